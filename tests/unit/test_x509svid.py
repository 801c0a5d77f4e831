from __future__ import annotations

import datetime as dt
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extauthz.identity import x509svid
from extauthz.identity.x509svid import (
    CertCache,
    CertFacts,
    CertificateError,
    check_svid,
    parse_certificate,
)

ID = "spiffe://prod.example.org/ns/pay/sa/api"
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
_KEY = ec.generate_private_key(ec.SECP256R1())


def make_cert(
    uris: tuple[str, ...] = (ID,),
    *,
    dns: tuple[str, ...] = (),
    ca: bool | None = False,
    key_cert_sign: bool = False,
    key_usage: frozenset[str] | None = frozenset({"digital_signature"}),
    not_before: float = NOW - 3600,
    not_after: float = NOW + 3600,
) -> str:
    """A URL-encoded PEM leaf, as Envoy forwards it in attributes.source.certificate."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if key_usage is not None:
        bits = set(key_usage) | ({"key_cert_sign"} if key_cert_sign else set())
        builder = builder.add_extension(key_usage_of(bits), critical=True)
    cert = builder.sign(_KEY, hashes.SHA256())
    return quote(cert.public_bytes(serialization.Encoding.PEM).decode())


KEY_USAGE_BITS = ("digital_signature", "content_commitment", "key_encipherment",
                  "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign")


def key_usage_of(bits: set[str] | frozenset[str]) -> x509.KeyUsage:
    assert bits <= set(KEY_USAGE_BITS), bits
    return x509.KeyUsage(**{b: b in bits for b in KEY_USAGE_BITS},
                         encipher_only=False, decipher_only=False)


def verify(encoded: str, principal: str = ID, now: float = NOW) -> str:
    return str(check_svid(parse_certificate(encoded), principal, now))


# -- bad paths ----------------------------------------------------------------------------


def test_ca_certificate_is_not_a_leaf() -> None:
    with pytest.raises(CertificateError, match="CA certificate"):
        verify(make_cert(ca=True))


def test_key_cert_sign_is_not_a_leaf() -> None:
    with pytest.raises(CertificateError, match="keyCertSign/cRLSign"):
        verify(make_cert(ca=None, key_cert_sign=True))


def test_crl_sign_is_not_a_leaf() -> None:
    # X509-SVID §4.3: a leaf MUST NOT set cRLSign, even with digitalSignature and cA false.
    with pytest.raises(CertificateError, match="keyCertSign/cRLSign"):
        verify(make_cert(key_usage=frozenset({"digital_signature", "crl_sign"})))


def test_missing_key_usage_extension_is_not_an_svid() -> None:
    # §4.3: the extension MUST be present; a certificate without one is usable for anything.
    with pytest.raises(CertificateError, match="no key usage extension"):
        verify(make_cert(key_usage=None))


@pytest.mark.parametrize("bits", [{"key_encipherment"}, {"key_agreement"}, set()])
def test_leaf_without_digital_signature_is_rejected(bits: set[str]) -> None:
    with pytest.raises(CertificateError, match="digitalSignature"):
        verify(make_cert(key_usage=frozenset(bits)))


def test_leaf_with_extra_allowed_key_usages_is_accepted() -> None:
    # §4.3 allows keyEncipherment and keyAgreement next to digitalSignature (go-spiffe's own
    # testdata leaves carry exactly these three).
    bits = frozenset({"digital_signature", "key_encipherment", "key_agreement"})
    assert verify(make_cert(key_usage=bits)) == ID


@pytest.mark.parametrize("uri", ["spiffe://prod.example.org", "spiffe://prod.example.org/"])
def test_leaf_id_without_a_path_is_not_a_workload(uri: str) -> None:
    # X509-SVID §5.2: validators MUST reject a leaf whose SPIFFE ID has no (non-root) path.
    with pytest.raises(CertificateError, match="not a SPIFFE ID of a workload"):
        verify(make_cert((uri,)), principal=uri)


def test_key_usage_must_be_critical() -> None:
    from tests.conformance.envoy_model import url_encoded_pem
    from tests.conformance.harness import make_cert as leaf

    with pytest.raises(CertificateError, match="not critical"):
        verify(url_encoded_pem(leaf((ID,), ku_critical=False, not_before=NOW - 60)))


@pytest.mark.parametrize("eku", [("serverAuth",), ("clientAuth",), ("codeSigning",)])
def test_extended_key_usage_when_present_needs_server_and_client_auth(eku: tuple[str]) -> None:
    from tests.conformance.envoy_model import url_encoded_pem
    from tests.conformance.harness import make_cert as leaf

    with pytest.raises(CertificateError, match="serverAuth or clientAuth"):
        verify(url_encoded_pem(leaf((ID,), eku=eku, not_before=NOW - 60)))
    both = leaf((ID,), eku=("clientAuth", "serverAuth"), not_before=NOW - 60)
    assert verify(url_encoded_pem(both)) == ID


def test_empty_subject_needs_a_critical_san() -> None:
    from tests.conformance.envoy_model import url_encoded_pem
    from tests.conformance.harness import make_cert as leaf

    empty = x509.Name([])
    with pytest.raises(CertificateError, match="empty subject"):
        verify(url_encoded_pem(leaf((ID,), subject=empty, not_before=NOW - 60)))
    ok = leaf((ID,), subject=empty, san_critical=True, not_before=NOW - 60)
    assert verify(url_encoded_pem(ok)) == ID


def test_facts_carry_the_der_sha256() -> None:
    enc = make_cert()
    from urllib.parse import unquote

    der = x509.load_pem_x509_certificate(unquote(enc).encode()).public_bytes(
        serialization.Encoding.DER)
    import hashlib

    assert parse_certificate(enc).sha256 == hashlib.sha256(der).hexdigest()


def test_two_uri_sans() -> None:
    with pytest.raises(CertificateError, match="exactly one URI SAN, has 2"):
        verify(make_cert((ID, "spiffe://prod.example.org/ns/admin")))


def test_no_uri_san_dns_only() -> None:
    # Envoy would report the DNS SAN as principal: never a workload identity.
    with pytest.raises(CertificateError, match="has 0"):
        verify(make_cert((), dns=("api.example.org",)), principal="api.example.org")


def test_uri_san_differs_from_principal() -> None:
    with pytest.raises(CertificateError, match="differs"):
        verify(make_cert(), principal="spiffe://prod.example.org/ns/pay/sa/admin")


def test_uri_san_not_spiffe() -> None:
    uri = "https://prod.example.org/api"
    with pytest.raises(CertificateError, match="not a SPIFFE ID"):
        verify(make_cert((uri,)), principal=uri)


def test_uri_san_lenient_spiffe_form_rejected() -> None:
    uri = "spiffe://prod.example.org/ns/pay/../admin"
    with pytest.raises(CertificateError, match="not a SPIFFE ID"):
        verify(make_cert((uri,)), principal=uri)


def test_expired_at_now() -> None:
    enc = make_cert(not_after=NOW - 1)
    with pytest.raises(CertificateError, match="expired"):
        verify(enc)
    with pytest.raises(CertificateError, match="expired"):
        verify(make_cert(not_after=NOW + 10), now=NOW + 10)


def test_not_yet_valid() -> None:
    with pytest.raises(CertificateError, match="not yet valid"):
        verify(make_cert(not_before=NOW + 60))


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        "%ff%fe",  # not UTF-8 once decoded
    ],
)
def test_unparseable(encoded: str) -> None:
    with pytest.raises(CertificateError):
        parse_certificate(encoded)


def test_two_pem_blocks_rejected() -> None:
    one = make_cert()
    with pytest.raises(CertificateError, match="exactly one PEM"):
        parse_certificate(one + make_cert(("spiffe://prod.example.org/ns/admin",)))


def test_oversized_rejected_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(x509svid, "MAX_ENCODED_CERT_LENGTH", 100)
    with pytest.raises(CertificateError, match="too large"):
        parse_certificate(make_cert())
    with pytest.raises(CertificateError, match="too large"):
        CertCache().facts(make_cert())


# -- good paths and the cache -------------------------------------------------------------


def test_valid_leaf() -> None:
    facts = parse_certificate(make_cert())
    assert facts.uri_sans == (ID,)
    assert facts.not_after == NOW + 3600
    assert verify(make_cert()) == ID
    assert verify(make_cert(ca=None)) == ID  # BasicConstraints absent is a leaf too


def test_cache_parses_once_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = x509svid.parse_certificate

    def counting(encoded: str) -> CertFacts:
        calls.append(encoded)
        return real(encoded)

    monkeypatch.setattr(x509svid, "parse_certificate", counting)
    cache = CertCache(maxsize=2)
    a, b, c = make_cert(), make_cert(), make_cert()
    assert cache.facts(a) is cache.facts(a)
    assert len(calls) == 1
    cache.facts(b)
    cache.facts(c)
    assert len(cache) == 2
    cache.facts(a)  # evicted, parsed again
    assert len(calls) == 4


def test_cache_remembers_failures_and_not_time_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = x509svid.parse_certificate

    def counting(encoded: str) -> CertFacts:
        calls.append(encoded)
        return real(encoded)

    monkeypatch.setattr(x509svid, "parse_certificate", counting)
    cache = CertCache()
    for _ in range(3):
        with pytest.raises(CertificateError):
            cache.facts("garbage")
    assert len(calls) == 1
    enc = make_cert(not_after=NOW + 10)
    assert str(check_svid(cache.facts(enc), ID, NOW)) == ID
    with pytest.raises(CertificateError, match="expired"):
        check_svid(cache.facts(enc), ID, NOW + 11)  # the cache never hides expiry
