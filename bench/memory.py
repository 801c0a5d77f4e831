"""Section `memory`: RSS of a real extauthz process under many distinct keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import grpc
import make_request
import memory_drive
from common import (
    BENCH,
    REPO,
    SERVER_CPU,
    Options,
    Results,
    Servers,
)
from load import LOAD_CPU
from procs import (
    admin_get,
    free_tcp_port,
    log,
    rss_mib,
)

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
