"""Identity through real Envoy: forged XFCC ignored, JWT-SVIDs, revocation, JWKS rotation.

A second stack runs extauthz with an identity config: one JWT-SVID issuer whose keys come
from a real local HTTPS JWKS server (trusted through SSL_CERT_FILE, as an operator with a
private CA would), a trusted proxy, a revocation file, and fast policy/revocation polling.

Its Envoy forwards the caller's `x-forwarded-client-cert` unchanged (`FORWARD_ONLY`, what a
service behind a trusted gateway needs, see docs/identity.md) instead of the generated
config's `SANITIZE_SET`: otherwise Envoy itself would strip a forged header and these tests
could not tell whether extauthz ignores it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extauthz.devstack import stack as devstack
from extauthz.devstack.certs import CertificateAuthority, write_pem
from extauthz.devstack.stack import DevStack

from .conftest import CHECKOUT, ORDERS, STRANGER, TEST_POLICY, TRUST_DOMAIN

pytestmark = pytest.mark.e2e

ISSUER = "https://oidc.demo.local"
AUDIENCE = "orders"
GATEWAY = "spiffe://demo.local/ns/ingress/sa/gateway"
ADMIN = "spiffe://demo.local/ns/ops/sa/admin"
XFCC = "x-forwarded-client-cert"


class Jwks:
    """A JWKS endpoint whose keys and health the test controls."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.failing = False
        self.fetches = 0

    def add_key(self) -> str:
        kid = uuid.uuid4().hex[:12]
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        return kid

    def document(self) -> bytes:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return json.dumps({"keys": keys}).encode()

    def token(self, kid: str, sub: str = CHECKOUT, lifetime: int = 300, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode(payload, self.keys[kid], algorithm="ES256", headers={"kid": kid, "typ": "JWT"})


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Jwks, str, Path]]:
    state = Jwks()
    ca = CertificateAuthority.create("jwks.test")
    certs = tmp_path_factory.mktemp("jwks-certs")
    paths = write_pem(certs, "jwks", ca.issue_server_cert(["localhost"], ["127.0.0.1"]))
    ca_file = certs / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            if state.failing:
                self.send_error(500)
                return
            body = state.document()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.cert, paths.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"https://127.0.0.1:{server.server_address[1]}/keys", ca_file
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def id_stack(tmp_path_factory: pytest.TempPathFactory, jwks: tuple[Jwks, str, Path]) -> Iterator[tuple[DevStack, Path]]:
    state, url, ca_file = jwks
    state.add_key()
    work = tmp_path_factory.mktemp("id-stack")
    policy = work / "policy"
    policy.mkdir()
    (policy / "orders.yaml").write_text(TEST_POLICY + "  - name: admin\n    methods: [GET]\n"
                                        "    path_prefix: /v1/admin\n"
                                        f"    allow: [{ADMIN}]\n")
    revocations = work / "revoked.yaml"
    revocations.write_text("principals: []\n")
    config = work / "extauthz.yaml"
    config.write_text(json.dumps({
        "identity": {
            "trust_domains": [TRUST_DOMAIN],
            "require_peer_certificate": True,
            "trusted_proxies": [GATEWAY],
            "jwt": {"issuers": [{
                "issuer": ISSUER, "audiences": [AUDIENCE], "jwt_svid": True,
                "trust_domain": TRUST_DOMAIN, "jwks_url": url, "jwks_cooldown": 0.5,
                "max_lifetime": 3600}]},
        },
    }))
    stack = DevStack(policy, trust_domain=TRUST_DOMAIN, workdir=work / "stack",
                     serve_args=["--config", str(config), "--revocation-file", str(revocations),
                                 "--watch-interval", "0.2"],
                     env={"SSL_CERT_FILE": str(ca_file)})
    render = devstack.render_yaml

    def forward_only(*args: Any, **kwargs: Any) -> str:
        text = render(*args, **kwargs)
        sanitize = "forward_client_cert_details: SANITIZE_SET"
        assert sanitize in text
        return text.replace(sanitize, "forward_client_cert_details: FORWARD_ONLY")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(devstack, "render_yaml", forward_only)
        stack.start()
    try:
        yield stack, revocations
    finally:
        stack.stop()
    assert stack.exit_codes == {"envoy": 0, "extauthz": 0}, stack.logs()


def _reason(resp: Any) -> str:
    return str(resp.headers.get("x-extauthz-reason", ""))


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_forged_xfcc_from_an_untrusted_peer_is_ignored(id_stack: tuple[DevStack, Path]) -> None:
    stack, _ = id_stack
    me = stack.issue_svid(CHECKOUT)
    forged = {XFCC: f"By=spiffe://demo.local/ns/x;URI={ADMIN}"}
    admin = stack.call(me, "GET", ORDERS, "/v1/admin/users", headers=forged)
    assert admin.status == 403
    own = stack.call(me, "GET", ORDERS, "/v1/orders/1", headers=forged)
    assert own.status == 200
    # The forged header really went through Envoy: extauthz, not Envoy, ignored it.
    assert own.json()["headers"][XFCC] == forged[XFCC]
    assert own.json()["headers"]["x-extauthz-principal"] == CHECKOUT


