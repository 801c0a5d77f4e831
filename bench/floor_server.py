"""The floor: the cheapest possible grpc.aio + uvloop ext_authz server.

It does what extauthz's gRPC edge does around a decision — the same grpc.aio server, the same
uvloop loop, the same upb-backed protobuf parsing of the CheckRequest, a health service for
Envoy's health checks — and decides nothing: every Check returns one prebuilt OK response.
Whatever extauthz costs above this is the cost of authorization itself.

    python bench/floor_server.py --listen 127.0.0.1:9292 [--capture FILE]

`--capture FILE` writes the first CheckRequest received (serialized) to FILE, which is how the
benchmark checks that its synthetic request has the shape of the one a real Envoy sends.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

OK = ea.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ea.OkHttpResponse())


class FloorServicer(ea_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, capture: Path | None) -> None:
        self._capture = capture

    async def Check(self, request: ea.CheckRequest, context: Any) -> ea.CheckResponse:
        if self._capture is not None:
            self._capture.write_bytes(request.SerializeToString())
            self._capture = None
        return OK


async def serve(listen: str, capture: Path | None) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    ea_grpc.add_AuthorizationServicer_to_server(FloorServicer(capture), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot bind {listen}")
    await server.start()
    for service in ("", "envoy.service.auth.v3.Authorization"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    p = argparse.ArgumentParser(description="constant-OK ext_authz server (the benchmark floor)")
    p.add_argument("--listen", default="127.0.0.1:9292")
    p.add_argument("--capture", type=Path, help="write the first CheckRequest here")
    args = p.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, args.capture))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
