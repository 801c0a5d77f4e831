"""Section `direct`: h2load straight at the gRPC Check method (no Envoy), and the py-spy
profile of the cache-hit server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import make_request
from common import (
    BENCH,
    GATEWAY,
    JWT_AUDIENCE,
    JWT_ISSUER,
    REPO,
    Options,
    Results,
    Servers,
    check_once,
)
from envoy.service.auth.v3 import external_auth_pb2 as ea
from load import LOAD_CPU, run_h2load
from procs import (
    Proc,
    cpu_seconds,
    free_tcp_port,
    log,
)

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
