#!/usr/bin/env python3
"""The extauthz benchmark: one run, one table, written into docs/benchmarks.md.

    make bench                                  # .venv/bin/python bench/run.py
    python bench/run.py --quick                 # short durations, for trying the harness
    python bench/run.py --only transports       # some sections (direct, envoy, transports,
                                                #   memory, micro)

Sections (each described in docs/benchmarks.md, which this script writes):

1. direct  — h2load against /envoy.service.auth.v3.Authorization/Check with a realistic
             CheckRequest: the floor server, extauthz cache hit, cache miss on 10,000 rules,
             a JWT caller, tracing 100% + decision log. Checks/s and server CPU µs per check
             (user+sys from /proc/PID/stat over the measured window / checks completed).
             The py-spy profile of the cache-hit case is taken here, after its measurement.
2. envoy   — wrk through a real two-sidecar mTLS mesh (envoy_mesh.py): no auth filter,
             native RBAC with the same rules, ext_authz to the floor, ext_authz to extauthz;
             then the same stacks at a fixed 1,000 requests/s (h2load --rps) for added p99.
3. transports — gRPC vs HTTP ext_authz through the same mesh (bench/transports.py): both
             do-nothing floors, extauthz on each transport with default settings and with
             --decision-log none, native RBAC; unloaded added latency; HTTP CPU per check
             direct; --workers 2 behind Envoy --concurrency 2 (checks per worker).
4. memory  — RSS of a real extauthz process driven with 1,000,000 distinct paths from
             100,000 distinct principals (a grpc.aio client in this process).
5. micro   — in-process timings of the hot path's stages, to say where the time goes.

Everything it starts binds to 127.0.0.1, is stopped by PID, and lives in a temporary
directory that is removed at the end (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import envoy_mesh  # noqa: E402
import envoy_rbac  # noqa: E402
import grpc  # noqa: E402
import make_request  # noqa: E402
import memory_drive  # noqa: E402
import microbench  # noqa: E402
import policies  # noqa: E402
import report  # noqa: E402
import yaml  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as ea  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc  # noqa: E402
from load import LOAD_CPU, percentile, run_h2load, run_wrk  # noqa: E402
from procs import (  # noqa: E402
    Proc,
    Procs,
    admin_get,
    cpu_seconds,
    ensure_tools,
    envoy_counter,
    free_tcp_port,
    http_get,
    log,
    machine_info,
    rss_mib,
    start_envoy,
)
from transports import section_transports  # noqa: E402

from extauthz.devstack.certs import CertificateAuthority, write_pem  # noqa: E402
from extauthz.devstack.stack import find_envoy, wait_for_grpc_serving  # noqa: E402
from extauthz.settings import Settings  # noqa: E402

SECTIONS = ("direct", "envoy", "transports", "memory", "micro")
SERVER_CPU = "0"  # the server under test (direct section, memory section)
ALLOWED_PATH = make_request.PATH
FORBIDDEN_PATH = "/v1/refunds/77"  # `orders-refund` is POST only: a GET matches no rule -> 403
JWT_ISSUER = "https://jwt.bench.example"
JWT_AUDIENCE = "orders"
GATEWAY = "spiffe://prod.example/ns/edge/sa/gateway"  # an mTLS peer the policy does not allow


@dataclass
class Options:
    duration: float = 8.0
    warmup: float = 2.0
    clients: int = 2
    streams: int = 32
    wrk_connections: int = 32
    rate: int = 1000
    rate_clients: int = 10
    rate_duration: float = 8.0
    profile_seconds: float = 6.0
    memory_checks: int = 1_000_000
    memory_principals: int = 100_000
    memory_concurrency: int = 64
    memory_grpc_checks: int = 40_000
    rules: int = 10_000
    pin: bool = True
    sections: tuple[str, ...] = SECTIONS
    write_docs: bool = True
    keep: bool = False


@dataclass
class Results:
    options: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    direct: list[dict[str, Any]] = field(default_factory=list)
    envoy: list[dict[str, Any]] = field(default_factory=list)
    rate: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    micro: list[dict[str, Any]] = field(default_factory=list)
    transports: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0




# -- tools and machine ---------------------------------------------------------------------


# -- processes -----------------------------------------------------------------------------


# -- load generators -----------------------------------------------------------------------


# -- servers under test --------------------------------------------------------------------


class Servers:
    def __init__(self, procs: Procs, opts: Options, policy_dir: Path, ca: CertificateAuthority):
        self.procs = procs
        self.opts = opts
        self.policy_dir = policy_dir
        self.ca = ca
        fields = Settings.__dataclass_fields__
        self.has_tracing = "tracing" in fields and "decision_log" in fields
        self.has_identity = "identity" in fields
        self.has_metrics = "metrics_listen" in fields

    def _config(self, name: str, extra: dict[str, Any]) -> Path:
        config: dict[str, Any] = {}
        if self.has_tracing:
            # The plain rows measure authorization alone: no spans, no decision log.
            config.update({"tracing": False, "decision_log": "none"})
        config.update(extra)
        path = self.procs.work / f"{name}.config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def extauthz(
        self,
        name: str,
        *,
        cpus: str | None = SERVER_CPU,
        config: dict[str, Any] | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> tuple[Proc, str]:
        target = f"127.0.0.1:{free_tcp_port()}"
        argv = [
            sys.executable, "-m", "extauthz", "serve",
            "--config", str(self._config(name, config or {})),
            "--policy", str(self.policy_dir),
            "--listen", target,
            "--log-level", "warning",
            *args,
        ]
        self.procs_cmd = shlex.join(self.procs.pinned(argv, cpus))
        proc = self.procs.spawn(name, argv, cpus, env)
        wait_for_grpc_serving(target, proc, 120.0)
        return proc, target

    def floor(self, name: str = "floor", *, cpus: str | None = SERVER_CPU) -> tuple[Proc, str]:
        target = f"127.0.0.1:{free_tcp_port()}"
        capture = self.procs.work / f"{name}.check.bin"
        argv = [sys.executable, str(BENCH / "floor_server.py"), "--listen", target]
        argv += ["--capture", str(capture)]
        self.procs_cmd = shlex.join(self.procs.pinned(argv, cpus))
        proc = self.procs.spawn(name, argv, cpus)
        wait_for_grpc_serving(target, proc, 60.0)
        return proc, target


def check_once(target: str, request: ea.CheckRequest) -> tuple[int, dict[str, str]]:
    with grpc.insecure_channel(target) as channel:
        resp = ea_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    return resp.status.code, headers


# -- section 1: direct gRPC ----------------------------------------------------------------


def _direct_row(
    results: Results,
    opts: Options,
    name: str,
    *,
    proc: Proc,
    target: str,
    body: Path,
    **extra: Any,
) -> dict[str, Any]:
    url = f"http://{target}{make_request.CHECK_METHOD}"
    common = {"clients": opts.clients, "streams": opts.streams, "body": body}
    common["headers"] = make_request.GRPC_HEADERS
    run_h2load(results, "h2load-warmup", url, duration=opts.warmup, pin=opts.pin, **common)
    before = cpu_seconds(proc.popen.pid)
    res = run_h2load(results, "h2load-direct", url, duration=opts.duration, pin=opts.pin, **common)
    used = cpu_seconds(proc.popen.pid) - before
    row = {
        "name": name,
        "checks_per_s": res["rps"],
        "cpu_us_per_check": used / max(res["done"], 1) * 1e6,
        "server_cpu_util": used / res["seconds"],
        "checks": res["done"],
        "failed": res["failed"],
        **extra,
    }
    log(
        f"direct {name}: {row['checks_per_s']:.0f} checks/s, "
        f"{row['cpu_us_per_check']:.1f} µs CPU/check (server at {row['server_cpu_util']:.0%})"
    )
    return row


def section_direct(results: Results, opts: Options, servers: Servers, svid_pem: bytes) -> None:
    work = servers.procs.work
    request = make_request.check_request(cert_pem=svid_pem)
    body = work / "check.bin"
    body.write_bytes(make_request.grpc_frame(request))
    results.commands["request"] = (
        f"python bench/make_request.py --cert billing.crt --out check.bin  # {body.stat().st_size} "
        f"bytes, {len(request.attributes.request.http.headers)} headers"
    )
    procs = servers.procs

    # Floor.
    proc, target = servers.floor()
    results.commands["floor"] = servers.procs_cmd
    code, _ = check_once(target, request)
    assert code == 0, "the floor must answer OK"
    floor = _direct_row(
        results, opts, "floor (constant OK)", proc=proc, target=target, body=body, kind="floor"
    )
    results.direct.append(floor)
    procs.stop(proc)

    # Cache hit (+ the profile).
    proc, target = servers.extauthz("extauthz-hit")
    results.commands["extauthz"] = servers.procs_cmd
    code, headers = check_once(target, request)
    if code != 0 or headers.get("x-extauthz-principal") != make_request.PRINCIPAL:
        raise RuntimeError(f"extauthz did not allow the benchmark request: {code} {headers}")
    results.direct.append(
        _direct_row(
            results, opts, "extauthz, cache hit", proc=proc, target=target, body=body, kind="hit"
        )
    )
    if opts.profile_seconds > 0:
        results.profile = profile_hit(results, opts, proc, target, body)
    procs.stop(proc)

    # Cache miss: h2load sends one body, so the cache is disabled instead.
    proc, target = servers.extauthz("extauthz-miss", args=["--cache-size", "0"])
    results.commands["extauthz-miss"] = servers.procs_cmd
    code, headers = check_once(target, request)
    assert code == 0, headers
    results.direct.append(
        _direct_row(
            results, opts, f"extauthz, cache miss ({opts.rules:,} rules, --cache-size 0)",
            proc=proc, target=target, body=body, kind="miss",
        )
    )
    procs.stop(proc)

    results.direct.append(jwt_row(results, opts, servers, svid_pem))
    results.direct.append(observability_row(results, opts, servers, request, body))


def jwt_row(results: Results, opts: Options, servers: Servers, svid_pem: bytes) -> dict[str, Any]:
    name = "extauthz, JWT caller (verification cached)"
    if not servers.has_identity:
        return {"name": name, "kind": "jwt", "na": "not yet available (no identity settings)"}
    import jwt  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    work = servers.procs.work
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "bench-1", "alg": "ES256", "use": "sig"})
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")
    now = int(time.time())
    token = jwt.encode(
        {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": make_request.PRINCIPAL,
         "iat": now, "exp": now + 3600},
        key, algorithm="ES256", headers={"kid": "bench-1", "typ": "JWT"},
    )
    identity = {
        "jwt": {
            "issuers": [
                {
                    "issuer": JWT_ISSUER,
                    "audiences": [JWT_AUDIENCE],
                    "algorithms": ["ES256"],
                    "jwt_svid": True,
                    "trust_domain": "prod.example",
                    "jwks_file": str(work / "jwks.json"),
                }
            ]
        }
    }
    # The mTLS peer is a gateway the policy does not allow: only a verified JWT allows it.
    gateway = servers.ca.issue_svid(GATEWAY)
    request = make_request.check_request(
        principal=GATEWAY, cert_pem=gateway.cert_pem, headers={"authorization": f"Bearer {token}"}
    )
    body = work / "check-jwt.bin"
    body.write_bytes(make_request.grpc_frame(request))
    try:
        proc, target = servers.extauthz("extauthz-jwt", config={"identity": identity})
    except Exception as exc:
        return {"name": name, "kind": "jwt", "na": f"not yet available ({exc})"[:200]}
    try:
        code, headers = check_once(target, request)
        if code != 0 or headers.get("x-extauthz-principal") != make_request.PRINCIPAL:
            return {"name": name, "kind": "jwt", "na": f"not yet available (check gave {code})"}
        return _direct_row(results, opts, name, proc=proc, target=target, body=body, kind="jwt")
    finally:
        servers.procs.stop(proc)


def observability_row(
    results: Results, opts: Options, servers: Servers, request: ea.CheckRequest, body: Path
) -> dict[str, Any]:
    name = "extauthz, cache hit + tracing 100% + decision log"
    if not servers.has_tracing:
        return {"name": name, "kind": "obs", "na": "not yet available (no tracing settings)"}
    procs = servers.procs
    work = procs.work
    sink_target = f"127.0.0.1:{free_tcp_port()}"
    sink = procs.spawn(
        "otlp-sink",
        [sys.executable, str(BENCH / "otlp_sink.py"), "--listen", sink_target],
        LOAD_CPU,
    )
    decisions = work / "decisions.jsonl"
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{sink_target}",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    config = {"tracing": True, "decision_log": str(decisions)}
    try:
        proc, target = servers.extauthz("extauthz-obs", config=config, env=env)
    except Exception as exc:
        procs.stop(sink)
        return {"name": name, "kind": "obs", "na": f"not yet available ({exc})"[:200]}
    results.commands["extauthz-obs"] = (
        " ".join(f"{k}={v}" for k, v in env.items()) + " " + servers.procs_cmd
    )
    try:
        code, _ = check_once(target, request)
        assert code == 0
        row = _direct_row(results, opts, name, proc=proc, target=target, body=body, kind="obs")
    finally:
        procs.stop(proc)
        procs.stop(sink)
    lines = 0
    with contextlib.suppress(OSError), decisions.open("rb") as fh:
        lines = sum(1 for _ in fh)
    exported = re.search(r"exports=(\d+) bytes=(\d+)", sink.log_path.read_text())
    row["decision_log_lines"] = lines
    row["otlp_exports"] = int(exported.group(1)) if exported else 0
    row["otlp_bytes"] = int(exported.group(2)) if exported else 0
    if lines == 0 or row["otlp_exports"] == 0:
        results.notes.append(
            f"tracing row: {lines} decision-log lines and {row['otlp_exports']} OTLP exports "
            "were seen; the row may not measure what it says"
        )
    return row


def profile_hit(
    results: Results, opts: Options, proc: Proc, target: str, body: Path
) -> dict[str, Any]:
    """Two py-spy recordings under the same load as the measured row, one after the other
    (each attaches with ptrace): collapsed stacks for the tables, then the flame graph.
    `--gil` keeps only samples of the thread holding the GIL (the one doing the work; grpc's
    idle poller thread would otherwise show up as busy), `--native` shows the C frames
    (grpc core, protobuf, uvloop) under the Python ones."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        return {"na": "py-spy is not installed (pip install py-spy)"}
    work = proc.log_path.parent
    svg = REPO / "docs" / "profile-cache-hit.svg" if opts.write_docs else work / "profile.svg"
    raw = work / "profile.txt"
    url = f"http://{target}{make_request.CHECK_METHOD}"
    seconds = opts.profile_seconds
    load = subprocess.Popen(
        [
            "taskset", "-c", LOAD_CPU, "h2load", "-D", f"{2 * seconds + 4:g}",
            "-c", str(opts.clients), "-m", str(opts.streams), "-t", "1", "-d", str(body),
            *(a for h in make_request.GRPC_HEADERS for a in ("-H", h)), url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    errors = []
    try:
        time.sleep(1.0)
        base = [spy, "record", "--pid", str(proc.popen.pid), "--duration", f"{seconds:g}"]
        base += ["--rate", "250", "--gil", "--native"]
        cmd_raw = [*base, "--format", "raw", "--output", str(raw)]
        cmd_svg = [*base, "--format", "flamegraph", "--output", str(svg)]
        results.commands["py-spy"] = shlex.join(
            ["py-spy", *cmd_svg[1:3], "PID", *cmd_svg[4:]]
        ).replace(str(REPO) + "/", "")
        for cmd in (cmd_raw, cmd_svg):
            out = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=False)
            errors.append(out.stderr.decode(errors="replace")[-300:])
    finally:
        load.kill()
        load.wait(timeout=10)
    if not raw.exists():
        return {"na": f"py-spy failed: {errors[0] if errors else '?'}"}
    return summarize_profile(raw.read_text(encoding="utf-8"), svg if svg.exists() else None)


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]+?)(?::(?P<line>\d+))?\)$")
# Where a sample's time is charged: the innermost of these functions on its stack.
BUCKETS = (
    ("IdentityResolver.resolve", "identity (mTLS/XFCC/JWT resolution)"),
    ("DecisionCache.get", "decision cache lookup"),
    ("Authorizer._apply_limits", "rate-limit lookup"),
    ("Authorizer.check", "Authorizer.check, other"),
    ("to_request", "proto.to_request"),
    ("_respond", "response (memoized)"),
    ("observe", "observers (spans, decision log, metrics)"),
    ("AuthorizationServicer.Check", "servicer, other"),
)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", str(REPO) + "/", "lib/python3.11/", "lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
    func = m.group("func")
    if func.startswith("0x"):  # an unsymbolized native frame: name its library
        return f"[native] {Path(path).name.split('.')[0]}"
    return f"{func} ({path})"


