"""A tiny sample upstream: answers every request with 200 and a JSON echo of what it saw.

It stands in for the service behind the sidecar in the demo and the end-to-end tests. The echo
has the service name, the method, the path and the headers of interest — notably
`x-extauthz-principal` (set by extauthz on allowed requests) and `x-forwarded-client-cert` (set
by Envoy from the verified client certificate) — so a caller can see what the upstream got.

    python -m extauthz.devstack.upstream --port 8080 [--service orders]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extauthz import headers as names

INTERESTING_HEADERS = (
    "host",
    names.PRINCIPAL,
    names.RULE,
    names.XFCC,
    "x-request-id",
)
MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class SeenRequest:
    service: str
    method: str
    path: str
    headers: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
        }


@dataclass
class _Log:
    lock: threading.Lock = field(default_factory=threading.Lock)
    items: list[SeenRequest] = field(default_factory=list)
    limit: int = 10_000


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "extauthz-upstream"
    sys_version = ""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(min(length, MAX_BODY))
        host = self.headers.get("host", "")
        service = self.server.service or host.split(":", 1)[0].split(".", 1)[0]
        headers = {
            name: value
            for name in INTERESTING_HEADERS
            if (value := self.headers.get(name)) is not None
        }
        seen = SeenRequest(service, self.command, self.path, headers)
        log = self.server.log
        with log.lock:
            log.items.append(seen)
            del log.items[: max(0, len(log.items) - log.limit)]
        body = json.dumps(seen.as_json(), sort_keys=True).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: str
    verbose: bool
    log: _Log


class UpstreamServer:
    """The sample upstream on a background thread; port 0 picks a free port.

    Use as a context manager, or call `start()` / `stop()`. `requests` is a snapshot of what it
    has seen so far (oldest first).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, service: str = "", verbose: bool = False
    ) -> None:
        self._httpd = _Server((host, port), _Handler, bind_and_activate=True)
        self._httpd.service = service
        self._httpd.verbose = verbose
        self._httpd.log = _Log()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def requests(self) -> list[SeenRequest]:
        with self._httpd.log.lock:
            return list(self._httpd.log.items)

    def clear(self) -> None:
        with self._httpd.log.lock:
            self._httpd.log.items.clear()

    def start(self) -> UpstreamServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"upstream:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve on the calling thread until interrupted (for the command line)."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extauthz.devstack.upstream", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--service", default="", help="name to report (default: from the Host)")
    args = p.parse_args(argv)
    server = UpstreamServer(args.host, args.port, service=args.service, verbose=True)
    print(f"upstream listening on http://{args.host}:{server.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
