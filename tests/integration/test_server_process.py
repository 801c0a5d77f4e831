"""The real `extauthz serve` process over real gRPC: contract, bad input, drain, reload."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .server_process import free_port, running_server, stop, wait_serving

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"
BILLING = "spiffe://prod.example/ns/finance/sa/billing"  # no rate limit declared


def request(principal: str = CHECKOUT, method: str = "GET", path: str = "/v1/orders/1",
            host: str = "orders.mesh.local") -> ea.CheckRequest:
    req = ea.CheckRequest()
    req.attributes.source.principal = principal
    http = req.attributes.request.http
    http.method, http.host, http.path = method, host, path
    http.headers["x-request-id"] = "abc"
    return req


def call(target: str, req: ea.CheckRequest) -> ea.CheckResponse:
    with grpc.insecure_channel(target) as ch:
        return ea_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def http_status(resp: ea.CheckResponse) -> int:
    if resp.HasField("ok_response"):
        return 200
    return int(resp.denied_response.status.code)


def reason(resp: ea.CheckResponse) -> str:
    return {h.header.key: h.header.value for h in resp.denied_response.headers}.get("x-extauthz-reason", "")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(REPO / "policy", d)
    return d


def test_bad_inputs_get_clear_denials_and_never_crash(policy_dir: Path, tmp_path: Path) -> None:
    with running_server(policy_dir, tmp_path) as srv:
        empty = call(srv.target, ea.CheckRequest())
        assert (http_status(empty), reason(empty), empty.status.code) == (401, "no_identity", 16)
        no_http = ea.CheckRequest()
        no_http.attributes.source.principal = CHECKOUT
        assert (http_status(call(srv.target, no_http)), reason(call(srv.target, no_http))) == (403, "malformed_request")
        for bad in ("orders.mesh.local", "CN=checkout", "spiffe://prod.example/a/../b", "s" * 100_000):
            resp = call(srv.target, request(principal=bad))
            assert (http_status(resp), reason(resp)) == (401, "invalid_identity")
        ambiguous = call(srv.target, request(path="/v1/orders%2F..%2Fadmin"))
        assert (http_status(ambiguous), reason(ambiguous)) == (403, "ambiguous_path")
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in srv.log()


def test_allow_forbid_and_response_contents(policy_dir: Path, tmp_path: Path) -> None:
    with running_server(policy_dir, tmp_path) as srv:
        ok = call(srv.target, request())
        assert ok.status.code == 0 and ok.HasField("ok_response")
        assert {h.header.key: h.header.value for h in ok.ok_response.headers}["x-extauthz-principal"] == CHECKOUT
        meta = ok.dynamic_metadata
        assert (meta["principal"], meta["rule"], meta["decision"]) == (CHECKOUT, "orders-read", "allow")
        forbidden = call(srv.target, request(method="POST", path="/v1/refunds/1"))
        assert (http_status(forbidden), reason(forbidden), forbidden.status.code) == (403, "principal_not_allowed", 7)


def test_health_service_and_reflection(policy_dir: Path, tmp_path: Path) -> None:
    with running_server(policy_dir, tmp_path) as srv:
        assert srv.health("envoy.service.auth.v3.Authorization") == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(srv.target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"envoy.service.auth.v3.Authorization", "grpc.health.v1.Health"} <= names


def test_unix_socket_is_created_group_only_and_removed_on_exit(policy_dir: Path, tmp_path: Path) -> None:
    sock = tmp_path / "authz.sock"
    with running_server(policy_dir, tmp_path, extra=["--listen", f"unix:{sock}"]):
        mode = stat.S_IMODE(os.stat(sock).st_mode)
        assert mode == 0o660
        resp = call(f"unix:{sock}", request())
        assert resp.HasField("ok_response")
    assert not sock.exists()


def test_missing_or_unreadable_policy_is_a_clear_startup_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", str(tmp_path / "nope"),
                          "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "does not exist or is not a directory" in out.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.yaml").write_text("apiVersion: extauthz/v1\nowner: x\nservice: y\nhosts: [h]\nrules: [{name: r}]\n")
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", str(broken),
                          "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "a.yaml: rules[0].path: exactly one of 'path' or 'path_prefix' is required" in out.stderr


def test_bad_settings_are_rejected_naming_their_source(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", "x", "--listen", "nonsense"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "expected HOST:PORT or unix:/path" in out.stderr
    env = {**os.environ, "EXTAUTHZ_CACHE_SIZE": "many"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", "x"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "environment variable EXTAUTHZ_CACHE_SIZE" in out.stderr
    for bad in ("Bad Header", "authorization", "x-forwarded-client-cert"):
        out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", "x",
                              "--principal-header", bad, "--print-config"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "principal_header" in out.stderr, bad


def test_settings_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache_size: 1\ncache_ttl: 5\nlog_level: warning\n")
    env = {**os.environ, "EXTAUTHZ_CACHE_TTL": "7", "EXTAUTHZ_LOG_LEVEL": "error"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(cfg),
                          "--policy", str(REPO / "policy"), "--log-level", "debug", "--print-config"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    import json

    printed = json.loads(out.stdout)
    assert (printed["cache_size"], printed["cache_ttl"], printed["log_level"]) == (1, 7.0, "debug")


def test_sigterm_drains_in_flight_checks_then_exits_zero(policy_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                             "--listen", target, "--grace-period", "5"], stderr=subprocess.PIPE)
    try:
        wait_serving(target, proc)
        results: list[int] = []
        errors: list[BaseException] = []

        def hammer() -> None:
            with grpc.insecure_channel(target) as ch:
                stub = ea_grpc.AuthorizationStub(ch)
                for _ in range(200):
                    try:
                        results.append(http_status(stub.Check(request(principal=BILLING), timeout=5)))
                    except grpc.RpcError as exc:  # refused after drain began: expected
                        errors.append(exc)
                        return

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(15)
        assert proc.wait(15) == 0
        assert results and set(results) == {200}  # every answered check was a real decision
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        assert '"event": "draining"' in stderr and '"event": "stopped"' in stderr
    finally:
        stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def _write_rule(policy_dir: Path, allow: str) -> None:
    (policy_dir / "extra.yaml").write_text(
        "apiVersion: extauthz/v1\nowner: t\nservice: s\nhosts: [extra.mesh.local]\n"
        f"rules:\n  - name: extra\n    path_prefix: /\n    allow: [\"{allow}\"]\n")


def test_reload_swaps_policy_and_a_broken_version_keeps_the_old_one(policy_dir: Path, tmp_path: Path) -> None:
    _write_rule(policy_dir, CHECKOUT)
    with running_server(policy_dir, tmp_path, extra=["--watch-interval", "0.2"]) as srv:
        req = request(host="extra.mesh.local", path="/x")
        first = call(srv.target, req)
        assert first.HasField("ok_response")
        version = first.dynamic_metadata["policy_version"]

        _write_rule(policy_dir, "spiffe://prod.example/ns/other/sa/x")
        deadline = time.monotonic() + 10
        while call(srv.target, req).HasField("ok_response") and time.monotonic() < deadline:
            time.sleep(0.1)
        after = call(srv.target, req)
        assert http_status(after) == 403 and after.dynamic_metadata["policy_version"] != version
        good_version = after.dynamic_metadata["policy_version"]

        (policy_dir / "broken.yaml").write_text("apiVersion: extauthz/v1\nrules: [")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while '"event": "policy_reload_failed"' not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "broken.yaml" in srv.log()
        still = call(srv.target, req)
        assert still.dynamic_metadata["policy_version"] == good_version
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING


def test_budget_headers_reach_the_upstream_only_when_enabled(policy_dir: Path, tmp_path: Path) -> None:
    with running_server(policy_dir, tmp_path) as srv:
        plain = {h.header.key for h in call(srv.target, request()).ok_response.headers}
        assert "ratelimit-remaining" not in plain
    with running_server(policy_dir, tmp_path, extra=["--ratelimit-budget-headers"]) as srv:
        first = {h.header.key: h.header.value for h in call(srv.target, request()).ok_response.headers}
        second = {h.header.key: h.header.value for h in call(srv.target, request()).ok_response.headers}
        # checkout: burst 50 in policy/orders.yaml; each allowed call spends one
        assert first["ratelimit-limit"] == "50"
        assert int(second["ratelimit-remaining"]) == int(first["ratelimit-remaining"]) - 1
        unlimited = call(srv.target, request(principal=BILLING))  # no limit declared: no headers
        assert "ratelimit-remaining" not in {h.header.key for h in unlimited.ok_response.headers}
    env = {"EXTAUTHZ_RATELIMIT_BUDGET_HEADERS": "maybe"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", "x", "--print-config"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "must be true or false" in out.stderr


def test_workers_share_the_port_and_drain_together(policy_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "workers.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy",
                                 str(policy_dir), "--listen", target, "--workers", "2"],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_serving(target, proc)
        deadline = time.monotonic() + 30
        children: list[str] = []
        while time.monotonic() < deadline and (
                len(children) < 2 or log_path.read_text().count('"event": "serving"') < 2):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            time.sleep(0.1)
        assert len(children) == 2, children
        assert log_path.read_text().count('"event": "serving"') == 2  # both bound the one port
        for _ in range(20):  # new channels: the kernel spreads connections over both
            assert http_status(call(target, request(principal=BILLING))) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        logged = log_path.read_text()
        assert logged.count('"event": "stopped"') == 2  # and both drained
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        stop(proc)


def test_sigterm_while_workers_start_is_a_clean_stop(policy_dir: Path) -> None:
    """A worker still importing when the supervisor forwards SIGTERM dies of the signal: that
    is the stop that was asked for, so the supervisor exits 0, not 256-15."""
    proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                             "--listen", f"127.0.0.1:{free_port()}", "--workers", "2"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        children: list[str] = []
        while time.monotonic() < deadline and len(children) < 2:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            time.sleep(0.01)
        assert len(children) == 2, children
        proc.send_signal(signal.SIGTERM)  # the workers have not started serving yet
        assert proc.wait(30) == 0
    finally:
        stop(proc)


def test_workers_refuse_a_unix_socket(policy_dir: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                          "--listen", f"unix:{tmp_path}/s.sock", "--workers", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unix socket cannot be shared" in out.stderr


def test_rule_header_is_opt_in_and_names_the_allowing_rule(policy_dir: Path, tmp_path: Path) -> None:
    with running_server(policy_dir, tmp_path) as srv:
        ok = call(srv.target, request())
        assert "x-extauthz-rule" in ok.ok_response.headers_to_remove  # never the caller's copy
        assert "x-extauthz-rule" not in {h.header.key for h in ok.ok_response.headers}
    with running_server(policy_dir, tmp_path, extra=["--rule-header", "x-authz-rule"]) as srv:
        ok = call(srv.target, request())
        headers = {h.header.key: h.header.value for h in ok.ok_response.headers}
        assert headers["x-authz-rule"] == "orders-read"
    out = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policy", "x", "--print-config",
                          "--rule-header", "x-extauthz-principal"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "rule_header: must differ from principal_header" in out.stderr
