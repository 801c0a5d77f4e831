"""An OTLP/gRPC trace collector that accepts every export and keeps nothing.

The "tracing 100%" row needs the exporter to really serialize and send its batches (an absent
collector would make it drop them instead, and cost less); this is the cheapest thing that
answers. On SIGTERM it prints `exports=N bytes=M` so the benchmark can check spans arrived.

    python bench/otlp_sink.py --listen 127.0.0.1:4317
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Sink(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._handler = grpc.unary_unary_rpc_method_handler(self._export)

    def _export(self, request: bytes, context: Any) -> bytes:
        with self._lock:
            self.exports += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    def service(self, handler_call_details: Any) -> Any:
        return self._handler if handler_call_details.method == EXPORT else None


def main() -> int:
    p = argparse.ArgumentParser(description="OTLP/gRPC trace sink")
    p.add_argument("--listen", default="127.0.0.1:4317")
    args = p.parse_args()
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[sink])
    if server.add_insecure_port(args.listen) == 0:
        raise SystemExit(f"cannot bind {args.listen}")
    server.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(0.5)
    print(f"exports={sink.exports} bytes={sink.bytes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
