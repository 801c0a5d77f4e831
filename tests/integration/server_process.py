"""Start `python -m extauthz serve` as a real process and stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as ch:
            return int(health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def wait_serving(target: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"extauthz exited early with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"extauthz at {target} not SERVING after {timeout}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


@contextmanager
def running_server(policy: Path, tmp: Path, extra: Sequence[str] = (),
                   env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp / f"extauthz-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--policy", str(policy),
             "--listen", target, *extra],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
    try:
        wait_serving(target, proc)
        yield ServerProcess(proc, target, log_path)
    finally:
        stop(proc)
