"""The HTTP ext_authz transport (`--http-listen`): Envoy's http_service protocol, in process.

Answers are read off raw sockets; every refusal must be a non-200 status and, where the
request cannot be read, a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from extauthz.decide.ratelimit import InProcessLimiter, LimitResult, LocalLimiter
from extauthz.settings import Settings
from extauthz.transport.http import HttpLimits, peer_from_xfcc

from .http_harness import (
    BILLING,
    CHECKOUT,
    HOST,
    SIDECAR,
    check,
    read_replies,
    running,
    xfcc,
)

FAST = HttpLimits(header_timeout=0.4, idle_timeout=30.0, sweep_interval=0.05, max_connections=64)


@pytest.fixture()
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running(tmp_path, limits=FAST) as s:
        yield s


# -- the protocol ---------------------------------------------------------------------------


def test_allowed_check_is_200_with_principal_upstream_and_metadata_headers(server) -> None:  # type: ignore[no-untyped-def]
    [reply], closed = server.exchange(check())
    assert reply.status == 200 and not closed
    assert reply.header("x-extauthz-principal") == CHECKOUT
    # a caller's own x-extauthz-rule is removed by Envoy on our say-so
    assert reply.header("x-envoy-auth-headers-to-remove") == "x-extauthz-rule"
    assert reply.header("principal") == CHECKOUT
    assert reply.header("identity_source") == "mtls"
    assert reply.header("rule") == "orders-read"
    assert reply.header("decision") == "allow"
    assert reply.header("reason") == "allowed"
    assert reply.header("policy_version") == server.app.store.current.version


def test_no_xfcc_is_401_no_identity_never_an_allow(server) -> None:  # type: ignore[no-untyped-def]
    [reply], closed = server.exchange(check(principal=None))
    assert reply.status == 401 and not closed
    assert reply.header("x-extauthz-reason") == "no_identity"
    assert reply.header("www-authenticate")
    assert reply.header("decision") == "deny"


@pytest.mark.parametrize("value", [
    f"By={SIDECAR};URI={CHECKOUT},By={SIDECAR};URI={BILLING}",  # two elements (APPEND_FORWARD)
    f"By={SIDECAR};URI={CHECKOUT};URI={BILLING}",  # two URIs
    f"By={SIDECAR};Hash=ab",  # no URI
    f"By={SIDECAR};Hash=ab;URI=",  # what Envoy writes for a certificate without a URI SAN
    f'By={SIDECAR};URI="{CHECKOUT}',  # unterminated quote
    f"By={SIDECAR};URI=https://not-spiffe.example/x",  # not a SPIFFE ID
])
def test_ambiguous_or_malformed_xfcc_is_401(server, value: str) -> None:  # type: ignore[no-untyped-def]
    raw = (f"GET /v1/orders/1 HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 0\r\n"
           f"x-forwarded-client-cert: {value}\r\n\r\n").encode()
    [reply], _ = server.exchange(raw)
    assert reply.status == 401
    assert reply.header("x-extauthz-reason") == "invalid_identity"


def test_xfcc_header_sent_twice_is_401_even_if_each_is_valid(server) -> None:  # type: ignore[no-untyped-def]
    raw = check(headers={"x-forwarded-client-cert": xfcc(BILLING)})
    [reply], _ = server.exchange(raw)
    assert reply.status == 401
    assert reply.header("x-extauthz-reason") == "invalid_identity"


def test_forbidden_route_is_403_with_reason_and_body(server) -> None:  # type: ignore[no-untyped-def]
    [reply], _ = server.exchange(check(method="DELETE"))
    assert reply.status == 403
    assert reply.header("x-extauthz-reason") == "no_matching_rule"
    assert reply.body == b"403 no_matching_rule\n"
    [other], _ = server.exchange(check(method="POST", path="/v1/orders", principal=BILLING))
    assert other.status == 403
    assert other.header("x-extauthz-reason") == "principal_not_allowed"


def test_rate_limited_is_429_with_retry_after(server) -> None:  # type: ignore[no-untyped-def]
    first, _ = server.exchange(check(method="POST", path="/v1/orders"))
    second, _ = server.exchange(check(method="POST", path="/v1/orders"))
    assert first[0].status == 200
    assert second[0].status == 429
    assert second[0].header("x-extauthz-reason") == "rate_limited"
    assert int(second[0].header("retry-after") or "0") >= 1


def test_keep_alive_connection_answers_checks_in_sequence(server) -> None:  # type: ignore[no-untyped-def]
    with server.connect() as sock:
        statuses = []
        for principal in (CHECKOUT, None, BILLING):
            sock.sendall(check(principal=principal))
            replies, closed = read_replies(sock, 1, 5.0)
            statuses.append(replies[0].status)
            assert not closed
    assert statuses == [200, 401, 200]


def test_path_prefix_is_removed_and_required(tmp_path: Path) -> None:
    with running(tmp_path, limits=FAST, settings=Settings(http_path_prefix="/authz")) as s:
        [ok], _ = s.exchange(check(path="/authz/v1/orders/1"))
        assert ok.status == 200 and ok.header("rule") == "orders-read"
        [outside], closed = s.exchange(check(path="/v1/orders/1"))
        assert outside.status == 400 and closed
        [sneaky], _ = s.exchange(check(path="/authzv1/orders/1"))
        assert sneaky.status == 400


def test_internal_error_is_503_internal_error(server) -> None:  # type: ignore[no-untyped-def]
    class Broken:
        @property
        def current(self) -> object:
            raise RuntimeError("policy store exploded")

    server.call(setattr, server.app.authorizer, "_policy", Broken())
    [reply], closed = server.exchange(check())
    assert reply.status == 503 and not closed
    assert reply.header("x-extauthz-reason") == "internal_error"


def test_a_check_that_waits_is_answered_through_a_task(tmp_path: Path) -> None:
    class SlowLimiter(InProcessLimiter):  # the Limiter lifecycle (start/aclose) inherited
        async def hit_many(self, items, cost=1):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)
            result: LimitResult = await super().hit_many(items, cost)
            return result

    with running(tmp_path, limits=FAST, limiter=SlowLimiter(LocalLimiter(time.time, 1000))) as s:
        [reply], _ = s.exchange(check(method="POST", path="/v1/orders"))
        assert reply.status == 200
        # pipelined while that check waits: the first answer still comes first, then a 400
        replies, closed = s.exchange(check(method="POST", path="/v1/orders") + check(), replies=2)
        assert [r.status for r in replies] == [429, 400]
        assert closed


# -- bad input --------------------------------------------------------------------------------


def _refused(server, raw: bytes, status: int) -> None:  # type: ignore[no-untyped-def]
    before = server.app.stats.by_reason.get("malformed_request", 0)
    replies, closed = server.exchange(raw)
    assert [r.status for r in replies] == [status], replies
    assert replies[0].header("x-extauthz-reason") == "malformed_request"
    assert replies[0].header("decision") == "deny"
    assert closed
    assert server.app.stats.by_reason.get("malformed_request", 0) == before + 1


def test_garbage_bytes_are_400_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    _refused(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400)


def test_100_kb_request_line_is_431_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    _refused(server, b"GET /v1/orders/" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", 431)


def test_10000_headers_are_431_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(10_000))
    _refused(server, check()[:-2] + many + b"\r\n", 431)


def test_a_body_on_a_check_is_413_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    raw = check().replace(b"content-length: 0", b"content-length: 5") + b"hello"
    _refused(server, raw, 413)


def test_chunked_transfer_encoding_is_400_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    raw = check().replace(b"content-length: 0", b"transfer-encoding: chunked") + b"0\r\n\r\n"
    _refused(server, raw, 400)


def test_transfer_encoding_with_content_length_smuggling_is_400_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    smuggled = check(principal=CHECKOUT, path="/v1/orders/2")
    raw = (check().replace(b"content-length: 0",
                           b"content-length: %d\r\ntransfer-encoding: chunked" % (len(smuggled) + 5))
           + b"0\r\n\r\n" + smuggled)
    _refused(server, raw, 400)


def test_http_1_0_is_400_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    _refused(server, check().replace(b"HTTP/1.1", b"HTTP/1.0"), 400)


def test_two_host_headers_are_400(server) -> None:  # type: ignore[no-untyped-def]
    _refused(server, check(headers={"host": "admin.mesh.local"}), 400)


def test_absolute_form_target_is_400(server) -> None:  # type: ignore[no-untyped-def]
    _refused(server, check(path="http://orders.mesh.local/v1/orders/1"), 400)


def test_pipelined_requests_answer_the_first_and_refuse_the_rest(server) -> None:  # type: ignore[no-untyped-def]
    replies, closed = server.exchange(check() + check(method="DELETE") + check(), replies=2)
    assert [r.status for r in replies] == [200, 400]
    assert replies[1].header("x-extauthz-reason") == "malformed_request"
    assert closed


def test_a_head_never_finished_gets_408_after_the_deadline_then_close(server) -> None:  # type: ignore[no-untyped-def]
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/orders/1 HTTP/1.1\r\nhost: " + HOST.encode() + b"\r\nx-slow: ")
        replies, closed = read_replies(sock, 1, 10.0)
        waited = time.monotonic() - started
    assert [r.status for r in replies] == [408]
    assert closed
    assert FAST.header_timeout * 0.9 <= waited < 8.0


def test_flood_of_bad_connections_is_bounded_and_good_checks_still_pass(server) -> None:  # type: ignore[no-untyped-def]
    socks = []
    try:
        for _ in range(150):  # more than max_connections (64)
            try:
                s = server.connect()
            except OSError:
                continue
            socks.append(s)
            with contextlib.suppress(OSError):
                s.sendall(b"GET /" + b"a" * 70_000)  # over max_head_bytes: refused
        assert server.call(lambda: len(server.transport.server.connections)) <= FAST.max_connections
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while server.call(lambda: len(server.transport.server.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.call(lambda: len(server.transport.server.connections)) == 0
    [reply], _ = server.exchange(check())
    assert reply.status == 200


def test_connections_beyond_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    limits = HttpLimits(max_connections=2, sweep_interval=0.05)
    with running(tmp_path, limits=limits) as s:
        a, b = s.connect(), s.connect()
        time.sleep(0.2)
        with s.connect() as c:
            c.sendall(check())
            replies, closed = read_replies(c, 1, 3.0)
        assert replies == [] and closed
        a.close()
        b.close()


# -- pure helpers ---------------------------------------------------------------------------------


def test_peer_from_sanitize_set_xfcc_reads_uri_and_cert() -> None:
    from tests.conformance.envoy_model import url_encoded_pem, xfcc_element
    from tests.conformance.harness import make_cert

    cert = make_cert((CHECKOUT,))
    peer = peer_from_xfcc(xfcc_element(by=[SIDECAR], cert=cert, include_cert=True))
    assert (peer.principal, peer.certificate, peer.problem) == (CHECKOUT, url_encoded_pem(cert), "")
    # A Cert= that Hash= does not describe is refused (identity/xfcc.py check_element).
    forged = xfcc_element(by=[SIDECAR], cert=cert, include_cert=True, digest="ab" * 32)
    assert "Hash= is not the SHA-256" in peer_from_xfcc(forged).problem


def test_http_listen_must_be_loopback_unix_or_tls() -> None:
    from extauthz.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="http_listen: 0.0.0.0:9292 is not loopback"):
        load_settings({"policy": "p", "http_listen": ["0.0.0.0:9292"]}, {})
    assert load_settings({"policy": "p", "http_listen": ["unix:/run/a.sock"]}, {}).listen == ()
    env = load_settings({"policy": "p"}, {"EXTAUTHZ_HTTP_LISTEN": "127.0.0.1:9292"})
    assert env.http_listen == ("127.0.0.1:9292",) and env.listen == ()
    both = load_settings({"policy": "p", "listen": ["127.0.0.1:9191"],
                          "http_listen": ["[::1]:9292"]}, {})
    assert both.listen == ("127.0.0.1:9191",) and both.http_listen == ("[::1]:9292",)
    with pytest.raises(SettingsError, match="http_path_prefix"):
        load_settings({"policy": "p", "http_path_prefix": "authz/"}, {})


# -- the same core as the gRPC transport ------------------------------------------------------

TABLE = [
    ("GET", "/v1/orders/1", CHECKOUT),  # 200
    ("GET", "/v1/orders/1", None),  # 401 no identity
    ("DELETE", "/v1/orders/1", CHECKOUT),  # 403 no matching rule
    ("POST", "/v1/orders", BILLING),  # 403 principal not allowed
    ("POST", "/v1/orders", CHECKOUT),  # 200, then 429
    ("POST", "/v1/orders", CHECKOUT),
    ("GET", "/v1/orders/1?x=%2e%2e/admin", CHECKOUT),
]


def test_http_and_grpc_transports_decide_the_same_table(tmp_path: Path) -> None:
    from envoy.service.auth.v3 import external_auth_pb2 as ea

    from extauthz.transport.grpc_server import AuthorizationServicer, response_options

    (tmp_path / "grpc").mkdir()
    (tmp_path / "http").mkdir()
    with running(tmp_path / "grpc", limits=FAST) as g, running(tmp_path / "http", limits=FAST) as h:
        servicer = AuthorizationServicer(g.app, response_options(g.app.settings))
        for method, path, principal in TABLE:
            req = ea.CheckRequest()
            http = req.attributes.request.http
            http.method, http.host, http.path = method, HOST, path
            if principal:
                req.attributes.source.principal = principal
            future = asyncio.run_coroutine_threadsafe(servicer.Check(req, None), g.loop)
            response = future.result(10)
            [reply], _ = h.exchange(check(method=method, path=path, principal=principal))
            meta = dict(response.dynamic_metadata.items())
            if response.HasField("denied_response"):
                status = response.denied_response.status.code
                grpc_headers = {x.header.key: x.header.value
                                for x in response.denied_response.headers}
                assert reply.body.decode() == response.denied_response.body
                for key, value in grpc_headers.items():
                    if key != "retry-after":  # seconds left: may tick between the two calls
                        assert reply.header(key) == value, (method, path, key)
            else:
                status = 200
                upstream = {x.header.key: x.header.value for x in response.ok_response.headers}
                for key, value in upstream.items():
                    assert reply.header(key) == value
                assert reply.header("x-envoy-auth-headers-to-remove") == ",".join(
                    response.ok_response.headers_to_remove)
            assert reply.status == status, (method, path, principal)
            for key in ("principal", "identity_source", "rule", "decision", "reason",
                        "policy_version"):
                if key == "policy_version":
                    continue  # two servers, two loads: same content, compared below
                assert reply.header(key) == meta[key], (method, path, key)
        assert g.app.store.current.version == h.app.store.current.version


# -- drain and mutual TLS ---------------------------------------------------------------------


def test_stop_lets_a_check_in_flight_finish(tmp_path: Path) -> None:
    class SlowLimiter(InProcessLimiter):  # the Limiter lifecycle (start/aclose) inherited
        async def hit_many(self, items, cost=1):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.3)
            return await super().hit_many(items, cost)

    with running(tmp_path, limits=FAST, limiter=SlowLimiter(LocalLimiter(time.time, 10))) as s:
        with s.connect() as sock:
            sock.sendall(check(method="POST", path="/v1/orders"))
            time.sleep(0.1)
            stopping = asyncio.run_coroutine_threadsafe(s.transport.stop(5.0), s.loop)
            replies, closed = read_replies(sock, 1, 5.0)
            stopping.result(10)
        assert [r.status for r in replies] == [200]
        assert closed  # drained: the connection does not stay open for more


def test_mutual_tls_admits_only_allowed_spiffe_ids(tmp_path: Path) -> None:
    import ssl

    from extauthz.devstack.certs import CertificateAuthority, write_pem

    ca = CertificateAuthority.create("prod.example")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    server_pem = write_pem(tmp_path, "server", ca.issue_server_cert())
    envoy = write_pem(tmp_path, "envoy", ca.issue_svid(SIDECAR))
    stranger = write_pem(tmp_path, "stranger", ca.issue_svid(CHECKOUT))
    settings = Settings(tls_cert=str(server_pem.cert), tls_key=str(server_pem.key),
                        tls_client_ca=str(tmp_path / "ca.crt"), tls_allowed_clients=(SIDECAR,))

    def client(cred: object | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        ctx.check_hostname = False
        if cred is not None:
            ctx.load_cert_chain(cred.cert, cred.key)  # type: ignore[attr-defined]
        return ctx

    with running(tmp_path, limits=FAST, settings=settings) as s:
        with s.connect() as raw, client(envoy).wrap_socket(raw) as sock:
            sock.sendall(check())
            replies, _ = read_replies(sock, 1, 5.0)
        assert [r.status for r in replies] == [200]
        with s.connect() as raw, client(stranger).wrap_socket(raw) as sock:
            try:
                sock.sendall(check())
                replies, closed = read_replies(sock, 1, 3.0)
            except (ssl.SSLError, OSError):
                replies, closed = [], True
        assert replies == [] and closed
        with (s.connect() as raw, pytest.raises((ssl.SSLError, OSError)),
              client(None).wrap_socket(raw) as sock):
            sock.sendall(check())
            if not sock.recv(1):
                raise ConnectionResetError("closed without an answer")


def test_serve_with_http_listen_only_answers_checks_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .http_harness import POLICY, Server
    from .server_process import free_port, stop

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "orders.yaml").write_text(POLICY)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path / "policy"),
             "--http-listen", f"127.0.0.1:{port}", "--decision-log", "none", "--no-tracing"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while f"http://127.0.0.1:{port}" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        client = Server(None, None, None, ("127.0.0.1", port))  # type: ignore[arg-type]
        [reply], _ = client.exchange(check())
        assert reply.status == 200
        assert "9191" not in log.read_text()  # --http-listen alone: no gRPC listener
    finally:
        assert stop(proc) == 0, log.read_text()


def test_workers_share_http_connections_through_so_reuseport(tmp_path: Path) -> None:
    """`--workers 2 --http-listen`: each new connection (Envoy opens one per concurrent check)
    lands on either worker; both decide a share. 60 connections: a worker with under 15% of
    them is a >5-sigma event for a fair spread, so this does not flake."""
    import re
    import socket
    import subprocess
    import sys
    import urllib.request

    from .http_harness import POLICY
    from .server_process import free_port, stop

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "orders.yaml").write_text(POLICY)
    port = free_port()
    metrics = _port_pair()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path / "policy"),
             "--http-listen", f"127.0.0.1:{port}", "--workers", "2",
             "--metrics-listen", f"127.0.0.1:{metrics}", "--decision-log", "none"],
            stdout=out, stderr=subprocess.STDOUT)

    def checks(worker: int) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics + worker}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(v) for v in re.findall(
            r'^extauthz_checks_total\{[^}]*\} ([0-9.e+]+)$', text, re.MULTILINE))

    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("http://127.0.0.1") < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        for _ in range(60):  # a new connection each, as Envoy's pool opens them
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(check())
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 "), data
        counts = [checks(0), checks(1)]
        assert sum(counts) == 60
        assert min(counts) >= 9, counts
    finally:
        assert stop(proc) == 0, log.read_text()


def _port_pair() -> int:
    """A free port P with P+1 free too (worker i serves metrics on P+i)."""
    import socket

    from .server_process import free_port

    while True:
        first = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first


def test_one_process_serves_grpc_and_http_with_one_lifecycle(tmp_path: Path) -> None:
    """`--listen` and `--http-listen` together: one policy load, both answer the same policy
    version, SIGTERM drains both and exits 0."""
    import socket
    import subprocess
    import sys

    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as ea
    from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

    from .http_harness import POLICY
    from .server_process import free_port, stop, wait_serving

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "orders.yaml").write_text(POLICY)
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path / "policy"),
             "--listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
             "--decision-log", "none"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", proc)
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
            sock.sendall(check())
            replies, _ = read_replies(sock, 1, 5.0)
        req = ea.CheckRequest()
        http = req.attributes.request.http
        http.method, http.host, http.path = "GET", HOST, "/v1/orders/1"
        req.attributes.source.principal = CHECKOUT
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = ea_grpc.AuthorizationStub(channel).Check(req, timeout=5)
        assert replies[0].status == 200 and response.status.code == 0
        assert replies[0].header("policy_version") == \
            response.dynamic_metadata["policy_version"]
        assert log.read_text().count('"event": "policy_loaded"') == 1
    finally:
        assert stop(proc) == 0, log.read_text()


def test_http_listen_that_cannot_bind_exits_1_with_one_line(tmp_path: Path) -> None:
    """A missing socket folder is the host refusing a valid setting: exit 1 (a wrong setting
    is 2; see docs/operations.md, start-up)."""
    import subprocess
    import sys

    from .http_harness import POLICY

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "orders.yaml").write_text(POLICY)
    sock = tmp_path / "no-such-dir" / "authz.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path / "policy"),
         "--http-listen", f"unix:{sock}", "--decision-log", "none"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"http_listen: cannot bind unix:{sock}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_workers_refuse_a_unix_http_listener() -> None:
    from extauthz.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="unix socket cannot be shared"):  # validated once
        load_settings({"policy": "p", "http_listen": ["unix:/run/a.sock"], "workers": 2}, {})


def test_xfcc_memo_stays_bounded_under_distinct_and_oversized_values(tmp_path: Path) -> None:
    from extauthz.transport.http import XFCC_MEMO_MAX_VALUE, XFCC_MEMO_SIZE

    with running(tmp_path, limits=FAST) as s:
        state = s.transport.server
        for i in range(XFCC_MEMO_SIZE + 10):
            s.call(state.peer, xfcc(f"spiffe://prod.example/ns/n/sa/{i}"))
        huge = xfcc(CHECKOUT) + ";Subject=\"" + "x" * (XFCC_MEMO_MAX_VALUE + 1) + "\""
        s.call(state.peer, huge)
        memo = s.call(lambda: dict(state._peers))
        assert len(memo) <= XFCC_MEMO_SIZE
        assert huge not in memo
