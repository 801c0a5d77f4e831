"""Run identity vectors through `Check` the way Envoy calls it, on every transport.

A *channel* is how an identity reaches extauthz (Envoy's `source.principal`, the peer
certificate, an XFCC header from a trusted proxy, a JWT-SVID `sub`); a *transport* is how the
CheckRequest reaches it. Each transport is one entry of TRANSPORTS: the gRPC servicer is driven
in-process with real CheckRequest protobufs (the object grpc hands it); an HTTP transport is
added by writing one class with the same `check` and listing it there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.auth.v3 import external_auth_pb2 as ea
from jwt.algorithms import ECAlgorithm

from extauthz.app import App, build_app
from extauthz.identity.xfcc import certificate_sha256
from extauthz.settings import Settings
from extauthz.transport.grpc_proto import REASON_HEADER
from extauthz.transport.grpc_server import AuthorizationServicer, response_options
from extauthz.transport.http import HttpTransport as HttpServer
from tests.conformance.envoy_model import url_encoded_pem, xfcc_element

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
HOST = "svc.conformance.test"
PROXY_TD = "edge.conformance.test"
PROXY = f"spiffe://{PROXY_TD}/ns/edge/sa/gateway"
XFCC = "x-forwarded-client-cert"
ANY_PATH = "/any/x"  # rule allowing "*"
TD_PATH = "/td/x"  # rule allowing spiffe://<td>/** for every trust domain under test
KID = "k1"

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
JWT_KEY = ec.generate_private_key(ec.SECP256R1())

EKU_OIDS = {"serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
            "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
            "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING}
KEY_USAGE_BITS = ("digital_signature", "content_commitment", "key_encipherment",
                  "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign")


def key_usage(bits: Sequence[str]) -> x509.KeyUsage:
    unknown = set(bits) - set(KEY_USAGE_BITS)
    assert not unknown, unknown
    return x509.KeyUsage(**{b: b in bits for b in KEY_USAGE_BITS},
                         encipher_only=False, decipher_only=False)


def make_cert(
    uris: Sequence[str] = (),
    *,
    dns: Sequence[str] = (),
    ku: Sequence[str] | None = ("digital_signature",),
    ku_critical: bool = True,
    ca: bool | None = False,
    eku: Sequence[str] | None = None,
    not_before: float = NOW - 3600,
    not_after: float = NOW + 3600,
    subject: x509.Name | None = None,
    san_critical: bool = False,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> x509.Certificate:
    """A leaf signed by a test CA (Envoy verified the chain before extauthz sees it)."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")])
                      if subject is None else subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conformance CA")]))
        .public_key((key or _LEAF_KEY).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=san_critical)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if ku is not None:
        builder = builder.add_extension(key_usage(ku), critical=ku_critical)
    if eku is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([EKU_OIDS[name] for name in eku]), critical=False)
    return builder.sign(_CA_KEY, hashes.SHA256())


# Valid for the whole century: vectors are checked at the time their certificates were valid.
PROXY_CERT = make_cert((PROXY,), not_before=dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp(),
                       not_after=dt.datetime(2099, 1, 1, tzinfo=dt.UTC).timestamp())


def jwt_svid(sub: str, issuer: str, **claims: Any) -> str:
    body = {"iss": issuer, "sub": sub, "aud": ["conformance"], "exp": NOW + 300, "iat": NOW,
            **claims}
    return jwt.encode(body, JWT_KEY, algorithm="ES256", headers={"kid": KID, "typ": "JWT"})


def issuer_for(trust_domain: str) -> str:
    return f"https://issuer.conformance.test/{trust_domain}"


# -- what a check is and what came back -------------------------------------------------------


@dataclass(frozen=True)
class Call:
    principal: str = ""
    certificate: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str = ANY_PATH
    method: str = "GET"
    host: str = HOST
    # HTTP transport only: the sidecar's own XFCC element, verbatim (else built from
    # principal/certificate as Envoy writes it).
    sidecar_xfcc: str | None = None


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    principal: str = ""  # who was allowed (the principal header on an allow)
    challenge: str = ""  # www-authenticate on a 401

    @property
    def allowed(self) -> bool:
        return self.status == 200


class Transport(Protocol):
    name: str

    def cannot_carry(self, call: Call) -> str:
        """Why this transport cannot express `call` ("" when it can)."""
        ...

    def check(self, call: Call) -> Answer: ...

    def close(self) -> None: ...


