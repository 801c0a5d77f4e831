"""Section `envoy`: wrk through the two-sidecar mTLS mesh (envoy_mesh.py), then the same
stacks at a fixed rate (h2load --rps) for the added p99.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import envoy_mesh
import envoy_rbac
import make_request
from common import (
    ALLOWED_PATH,
    FORBIDDEN_PATH,
    Options,
    Results,
    Servers,
)
from envoy.service.auth.v3 import external_auth_pb2 as ea
from load import percentile, run_h2load, run_wrk
from procs import (
    Proc,
    admin_get,
    cpu_seconds,
    envoy_counter,
    free_tcp_port,
    http_get,
    log,
    start_envoy,
)

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
