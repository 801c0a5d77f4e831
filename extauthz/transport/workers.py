"""`extauthz serve --workers N`: N server processes sharing one TCP port (SO_REUSEPORT).

Python runs one check at a time per process, so on a host with more cores the way to use them
is more processes. The kernel spreads Envoy's connections over the workers. Each worker is a
full `extauthz serve` with its own decision cache and in-process rate-limit state (documented
in docs/operations.md: use the Redis limiter for limits that are exact across workers).

The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every worker. It does not
restart a worker that dies: it stops the others and exits with that worker's status, so the
orchestrator (Kubernetes, systemd) restarts the whole unit and health checks see the outage.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from extauthz.settings import Settings, parse_listen_address

log = logging.getLogger("extauthz.workers")


def _metrics_address(settings: Settings, index: int) -> str:
    host, port = parse_listen_address(settings.metrics_listen)
    return f"{host}:{int(port) + index}"


def run_workers(settings: Settings, serve_argv: Sequence[str]) -> int:
    """Start `settings.workers` workers with the same arguments and supervise them."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Before the first worker exists: a SIGTERM that arrives while they start must reach
    # them, never kill the supervisor alone and leave them running.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(settings.workers):
        if stopping:
            break
        extra = ["--workers", "1"]
        if settings.metrics_listen:  # one metrics port per worker: base port + index
            extra += ["--metrics-listen", _metrics_address(settings, index)]
        env = {**os.environ, "EXTAUTHZ_WORKER_INDEX": str(index)}
        argv = [sys.executable, "-m", "extauthz", "serve", *serve_argv, *extra]
        children.append(subprocess.Popen(argv, env=env))
    if stopping:  # a stop arrived while a worker was being started: it missed the signal
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
    log.info("workers started", extra={"event": "workers_started",
                                        "pids": [c.pid for c in children]})

    status = 0
    while any(c.poll() is None for c in children):
        for child in children:
            code = child.poll()
            if code is not None and code != 0 and not stopping:
                log.error("a worker exited; stopping the others",
                          extra={"event": "worker_exited", "pid": child.pid, "status": code})
                stopping = True
                status = code
                for other in children:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    codes = [c.returncode for c in children]
    if status == 0:
        # A worker still starting when the supervisor forwarded SIGTERM/SIGINT dies of it
        # before its own handlers are installed: that is the stop that was asked for.
        asked = (-signal.SIGTERM, -signal.SIGINT) if stopping else ()
        status = next((c for c in codes if c != 0 and c not in asked), 0)
    log.info("workers stopped", extra={"event": "workers_stopped", "status": codes})
    return status