def summarize_profile(raw: str, svg: Path | None) -> dict[str, Any]:
    """Shares of the samples: own time by function, time including callees, and buckets that
    split the extauthz servicer's time from the gRPC machinery the floor has too."""
    total = 0
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    buckets: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            _short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        bucket = "grpc.aio, protobuf, event loop (the floor's work too)"
        for frame in reversed(frames):
            name = frame.split(" (", 1)[0]
            found = next((b for key, b in BUCKETS if name.endswith(key)), None)
            if found is not None:
                bucket = found
                break
        buckets[bucket] = buckets.get(bucket, 0) + n

    def top(table: dict[str, int], k: int) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:k]
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in ranked]

    return {
        "samples": total,
        "buckets": top(buckets, len(buckets)),
        "self": top(own, 15),
        "inclusive": [
            x for x in top(inclusive, 400) if x[0].endswith(".py)") and not x[0].startswith(_BORING)
        ][:20],
        "svg": str(svg.relative_to(REPO)) if svg is not None and svg.is_relative_to(REPO) else None,
    }


_BORING = ("_run_module_as_main", "_run_code", "<module>", "main (", "_run (", "_serve (",
           "Runner.run")


# -- section 2: through Envoy --------------------------------------------------------------


def section_envoy(
    results: Results, opts: Options, servers: Servers, envoy: str, certs: dict[str, Path]
) -> None:
    procs = servers.procs
    upstream_port, upstream_admin = free_tcp_port(), free_tcp_port()
    upstream = start_envoy(
        procs, envoy, "envoy-upstream",
        envoy_mesh.upstream(listen_port=upstream_port, admin_port=upstream_admin),
        upstream_admin,
    )
    rbac = envoy_rbac.rbac_filters_for(servers.policy_dir)
    headers = ["traceparent: " + make_request.TRACEPARENT, "accept: application/json"]
    try:
        for variant, label in (
            ("none", "Envoy, no auth filter"),
            ("rbac", f"Envoy + native RBAC ({opts.rules:,} rules)"),
            ("floor", "Envoy + ext_authz → floor"),
            ("extauthz", "Envoy + ext_authz → extauthz"),
        ):
            _envoy_variant(
                results, opts, servers, envoy=envoy, certs=certs, variant=variant, label=label,
                rbac=rbac, headers=headers, upstream_port=upstream_port,
            )
    finally:
        procs.stop(upstream)


