"""Load generators: h2load (HTTP/2 and gRPC, or HTTP/1.1 at a fixed rate) and wrk (HTTP/1.1),
their exact command lines recorded in the results, their output parsed into numbers.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOAD_CPU = "1"  # h2load, the OTLP sink, the memory driver


_NUMBER = r"([\d.]+)"


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_h2load(
    results: Any,
    key: str,
    url: str,
    *,
    duration: float,
    clients: int,
    streams: int = 1,
    body: Path | None = None,
    headers: Sequence[str] = (),
    rps: int | None = None,
    h1: bool = False,
    log_file: Path | None = None,
    pin: bool = True,
) -> dict[str, Any]:
    argv = ["h2load", "-D", f"{duration:g}", "-c", str(clients), "-m", str(streams), "-t", "1"]
    if body is not None:
        argv += ["-d", str(body)]
    for h in headers:
        argv += ["-H", h]
    if rps is not None:
        argv += [f"--rps={rps}"]
    if h1:
        argv += ["--h1"]
    if log_file is not None:
        argv += [f"--log-file={log_file}"]
    argv.append(url)
    if pin:
        argv = ["taskset", "-c", LOAD_CPU, *argv]
    results.commands.setdefault(key, shlex.join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    text = out.stdout
    finished = re.search(rf"finished in {_NUMBER}(m?s), {_NUMBER} req/s", text)
    reqs = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if finished is None or reqs is None:
        raise RuntimeError(f"h2load failed ({out.returncode}): {text[-800:]} {out.stderr[-800:]}")
    done, succeeded, failed, errored = (int(reqs.group(i)) for i in (3, 4, 5, 6))
    return {
        "seconds": _seconds(finished.group(1), finished.group(2)),
        "rps": float(finished.group(3)),
        "done": done,
        "succeeded": succeeded,
        "failed": failed + errored,
    }


def run_wrk(
    results: Any,
    key: str,
    url: str,
    *,
    duration: float,
    connections: int,
    headers: Sequence[str],
) -> dict[str, Any]:
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    results.commands.setdefault(key, shlex.join(argv))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    text = out.stdout
    rps = re.search(rf"Requests/sec:\s+{_NUMBER}", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {text[-800:]} {out.stderr[-800:]}")
    lat = {
        p: _seconds(v, u) * 1e3
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    }
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


