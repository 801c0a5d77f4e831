"""XFCC exactly as a real Envoy writes it, read by extauthz (issue 16).

The sidecar is configured to write every detail (`subject`, `cert`, `chain`, `uri`, `dns`) and
talks to extauthz over the HTTP transport, which reads the caller from that element. Clients
present certificates whose Subject holds RFC 2253 specials and non-ASCII, and whose SANs hold
`,` and `;` — what Envoy writes raw. What a real Envoy (BoringSSL) prints must match the model
the conformance suite builds headers with, and no SAN may turn into another identity.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from extauthz.devstack import stack as devstack
from extauthz.devstack.certs import Credential
from extauthz.devstack.stack import DevStack
from extauthz.identity.xfcc import parse_rfc2253, parse_xfcc
from tests.conformance.envoy_model import printed_entries, rfc2253

from .conftest import CHECKOUT, ORDERS, TRUST_DOMAIN, _require_envoy

pytestmark = pytest.mark.e2e

ADMIN = f"spiffe://{TRUST_DOMAIN}/ns/ops/sa/admin"
ALL_DETAILS = ("set_current_client_cert_details:\n"
               "            subject: true\n            cert: true\n            chain: true\n"
               "            uri: true\n            dns: true")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, policy_dir: Path) -> Iterator[DevStack]:
    _require_envoy()
    render = devstack.render_yaml

    def every_detail(*args: Any, **kwargs: Any) -> str:
        text = render(*args, **kwargs)
        only_uri = "set_current_client_cert_details:\n            uri: true"
        assert only_uri in text
        return text.replace(only_uri, ALL_DETAILS)

    stack = DevStack(policy_dir, trust_domain=TRUST_DOMAIN, authz_protocol="http",
                     workdir=tmp_path_factory.mktemp("xfcc-envoy"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(devstack, "render_yaml", every_detail)
        stack.start()
    try:
        yield stack
    finally:
        stack.stop()
    assert stack.exit_codes.get("envoy") == 0, stack.logs()


def client(stack: DevStack, uris: list[str], dns: list[str], subject: x509.Name) -> Credential:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    return stack.ca._issue_leaf(subject, x509.SubjectAlternativeName(names),
                                dt.timedelta(hours=1))


def test_real_envoy_subject_cert_and_dns_are_read_and_match_the_model(stack: DevStack) -> None:
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sue, Grabbit and Runn"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "日本"),
        x509.NameAttribute(NameOID.COMMON_NAME, 'Noël "the" +admin; <x>=y\\z'),
    ])
    cred = client(stack, [CHECKOUT], ["checkout.demo.local", "alt.demo.local"], subject)
    resp = stack.call(cred, "GET", ORDERS, "/v1/orders/xfcc-details")
    assert resp.status == 200, (resp, stack.logs())
    seen = [r for r in stack.upstream.requests if r.path == "/v1/orders/xfcc-details"][-1]
    assert seen.headers["x-extauthz-principal"] == CHECKOUT
    (element,) = parse_xfcc(seen.headers["x-forwarded-client-cert"])
    cert = x509.load_pem_x509_certificate(cred.cert_pem)
    # What BoringSSL printed is what the conformance model prints for the same certificate.
    assert element.get("subject") == rfc2253(cert.subject)
    assert parse_rfc2253(element.get("subject") or "") == tuple(
        tuple(rdn) for rdn in printed_entries(cert.subject))
    assert element.get("hash") == hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    assert unquote(element.get("cert") or "") == cert.public_bytes(Encoding.PEM).decode()
    assert (element.get("chain") or "").startswith(element.get("cert") or "-")
    assert element.values("uri") == (CHECKOUT,)
    assert element.values("dns") == ("checkout.demo.local", "alt.demo.local")


@pytest.mark.parametrize(("uri", "dns"), [
    (f"{CHECKOUT},URI={ADMIN}", []),  # a second element
    (f"{CHECKOUT};URI={ADMIN}", []),  # a second URI pair
    (f'{CHECKOUT};Subject="CN=x"', []),  # a pair out of Envoy's order
    (CHECKOUT, [f"x.demo.local;URI={ADMIN}"]),  # a DNS SAN adding a URI after DNS=
])
def test_real_envoy_writes_sans_raw_and_no_injection_becomes_an_identity(
        stack: DevStack, uri: str, dns: list[str]) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "injector")])
    cred = client(stack, [uri], dns, subject)
    resp = stack.call(cred, "GET", ORDERS, "/v1/orders/xfcc-injection")
    assert resp.status == 401, (resp, stack.logs())
    assert resp.headers.get("x-extauthz-reason") == "invalid_identity"
