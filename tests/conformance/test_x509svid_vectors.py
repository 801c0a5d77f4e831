"""X509-SVID leaf rules (X509-SVID.md, go-spiffe's verify tests and testdata) through `Check`:
as the mTLS peer's certificate and as the client certificate a trusted proxy forwards in XFCC.

Chain validation is Envoy's (the handshake); the vectors that concern it say so and are not
sent here — except go-spiffe's testdata files whose *intermediate* is wrong, whose leaf is
sent to show where the boundary is: the leaf alone is a valid SVID.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.conformance.envoy_model import url_encoded_pem, xfcc_element
from tests.conformance.harness import (
    CHANNELS_OF,
    NOW,
    PROXY,
    PROXY_CERT,
    TD_PATH,
    TRANSPORTS,
    XFCC,
    Call,
    Harness,
    build_harness,
    make_cert,
)
from tests.conformance.vectors import load

VECTORS: list[dict[str, Any]] = load("x509svid.json")["vectors"]
HERE = [v for v in VECTORS if v["applies"] == "extauthz"]
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


ALL = sorted(TRANSPORTS)
FORWARDING = [t for t in ALL if "xfcc" in CHANNELS_OF[t]]


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    yield from build_harness(tmp_path_factory.mktemp(f"x509-{request.param}"), request.param,
                             trust_domains=["example.org", "example..org", "domain1.test"])


def _subject(text: str) -> x509.Name:
    oids = {"O": NameOID.ORGANIZATION_NAME, "C": NameOID.COUNTRY_NAME}
    if not text:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(oids[k], v)
                      for k, v in (part.split("=", 1) for part in reversed(text.split(",")))])


def build(vector: dict[str, Any]) -> tuple[str, str, list[str], float]:
    """(URL-encoded PEM as Envoy forwards it, Envoy's principal for it, URI SANs, check time)."""
    if "leaf_pem" in vector:
        cert = x509.load_pem_x509_certificate(vector["leaf_pem"].encode())
        uris = list(vector["uri_sans"])
        dns = _dns(cert)
        return url_encoded_pem(cert), (uris or dns or [""])[0], uris, float(vector["at"])
    r = vector["recipe"]
    cert = make_cert(
        r["uris"], dns=r.get("dns", ()), ku=r["ku"], ku_critical=r["ku_critical"], ca=r["ca"],
        eku=r["eku"], subject=_subject(r["subject"]), san_critical=r["san_critical"],
        not_before=NOW + r["not_before"], not_after=NOW + r["not_after"],
        key=RSA_KEY if r.get("key") == "rsa2048" else None,
    )
    encoded = url_encoded_pem(cert)
    if r.get("corrupt_der"):
        der = bytearray(cert.public_bytes(Encoding.DER))
        der[0] = 0x27  # what go-spiffe's verify_test does to its raw leaf
        body = base64.encodebytes(bytes(der)).decode().replace("\n", "")
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
        encoded = pem.replace("\n", "%0A").replace("+", "%2B").replace("/", "%2F").replace(
            "=", "%3D").replace(" ", "%20")
    principal = (r["uris"] or r.get("dns") or [""])[0]
    return encoded, principal, list(r["uris"]), NOW


def _dns(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def expect(harness: Harness, vector: dict[str, Any], call: Call, at: float,
           want_principal: str) -> str | None:
    """None when the answer is what the vector says, else a description of the difference."""
    harness.clock.now = at
    try:
        answer = harness.check(call)
    finally:
        harness.clock.now = NOW
    if vector["extauthz"] == "accept":
        ok = answer.allowed and answer.principal == want_principal
    else:
        ok = answer.status == 401 and not answer.allowed
    return None if ok else f"{vector['case']}: {answer}"


def test_every_recorded_rule_is_decided_here_or_documented_as_envoys() -> None:
    for v in VECTORS:
        assert v["applies"] in ("extauthz", "envoy"), v["case"]
        if v["applies"] == "envoy":
            assert v.get("why_not_here"), v["case"]
        else:
            assert v["extauthz"] in ("accept", "reject"), v["case"]
            # extauthz never accepts what the specification rejects.
            assert not (v["extauthz"] == "accept" and not v["valid"]), v["case"]
    assert len(HERE) >= 45


@pytest.mark.parametrize("harness", ALL, indirect=True)
def test_leaf_rules_as_the_peer_certificate(harness: Harness) -> None:
    wrong = []
    for v in HERE:
        if v.get("recipe", {}).get("no_certificate"):
            call = Call(path=TD_PATH)  # no client certificate: Envoy reports no principal
            want = ""
        else:
            encoded, principal, uris, at = build(v)
            call = Call(principal=principal, certificate=encoded, path=TD_PATH)
            want = uris[0] if uris else ""
        problem = expect(harness, v, call, at if "leaf_pem" in v else NOW, want)
        if problem:
            wrong.append(problem)
    assert wrong == []


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_leaf_rules_as_the_certificate_a_trusted_proxy_forwards(harness: Harness) -> None:
    wrong = []
    for v in HERE:
        if v.get("recipe", {}).get("no_certificate"):
            continue  # Envoy removes XFCC when the client presented no certificate
        encoded, _, uris, at = build(v)
        cert_hash = _hash_of(encoded)
        element = xfcc_element(by=[PROXY], digest=cert_hash, uri_sans=uris)
        # Cert= goes between Hash= and URI=, exactly as Envoy orders them.
        head, _, tail = element.partition(";URI=")
        element = f'{head};Cert="{encoded}";URI={tail}'
        call = Call(principal=PROXY, certificate=url_encoded_pem(PROXY_CERT),
                    headers={XFCC: element}, path=TD_PATH)
        problem = expect(harness, v, call, at, uris[0] if uris else "")
        if problem:
            wrong.append(problem)
    assert wrong == []


def _hash_of(encoded: str) -> str:
    try:
        cert = x509.load_pem_x509_certificate(unquote(encoded).encode())
        return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    except ValueError:  # the corrupted certificate: any well-formed digest
        return "00" * 32


def test_go_spiffe_testdata_leaves_are_checked_inside_their_validity() -> None:
    testdata = [v for v in VECTORS if "leaf_pem" in v]
    assert len(testdata) >= 8
    for v in testdata:
        cert = x509.load_pem_x509_certificate(v["leaf_pem"].encode())
        assert cert.not_valid_before_utc.timestamp() < v["at"] < cert.not_valid_after_utc.timestamp()
        assert dt.datetime.fromtimestamp(v["at"], dt.UTC).year >= 2020
