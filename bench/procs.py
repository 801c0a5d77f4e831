"""Processes of the benchmark: start, pin, measure (CPU, RSS) and stop them, each by its PID.

Also the two tools every section needs (h2load and wrk from Debian) and the machine facts the
report prints. Nothing here knows about a section.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from extauthz.devstack.stack import Proc

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- tools and machine ---------------------------------------------------------------------


def ensure_tools() -> None:
    """h2load (nghttp2-client) and wrk from Debian, like scripts/bootstrap.sh does for redis."""
    wanted = {"h2load": "nghttp2-client", "wrk": "wrk", "taskset": "util-linux"}
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} (Debian packages)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        return
    raise SystemExit(f"missing tools; install them (apt-get install {' '.join(missing)})")


def _version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(1) if found else "?"


def machine_info(envoy: str) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import uvloop  # noqa: PLC0415

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "uvloop": uvloop.__version__,
        "envoy": _version([envoy, "--version"], r"/(\d+\.\d+\.\d+)/"),
        "h2load": _version(["h2load", "--version"], r"nghttp2/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class Procs:
    """Processes started by the benchmark, each stopped by its own PID (SIGTERM, then KILL)."""

    def __init__(self, work: Path, pin: bool) -> None:
        self.work = work
        self.pin = pin
        self.live: list[Proc] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p
        )

    def pinned(self, argv: list[str], cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus, *argv] if (cpus is not None and self.pin) else argv

    def spawn(
        self, name: str, argv: list[str], cpus: str | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        log_path = self.work / f"{name}.log"
        log_file = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                self.pinned(argv, cpus),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        proc = Proc(name, popen, log_path, log_file, 10.0)
        self.live.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc in self.live:
            self.live.remove(proc)
            proc.stop()

    def stop_all(self) -> None:
        while self.live:
            self.live.pop().stop()


def admin_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def start_envoy(
    procs: Procs, envoy: str, name: str, boot: dict[str, Any], admin: int, *, concurrency: int = 1
) -> Proc:
    path = procs.work / f"{name}.json"  # JSON: Envoy parses 10,000 RBAC policies faster
    path.write_text(json.dumps(boot), encoding="utf-8")
    argv = [envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", str(concurrency),
            "-l", "warning"]
    proc = procs.spawn(name, argv)
    deadline = time.monotonic() + 60
    while admin_get(admin, "/ready").strip() != "LIVE":
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {proc.log_path}")
        time.sleep(0.05)
    return proc


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def envoy_counter(admin: int, name: str) -> int:
    for line in admin_get(admin, f"/stats?filter={re.escape(name)}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def free_tcp_port(host: str = "127.0.0.1") -> int:
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: Proc, timeout: float) -> None:
    """Until 127.0.0.1:`port` accepts connections (the HTTP transport opens its listener only
    once the policy is loaded)."""
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} is not listening on {port}; see {proc.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
