"""A realistic ext_authz CheckRequest, shaped like the one a sidecar Envoy sends, and its
gRPC wire form for h2load (`-d FILE`): a 5-byte frame prefix + the serialized message.

What Envoy puts in a CheckRequest for an mTLS HTTP/2 request (with
`include_peer_certificate: true`, as extauthz's sidecar bootstrap sets): the peer's SPIFFE ID
as `source.principal` and its URL-encoded PEM as `source.certificate`, both addresses, the
request time, and `request.http` with method, host, path (query included), scheme, protocol,
a request id and every request header (pseudo-headers included) — about fifteen here,
`traceparent` among them.

    python bench/make_request.py --out /tmp/check.bin     # a body for h2load -d
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path

from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")

# The request every "direct" row sends: allowed by rule `orders-read` of policy/orders.yaml
# for `billing` (which, unlike `checkout`, has no rate limit: a limiter would turn a
# throughput test into a 429 test).
PRINCIPAL = "spiffe://prod.example/ns/finance/sa/billing"
HOST = "orders.mesh.local"
METHOD = "GET"
PATH = "/v1/orders/84213/items?expand=prices&page=2"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def browser_like_headers(host: str, method: str, path: str) -> dict[str, str]:
    """What a mesh client's request carries once both sidecars have touched it."""
    return {
        ":authority": host,
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "accept": "application/json",
        "accept-encoding": "gzip, deflate, br",
        "user-agent": "checkout-service/2.14.1 python-httpx/0.27",
        "x-request-id": str(uuid.UUID(int=0x5F0E2B1C_7A6D_4E8F_9C3B_2A1D0E9F8C7B)),
        "x-forwarded-proto": "https",
        "x-envoy-expected-rq-timeout-ms": "15000",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=t61rcWkgMzE",
        "baggage": "tenant=eu-west-2,plan=enterprise",
        "x-b3-sampled": "1",
        "x-forwarded-client-cert": "By=spiffe://prod.example/ns/orders/sa/orders;"
        f"Hash={'3f2c9a7d' * 8};URI=spiffe://prod.example/ns/finance/sa/billing",
    }


def encode_certificate(cert_pem: bytes) -> str:
    """`source.certificate` as Envoy sends it: the PEM, URL-encoded."""
    return urllib.parse.quote(cert_pem.decode("ascii"), safe="")


def check_request(
    *,
    principal: str = PRINCIPAL,
    cert_pem: bytes | None = None,
    host: str = HOST,
    method: str = METHOD,
    path: str = PATH,
    headers: Mapping[str, str] | None = None,
) -> ea.CheckRequest:
    req = ea.CheckRequest()
    attrs = req.attributes
    src = attrs.source
    src.address.socket_address.address = "10.12.3.41"
    src.address.socket_address.port_value = 51514
    src.address.socket_address.protocol = address_pb2.SocketAddress.TCP
    src.principal = principal
    if cert_pem is not None:
        src.certificate = encode_certificate(cert_pem)
    dst = attrs.destination
    dst.address.socket_address.address = "10.12.7.9"
    dst.address.socket_address.port_value = 10000
    dst.principal = "spiffe://prod.example/ns/orders/sa/orders"
    attrs.request.time.FromNanoseconds(time.time_ns())
    http: ac.AttributeContext.HttpRequest = attrs.request.http
    http.id = "9183461739501826391"
    http.method = method
    http.host = host
    http.path = path
    http.scheme = "https"
    http.protocol = "HTTP/2"
    http.size = 0
    all_headers = browser_like_headers(host, method, path)
    all_headers.update(headers or {})
    for key, value in all_headers.items():
        http.headers[key] = value
    attrs.tls_session.sni = host
    return req


def grpc_frame(message: ea.CheckRequest) -> bytes:
    """A length-prefixed gRPC message: flag byte (0: not compressed), 4-byte big-endian length."""
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the framed body")
    p.add_argument("--cert", type=Path, help="PEM of the caller's SVID (source.certificate)")
    p.add_argument("--principal", default=PRINCIPAL)
    p.add_argument("--path", default=PATH)
    args = p.parse_args(argv)
    cert = args.cert.read_bytes() if args.cert else None
    body = grpc_frame(check_request(principal=args.principal, cert_pem=cert, path=args.path))
    args.out.write_bytes(body)
    print(f"{args.out}: {len(body)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