def _envoy_variant(
    results: Results,
    opts: Options,
    servers: Servers,
    *,
    envoy: str,
    certs: dict[str, Path],
    variant: str,
    label: str,
    rbac: list[dict[str, Any]],
    headers: list[str],
    upstream_port: int,
) -> None:
    procs = servers.procs
    authz: Proc | None = None
    target = "127.0.0.1:1"
    if variant == "floor":
        authz, target = servers.floor("floor-envoy", cpus=None)
    elif variant == "extauthz":
        authz, target = servers.extauthz("extauthz-envoy", cpus=None)
    server_port, server_admin = free_tcp_port(), free_tcp_port()
    client_port, client_admin = free_tcp_port(), free_tcp_port()
    started: list[Proc] = [] if authz is None else [authz]
    try:
        boot = envoy_mesh.server_sidecar(
            variant,
            listen_port=server_port, admin_port=server_admin, upstream_port=upstream_port,
            authz_target=target, server_cert=str(certs["server.crt"]),
            server_key=str(certs["server.key"]), trust_bundle=str(certs["ca.crt"]),
            rbac_filters=rbac,
        )
        started.append(start_envoy(procs, envoy, f"envoy-server-{variant}", boot, server_admin))
        client = envoy_mesh.client_sidecar(
            listen_port=client_port, admin_port=client_admin, server_port=server_port,
            host=make_request.HOST, svid_cert=str(certs["billing.crt"]),
            svid_key=str(certs["billing.key"]), trust_bundle=str(certs["ca.crt"]),
        )
        started.append(start_envoy(procs, envoy, f"envoy-client-{variant}", client, client_admin))
        if variant in ("floor", "extauthz"):
            # Envoy health-checks the authorization cluster; wait until it is healthy.
            deadline = time.monotonic() + 15
            while "health_flags::healthy" not in admin_get(server_admin, "/clusters"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        allowed = http_get(client_port, ALLOWED_PATH)
        forbidden = http_get(client_port, FORBIDDEN_PATH)
        expect_forbidden = 403 if variant in ("rbac", "extauthz") else 200
        if allowed != 200 or forbidden != expect_forbidden:
            raise RuntimeError(
                f"{variant}: allowed path gave {allowed}, forbidden path gave {forbidden} "
                f"(expected 200 and {expect_forbidden}); logs in {procs.work}"
            )
        url = f"http://127.0.0.1:{client_port}{ALLOWED_PATH}"
        run_wrk(results, "wrk-warmup", url, duration=opts.warmup,
                connections=opts.wrk_connections, headers=headers)
        before = cpu_seconds(authz.popen.pid) if authz else 0.0
        res = run_wrk(results, "wrk", url, duration=opts.duration,
                      connections=opts.wrk_connections, headers=headers)
        used = cpu_seconds(authz.popen.pid) - before if authz else 0.0
        row = {"name": label, "variant": variant, **res}
        if authz is not None:
            row["authz_cpu_us_per_request"] = used / max(res["requests"], 1) * 1e6
        if variant in ("floor", "extauthz"):
            row["ext_authz_ok"] = envoy_counter(server_admin, "http.ingress_http.ext_authz.ok")
        log(f"envoy {variant}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, "
            f"p99 {res['p99_ms']} ms")
        results.envoy.append(row)
        capture = procs.work / "floor-envoy.check.bin"
        if variant == "floor" and capture.exists():
            real = ea.CheckRequest.FromString(capture.read_bytes())
            results.machine["envoy_check_request"] = (
                f"{real.ByteSize():,} bytes, {len(real.attributes.request.http.headers)} headers "
                f"({', '.join(sorted(real.attributes.request.http.headers))})"
            )
        if variant != "rbac":
            results.rate.append(
                _fixed_rate(
                    results, opts, procs.work, variant=variant, label=label, url=url,
                    headers=headers,
                )
            )
    finally:
        for proc in reversed(started):
            procs.stop(proc)


def _fixed_rate(
    results: Results, opts: Options, work: Path, *, variant: str, label: str, url: str,
    headers: list[str],
) -> dict[str, Any]:
    log_file = work / f"rate-{variant}.tsv"
    per_client = max(1, opts.rate // opts.rate_clients)
    res = run_h2load(
        results, "h2load-rate", url, duration=opts.rate_duration + 1, clients=opts.rate_clients,
        rps=per_client, h1=True, headers=headers, log_file=log_file, pin=False,
    )
    rows = []
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].isdigit():
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    rows.sort()
    first = rows[0][0] if rows else 0
    kept = [r for r in rows if r[0] >= first + 1_000_000]  # the first second is warm-up
    lat = sorted(r[2] / 1000 for r in kept)
    bad = sum(1 for r in kept if r[1] != 200)
    row = {
        "name": label,
        "variant": variant,
        "target_rps": per_client * opts.rate_clients,
        "achieved_rps": len(kept) / max(opts.rate_duration, 1e-9),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else float("nan"),
        "requests": len(kept),
        "non_200": bad + res["failed"],
    }
    log(f"rate {variant}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms")
    return row


# -- section 3: memory ---------------------------------------------------------------------


def section_memory(results: Results, opts: Options, servers: Servers) -> None:
    procs = servers.procs
    config = servers._config("memory", {})
    fractions = [0.1, 0.25, 0.5, 0.75, 1.0]
    if opts.memory_grpc_checks:  # a point to compare with the real server's
        fractions.append(opts.memory_grpc_checks / opts.memory_checks)
    # 1. A million distinct checks through the servicer, in a process of its own.
    argv = [
        sys.executable, str(BENCH / "memory_drive.py"), "--policy", str(servers.policy_dir),
        "--config", str(config), "--checks", str(opts.memory_checks),
        "--principals", str(opts.memory_principals),
        "--points", ",".join(f"{f:g}" for f in fractions),
    ]
    results.commands["memory-inprocess"] = shlex.join(procs.pinned(argv, SERVER_CPU)).replace(
        str(REPO) + "/", ""
    )
    log(f"memory: {opts.memory_checks:,} distinct checks in-process")
    out = subprocess.run(
        procs.pinned(argv, SERVER_CPU), capture_output=True, text=True, env=procs.env,
        timeout=1800, check=False,
    )
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines or "done" not in lines[-1]:
        raise RuntimeError(f"memory_drive failed: {out.stderr[-1500:]}")
    summary = lines[-1]
    memory: dict[str, Any] = {
        "checks": opts.memory_checks,
        "principals": opts.memory_principals,
        "cache_size": summary["cache_size"],
        "cache_entries": summary["cache_entries"],
        "limiter_max_keys": summary["limiter_max_keys"],
        "points": lines[:-1],
        "rss_mib": summary["rss_mib"],
        "peak_mib": summary["peak_mib"],
        "seconds": summary["seconds"],
        "checks_per_s": round(opts.memory_checks / max(summary["seconds"], 1e-9)),
    }
    log(f"memory in-process: {summary}")
    # 2. The same traffic through gRPC into a real `extauthz serve`, for a shorter run.
    if opts.memory_grpc_checks:
        memory["grpc"] = _memory_grpc(results, opts, servers)
    results.memory = memory


def _memory_grpc(results: Results, opts: Options, servers: Servers) -> dict[str, Any]:
    metrics_port = free_tcp_port()
    config = {"metrics_listen": f"127.0.0.1:{metrics_port}"} if servers.has_metrics else {}
    proc, target = servers.extauthz("extauthz-memory", config=config)
    results.commands["memory-grpc"] = servers.procs_cmd
    pid = proc.popen.pid
    points: list[dict[str, Any]] = [{"checks": 0, "rss_mib": round(rss_mib(pid)[0], 1)}]
    previous = os.sched_getaffinity(0)
    if opts.pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    t0 = time.monotonic()
    try:
        asyncio.run(_drive_memory(target, opts, [opts.memory_grpc_checks], pid, points))
        elapsed = time.monotonic() - t0
        entries = _metric(metrics_port, "extauthz_decision_cache_entries") if config else None
    finally:
        os.sched_setaffinity(0, previous)
        servers.procs.stop(proc)
    log(f"memory over gRPC: {points}")
    return {
        "checks": opts.memory_grpc_checks,
        "points": points,
        "seconds": round(elapsed, 1),
        "checks_per_s": round(opts.memory_grpc_checks / elapsed),
        "cache_entries": int(entries) if entries is not None else None,
    }


def _metric(port: int, name: str) -> float | None:
    for line in admin_get(port, "/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _drive_memory(
    target: str, opts: Options, marks: list[int], pid: int, points: list[dict[str, Any]]
) -> None:
    """The memory_drive.py traffic (distinct paths, cycling principals), over gRPC."""
    import uvloop  # noqa: PLC0415

    uvloop.install()
    base = memory_drive.template().SerializeToString()
    total = marks[-1]
    counter = iter(range(total))
    done = 0
    pending = list(marks)
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(make_request.CHECK_METHOD)

        async def worker() -> None:
            nonlocal done
            for i in counter:
                await call(memory_drive.wire(base, i, opts.memory_principals), timeout=30)
                done += 1
                if pending and done >= pending[0]:
                    pending.pop(0)
                    points.append(
                        {"checks": done, "rss_mib": round(rss_mib(pid)[0], 1),
                         "seconds": round(time.monotonic() - t0, 1)}
                    )

        await asyncio.gather(*(worker() for _ in range(opts.memory_concurrency)))


# -- main ----------------------------------------------------------------------------------


def make_certs(work: Path) -> tuple[CertificateAuthority, dict[str, Path], bytes]:
    ca = CertificateAuthority.create("prod.example")
    d = work / "certs"
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.crt").write_bytes(ca.cert_pem)
    server = write_pem(d, "server", ca.issue_server_cert(dns_names=(make_request.HOST,)))
    billing = ca.issue_svid(make_request.PRINCIPAL)
    client = write_pem(d, "billing", billing)
    certs = {
        "ca.crt": d / "ca.crt",
        "server.crt": server.cert,
        "server.key": server.key,
        "billing.crt": client.cert,
        "billing.key": client.key,
    }
    return ca, certs, billing.cert_pem


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description="extauthz benchmark (writes docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="short runs, to try the harness")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--duration", type=float, help="measured seconds per row (default 8)")
    p.add_argument("--memory-checks", type=int, help="checks for the memory run (default 1e6)")
    p.add_argument("--no-pin", action="store_true", help="do not pin server/load to CPUs")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.*")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    opts = Options()
    if args.quick:
        opts = Options(duration=2, warmup=1, rate_duration=3, profile_seconds=2,
                       memory_checks=50_000, memory_principals=10_000,
                       memory_grpc_checks=5_000)
    if args.duration:
        opts.duration = opts.rate_duration = args.duration
    if args.memory_checks:
        opts.memory_checks = args.memory_checks
    if args.only:
        wanted = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(wanted) - set(SECTIONS)
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}")
        opts.sections = wanted
    opts.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    opts.write_docs = not args.no_docs
    opts.keep = args.keep
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    ensure_tools()
    envoy = find_envoy()
    started = time.monotonic()
    results = Results(options=asdict(opts))
    results.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results.machine = machine_info(envoy)
    work = Path(tempfile.mkdtemp(prefix="extauthz-bench-"))
    procs = Procs(work, opts.pin)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        policy_dir = work / "policy"
        policies.generate(policy_dir, opts.rules)
        results.commands["policy"] = f"python bench/policies.py DIR  # {opts.rules:,} rules"
        ca, certs, svid_pem = make_certs(work)
        servers = Servers(procs, opts, policy_dir, ca)
        if "micro" in opts.sections:
            log("micro: in-process stage timings")
            try:
                results.micro = microbench.run(policy_dir, svid_pem)
            except Exception as exc:  # it reaches into the server's internals
                results.notes.append(f"in-process stage timings failed: {exc!r}")
        if "direct" in opts.sections:
            section_direct(results, opts, servers, svid_pem)
        if "envoy" in opts.sections:
            section_envoy(results, opts, servers, envoy, certs)
        if "transports" in opts.sections:
            section_transports(results, opts, procs, envoy, certs, policy_dir=policy_dir)
        if "memory" in opts.sections:
            section_memory(results, opts, servers)
    finally:
        procs.stop_all()
        results.seconds = round(time.monotonic() - started, 1)
        saved = Path(tempfile.gettempdir()) / "extauthz-bench-results.json"
        saved.write_text(json.dumps(asdict(results), indent=2, default=str))
        log(f"results saved to {saved} (re-render with: python bench/report.py {saved})")
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    results.machine["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report.render(asdict(results))
    print(report.console(asdict(results)))
    if opts.write_docs:
        (REPO / "docs" / "benchmarks.md").write_text(text, encoding="utf-8")
        chart = report.chart(asdict(results), REPO / "docs" / "benchmarks.png")
        log(f"wrote docs/benchmarks.md{' and docs/benchmarks.png' if chart else ''}")
    log(f"done in {results.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
