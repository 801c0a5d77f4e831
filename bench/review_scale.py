"""Does `extauthz review` stay streaming on a big decision log?

    python bench/review_scale.py [--lines 1000000 100000] [--gzip] [--workdir DIR]

Generates decision logs of the given sizes against the demo policy (lines made the way the
server makes them: the compiled policy decides and `decision_log.record` writes the line,
then ids, times and callers are varied), then runs `extauthz review` (with --patch-out) and
`extauthz inventory` on each in a fresh process and prints wall time and peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, measured inside that process).

The mix: checkout reading orders by id (unique ids), creating orders, reading stock; orders
charging; billing denied on DELETE; 3% callers with a unique undeclared SPIFFE ID each (to
push the bounded principal/denial tables past their caps); 2% unauthenticated, arriving in
bursts; 1% decisions of a policy version that is not supplied; 0.1% malformed lines and a
truncated last line. Peak RSS should not grow with the number of lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extauthz.decide.pipeline import CheckResult  # noqa: E402
from extauthz.devstack.stack import DEFAULT_POLICY_DIR  # noqa: E402
from extauthz.model import (  # noqa: E402
    Decision,
    Identity,
    IdentitySource,
    Outcome,
    Reason,
    Request,
)
from extauthz.observe.decision_log import format_line, record  # noqa: E402
from extauthz.sources.policy_store import load_policy  # noqa: E402

T0 = 1_714_564_800  # 2024-05-01T12:00:00Z
TD = "demo.local"
CHECKOUT = f"spiffe://{TD}/ns/shop/sa/checkout"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"
BILLING = f"spiffe://{TD}/ns/payments/sa/billing"
STRANGER = f"spiffe://{TD}/ns/x/sa/s__N__"

# (weight, principal, method, host, path); __N__ becomes a running number.
MIX = [
    (50, CHECKOUT, "GET", "orders.demo.local", "/v1/orders/__N__"),
    (10, CHECKOUT, "POST", "orders.demo.local", "/v1/orders"),
    (15, CHECKOUT, "GET", "inventory.demo.local", "/v1/stock/sku-__N__"),
    (10, ORDERS, "POST", "billing.demo.local", "/v1/charges"),
    (9, BILLING, "DELETE", "orders.demo.local", "/v1/orders/__N__"),
    (3, STRANGER, "GET", "orders.demo.local", "/v1/orders/__N__"),
    (2, None, "GET", "orders.demo.local", "/v1/orders"),
    (1, CHECKOUT, "POST", "orders.demo.local", "/v1/orders"),  # an unknown policy version
]


def templates() -> list[tuple[int, str]]:
    policy = load_policy(DEFAULT_POLICY_DIR)
    out = []
    for i, (weight, who, method, host, path) in enumerate(MIX):
        if who is None:
            decision = Decision(Outcome.UNAUTHENTICATED, Reason.NO_IDENTITY,
                                policy_version=policy.version)
        else:
            ident = Identity(who, IdentitySource.MTLS, TD)
            decision = policy.evaluate(ident, host, method, path.replace("__N__", "1")).decision
        line = format_line(record(T0, Request(method=method, host=host, path=path),
                                  CheckResult(decision), 0.00005)).decode()
        if i == len(MIX) - 1:
            line = line.replace(policy.version, "0ld0ld0ld0ld0ld0")
        out.append((weight, line.replace("2024-05-01T12:00:00.000000Z", "__T__")))
    return out


def generate(path: Path, lines: int, use_gzip: bool) -> None:
    rng = random.Random(42)
    tmpls = templates()
    choices = [t for w, t in tmpls for _ in range(w)]
    opened: IO[str] = (gzip.open(path, "wt", compresslevel=1) if use_gzip  # noqa: SIM115
                       else path.open("w", encoding="ascii"))
    with opened as f:
        stamp, second = "", -1
        buf = []
        for n in range(lines):
            sec = T0 + n // 20  # 20 decisions a second
            if sec != second:
                second = sec
                stamp = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            if n % 1000 == 999:
                buf.append("{this is not json\n")
                continue
            line = rng.choice(choices)
            buf.append(line.replace("__T__", f"{stamp}.{n % 20 * 50000:06d}Z")
                       .replace("__N__", str(n)))
            if len(buf) >= 10_000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
        f.write('{"schema_version":1,"time":"2024-')  # truncated last line


def measure(argv: list[str]) -> None:
    """Child process: run one CLI command, print its wall time and peak RSS as JSON."""
    from extauthz.cli.main import main  # noqa: PLC0415 - only the child process needs it

    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        saved, sys.stdout = sys.stdout, sink
        try:
            code = main(argv)
        finally:
            sys.stdout = saved
    print(json.dumps({"seconds": time.perf_counter() - start, "exit": code,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(argv: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--measure", *argv], check=True,
                         capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 100_000])
    ap.add_argument("--gzip", action="store_true", help="write the logs gzip-compressed")
    ap.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="review-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'lines':>10} {'log MB':>8} {'command':>10} {'seconds':>8} {'lines/s':>9} "
          f"{'peak RSS MB':>11}")
    baseline = run(["inventory", "--policy", str(DEFAULT_POLICY_DIR)])
    print(f"{0:>10} {0:>8} {'(no logs)':>10} {baseline['seconds']:>8.2f} {'-':>9} "
          f"{baseline['maxrss_mb']:>11.1f}")
    for n in args.lines:
        log = work / (f"decisions-{n}.log" + (".gz" if args.gzip else ""))
        t = time.perf_counter()
        generate(log, n, args.gzip)
        gen = time.perf_counter() - t
        size = log.stat().st_size / 1e6
        for name in ("review", "inventory"):
            argv = [name, "--policy", str(DEFAULT_POLICY_DIR), "--logs", str(log)]
            if name == "review":
                argv += ["--patch-out", str(work / "tighten.patch")]
            r = run(argv)
            print(f"{n:>10} {size:>8.1f} {name:>10} {r['seconds']:>8.2f} "
                  f"{n / r['seconds']:>9.0f} {r['maxrss_mb']:>11.1f}", flush=True)
        print(f"{'':>10} (generated in {gen:.1f}s)")
        if args.workdir is None:
            log.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