class GrpcTransport:
    """The gRPC servicer, called as grpc calls it, with a real CheckRequest."""

    name = "grpc"

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = AuthorizationServicer(app, response_options(app.settings))
        self._loop = loop

    def cannot_carry(self, call: Call) -> str:
        if call.sidecar_xfcc is not None:
            return "over gRPC the peer comes from the TLS connection, not a sidecar header"
        return ""

    def close(self) -> None:
        """Nothing to release: the servicer is called in-process."""

    def check(self, call: Call) -> Answer:
        request = ea.CheckRequest()
        attrs = request.attributes
        attrs.source.principal = call.principal
        attrs.source.certificate = call.certificate
        http = attrs.request.http
        http.method, http.host, http.path = call.method, call.host, call.path
        for name, value in call.headers.items():
            http.headers[name] = value
        response = self._loop.run_until_complete(self._servicer.Check(request, None))
        if response.HasField("ok_response"):
            sent = {h.header.key: h.header.value for h in response.ok_response.headers}
            return Answer(200, "allowed", principal=sent.get("x-extauthz-principal", ""))
        denied = response.denied_response
        sent = {h.header.key: h.header.value for h in denied.headers}
        return Answer(
            denied.status.code, sent.get(REASON_HEADER, ""),
            challenge=sent.get("www-authenticate", ""),
        )


SIDECAR = "spiffe://svc.conformance.test/ns/svc/sa/sidecar"
_NO_CERT_HASH = "0f" * 32


