from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from extauthz.sources.jwks import (
    JwksCache,
    JwksError,
    discovery_fetcher,
    file_fetcher,
    https_fetcher,
    parse_jwks,
)

from .conftest import Clock


def jwk(kid: str | None, **extra: Any) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    data: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key))
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def doc(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


class Fetcher:
    def __init__(self, body: bytes) -> None:
        self.body: bytes | Exception = body
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        if isinstance(self.body, Exception):
            raise self.body
        return self.body


def make_cache(body: bytes, **kw: float) -> tuple[JwksCache, Fetcher, Clock]:
    fetch, clock = Fetcher(body), Clock(1000.0)
    opts = {"refresh_interval": 300.0, "cooldown": 30.0, "negative_ttl": 120.0, "stale_ttl": 3600.0}
    opts.update(kw)
    return JwksCache(fetch, clock=clock, **opts), fetch, clock


# -- parsing --------------------------------------------------------------------------------


def test_parse_drops_ambiguous_private_and_non_signing_keys() -> None:
    private = jwk("priv", d="AAAA")
    keys = parse_jwks(
        doc(jwk("a"), jwk("dup"), jwk("dup"), private, jwk("enc", use="enc"),
            jwk("x509", use="x509-svid"), jwk("svid", use="jwt-svid"), {"kty": "nope"}, "junk")
    )  # fmt: skip
    assert set(keys) == {"a", "svid"}
    assert keys["a"].kty == "EC" and keys["a"].crv == "P-256"


def test_kidless_key_only_when_alone() -> None:
    assert set(parse_jwks(doc(jwk(None)))) == {None}
    assert set(parse_jwks(doc(jwk(None), jwk("a")))) == {"a"}


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"keys": {}}', b"[" * 100_000, b" " * (300 * 1024)]
)
def test_parse_rejects_bad_documents(body: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(body)


def test_parse_rejects_too_many_keys() -> None:
    with pytest.raises(JwksError, match="more than 2"):
        parse_jwks(doc(jwk("a"), jwk("b"), jwk("c")), max_keys=2)


def test_https_only() -> None:
    with pytest.raises(JwksError, match="https"):
        https_fetcher("http://127.0.0.1/keys")


def test_file_fetcher(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(doc(jwk("a")))
    assert set(parse_jwks(file_fetcher(path)())) == {"a"}


# -- the cache: request path never fetches ------------------------------------------------


def test_not_ready_until_first_refresh() -> None:
    cache, fetch, _ = make_cache(doc(jwk("a")))
    assert not cache.ready
    assert cache.get_key("a") is None
    assert fetch.calls == 0  # get_key never does I/O
    assert cache.run_pending()
    assert cache.ready and cache.get_key("a") is not None


def test_unknown_kid_refetch_is_rate_limited_and_negative_cached() -> None:
    cache, fetch, clock = make_cache(doc(jwk("a")))
    cache.refresh()
    assert fetch.calls == 1
    assert cache.get_key("new") is None  # asks for a refetch, but only after the cooldown
    assert not cache.run_pending()
    clock.now += 30
    assert cache.run_pending()
    assert fetch.calls == 2
    # Still unknown after the refetch: negative-cached, no more refetches for it.
    for _ in range(100):
        assert cache.get_key("new") is None
        clock.now += 1
        cache.run_pending()
    assert fetch.calls == 2
    # A flood of made-up kids costs at most one fetch per cooldown.
    for i in range(900):
        cache.get_key(f"../../etc/passwd{i}")
        clock.now += 0.03
        cache.run_pending()
    assert fetch.calls == 3


def test_rotation_picks_up_a_new_kid() -> None:
    cache, fetch, clock = make_cache(doc(jwk("a")))
    cache.refresh()
    fetch.body = doc(jwk("a"), jwk("b"))
    assert cache.get_key("b") is None
    clock.now += 30
    cache.run_pending()
    assert cache.get_key("b") is not None
    fetch.body = doc(jwk("b"))
    clock.now += 300  # scheduled refresh drops the retired key
    assert cache.run_pending()
    assert cache.get_key("a") is None and cache.get_key("b") is not None


def test_stale_keys_kept_for_bounded_time_when_endpoint_fails() -> None:
    cache, fetch, clock = make_cache(doc(jwk("a")), retry_interval=10.0)
    cache.refresh()
    fetch.body = OSError("connection refused")
    clock.now += 300
    assert cache.run_pending() and "connection refused" in cache.last_error
    assert cache.get_key("a") is not None  # stale but kept
    clock.now += 10
    assert cache.run_pending()  # retried after retry_interval, not refresh_interval
    clock.now = 1000 + 3600 + 1
    assert cache.get_key("a") is None and not cache.ready  # past stale_ttl: fail closed
    fetch.body = doc(jwk("a"))
    cache.refresh()
    assert cache.get_key("a") is not None


def test_bad_document_keeps_previous_keys() -> None:
    cache, fetch, _ = make_cache(doc(jwk("a")))
    cache.refresh()
    fetch.body = b"<html>oops</html>"
    assert not cache.refresh()
    assert cache.get_key("a") is not None


def test_background_thread_start_stop() -> None:
    fetch = Fetcher(doc(jwk("a")))
    cache = JwksCache(fetch, refresh_interval=3600.0)
    loaded = threading.Event()
    real = cache.refresh

    def refresh() -> bool:
        ok = real()
        loaded.set()
        return ok

    cache.refresh = refresh  # type: ignore[method-assign]
    cache.start()
    try:
        assert loaded.wait(5)
        assert cache.get_key("a") is not None
    finally:
        cache.stop()
    assert cache._thread is None


# -- a real HTTPS endpoint on loopback ---------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Path]]:
    state: dict[str, Any] = {"status": 200, "body": doc(jwk("a")), "location": "", "routes": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.setdefault("paths", []).append(self.path)
            if self.path in state["routes"]:
                body = state["routes"][self.path]
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(state["status"])
            if state["location"]:
                self.send_header("Location", state["location"])
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: Any) -> None:
            pass

    cert_path, key_path = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/keys", state, cert_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_real_https_rotation_and_failure(https_server: tuple[str, dict[str, Any], Path]) -> None:
    url, state, cert_path = https_server
    ctx = ssl.create_default_context(cafile=str(cert_path))
    clock = Clock(1000.0)
    cache = JwksCache(https_fetcher(url, timeout=2, ssl_context=ctx), clock=clock, cooldown=30)
    assert cache.refresh() and cache.get_key("a") is not None
    state["body"] = doc(jwk("b"))
    clock.now += 300
    assert cache.run_pending()
    assert cache.get_key("b") is not None and cache.get_key("a") is None
    state["status"] = 500
    clock.now += 300
    assert cache.run_pending() and "500" in cache.last_error
    assert (cache.fetch_count, cache.fetch_failures) == (3, 1)
    assert cache.get_key("b") is not None  # stale keys kept
    state.update(status=302, location="https://127.0.0.1:1/evil", body=b"")
    assert not cache.refresh() and "302" in cache.last_error  # redirects are not followed


def test_real_https_untrusted_certificate_fails(
    https_server: tuple[str, dict[str, Any], Path],
) -> None:
    url, _, _ = https_server
    cache = JwksCache(https_fetcher(url, timeout=2))  # system trust store: self-signed fails
    assert not cache.refresh()
    assert "CERTIFICATE_VERIFY_FAILED" in cache.last_error or "certificate" in cache.last_error
    assert not cache.ready


def test_oidc_discovery(https_server: tuple[str, dict[str, Any], Path]) -> None:
    url, state, cert_path = https_server
    ctx = ssl.create_default_context(cafile=str(cert_path))
    issuer = url.removesuffix("/keys") + "/tenant"
    meta = {"issuer": issuer, "jwks_uri": url}
    state["routes"]["/tenant/.well-known/openid-configuration"] = json.dumps(meta).encode()
    cache = JwksCache(discovery_fetcher(issuer, timeout=2, ssl_context=ctx))
    assert cache.refresh() and cache.get_key("a") is not None
    assert state["paths"] == ["/tenant/.well-known/openid-configuration", "/keys"]
    bad = [
        ({**meta, "issuer": issuer + "/"}, "another issuer"),
        ({**meta, "jwks_uri": url.replace("https", "http")}, "https:// jwks_uri"),
        ({"issuer": issuer}, "https:// jwks_uri"),
    ]
    for document, message in bad:
        state["routes"]["/tenant/.well-known/openid-configuration"] = json.dumps(document).encode()
        assert not cache.refresh() and message in cache.last_error
        assert cache.get_key("a") is not None  # the last good keys keep serving
    state["routes"]["/tenant/.well-known/openid-configuration"] = b"[1]"
    assert not cache.refresh() and "not a JSON object" in cache.last_error
    with pytest.raises(JwksError, match="https"):
        discovery_fetcher("http://idp.example.org")