def test_xfcc_from_the_trusted_gateway(id_stack: tuple[DevStack, Path]) -> None:
    stack, _ = id_stack
    gateway = stack.issue_svid(GATEWAY)
    # Left of the gateway's own (rightmost) element is what the client sent: never trusted.
    header = (f"URI={CHECKOUT},By={GATEWAY};Hash={'ab' * 32};"
              f'Subject="CN=x,URI=spiffe://demo.local/ns/shop/sa/checkout";URI={ADMIN}')
    ok = stack.call(gateway, "GET", ORDERS, "/v1/admin/users", headers={XFCC: header})
    assert ok.status == 200, ok
    assert ok.json()["headers"]["x-extauthz-principal"] == ADMIN
    denied = stack.call(gateway, "GET", ORDERS, "/v1/orders/1", headers={XFCC: header})
    assert denied.status == 403  # ADMIN may not read orders: the identity is the forwarded one
    ambiguous = {XFCC: f"By={GATEWAY};URI={ADMIN};URI={CHECKOUT}"}
    resp = stack.call(gateway, "GET", ORDERS, "/v1/orders/1", headers=ambiguous)
    assert resp.status == 401 and _reason(resp) == "invalid_identity"
    assert resp.headers["www-authenticate"].startswith('mTLS realm="extauthz", error="invalid_certificate"')
    unterminated = {XFCC: f'By={GATEWAY};Subject="CN=x;URI={ADMIN}'}
    assert stack.call(gateway, "GET", ORDERS, "/v1/admin/users", headers=unterminated).status == 401


def test_certificate_failure_gets_a_certificate_challenge(id_stack: tuple[DevStack, Path]) -> None:
    stack, _ = id_stack
    dns_only = stack.ca.issue_dns_only("legacy.demo.local")  # a DNS SAN, no URI SAN
    resp = stack.call(dns_only, "GET", ORDERS, "/v1/orders/1")
    assert resp.status == 401 and _reason(resp) == "invalid_identity"
    assert resp.headers["www-authenticate"].startswith('mTLS realm="extauthz", error="invalid_certificate"')


def test_jwt_svid_identifies_the_workload(id_stack: tuple[DevStack, Path], jwks: tuple[Jwks, str, Path]) -> None:
    stack, _ = id_stack
    state, _, _ = jwks
    kid = next(iter(state.keys))
    hop = stack.issue_svid(STRANGER)  # the mTLS peer only proves the hop
    without = stack.call(hop, "GET", ORDERS, "/v1/orders/1")
    assert without.status == 403
    ok = stack.call(hop, "GET", ORDERS, "/v1/orders/1", headers={"authorization": f"Bearer {state.token(kid)}"})
    assert ok.status == 200, ok
    assert ok.json()["headers"]["x-extauthz-principal"] == CHECKOUT


def test_bad_tokens_are_401_with_a_challenge(id_stack: tuple[DevStack, Path], jwks: tuple[Jwks, str, Path]) -> None:
    stack, _ = id_stack
    state, _, _ = jwks
    kid = next(iter(state.keys))
    hop = stack.issue_svid(STRANGER)
    cases = {
        "expired": state.token(kid, lifetime=-120),
        "foreign trust domain": state.token(kid, sub="spiffe://evil.example/ns/shop/sa/checkout"),
        "wrong audience": state.token(kid, aud="billing"),
        "too long-lived": state.token(kid, lifetime=7200),
        "garbage": "not.a.token",
    }
    for name, token in cases.items():
        resp = stack.call(hop, "GET", ORDERS, "/v1/orders/1", headers={"authorization": f"Bearer {token}"})
        assert resp.status == 401, name
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="extauthz"') and token not in challenge, name


def test_revocation_takes_effect_without_restart(id_stack: tuple[DevStack, Path]) -> None:
    stack, revocations = id_stack
    me = stack.issue_svid(CHECKOUT)
    assert stack.call(me, "GET", ORDERS, "/v1/orders/1").status == 200
    revocations.write_text(f"principals: [{CHECKOUT}]\n")
    assert _wait_for(lambda: stack.call(me, "GET", ORDERS, "/v1/orders/1").status == 401)
    assert _reason(stack.call(me, "GET", ORDERS, "/v1/orders/1")) == "revoked"
    revocations.write_text("principals: [\n")  # broken: the previous list stays in force
    time.sleep(1.0)
    assert stack.call(me, "GET", ORDERS, "/v1/orders/1").status == 401
    revocations.write_text("principals: []\n")
    assert _wait_for(lambda: stack.call(me, "GET", ORDERS, "/v1/orders/1").status == 200)


def test_jwks_rotation_then_outage_keeps_last_good_keys(id_stack: tuple[DevStack, Path], jwks: tuple[Jwks, str, Path]) -> None:
    stack, _ = id_stack
    state, _, _ = jwks
    hop = stack.issue_svid(STRANGER)
    new_kid = state.add_key()  # rotation: a key extauthz has not fetched yet

    def allowed() -> bool:
        token = state.token(new_kid)
        return stack.call(hop, "GET", ORDERS, "/v1/orders/1", headers={"authorization": f"Bearer {token}"}).status == 200

    assert _wait_for(allowed), "a token signed with the rotated-in key was never accepted"
    state.failing = True
    fetches = state.fetches
    stray = Jwks()  # a key the endpoint never published: its kid is unknown to extauthz
    stray_token = stray.token(stray.add_key())
    stray_call = stack.call(hop, "GET", ORDERS, "/v1/orders/1", headers={"authorization": f"Bearer {stray_token}"})
    assert stray_call.status == 401
    assert _wait_for(lambda: state.fetches > fetches), "an unknown kid must trigger a refetch"
    time.sleep(0.5)  # the refetch failed (HTTP 500) by now
    assert allowed(), "keys fetched before the outage must keep serving"
    state.failing = False
