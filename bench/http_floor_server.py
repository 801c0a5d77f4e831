"""The HTTP floor: the cheapest possible uvloop + httptools server of Envoy's HTTP ext_authz
protocol (`http_service`). It parses each request with the same C parser as extauthz's HTTP
transport and answers every one with the same prebuilt `200 OK`: whatever extauthz's HTTP
transport costs above this is the cost of authorization itself.

    python bench/http_floor_server.py --listen 127.0.0.1:9393
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import httptools
import uvloop

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(OK)


async def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, host, int(port), reuse_port=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    p = argparse.ArgumentParser(description="constant-200 HTTP ext_authz server (the HTTP floor)")
    p.add_argument("--listen", default="127.0.0.1:9393")
    args = p.parse_args()
    uvloop.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
