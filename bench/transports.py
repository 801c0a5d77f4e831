"""Section `transports`: gRPC versus HTTP ext_authz, through the two-sidecar mTLS mesh.

Rows, each through the same mesh (envoy_mesh.py) and upstream:

* loaded (wrk, `--connections` connections): Envoy without auth; native RBAC; ext_authz on
  each transport to its do-nothing floor (bench/floor_server.py, bench/http_floor_server.py);
  ext_authz on each transport to extauthz with its **default settings** (decision log to
  stdout, tracing on but without an exporter: no spans) and with `--decision-log none`.
  Requests/s, p50/p99, CPU per request of the authorizer and of the server sidecar Envoy.
* unloaded (wrk, one connection, one request at a time): p50/p99, and the latency each
  authorizer adds to Envoy without auth.
* direct (wrk straight at the HTTP listener, no Envoy): authorizer CPU per check.
* workers: `extauthz serve --workers 2` behind a server sidecar with `--concurrency 2`, for
  each transport (gRPC also with `max_concurrent_streams` on the authz cluster): the share
  of checks each worker decided, read from each worker's Prometheus endpoint.

Every process binds 127.0.0.1 and is stopped by its PID (procs.Procs).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import envoy_mesh
import envoy_rbac
import make_request
import yaml
from load import run_wrk
from procs import (
    Proc,
    Procs,
    admin_get,
    cpu_seconds,
    free_tcp_port,
    http_get,
    log,
    start_envoy,
    wait_listening,
)

from extauthz.devstack.stack import wait_for_grpc_serving

BENCH = Path(__file__).resolve().parent
ALLOWED_PATH = make_request.PATH
FORBIDDEN_PATH = "/v1/refunds/77"
HEADERS = ["traceparent: " + make_request.TRACEPARENT, "accept: application/json"]
# What the server sidecar sends extauthz's HTTP transport for the allowed request.
DIRECT_HEADERS = [
    f"Host: {make_request.HOST}",  # wrk replaces its own Host only when spelled "Host"
    "content-length: 0",
    "x-forwarded-client-cert: By=spiffe://prod.example/ns/orders/sa/orders;"
    f"Hash={'3f2c9a7d' * 8};URI={make_request.PRINCIPAL}",
    "traceparent: " + make_request.TRACEPARENT,
    "x-request-id: 5f0e2b1c-7a6d-4e8f-9c3b-2a1d0e9f8c7b",
]


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    filter: str  # envoy_mesh variant: none | rbac | floor | extauthz
    transport: str = "grpc"
    authz: str = ""  # "" | grpc-floor | http-floor | extauthz
    config: tuple[tuple[str, Any], ...] = ()
    streams: int = 0  # gRPC: the authz cluster's max_concurrent_streams (0: Envoy's default)


DEFAULTS: tuple[tuple[str, Any], ...] = (("tracing", True), ("decision_log", "stdout"))
BARE: tuple[tuple[str, Any], ...] = (("tracing", True), ("decision_log", "none"))

VARIANTS = (
    Variant("none", "Envoy, no auth filter", "none"),
    Variant("rbac", "Envoy + native RBAC", "rbac"),
    Variant("http-floor", "ext_authz HTTP → do-nothing uvloop+httptools", "floor", "http",
            "http-floor"),
    Variant("grpc-floor", "ext_authz gRPC → do-nothing grpc.aio+uvloop", "floor", "grpc",
            "grpc-floor"),
    Variant("http-extauthz", "ext_authz HTTP → extauthz, default settings", "extauthz",
            "http", "extauthz", DEFAULTS),
    Variant("grpc-extauthz", "ext_authz gRPC → extauthz, default settings", "extauthz",
            "grpc", "extauthz", DEFAULTS),
    Variant("http-extauthz-bare", "ext_authz HTTP → extauthz, --decision-log none",
            "extauthz", "http", "extauthz", BARE),
    Variant("grpc-extauthz-bare", "ext_authz gRPC → extauthz, --decision-log none",
            "extauthz", "grpc", "extauthz", BARE),
    Variant("grpc-extauthz-bare-streams1", "ext_authz gRPC (max_concurrent_streams 1) → "
            "extauthz, --decision-log none", "extauthz", "grpc", "extauthz", BARE, streams=1),
)


class Authorizers:
    """Starts the authorizer of a variant: a floor, or extauthz on one transport."""

    def __init__(self, procs: Procs, policy_dir: Path) -> None:
        self.procs = procs
        self.policy_dir = policy_dir
        self.commands: dict[str, str] = {}

    def start(self, name: str, kind: str, transport: str, *,
              config: Sequence[tuple[str, Any]] = (), args: Sequence[str] = (),
              env: dict[str, str] | None = None) -> tuple[Proc, str]:
        port = free_tcp_port()
        target = f"127.0.0.1:{port}"
        if kind == "http-floor":
            argv = [sys.executable, str(BENCH / "http_floor_server.py"), "--listen", target]
        elif kind == "grpc-floor":
            argv = [sys.executable, str(BENCH / "floor_server.py"), "--listen", target]
        else:
            path = self.procs.work / f"{name}.config.yaml"
            path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
            flag = "--http-listen" if transport == "http" else "--listen"
            argv = [sys.executable, "-m", "extauthz", "serve", "--config", str(path),
                    "--policy", str(self.policy_dir), flag, target, "--log-level", "warning",
                    *args]
        environment = {"OTEL_TRACES_EXPORTER": "", **(env or {})} if kind == "extauthz" else None
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.commands[name] = (shown + " python " + " ".join(argv[1:])).strip()
        proc = self.procs.spawn(name, argv, None, environment)
        if transport == "http":
            wait_listening(port, proc, 120.0)
        else:
            wait_for_grpc_serving(target, proc, 120.0)  # type: ignore[arg-type]
        return proc, target


def _mesh(procs: Procs, envoy: str, certs: dict[str, Path], *, variant: Variant,
          authz_target: str, upstream_port: int, rbac: list[dict[str, Any]],
          concurrency: int = 1, streams: int = 0, per_connection_pools: bool = False,
          ) -> tuple[list[Proc], int, int]:
    server_port, server_admin = free_tcp_port(), free_tcp_port()
    client_port, client_admin = free_tcp_port(), free_tcp_port()
    boot = envoy_mesh.server_sidecar(
        variant.filter, listen_port=server_port, admin_port=server_admin,
        upstream_port=upstream_port, authz_target=authz_target,
        server_cert=str(certs["server.crt"]), server_key=str(certs["server.key"]),
        trust_bundle=str(certs["ca.crt"]), rbac_filters=rbac, transport=variant.transport,
        max_concurrent_streams=streams,
    )
    started = [start_envoy(procs, envoy, f"envoy-server-{variant.key}", boot, server_admin,
                           concurrency=concurrency)]
    client = envoy_mesh.client_sidecar(
        listen_port=client_port, admin_port=client_admin, server_port=server_port,
        host=make_request.HOST, svid_cert=str(certs["billing.crt"]),
        svid_key=str(certs["billing.key"]), trust_bundle=str(certs["ca.crt"]),
    )
    if per_connection_pools:  # one mTLS connection per wrk connection: both workers busy
        cluster = client["static_resources"]["clusters"][0]
        cluster["connection_pool_per_downstream_connection"] = True
    started.append(start_envoy(procs, envoy, f"envoy-client-{variant.key}", client,
                               client_admin, concurrency=concurrency))
    if variant.authz:
        deadline = time.monotonic() + 15
        while "health_flags::healthy" not in admin_get(server_admin, "/clusters"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    allowed = http_get(client_port, ALLOWED_PATH)
    forbidden = http_get(client_port, FORBIDDEN_PATH)
    expect = 403 if variant.filter in ("rbac", "extauthz") else 200
    if allowed != 200 or forbidden != expect:
        raise RuntimeError(f"{variant.key}: allowed path {allowed}, forbidden path {forbidden} "
                           f"(expected 200 and {expect}); logs in {procs.work}")
    return started, client_port, server_admin


@dataclass
class Run:
    """What every row of the section shares."""

    results: Any
    opts: Any
    procs: Procs
    envoy: str
    certs: dict[str, Path]
    authorizers: Authorizers
    upstream_port: int
    rbac: list[dict[str, Any]]
    table: dict[str, Any]

    def mesh(self, variant: Variant, authz_target: str, *, concurrency: int = 1,
             streams: int = 0, per_connection_pools: bool = False,
             ) -> tuple[list[Proc], int]:
        started, port, _admin = _mesh(
            self.procs, self.envoy, self.certs, variant=variant, authz_target=authz_target,
            upstream_port=self.upstream_port, rbac=self.rbac, concurrency=concurrency,
            streams=streams, per_connection_pools=per_connection_pools)
        return started, port

    def wrk(self, key: str, url: str, connections: int, headers: list[str]) -> dict[str, Any]:
        return run_wrk(self.results, key, url, duration=self.opts.duration,
                       connections=connections, headers=headers)

    def warm(self, url: str, headers: list[str]) -> None:
        run_wrk(self.results, "wrk-warmup", url, duration=self.opts.warmup,
                connections=self.opts.wrk_connections, headers=headers)


def section_transports(results: Any, opts: Any, procs: Procs, envoy: str,
                       certs: dict[str, Path], *, policy_dir: Path) -> None:
    authorizers = Authorizers(procs, policy_dir)
    upstream_port, upstream_admin = free_tcp_port(), free_tcp_port()
    upstream = start_envoy(procs, envoy, "envoy-upstream-t",
                           envoy_mesh.upstream(listen_port=upstream_port,
                                               admin_port=upstream_admin), upstream_admin)
    table: dict[str, Any] = {"loaded": [], "unloaded": [], "direct": [], "workers": []}
    run = Run(results, opts, procs, envoy, certs, authorizers, upstream_port,
              envoy_rbac.rbac_filters_for(policy_dir), table)
    try:
        for variant in VARIANTS:
            _loaded_and_unloaded(run, variant)
        _direct(run)
        for transport, streams in (("http", 0), ("grpc", 0), ("grpc", 1)):
            _workers(run, transport, streams)
    finally:
        procs.stop(upstream)
    none = next((r for r in table["unloaded"] if r["variant"] == "none"), None)
    for row in table["unloaded"]:
        if none is not None and row["p50_ms"] is not None and none["p50_ms"] is not None:
            row["added_p50_ms"] = row["p50_ms"] - none["p50_ms"]
            row["added_p99_ms"] = row["p99_ms"] - none["p99_ms"]
    table["commands"] = authorizers.commands
    results.transports = table


def _loaded_and_unloaded(run: Run, variant: Variant) -> None:
    procs = run.procs
    started: list[Proc] = []
    authz: Proc | None = None
    target = "127.0.0.1:1"
    try:
        if variant.authz:
            authz, target = run.authorizers.start(f"t-{variant.key}", variant.authz,
                                                  variant.transport, config=variant.config)
            started.append(authz)
        mesh, client_port = run.mesh(variant, target, streams=variant.streams)
        started += mesh
        server_envoy = mesh[0]
        url = f"http://127.0.0.1:{client_port}{ALLOWED_PATH}"
        run.warm(url, HEADERS)
        before = (cpu_seconds(authz.popen.pid) if authz else 0.0,
                  cpu_seconds(server_envoy.popen.pid))
        res = run.wrk("wrk", url, run.opts.wrk_connections, HEADERS)
        n = max(res["requests"], 1)
        row = {"variant": variant.key, "name": variant.label, "transport": variant.transport,
               **res,
               "envoy_cpu_us": (cpu_seconds(server_envoy.popen.pid) - before[1]) / n * 1e6}
        if authz is not None:
            row["authz_cpu_us"] = (cpu_seconds(authz.popen.pid) - before[0]) / n * 1e6
        run.table["loaded"].append(row)
        log(f"transports {variant.key}: {res['rps']:.0f} req/s, authz "
            f"{row.get('authz_cpu_us', 0):.0f} µs, envoy {row['envoy_cpu_us']:.0f} µs")
        one = run.wrk("wrk-unloaded", url, 1, HEADERS)
        run.table["unloaded"].append({"variant": variant.key, "name": variant.label,
                                      "rps": one["rps"], "p50_ms": one["p50_ms"],
                                      "p99_ms": one["p99_ms"]})
    finally:
        for proc in reversed(started):
            procs.stop(proc)


def _direct(run: Run) -> None:
    sink_target = f"127.0.0.1:{free_tcp_port()}"
    sink = run.procs.spawn("t-otlp-sink", [sys.executable, str(BENCH / "otlp_sink.py"),
                                           "--listen", sink_target])
    traced_env = {  # the caller's traceparent is sampled: every check is a span, exported
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{sink_target}",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
    }
    traced = (("tracing", True), ("decision_log", str(run.procs.work / "t-decisions.jsonl")))
    try:
        for key, kind, config, env in (("http-floor", "http-floor", (), None),
                                       ("http-extauthz", "extauthz", DEFAULTS, None),
                                       ("http-extauthz-bare", "extauthz", BARE, None),
                                       ("http-extauthz-traced-100%+log-file", "extauthz",
                                        traced, traced_env)):
            _direct_row(run, key, kind, config, env)
    finally:
        run.procs.stop(sink)


def _direct_row(run: Run, key: str, kind: str, config: Sequence[tuple[str, Any]],
                env: dict[str, str] | None) -> None:
    proc, target = run.authorizers.start(f"d-{key}", kind, "http", config=config, env=env)
    try:
        url = f"http://{target}{ALLOWED_PATH}"
        run.warm(url, DIRECT_HEADERS)
        before = cpu_seconds(proc.popen.pid)
        res = run.wrk("wrk-direct", url, run.opts.wrk_connections, DIRECT_HEADERS)
        used = cpu_seconds(proc.popen.pid) - before
        cpu = used / max(res["requests"], 1) * 1e6
        run.table["direct"].append({"variant": key, "rps": res["rps"],
                                    "non_2xx": res["non_2xx"], "cpu_us": cpu})
        log(f"direct {key}: {res['rps']:.0f} checks/s, {cpu:.1f} µs CPU per check")
    finally:
        run.procs.stop(proc)


_CHECKS = re.compile(r'^extauthz_checks_total\{[^}]*\} ([0-9.e+]+)$', re.MULTILINE)


def _checks(port: int) -> float:
    text = admin_get(port, "/metrics")
    return sum(float(v) for v in _CHECKS.findall(text))


def _workers(run: Run, transport: str, streams: int) -> None:
    metrics = free_tcp_port()
    while not _free(metrics + 1):  # worker i serves metrics on metrics + i: both must be free
        metrics = free_tcp_port()
    key = f"{transport}-workers" + (f"-streams{streams}" if streams else "")
    started: list[Proc] = []
    try:
        proc, target = run.authorizers.start(
            f"w-{key}", "extauthz", transport, config=BARE,
            args=("--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics}"))
        started.append(proc)
        deadline = time.monotonic() + 60
        while not all(admin_get(metrics + i, "/metrics") for i in (0, 1)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{key}: worker metrics not up; see {proc.log_path}")
            time.sleep(0.1)
        variant = Variant(key, key, "extauthz", transport, "extauthz")
        mesh, client_port = run.mesh(variant, target, concurrency=2, streams=streams,
                                     per_connection_pools=True)
        started += mesh
        url = f"http://127.0.0.1:{client_port}{ALLOWED_PATH}"
        run.warm(url, HEADERS)
        before = [_checks(metrics + i) for i in (0, 1)]
        res = run.wrk("wrk-workers", url, run.opts.wrk_connections, HEADERS)
        counts = [_checks(metrics + i) - before[i] for i in (0, 1)]
        total = sum(counts) or 1.0
        row = {"variant": key, "transport": transport, "max_concurrent_streams": streams,
               "rps": res["rps"], "shares": [round(c / total, 3) for c in counts],
               "checks": counts}
        run.table["workers"].append(row)
        log(f"workers {key}: shares {row['shares']} at {res['rps']:.0f} req/s")
    finally:
        for p in reversed(started):
            run.procs.stop(p)


def _free(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
