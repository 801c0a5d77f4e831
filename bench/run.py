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
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import make_request  # noqa: E402
import microbench  # noqa: E402
import policies  # noqa: E402
import report  # noqa: E402
from common import SECTIONS, Options, Results, Servers  # noqa: E402
from direct import section_direct  # noqa: E402
from memory import section_memory  # noqa: E402
from mesh_rows import section_envoy  # noqa: E402
from procs import (  # noqa: E402
    Procs,
    ensure_tools,
    log,
    machine_info,
)
from transports import section_transports  # noqa: E402

from extauthz.devstack.certs import CertificateAuthority, write_pem  # noqa: E402
from extauthz.devstack.stack import find_envoy  # noqa: E402

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
