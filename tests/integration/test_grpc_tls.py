"""extauthz's own gRPC listener with mutual TLS and an allowed-client list (real process,
real certificates from extauthz.devstack.certs).

The server listens on TCP with TLS and on a unix socket (plaintext by design); readiness is
awaited on the unix socket.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.devstack.certs import CertificateAuthority, Credential, write_pem
from extauthz.settings import Settings, SettingsError
from extauthz.transport.tls import TlsConfig, channel_credentials, peer_spiffe_id
from tests.integration.server_process import free_port, stop, wait_serving

TD = "demo.local"
ENVOY_ID = f"spiffe://{TD}/ns/mesh/sa/envoy"
GATEWAYS = f"spiffe://{TD}/ns/gateways/sa/*"
POLICY = """\
apiVersion: extauthz/v1
owner: team-tls
service: orders
hosts: [orders.demo.local]
principals:
  - name: checkout
    spiffe: spiffe://demo.local/ns/shop/sa/checkout
rules:
  - name: read
    methods: [GET]
    path_prefix: /v1/orders
    allow: [checkout]
"""


@dataclass
class Tls:
    ca: CertificateAuthority
    target: str
    unix: str
    dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def channel(self, cred: Credential | None, ca: CertificateAuthority | None = None) -> grpc.Channel:
        creds = channel_credentials(
            (ca or self.ca).cert_pem,
            cred.cert_pem if cred else None,
            cred.key_pem if cred else None,
        )
        return grpc.secure_channel(
            self.target, creds, [("grpc.ssl_target_name_override", "localhost")]
        )


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    ca = CertificateAuthority.create(TD)
    with tempfile.TemporaryDirectory(prefix="extauthz-tls-") as tmp:
        d = Path(tmp)
        (d / "policy").mkdir()
        (d / "policy" / "orders.yaml").write_text(POLICY)
        (d / "ca.crt").write_bytes(ca.cert_pem)
        server = write_pem(d, "server", ca.issue_server_cert())
        target = f"127.0.0.1:{free_port()}"
        unix = f"unix:{d}/authz.sock"
        log = d / "extauthz.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "extauthz", "serve", "--policy", str(d / "policy"),
                 "--listen", target, "--listen", unix,
                 "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                 "--tls-client-ca", str(d / "ca.crt"),
                 "--tls-allowed-clients", f"{ENVOY_ID},{GATEWAYS}",
                 "--decision-log", "none", "--no-tracing"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            wait_serving(unix, proc)
            yield Tls(ca, target, unix, d, proc, log)
        finally:
            assert stop(proc) == 0, log.read_text()


def _check(channel: grpc.Channel) -> ea.CheckResponse:
    req = ea.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.host = "orders.demo.local"
    req.attributes.request.http.path = "/v1/orders"
    with channel:
        return ea_grpc.AuthorizationStub(channel).Check(req, timeout=5)


def _code(fn: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_allowed_envoy_gets_answers(tls: Tls) -> None:
    reply = _check(tls.channel(tls.ca.issue_svid(ENVOY_ID)))
    # The RPC succeeded; the check itself has no caller identity, so the answer is a 401.
    assert reply.denied_response.status.code == 401


def test_allowed_pattern(tls: Tls) -> None:
    reply = _check(tls.channel(tls.ca.issue_svid(f"spiffe://{TD}/ns/gateways/sa/edge")))
    assert reply.HasField("denied_response")


def test_unlisted_spiffe_id_is_permission_denied(tls: Tls) -> None:
    stranger = tls.ca.issue_svid(f"spiffe://{TD}/ns/shop/sa/checkout")
    assert _code(lambda: _check(tls.channel(stranger))) == grpc.StatusCode.PERMISSION_DENIED
    assert "client_refused" in tls.log.read_text()


def test_certificate_without_spiffe_id_is_unauthenticated(tls: Tls) -> None:
    dns = tls.ca.issue_dns_only("envoy.demo.local")
    assert _code(lambda: _check(tls.channel(dns))) == grpc.StatusCode.UNAUTHENTICATED


def test_no_client_certificate_fails_the_handshake(tls: Tls) -> None:
    assert _code(lambda: _check(tls.channel(None))) == grpc.StatusCode.UNAVAILABLE


def test_foreign_ca_fails_the_handshake(tls: Tls) -> None:
    foreign = CertificateAuthority.create(TD)
    cred = foreign.issue_svid(ENVOY_ID)
    # Our side trusts the real CA; the server refuses a client certificate from another one.
    assert _code(lambda: _check(tls.channel(cred))) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_on_the_tls_port_fails(tls: Tls) -> None:
    assert _code(lambda: _check(grpc.insecure_channel(tls.target))) == grpc.StatusCode.UNAVAILABLE


def test_unix_socket_stays_plaintext(tls: Tls) -> None:
    reply = _check(grpc.insecure_channel(tls.unix))
    assert reply.denied_response.status.code == 401


def test_health_needs_only_the_handshake(tls: Tls) -> None:
    any_workload = tls.ca.issue_svid(f"spiffe://{TD}/ns/shop/sa/anyone")
    with tls.channel(any_workload) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_refused_to_unlisted_clients(tls: Tls) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stranger = tls.ca.issue_svid(f"spiffe://{TD}/ns/shop/sa/other")

    def ask() -> None:
        with tls.channel(stranger) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            list(stub.ServerReflectionInfo(iter([req]), timeout=5))

    assert _code(ask) == grpc.StatusCode.PERMISSION_DENIED
    with tls.channel(tls.ca.issue_svid(ENVOY_ID)) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert "envoy.service.auth.v3.Authorization" in names


def test_health_cli_over_tls(tls: Tls) -> None:
    probe = write_pem(tls.dir, "probe", tls.ca.issue_svid(f"spiffe://{TD}/ns/ops/sa/probe"))
    base = [sys.executable, "-m", "extauthz", "health", "--address", tls.target]
    ok = subprocess.run(
        [*base, "--tls-ca", str(tls.dir / "ca.crt"), "--tls-cert", str(probe.cert),
         "--tls-key", str(probe.key), "--tls-server-name", "localhost"],
        capture_output=True, text=True, timeout=30,
    )
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    plain = subprocess.run([*base, "--timeout", "1"], capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1


def test_rotated_server_certificate_is_served_without_restart(tls: Tls) -> None:
    # Rotate to a certificate from a new CA whose name only the new CA's clients accept.
    before = tls.ca.issue_svid(ENVOY_ID)
    with tls.channel(before) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    fresh = tls.ca.issue_server_cert(dns_names=["rotated.demo.local"])
    (tls.dir / "server.crt").write_bytes(fresh.cert_pem)
    (tls.dir / "server.key").write_bytes(fresh.key_pem)
    creds = channel_credentials(tls.ca.cert_pem, before.cert_pem, before.key_pem)
    opts = [("grpc.ssl_target_name_override", "rotated.demo.local")]
    with grpc.secure_channel(tls.target, creds, opts) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert "tls_reloaded" in tls.log.read_text() or "TLS certificate reloaded" in tls.log.read_text()


# -- configuration errors ----------------------------------------------------------------------


def test_no_tls_settings_means_plaintext() -> None:
    assert TlsConfig.from_settings(Settings()) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls_cert": "/x.crt"}, "tls_key, tls_client_ca: required"),
        ({"tls_cert": "/x", "tls_key": "/y", "tls_client_ca": "/z"}, "tls_allowed_clients"),
        ({"tls_allowed_clients": (ENVOY_ID,)}, "tls_cert, tls_key, tls_client_ca"),
        (
            {"tls_cert": "/x", "tls_key": "/y", "tls_client_ca": "/z",
             "tls_allowed_clients": ("envoy",)},
            "invalid SPIFFE ID",
        ),
        (
            {"tls_cert": "/nope", "tls_key": "/y", "tls_client_ca": "/z",
             "tls_allowed_clients": (ENVOY_ID,)},
            "tls_cert: cannot read /nope",
        ),
    ],
)
def test_partial_or_unsafe_tls_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        TlsConfig.from_settings(Settings(**kwargs))  # type: ignore[arg-type]


def test_serve_refuses_partial_tls_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    proc = subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path),
         "--listen", f"127.0.0.1:{free_port()}", "--tls-cert", "/etc/x.crt"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "tls_key" in proc.stderr


def test_peer_spiffe_id_needs_exactly_one_uri() -> None:
    one = {"x509_subject_alternative_name": [b"spiffe://a/b", b"envoy.local"]}
    assert peer_spiffe_id(one) == "spiffe://a/b"
    assert peer_spiffe_id({"x509_subject_alternative_name": [b"spiffe://a/b", b"spiffe://a/c"]}) is None
    assert peer_spiffe_id({}) is None
