"""Traffic for the rate-limit tests: concurrent gRPC checks against real servers, and a
paced stream of checks against in-process limiters that records every answer's latency."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

from extauthz.backends.redis_limiter import RedisLimiter
from extauthz.decide.ratelimit import Limit, LimitResult


def limited_policy(burst: int, pattern: str = "spiffe://prod.example/ns/burst/sa/*") -> str:
    """Every SPIFFE ID under `pattern` gets its own budget: `burst` at once, 1 a minute."""
    return f"""\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: burst
    spiffe: {pattern}
    limit: {{rate: 1, period: 60s, burst: {burst}}}
rules:
  - name: orders-read
    methods: [GET]
    path_prefix: /v1/orders
    allow: [burst]
"""


def check_request(principal: str) -> ea.CheckRequest:
    req = ea.CheckRequest()
    req.attributes.source.principal = principal
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", "/v1/orders/1"
    return req


async def grpc_burst(targets: Sequence[str], principal: str, size: int) -> Counter[str]:
    """`size` concurrent checks, round-robin over the servers; answers counted by kind:
    `allow`, or `STATUS:reason` of the denial."""
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        stubs = [ea_grpc.AuthorizationStub(ch) for ch in channels]
        for ch in channels:
            await ch.channel_ready()
        req = check_request(principal)

        async def one(i: int) -> str:
            resp = await stubs[i % len(stubs)].Check(req, timeout=10)
            if resp.HasField("ok_response"):
                return "allow"
            headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
            return f"{resp.denied_response.status.code}:{headers.get('x-extauthz-reason')}"

        return Counter(await asyncio.gather(*(one(i) for i in range(size))))
    finally:
        for ch in channels:
            await ch.close()


@dataclass
class Stream:
    """Answers of a paced stream of checks, in order, with their latencies."""

    results: list[tuple[float, LimitResult, float]] = field(default_factory=list)

    @property
    def allowed(self) -> int:
        return sum(1 for _, r, _ in self.results if r.allowed and not r.backend_error)

    def latencies(self) -> list[float]:
        return sorted(took for _, _, took in self.results)

    def p99(self) -> float:
        lat = self.latencies()
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0


async def paced(
    limiters: Sequence[RedisLimiter],
    items: Sequence[tuple[str, Limit]],
    stop: asyncio.Event,
    out: Stream,
    per_tick: int = 4,
    tick: float = 0.02,
) -> None:
    """Every `tick` s, `per_tick` concurrent checks on each limiter, until `stop` is set."""

    async def one(rl: RedisLimiter) -> None:
        started = time.perf_counter()
        result = await rl.hit_many(items)
        out.results.append((started, result, time.perf_counter() - started))

    while not stop.is_set():
        await asyncio.gather(*(one(rl) for rl in limiters for _ in range(per_tick)))
        await asyncio.sleep(tick)
