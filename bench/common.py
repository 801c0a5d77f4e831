"""What every section shares: options, results, constants, the servers under test.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import make_request
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from procs import (
    Proc,
    Procs,
    free_tcp_port,
)

from extauthz.devstack.certs import CertificateAuthority
from extauthz.devstack.stack import wait_for_grpc_serving
from extauthz.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SECTIONS = ("direct", "envoy", "transports", "memory", "micro")
SERVER_CPU = "0"  # the server under test (direct section, memory section)
ALLOWED_PATH = make_request.PATH
FORBIDDEN_PATH = "/v1/refunds/77"  # `orders-refund` is POST only: a GET matches no rule -> 403
JWT_ISSUER = "https://jwt.bench.example"
JWT_AUDIENCE = "orders"
GATEWAY = "spiffe://prod.example/ns/edge/sa/gateway"  # an mTLS peer the policy does not allow


@dataclass
class Options:
    duration: float = 8.0
    warmup: float = 2.0
    clients: int = 2
    streams: int = 32
    wrk_connections: int = 32
    rate: int = 1000
    rate_clients: int = 10
    rate_duration: float = 8.0
    profile_seconds: float = 6.0
    memory_checks: int = 1_000_000
    memory_principals: int = 100_000
    memory_concurrency: int = 64
    memory_grpc_checks: int = 40_000
    rules: int = 10_000
    pin: bool = True
    sections: tuple[str, ...] = SECTIONS
    write_docs: bool = True
    keep: bool = False


@dataclass
class Results:
    options: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    direct: list[dict[str, Any]] = field(default_factory=list)
    envoy: list[dict[str, Any]] = field(default_factory=list)
    rate: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    micro: list[dict[str, Any]] = field(default_factory=list)
    transports: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0




# -- servers under test --------------------------------------------------------------------


class Servers:
    def __init__(self, procs: Procs, opts: Options, policy_dir: Path, ca: CertificateAuthority):
        self.procs = procs
        self.opts = opts
        self.policy_dir = policy_dir
        self.ca = ca
        fields = Settings.__dataclass_fields__
        self.has_tracing = "tracing" in fields and "decision_log" in fields
        self.has_identity = "identity" in fields
        self.has_metrics = "metrics_listen" in fields

    def _config(self, name: str, extra: dict[str, Any]) -> Path:
        config: dict[str, Any] = {}
        if self.has_tracing:
            # The plain rows measure authorization alone: no spans, no decision log.
            config.update({"tracing": False, "decision_log": "none"})
        config.update(extra)
        path = self.procs.work / f"{name}.config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def extauthz(
        self,
        name: str,
        *,
        cpus: str | None = SERVER_CPU,
        config: dict[str, Any] | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> tuple[Proc, str]:
        target = f"127.0.0.1:{free_tcp_port()}"
        argv = [
            sys.executable, "-m", "extauthz", "serve",
            "--config", str(self._config(name, config or {})),
            "--policy", str(self.policy_dir),
            "--listen", target,
            "--log-level", "warning",
            *args,
        ]
        self.procs_cmd = shlex.join(self.procs.pinned(argv, cpus))
        proc = self.procs.spawn(name, argv, cpus, env)
        wait_for_grpc_serving(target, proc, 120.0)
        return proc, target

    def floor(self, name: str = "floor", *, cpus: str | None = SERVER_CPU) -> tuple[Proc, str]:
        target = f"127.0.0.1:{free_tcp_port()}"
        capture = self.procs.work / f"{name}.check.bin"
        argv = [sys.executable, str(BENCH / "floor_server.py"), "--listen", target]
        argv += ["--capture", str(capture)]
        self.procs_cmd = shlex.join(self.procs.pinned(argv, cpus))
        proc = self.procs.spawn(name, argv, cpus)
        wait_for_grpc_serving(target, proc, 60.0)
        return proc, target


def check_once(target: str, request: ea.CheckRequest) -> tuple[int, dict[str, str]]:
    with grpc.insecure_channel(target) as channel:
        resp = ea_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    return resp.status.code, headers
