"""An in-process HTTP transport on uvloop in a background thread, and raw-socket clients.

Raw sockets on purpose: the bad-input tests send what no HTTP client library would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvloop

from extauthz.app import App, build_app
from extauthz.app import start as start_app
from extauthz.app import stop as stop_app
from extauthz.settings import Settings
from extauthz.transport.http import HttpLimits, HttpTransport

TD = "prod.example"
CHECKOUT = f"spiffe://{TD}/ns/shop/sa/checkout"
BILLING = f"spiffe://{TD}/ns/finance/sa/billing"
SIDECAR = f"spiffe://{TD}/ns/orders/sa/orders"
HOST = "orders.mesh.local"
POLICY = f"""\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [{HOST}]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
  - name: billing
    spiffe: {BILLING}
rules:
  - name: orders-read
    methods: [GET]
    path_prefix: /v1/orders
    allow: [checkout, billing]
  - name: orders-create
    methods: [POST]
    path: /v1/orders
    allow: [checkout]
    limit: {{rate: 1, period: 60s, burst: 1}}
"""


def xfcc(principal: str = CHECKOUT) -> str:
    """What a sidecar with SANITIZE_SET + uri: true sets: one element, one URI."""
    return f"By={SIDECAR};Hash={'0123abcd' * 8};URI={principal}"  # Hash: 64 hex, as Envoy


def check(method: str = "GET", path: str = "/v1/orders/1", host: str = HOST,
          headers: dict[str, str] | None = None, principal: str | None = CHECKOUT) -> bytes:
    """One check as Envoy's http_service sends it."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "content-length: 0"]
    if principal is not None:
        lines.append(f"x-forwarded-client-cert: {xfcc(principal)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def parse_replies(raw: bytes) -> list[Reply]:
    out = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        body, rest = rest[:n], rest[n:]
        out.append(Reply(status, headers, body, head + b"\r\n\r\n" + body))
    return out


class Server:
    def __init__(self, app: App, transport: HttpTransport, loop: asyncio.AbstractEventLoop,
                 address: tuple[str, int]) -> None:
        self.app = app
        self.transport = transport
        self.loop = loop
        self.address = address

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def exchange(self, raw: bytes, *, replies: int = 1, timeout: float = 5.0) -> tuple[list[Reply], bool]:
        """Send `raw` on a fresh connection; read until `replies` answers arrived and the
        server closed, or `timeout`. Returns the answers and whether the server closed."""
        with self.connect(timeout) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            return read_replies(sock, replies, timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


def read_replies(sock: socket.socket, replies: int, timeout: float) -> tuple[list[Reply], bool]:
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if len(parse_replies(data)) >= replies and replies > 0:
                # give a close that follows the answer a moment to arrive
                try:
                    sock.settimeout(0.2)
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                data += chunk
                continue
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    return parse_replies(data), closed


@contextmanager
def running(tmp: Path, *, limits: HttpLimits | None = None, settings: Settings | None = None,
            limiter: Any = None) -> Iterator[Server]:
    policy = tmp / "policy"
    if not policy.exists():
        policy.mkdir()
        (policy / "orders.yaml").write_text(POLICY)
    base = settings or Settings()
    settings = replace(base, policy=policy, listen=(), http_listen=("127.0.0.1:0",),
                       decision_log="none", tracing=False)
    app = build_app(settings, limiter=limiter)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    transport = HttpTransport(app, limits)

    async def up() -> list[str]:
        await start_app(app)
        return await transport.start()

    bound = asyncio.run_coroutine_threadsafe(up(), loop).result(30)
    host, _, port = bound[0].removeprefix("http://").rpartition(":")
    try:
        yield Server(app, transport, loop, (host, int(port)))
    finally:
        async def down() -> None:
            await transport.stop(2.0)
            await stop_app(app)

        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
