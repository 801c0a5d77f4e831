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

from extauthz.settings import Settings, SettingsError, parse_listen_address
from extauthz.transport.listeners import SUPERVISOR_ENV

log = logging.getLogger("extauthz.workers")


def check_workers(settings: Settings) -> None:
    if settings.workers <= 1:
        return
    for addr in (*settings.listen, *settings.http_listen):
        host, port = parse_listen_address(addr)
        if host == "unix":
            raise SettingsError(
                "workers: a unix socket cannot be shared by several workers; listen on "
                "HOST:PORT (SO_REUSEPORT) or run one worker per socket"
            )
        if port == 0:
            raise SettingsError("workers: port 0 would give every worker its own port")


def _metrics_address(settings: Settings, index: int) -> str:
    host, port = parse_listen_address(settings.metrics_listen)
    return f"{host}:{int(port) + index}"


# A worker stopped by the signal the supervisor forwarded, in any phase of its start-up:
# Python's default action (-15) before the server installs its handler, 0 after it drained.
_DRAINED = frozenset({0, -signal.SIGTERM})


def run_workers(settings: Settings, serve_argv: Sequence[str]) -> int:  # noqa: C901 - its owner (issue 19 splits it); see docs/architecture.md
    """Start `settings.workers` workers with the same arguments and supervise them.

    Exit status: 0 after a drain (SIGTERM/SIGINT), whatever phase each worker was in;
    otherwise the first failing worker's status (1 for a worker killed by a signal)."""
    check_workers(settings)
    children: list[subprocess.Popen[bytes]] = []
    stopping = False
    terminated: set[int] = set()  # pids already sent SIGTERM

    def terminate_all() -> None:
        for child in children:
            if child.pid not in terminated and child.poll() is None:
                terminated.add(child.pid)
                child.send_signal(signal.SIGTERM)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True  # workers drain on SIGTERM in every phase
            terminate_all()
            return
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Installed before the first worker starts: a SIGTERM during start-up must reach the
    # workers already started, and no worker starts after it. SIGHUP is *ignored* while the
    # workers are spawned: an ignored disposition survives exec, so each worker ignores a
    # reload until its server installs its own handler (a forwarded SIGHUP would otherwise
    # kill a starting worker; it reads the current files as it starts anyway).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for index in range(settings.workers):
        if stopping:
            break
        extra = ["--workers", "1"]
        if settings.metrics_listen:  # one metrics port per worker: base port + index
            extra += ["--metrics-listen", _metrics_address(settings, index)]
        env = {**os.environ, "EXTAUTHZ_WORKER_INDEX": str(index),
               SUPERVISOR_ENV: str(os.getpid())}
        argv = [sys.executable, "-m", "extauthz", "serve", *serve_argv, *extra]
        # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards a
        # SIGTERM (a SIGINT would interrupt a starting worker with KeyboardInterrupt).
        children.append(subprocess.Popen(argv, env=env, start_new_session=True))
    signal.signal(signal.SIGHUP, forward)
    log.info("workers started", extra={"event": "workers_started",
                                        "pids": [c.pid for c in children]})

    failed: int | None = None
    while any(c.poll() is None for c in children):
        if stopping:  # including a worker whose start the signal interrupted
            terminate_all()
        for child in children:
            code = child.poll()
            if code is not None and failed is None and not stopping and code != 0:
                log.error("a worker exited; stopping the others",
                          extra={"event": "worker_exited", "pid": child.pid, "status": code})
                failed = code
                terminate_all()
        time.sleep(0.05)
    codes = [c.returncode for c in children]
    if failed is None:
        # During a drain only a worker that reported its own error counts (e.g. exit 1).
        failed = next((c for c in codes if c not in _DRAINED), None)
    log.info("workers stopped", extra={"event": "workers_stopped", "status": codes})
    if failed is None:
        return 0
    return failed if failed > 0 else 1
