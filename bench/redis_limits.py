#!/usr/bin/env python3
"""Rate-limit backends side by side: what a check costs with the in-memory limiter, one
Redis, and a three-master Redis Cluster; and what the Redis deadline must cover.

    .venv/bin/python bench/redis_limits.py                 # prints the markdown section
    .venv/bin/python bench/redis_limits.py --write         # and puts it in docs/rate-limits.md

Rows ("direct": a grpc.aio client in this process, 64 checks in flight, against one real
`extauthz serve` process; nothing through Envoy):

* server CPU µs per check: user+sys of the server process (/proc/PID/stat) over the
  measured checks, divided by their number;
* Redis round trips per check: pipelines the server sent (its
  `extauthz_ratelimit_redis_round_trips_total`) / checks;
* Redis commands per check: `cmdstat_evalsha` + `cmdstat_eval` calls (INFO commandstats,
  summed over the cluster's masters) / checks.

"deadline": three serve processes, ten bursts of 200 concurrent checks spread over them;
the p50/p99/max of a check's wait for Redis and of a pipeline's round trip, read from the
servers' own metrics.

"failover": `--failovers` times per mode (closed, local), a Sentinel-managed master is
SIGKILLed under traffic from three limiters; after recovery the rest of the budget is
spent; allows above the budget are what the failover forgot.

Everything binds to 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc  # noqa: E402

from extauthz.backends.redis_limiter import RedisLimiter  # noqa: E402
from extauthz.decide.ratelimit import Limit, principal_key  # noqa: E402
from tests.integration.limit_traffic import (  # noqa: E402
    Stream,
    check_request,
    grpc_burst,
    limited_policy,
    paced,
)
from tests.integration.server_process import free_port, running_server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.redis_topologies import RedisClusterNodes, SentinelSetup, cli  # noqa: E402

DOC = REPO / "docs" / "rate-limits.md"
BEGIN = "<!-- bench/redis_limits.py: begin -->"
END = "<!-- bench/redis_limits.py: end -->"
OPEN_POLICY = limited_policy(1_000_000).replace("rate: 1, period: 60s", "rate: 1000000, period: 1s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def script_calls(ports: Sequence[int]) -> int:
    total = 0
    for port in ports:
        for m in re.finditer(
            r"cmdstat_(?:evalsha|eval):calls=(\d+)", cli(port, "info", "commandstats")
        ):
            total += int(m.group(1))
    return total


async def drive(target: str, principal: str, checks: int, concurrency: int = 64) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ea_grpc.AuthorizationStub(ch)
        req = check_request(principal)
        left = checks

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.Check(req, timeout=10)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def direct_row(
    name: str,
    args: list[str],
    redis_ports: Sequence[int],
    policy_text: str,
    *,
    work: Path,
    checks: int,
) -> dict[str, str]:
    policy = work / f"policy-{name.replace(' ', '-')}"
    policy.mkdir()
    (policy / "orders.yaml").write_text(policy_text)
    mport = free_port()
    extra = [
        *args,
        "--decision-log",
        "none",
        "--no-tracing",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
    ]
    with running_server(policy, work, extra=extra) as srv:
        principal = "spiffe://prod.example/ns/burst/sa/bench"
        asyncio.run(drive(srv.target, principal, 500))  # warm-up
        cpu0, trips0 = (
            cpu_seconds(srv.proc.pid),
            metric(mport, "extauthz_ratelimit_redis_round_trips_total"),
        )
        cmds0 = script_calls(redis_ports)
        started = time.perf_counter()
        asyncio.run(drive(srv.target, principal, checks))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(srv.proc.pid) - cpu0
        trips = metric(mport, "extauthz_ratelimit_redis_round_trips_total") - trips0
        cmds = script_calls(redis_ports) - cmds0
    return {
        "backend": name,
        "checks": str(checks),
        "checks/s": f"{checks / wall:,.0f}",
        "server CPU µs/check": f"{cpu / checks * 1e6:.0f}",
        "Redis round trips/check": f"{trips / checks:.3f}" if redis_ports else "0",
        "Redis commands/check": f"{cmds / checks:.3f}" if redis_ports else "0",
    }


def deadline_rows(url: str, work: Path, rounds: int = 10, size: int = 200) -> dict[str, str]:

    policy = work / "policy-deadline"
    policy.mkdir()
    (policy / "orders.yaml").write_text(limited_policy(50))
    with ExitStack() as stack:
        ports = [free_port() for _ in range(3)]
        servers = [
            stack.enter_context(
                running_server(
                    policy,
                    work,
                    extra=[
                        "--rate-limit-backend",
                        "redis",
                        "--redis-url",
                        url,
                        "--decision-log",
                        "none",
                        "--metrics-listen",
                        f"127.0.0.1:{port}",
                    ],
                )
            )
            for port in ports
        ]
        targets = [s.target for s in servers]
        failures = 0
        for n in range(rounds):
            answers = asyncio.run(
                grpc_burst(targets, f"spiffe://prod.example/ns/burst/sa/d{n}", size)
            )
            failures += sum(v for k, v in answers.items() if k.startswith("503"))
        p50 = max(
            metric(p, 'extauthz_ratelimit_check_recent_seconds{quantile="0.5"}') for p in ports
        )
        p99 = max(
            metric(p, 'extauthz_ratelimit_check_recent_seconds{quantile="0.99"}') for p in ports
        )
        trips = sum(metric(p, "extauthz_ratelimit_redis_round_trips_total") for p in ports)
        sent = sum(metric(p, "extauthz_ratelimit_redis_checks_total") for p in ports)
        rtt_sum = sum(metric(p, "extauthz_ratelimit_redis_seconds_sum") for p in ports)
        rtt_n = sum(metric(p, "extauthz_ratelimit_redis_seconds_count") for p in ports)
    return {
        "bursts": f"{rounds} x {size} checks over 3 processes",
        "check wait p50 (worst process)": f"{p50 * 1e3:.1f} ms",
        "check wait p99 (worst process)": f"{p99 * 1e3:.1f} ms",
        "pipeline round trip, mean": f"{rtt_sum / max(rtt_n, 1) * 1e3:.2f} ms",
        "checks per pipeline": f"{sent / max(trips, 1):.1f}",
        "failure-mode answers": str(failures),
    }


def redis_version() -> str:
    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else "?"


def failover_rows(count: int, mode: str) -> list[dict[str, str]]:
    """Kill the Sentinel-managed master under traffic from three limiters (in this
    process); count the allows beyond the budget once everything is spent."""

    burst = 600
    items = [(principal_key("spiffe://td/ns/failover/sa/bench"), Limit(1, 3600.0, burst))]

    async def once(setup: SentinelSetup) -> dict[str, str]:
        rls = [
            RedisLimiter.from_url(setup.url, failure_mode=mode, overlimit_entries=0)
            for _ in range(3)
        ]
        out, stop = Stream(), asyncio.Event()
        try:
            for rl in rls:
                await rl.start()
            traffic = asyncio.create_task(paced(rls, items, stop, out))
            await asyncio.sleep(0.3)
            killed = time.perf_counter()
            await asyncio.to_thread(setup.master.kill)
            while time.perf_counter() - killed < 20:
                await asyncio.sleep(0.1)
                recent = [r for _, r, _ in out.results[-12:]]
                if len(recent) == 12 and not any(r.backend_error or r.degraded for r in recent):
                    break
            recovered = time.perf_counter() - killed
            stop.set()
            await traffic
            for _ in range(burst // 60):
                wave = await asyncio.gather(*(rls[i % 3].hit_many(items) for i in range(60)))
                out.results.extend((0.0, r, 0.0) for r in wave)
        finally:
            for rl in rls:
                await rl.aclose()
        genuine = [r for _, r, _ in out.results if not r.backend_error and not r.degraded]
        allowed = sum(r.allowed for r in genuine)
        return {
            "mode": mode,
            "recovered after": f"{recovered:.2f} s",
            "allowed (budget 600)": str(allowed),
            "extra allows": str(max(0, allowed - burst)),
            "failure-mode answers": str(len(out.results) - len(genuine)),
            "p99 / max answer": f"{out.p99() * 1e3:.1f} / {max(out.latencies()) * 1e3:.1f} ms",
        }

    rows = []
    for _ in range(count):
        with SentinelSetup() as setup:
            rows.append(asyncio.run(once(setup)))
    return rows


def table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines)


@contextmanager
def backends() -> Iterator[tuple[RedisServer, RedisClusterNodes]]:
    with RedisServer() as single, RedisClusterNodes() as cluster:
        yield single, cluster


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checks", type=int, default=6000, help="measured checks per row")
    ap.add_argument("--write", action="store_true", help="update docs/rate-limits.md")
    ap.add_argument(
        "--failovers", type=int, default=3, help="Sentinel failovers to measure per mode"
    )
    opts = ap.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="extauthz-bench-rl-") as tmp,
        backends() as (single, cluster),
    ):
        work = Path(tmp)
        cluster_ports = [n.port for n in cluster.nodes]
        rows = [
            direct_row("memory", [], [], OPEN_POLICY, work=work, checks=opts.checks),
            direct_row(
                "redis (one)",
                ["--rate-limit-backend", "redis", "--redis-url", single.url],
                [single.port],
                OPEN_POLICY,
                work=work,
                checks=opts.checks,
            ),
            direct_row(
                "redis cluster (3 masters)",
                ["--rate-limit-backend", "redis", "--redis-url", cluster.url],
                cluster_ports,
                OPEN_POLICY,
                work=work,
                checks=opts.checks,
            ),
            direct_row(
                "redis (one), caller over its limit",
                ["--rate-limit-backend", "redis", "--redis-url", single.url],
                [single.port],
                limited_policy(1),
                work=work,
                checks=opts.checks,
            ),
        ]
        deadline = [deadline_rows(single.url, work)]
    failovers = [r for mode in ("closed", "local") for r in failover_rows(opts.failovers, mode)]
    load = os.getloadavg()
    section = "\n".join(
        [
            BEGIN,
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores (load average "
            f"{load[0]:.2f} at the end), Redis {redis_version()}, loopback. "
            "Command: `.venv/bin/python bench/redis_limits.py --write`.",
            "",
            table(rows),
            "",
            table(deadline),
            "",
            "Sentinel failover: the master SIGKILLed under ~600 checks/s from three limiters "
            "(`down-after-milliseconds 1000`); after recovery the rest of the 600-check "
            "budget is spent, so `allowed` above 600 would be budget the failover forgot.",
            "",
            table(failovers),
            END,
        ]
    )
    print(section)
    if opts.write:
        text = DOC.read_text()
        start, end = text.find(BEGIN), text.find(END)
        if start < 0 or end < 0:
            print(f"{DOC}: no {BEGIN} ... {END} markers", file=sys.stderr)
            return 1
        DOC.write_text(text[:start] + section + text[end + len(END) :])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