class HttpTransport:
    """The HTTP transport (transport/http.py) on a uvloop thread, over a loopback socket.

    Envoy's http_service sends no `source.principal`/`source.certificate`: the local sidecar
    states the verified peer in its own single XFCC element (SANITIZE_SET), which is what
    this adapter writes from the call's principal and certificate, exactly as Envoy would.
    A call that already carries an XFCC header (a gateway's element) cannot be expressed: the
    sidecar replaces it."""

    name = "http"

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        del loop  # this transport runs on its own loop
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = HttpServer(app)
        bound = asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(30)
        host, _, port = bound[0].removeprefix("http://").rpartition(":")
        self._address = (host, int(port))
        self._sock: socket.socket | None = None

    def cannot_carry(self, call: Call) -> str:
        if XFCC in call.headers:
            return "the sidecar's own XFCC element replaces a forwarded one (SANITIZE_SET)"
        texts = [call.principal, call.sidecar_xfcc or "", *call.headers.values()]
        if any(ch in "\r\n\x00" or ord(ch) < 0x20 or ord(ch) == 0x7F
               for text in texts for ch in text if ch != "\t"):
            return "Envoy never sends control characters in a header value"
        return ""

    def _element(self, call: Call) -> str:
        if call.certificate:
            digest = certificate_sha256(call.certificate)
            return (f"By={SIDECAR};Hash={digest};Cert=\"{call.certificate}\";"
                    f"URI={call.principal}")
        return f"By={SIDECAR};Hash={_NO_CERT_HASH};URI={call.principal}"

    def check(self, call: Call) -> Answer:
        assert not self.cannot_carry(call), self.cannot_carry(call)
        lines = [f"{call.method} {call.path} HTTP/1.1", f"host: {call.host}", "content-length: 0"]
        if call.sidecar_xfcc is not None:
            lines.append(f"{XFCC}: {call.sidecar_xfcc}")
        elif call.principal or call.certificate:
            lines.append(f"{XFCC}: {self._element(call)}")
        lines += [f"{k}: {v}" for k, v in call.headers.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        status, headers = self._exchange(raw)
        if status == 200:
            return Answer(200, "allowed", principal=headers.get("principal", ""))
        return Answer(status, headers.get(REASON_HEADER, ""),
                      challenge=headers.get("www-authenticate", ""))

    def _exchange(self, raw: bytes) -> tuple[int, dict[str, str]]:
        for attempt in (1, 2):
            if self._sock is None:
                self._sock = socket.create_connection(self._address, timeout=10)
            try:
                self._sock.sendall(raw)
                return self._read_reply(self._sock)
            except (ConnectionError, OSError):
                self._sock.close()
                self._sock = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _read_reply(self, sock: socket.socket) -> tuple[int, dict[str, str]]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a reply")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        if headers.get("connection") == "close":
            sock.close()
            self._sock = None
        return int(lines[0].split(" ")[1]), headers

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        asyncio.run_coroutine_threadsafe(self._server.stop(1.0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# One line per transport.
TRANSPORTS: dict[str, Callable[[App, asyncio.AbstractEventLoop], Transport]] = {
    "grpc": GrpcTransport,
    "http": HttpTransport,
}


# -- the application under test ----------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_policy(directory: Path, trust_domains: Sequence[str], extra_rules: Sequence[dict[str, Any]] = ()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "apiVersion": "extauthz/v1", "owner": "conformance", "service": "svc", "hosts": [HOST],
        "rules": [
            {"name": "anyone", "path_prefix": "/any", "allow": ["*"]},
            {"name": "by-trust-domain", "path_prefix": "/td",
             "allow": [f"spiffe://{td}/**" for td in sorted(set(trust_domains))]},
            *extra_rules,
        ],
    }
    (directory / "policy.yaml").write_text(json.dumps(document))


def write_jwks(path: Path) -> None:
    jwk = json.loads(ECAlgorithm.to_jwk(JWT_KEY.public_key()))
    jwk.update({"kid": KID, "use": "jwt-svid", "alg": "ES256"})
    path.write_text(json.dumps({"keys": [jwk]}))


@dataclass
class Harness:
    app: App
    clock: Clock
    transport: Transport

    def check(self, call: Call) -> Answer:
        return self.transport.check(call)


def build_harness(
    tmp: Path,
    transport: str,
    *,
    trust_domains: Sequence[str] = (),
    jwt_trust_domains: Sequence[str] = (),
    identity: Mapping[str, Any] | None = None,
    extra_rules: Sequence[dict[str, Any]] = (),
    issuer_options: Mapping[str, Any] | None = None,
) -> Iterator[Harness]:
    """A real App from `build_app` (policy store, resolver, JWKS caches loaded from a file,
    decision cache, servicer) with a controllable clock. A generator: use with `yield from`
    in a fixture so the JWKS refreshers are stopped."""
    write_policy(tmp / "policy", [*trust_domains, PROXY_TD], extra_rules)
    jwks = tmp / "jwks.json"
    write_jwks(jwks)
    section: dict[str, Any] = dict(identity or {})
    section.setdefault("trusted_proxies", [PROXY])
    if jwt_trust_domains:
        section.setdefault("jwt", {})["issuers"] = [
            {"issuer": issuer_for(td), "audiences": ["conformance"], "jwt_svid": True,
             "trust_domain": td, "jwks_file": str(jwks), **(issuer_options or {})}
            for td in sorted(set(jwt_trust_domains))
        ]
    clock = Clock()
    app = build_app(Settings(policy=tmp / "policy", identity=section, decision_log="none",
                             tracing=False, listen=(), http_listen=("127.0.0.1:0",)),
                    clock=clock)
    assert app.store.reload(), "conformance policy did not load"
    for cache in app.keys.caches:
        assert cache.refresh(), "conformance JWKS did not load"
    loop = asyncio.new_event_loop()
    edge = TRANSPORTS[transport](app, loop)
    try:
        yield Harness(app, clock, edge)
    finally:
        edge.close()
        app.keys.stop()
        loop.close()


# -- the four channels ---------------------------------------------------------------------------


def via_principal(sid: str, path: str = ANY_PATH) -> Call:
    """Envoy's `source.principal` alone (no include_peer_certificate)."""
    return Call(principal=sid, path=path)


def via_peer_certificate(sid: str, path: str = ANY_PATH) -> Call | None:
    """The peer's certificate with `sid` as its only URI SAN, and Envoy's principal for it.
    None when no certificate can carry `sid` (a URI SAN is an IA5String: ASCII only)."""
    cert = leaf_for(sid)
    if cert is None:
        return None
    return Call(principal=sid, certificate=url_encoded_pem(cert), path=path)


def via_xfcc(sid: str, path: str = ANY_PATH) -> Call:
    """A trusted proxy (mTLS peer PROXY) forwarding the client's certificate as Envoy writes
    it with SANITIZE_SET and cert/subject/uri details; when no certificate can carry `sid`,
    the element Envoy would write for such a SAN without Cert=."""
    cert = leaf_for(sid)
    if cert is not None:
        element = xfcc_element(by=[PROXY], cert=cert, include_cert=True, subject=True)
    else:
        element = xfcc_element(by=[PROXY], digest="ab" * 32, uri_sans=[sid])
    return Call(principal=PROXY, certificate=url_encoded_pem(PROXY_CERT),
                headers={XFCC: element}, path=path)


def via_jwt_svid(sid: str, issuer_td: str, path: str = ANY_PATH) -> Call:
    """A JWT-SVID whose `sub` is `sid`, signed by the issuer of `issuer_td`, through a hop."""
    token = jwt_svid(sid, issuer_for(issuer_td))
    return Call(principal=PROXY, certificate=url_encoded_pem(PROXY_CERT),
                headers={"authorization": f"Bearer {token}"}, path=path)


_LEAVES: dict[str, x509.Certificate | None] = {}


def leaf_for(sid: str) -> x509.Certificate | None:
    if sid not in _LEAVES:
        try:
            _LEAVES[sid] = make_cert((sid,))
        except ValueError:  # cryptography refuses non-ASCII URI SANs
            _LEAVES[sid] = None
    return _LEAVES[sid]


CHANNELS = ("principal", "peer_certificate", "xfcc", "jwt_svid")
# The HTTP transport learns the peer only from its sidecar's own XFCC element, so a gateway's
# forwarded element cannot reach it (test_xfcc_vectors checks that a chain of them is refused).
CHANNELS_OF = {"grpc": CHANNELS, "http": ("principal", "peer_certificate", "jwt_svid")}
