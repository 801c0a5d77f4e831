"""End to end through a real Envoy with real mTLS: caller -> Envoy -> extauthz -> upstream."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from extauthz.devstack.certs import CertificateAuthority, Credential
from extauthz.devstack.stack import DevStack, TlsRefusedError, call
from extauthz.devstack.upstream import SeenRequest

REASON = "x-extauthz-reason"
PRINCIPAL = "x-extauthz-principal"
ORDERS = "orders.demo.local"  # as in conftest.TEST_POLICY
CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"


def _unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def _seen(stack: DevStack, path: str) -> list[SeenRequest]:
    return [r for r in stack.upstream.requests if r.path == path]


# -- through Envoy --------------------------------------------------------------------------


@pytest.mark.e2e
def test_allowed_request_reaches_upstream(stack: DevStack, checkout: Credential) -> None:
    path = _unique("/v1/orders")
    resp = call(stack, checkout, "GET", ORDERS, path)
    assert resp.status == 200, (resp, stack.logs())
    echo = resp.json()
    assert echo["path"] == path and echo["method"] == "GET"
    [seen] = _seen(stack, path)
    # Envoy set XFCC from the verified certificate (SANITIZE_SET, uri only).
    assert f"URI={CHECKOUT}" in seen.headers.get("x-forwarded-client-cert", "")
    if PRINCIPAL in seen.headers:  # the server's --principal-header (on by default)
        assert seen.headers[PRINCIPAL] == CHECKOUT


@pytest.mark.e2e
def test_exact_path_rule_allows_post(stack: DevStack, checkout: Credential) -> None:
    resp = call(stack, checkout, "POST", ORDERS, "/v1/orders", body=b"{}")
    assert resp.status == 200, resp


@pytest.mark.e2e
def test_known_spiffe_id_without_matching_rule_is_403(
    stack: DevStack, stranger: Credential
) -> None:
    path = _unique("/v1/orders")
    resp = call(stack, stranger, "GET", ORDERS, path)
    assert resp.status == 403, resp
    assert resp.headers.get(REASON), resp.headers
    assert _seen(stack, path) == []


@pytest.mark.e2e
def test_method_without_rule_is_403(stack: DevStack, checkout: Credential) -> None:
    path = _unique("/v1/orders")
    resp = call(stack, checkout, "DELETE", ORDERS, path)
    assert resp.status == 403, resp
    assert _seen(stack, path) == []


@pytest.mark.e2e
def test_dns_san_only_certificate_is_401(stack: DevStack, dns_only: Credential) -> None:
    # The certificate chains to the trusted CA, so TLS succeeds; Envoy reports its DNS SAN as
    # the peer principal, which is not a SPIFFE ID: no workload identity -> 401.
    path = _unique("/v1/orders")
    resp = call(stack, dns_only, "GET", ORDERS, path)
    assert resp.status == 401, resp
    assert resp.headers.get(REASON), resp.headers
    assert _seen(stack, path) == []


@pytest.mark.e2e
def test_no_client_certificate_is_refused_at_tls(stack: DevStack) -> None:
    with pytest.raises(TlsRefusedError):
        call(stack, None, "GET", ORDERS, "/v1/orders")


@pytest.mark.e2e
def test_certificate_from_foreign_ca_is_refused_at_tls(
    stack: DevStack, foreign_checkout: Credential
) -> None:
    with pytest.raises(TlsRefusedError):
        call(stack, foreign_checkout, "GET", ORDERS, "/v1/orders")


@pytest.mark.e2e
@pytest.mark.parametrize("forged", [CHECKOUT, "spiffe://demo.local/ns/admin/sa/root"])
def test_caller_supplied_principal_header_never_reaches_upstream(
    stack: DevStack, checkout: Credential, forged: str
) -> None:
    path = _unique("/v1/orders")
    resp = call(stack, checkout, "GET", ORDERS, path, headers={PRINCIPAL: forged + "-forged"})
    assert resp.status == 200, resp
    [seen] = _seen(stack, path)
    # Only extauthz's own value (the verified principal) may arrive, never the caller's.
    assert seen.headers.get(PRINCIPAL) in (None, CHECKOUT)


@pytest.mark.e2e
def test_dot_segments_are_normalized_before_authorization(
    stack: DevStack, checkout: Credential
) -> None:
    # /v1/orders/../admin is /v1/admin: no rule allows it, whatever the raw prefix says.
    resp = call(stack, checkout, "GET", ORDERS, "/v1/orders/../admin")
    assert resp.status == 403, resp
    assert not [r for r in stack.upstream.requests if "admin" in r.path]


@pytest.mark.e2e
def test_escaped_slashes_are_rejected_by_envoy(stack: DevStack, checkout: Credential) -> None:
    resp = call(stack, checkout, "GET", ORDERS, "/v1/orders%2F..%2Fadmin")
    assert resp.status == 400, resp
    assert REASON not in resp.headers  # Envoy answered; extauthz was never asked


@pytest.mark.e2e
def test_rate_limited_principal_gets_429(stack: DevStack, exporter: Credential) -> None:
    statuses = [call(stack, exporter, "GET", ORDERS, "/v1/export").status for _ in range(4)]
    assert statuses[0] == 200, statuses
    assert 429 in statuses, statuses


@pytest.mark.e2e
def test_access_log_records_the_authorized_principal(stack: DevStack, checkout: Credential) -> None:
    path = _unique("/v1/orders")
    assert call(stack, checkout, "GET", ORDERS, path).status == 200
    deadline = time.monotonic() + 5  # Envoy flushes file access logs about once a second
    entries: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        entries = [e for e in stack.access_log() if e.get("path") == path]
        if entries:
            break
        time.sleep(0.1)
    assert entries, stack.access_log()[-5:]
    assert entries[0]["status"] == 200
    assert entries[0]["peer_uri_san"] == CHECKOUT
    assert entries[0]["principal"] == CHECKOUT  # ext_authz dynamic metadata


@pytest.mark.e2e
def test_extauthz_over_unix_socket_and_fail_closed(
    tmp_path_factory: pytest.TempPathFactory, policy_dir: Path
) -> None:
    with DevStack(
        policy_dir, extauthz_transport="unix", workdir=tmp_path_factory.mktemp("unix")
    ) as s:
        assert s.extauthz_target.startswith("unix:/")
        svid = s.issue_svid(CHECKOUT)
        assert call(s, svid, "GET", ORDERS, "/v1/orders").status == 200
        assert call(s, s.issue_svid(CHECKOUT + "x"), "GET", ORDERS, "/v1/orders").status == 403
        # extauthz gone: Envoy fails closed with 503 (not 401/403, and never a 200).
        assert s.stop_process("extauthz") == 0, s.logs()
        path = _unique("/v1/orders")
        resp = call(s, svid, "GET", ORDERS, path)
        assert resp.status == 503, resp
        assert _seen(s, path) == []
    assert s.exit_codes == {"envoy": 0, "extauthz": 0}, s.logs()


# -- the credentials themselves (no processes) ---------------------------------------------


def test_svid_shape() -> None:
    ca = CertificateAuthority.create("demo.local")
    cert = ca.issue_svid(CHECKOUT).certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CHECKOUT]
    assert san.get_values_for_type(x509.DNSName) == []
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 2 * 3600
    ca_key = ca.cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    signature_algorithm = ec.ECDSA(cert.signature_hash_algorithm)
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, signature_algorithm)


def test_svid_rejects_bad_ids() -> None:
    ca = CertificateAuthority.create("demo.local")
    for bad in ("spiffe://demo.local", "spiffe://other.local/x", "https://demo.local/x"):
        with pytest.raises(ValueError):
            ca.issue_svid(bad)


def test_ca_and_server_cert_shape() -> None:
    ca = CertificateAuthority.create("demo.local")
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    server = ca.issue_server_cert()
    assert "*.demo.local" in server.dns_sans and "localhost" in server.dns_sans
    assert server.uri_sans == []
    legacy = ca.issue_dns_only("legacy.demo.local")
    assert legacy.dns_sans == ["legacy.demo.local"] and legacy.uri_sans == []
