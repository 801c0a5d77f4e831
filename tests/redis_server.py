"""A real, throwaway `redis-server` for tests.

Starts on a free loopback port with its own temp dir and no persistence, waits for PING,
and is stopped, killed, paused (SIGSTOP) and resumed (SIGCONT) strictly by the PID it
started: never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

INSTALL_HINT = (
    "redis-server is required for the Redis limiter tests and was not found on PATH.\n"
    "Install it:  Debian/Ubuntu: sudo apt-get install redis-server   "
    "Fedora: sudo dnf install redis   macOS: brew install redis\n"
    "or set REDIS_SERVER=/path/to/redis-server (or run a Docker engine: testcontainers is "
    "used then)."
)


def find_redis_server() -> str | None:
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process. `start()` may be called again after `kill()` or `stop()`:
    it comes back on the same port (empty, as after a crash without persistence)."""

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        extra: Sequence[str] = (),
        config: str | None = None,
    ) -> None:
        """`extra`: more redis-server arguments (e.g. `--cluster-enabled yes`). `config`: a
        config file's text, written to the server's own directory and passed first (a
        Sentinel needs a writable config file)."""
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.binary = found
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp = tempfile.TemporaryDirectory(prefix="extauthz-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = Path(self._tmp.name) / "redis.log"
        self.extra = tuple(extra)
        self.config = config
        self.dir = Path(self._tmp.name)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        return self.proc.pid

    def start(self, wait: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [self.binary]
        if self.config is not None:
            conf = self.dir / "redis.conf"
            if not conf.exists():  # a Sentinel rewrites it: keep its state across restarts
                conf.write_text(self.config)
            args.append(str(conf))
        args += [
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            self._tmp.name,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self._log),
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self._log.read_text() if self._log.exists() else ""
                self._close_pipes()
                self.proc = None
                raise RuntimeError(f"redis-server exited at start:\n{err}\n{log}")
            if ping(self.port):
                return self
            time.sleep(0.01)
        self.kill()
        raise TimeoutError(f"redis-server did not answer PING on {self.port} within {wait}s")

    def _signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash: in-flight connections are reset."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._close_pipes()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._close_pipes()
        self.proc = None

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def docker_available(timeout: float = 1.0) -> bool:
    """True only if a Docker engine answers `GET /_ping` right now.

    Speaks HTTP over the engine socket itself (DOCKER_HOST unix:// or tcp://, else
    /var/run/docker.sock): never raises, never hangs, leaves no socket behind.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host[len("unix://") :]
            if not Path(path).exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = path
        elif host.startswith("tcp://"):
            hostport = host[len("tcp://") :].split("/", 1)[0]
            name, _, port = hostport.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name or "127.0.0.1", int(port or 2375))
        else:
            return False  # ssh:// and friends: not probed, treat as absent
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b" ", 2)[1:2] == [b"200"]
    except (OSError, ValueError):
        return False


class SilentListener:
    """A TCP listener that accepts connections and never answers (a wedged proxy, a
    half-dead host): the client's writes succeed and its reads wait forever."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(512)
        self._sock.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)

    def __enter__(self) -> SilentListener:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
