"""RedisLimiter against a real redis-server. Bad paths first.

Each test gets its own redis-server (see conftest.py). Async code runs under asyncio.run,
so no pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from extauthz.backends.redis_limiter import FailureMode, RedisLimiter
from extauthz.decide.ratelimit import (
    Limit,
    LimitResult,
    LocalLimiter,
    limit_outcome,
    principal_key,
    rate_limit_headers,
    rule_key,
)
from extauthz.model import Outcome
from tests.redis_server import RedisServer, SilentListener, docker_available, free_port

pytestmark = pytest.mark.redis

T = TypeVar("T")
HOUR = 3600.0  # long periods: no refill happens while a test runs
SLACK = 0.050  # "no call slower than timeout + 50 ms"
ENVOY_TIMEOUT = 0.250  # ext_authz timeout of the generated Envoy config


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def timed(call: Callable[[], Awaitable[LimitResult]]) -> tuple[LimitResult, float]:
    started = time.perf_counter()
    result = await call()
    return result, time.perf_counter() - started


# --- bad configuration and unreachable Redis ---------------------------------------------


def test_rejects_bad_configuration() -> None:
    client = aioredis.Redis()
    with pytest.raises(ValueError):
        RedisLimiter(client, failure_mode="sideways")
    with pytest.raises(ValueError):
        RedisLimiter(client, timeout=0)
    run(client.aclose())


@pytest.mark.parametrize("kind", ["redis://{}/0", "redis+cluster://{}", "redis+sentinel://{}/svc"])
@pytest.mark.parametrize("mode", list(FailureMode))
def test_nothing_listening_answers_per_failure_mode_quickly(mode: FailureMode, kind: str) -> None:
    """One Redis, a cluster's start-up node or the Sentinels: nobody there, every form."""

    async def main() -> None:
        url = kind.format(f"127.0.0.1:{free_port()}")
        rl = RedisLimiter.from_url(url, failure_mode=mode)
        limit = Limit(1, HOUR, 2)
        try:
            with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises: unreachable
                await rl.start()
            results = []
            for _ in range(3):
                r, took = await timed(lambda: rl.hit("k", limit))
                assert took < rl.deadline + SLACK
                results.append(r)
        finally:
            await rl.aclose()
        if mode is FailureMode.CLOSED:
            assert all(limit_outcome(r) is Outcome.UNAVAILABLE for r in results)
        elif mode is FailureMode.OPEN:
            assert all(r.allowed and r.backend_error for r in results)
        else:
            assert [r.allowed for r in results] == [True, True, False]
            assert all(r.degraded and not r.backend_error for r in results)
            assert limit_outcome(results[-1]) is Outcome.RATE_LIMITED

    run(main())


def test_bad_arguments_raise_before_touching_redis(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url)
        try:
            with pytest.raises(ValueError):
                await rl.hit_many([])
            with pytest.raises(ValueError):
                await rl.hit_many([("k", Limit(1, 1.0, 1)), ("k", Limit(1, 1.0, 1))])
            with pytest.raises(ValueError):
                await rl.hit("k", Limit(1, 1.0, 1), cost=-1)
            assert rl.backend_errors == 0
        finally:
            await rl.aclose()

    run(main())


# --- exact counting ----------------------------------------------------------------------


def test_exactly_n_then_denied_and_same_numbers_as_local(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0)
        local = LocalLimiter(time.monotonic)
        limit = Limit(rate=5, period=HOUR, burst=5)
        try:
            remote = [await rl.hit("p", limit) for _ in range(8)]
        finally:
            await rl.aclose()
        here = [local.hit("p", limit) for _ in range(8)]
        assert [r.allowed for r in remote] == [True] * 5 + [False] * 3
        assert [r.remaining for r in remote] == [r.remaining for r in here]
        assert not any(r.backend_error or r.degraded for r in remote)
        assert all(r.key == "p" for r in remote)
        denied = remote[-1]
        assert limit_outcome(denied) is Outcome.RATE_LIMITED
        assert denied.retry_after == pytest.approx(HOUR / 5, abs=0.05)
        assert dict(rate_limit_headers(denied))["retry-after"] == "720"

    run(main())


def test_refill_uses_redis_time(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0)
        limit = Limit(rate=20, period=1.0, burst=1)  # one per 50 ms
        try:
            assert (await rl.hit("p", limit)).allowed
            r = await rl.hit("p", limit)
            assert not r.allowed and 0 < r.retry_after <= 0.05
            await asyncio.sleep(r.retry_after + 0.005)
            assert (await rl.hit("p", limit)).allowed
        finally:
            await rl.aclose()

    run(main())


def test_concurrent_checks_allow_exactly_the_limit(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=2.0, overlimit_entries=0)
        limit = Limit(rate=1, period=HOUR, burst=50)
        try:
            results = await asyncio.gather(*(rl.hit("p", limit) for _ in range(300)))
        finally:
            await rl.aclose()
        assert not any(r.backend_error for r in results)
        assert sum(r.allowed for r in results) == 50
        # Pipelined: 300 concurrent checks left in a few round trips, not 300.
        assert rl.checks_sent == 300 and rl.round_trips <= 10, rl.round_trips

    run(main())


def test_three_replicas_share_one_budget_exactly(redis_url: str) -> None:
    async def main() -> None:
        replicas = [RedisLimiter.from_url(redis_url, timeout=2.0) for _ in range(3)]
        per_principal = Limit(rate=1, period=HOUR, burst=60)
        per_rule = Limit(rate=1, period=HOUR, burst=40)
        p = "spiffe://td/ns/a/sa/client"
        checks = [(principal_key(p), per_principal), (rule_key(p, "read"), per_rule)]
        try:
            single = await asyncio.gather(
                *(rl.hit("solo", per_rule) for rl in replicas for _ in range(50))
            )
            many = await asyncio.gather(
                *(rl.hit_many(checks) for rl in replicas for _ in range(50))
            )
            # The per-principal budget paid only for the 40 allowed calls, on every replica.
            peeks = [await rl.hit(principal_key(p), per_principal, cost=0) for rl in replicas]
        finally:
            for rl in replicas:
                await rl.aclose()
        assert not any(r.backend_error for r in single + many)
        assert sum(r.allowed for r in single) == 40  # tolerance: none, exact
        assert sum(r.allowed for r in many) == 40
        assert [r.remaining for r in peeks] == [20, 20, 20]

    run(main())


def test_hit_many_consumes_nothing_when_one_denies(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0)
        wide, narrow = Limit(1, HOUR, 100), Limit(1, HOUR, 2)
        try:
            assert (await rl.hit_many([("a", wide), ("b", narrow)])).allowed
            assert (await rl.hit_many([("a", wide), ("b", narrow)])).allowed
            for _ in range(10):
                r = await rl.hit_many([("a", wide), ("b", narrow)])
                assert not r.allowed and r.key == "b"
            assert (await rl.hit("a", wide, cost=0)).remaining == 98
        finally:
            await rl.aclose()

    run(main())


def test_every_key_has_a_ttl_and_the_prefix(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0, prefix="t:rl:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            for i in range(20):
                limit = Limit(rate=1 + i, period=60.0, burst=1 + i % 4)
                await rl.hit_many([(f"p{i}", limit), (f"p{i}:r", Limit(1, 10.0, 1))])
                await rl.hit(f"q{i}", limit, cost=0)  # a peek writes nothing
            keys = [k async for k in raw.scan_iter(match="*")]
            assert len(keys) == 40
            assert all(k.startswith(b"t:rl:") for k in keys)
            for k in keys:
                ttl_ms = await raw.pttl(k)
                assert 0 < ttl_ms <= 60_000, (k, ttl_ms)
        finally:
            await raw.aclose()
            await rl.aclose()

    run(main())


def test_survives_script_flush(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0)
        raw = aioredis.Redis.from_url(redis_url)
        limit = Limit(1, HOUR, 3)
        try:
            await rl.start()
            assert (await rl.hit("k", limit)).remaining == 2
            await raw.script_flush()
            r = await rl.hit("k", limit)  # EVALSHA -> NOSCRIPT -> EVAL
            assert r.allowed and r.remaining == 1 and not r.backend_error
            assert (await raw.script_exists(rl_sha()))[0]
        finally:
            await raw.aclose()
            await rl.aclose()

    run(main())


def rl_sha() -> str:
    from extauthz.backends.redis_limiter import GCRA_SHA

    return GCRA_SHA


# --- Redis hangs or dies -----------------------------------------------------------------


def expect_mode(mode: FailureMode, results: list[LimitResult], burst: int) -> None:
    if mode is FailureMode.CLOSED:
        assert all(not r.allowed and r.backend_error for r in results)
        assert all(limit_outcome(r) is Outcome.UNAVAILABLE for r in results)
    elif mode is FailureMode.OPEN:
        assert all(r.allowed and r.backend_error for r in results)
    else:  # the per-process fallback enforces the limit on its own
        assert all(r.degraded and not r.backend_error for r in results)
        assert sum(r.allowed for r in results) == min(burst, len(results))


async def wait_until_recovered(rl: RedisLimiter, key: str, limit: Limit) -> LimitResult:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        r = await rl.hit(key, limit)
        if not (r.backend_error or r.degraded):
            return r
        await asyncio.sleep(0.02)
    raise AssertionError("RedisLimiter did not recover within 5 s")


async def outage(
    rl: RedisLimiter, mode: FailureMode, key: str, calls: int = 12
) -> list[tuple[LimitResult, float]]:
    limit = Limit(1, HOUR, 5)
    out = [
        await timed(lambda: rl.hit_many([(key, limit), (key + ":r", limit)])) for _ in range(calls)
    ]
    expect_mode(mode, [r for r, _ in out], burst=5)
    slowest = max(took for _, took in out)
    assert slowest < rl.deadline + SLACK, f"{mode}: slowest call {slowest * 1000:.1f} ms"
    assert p99([took for _, took in out]) < ENVOY_TIMEOUT
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.parametrize("mode", list(FailureMode))
def test_sigstopped_redis_is_bounded_and_recovers(
    redis_proc: RedisServer, mode: FailureMode
) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(
            redis_proc.url, failure_mode=mode, breaker_min_calls=3, breaker_cooldown=0.1
        )
        limit = Limit(1, HOUR, 5)
        try:
            await rl.start()
            assert (await rl.hit("before", limit)).allowed
            redis_proc.pause()
            try:
                await outage(rl, mode, "during")
                assert not rl.healthy  # breaker open: no latency per call any more
                await asyncio.sleep(0.15)
                await outage(rl, mode, "during2", calls=4)  # half-open probes time out again
            finally:
                redis_proc.resume()
            r = await wait_until_recovered(rl, "after", limit)
            assert r.allowed and r.remaining == 4
            assert (await rl.hit("before", limit)).remaining == 3  # state kept across the stall
        finally:
            await rl.aclose()

    run(main())


@pytest.mark.parametrize("mode", list(FailureMode))
def test_killed_redis_is_bounded_and_recovers_on_restart(
    redis_proc: RedisServer, mode: FailureMode
) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(
            redis_proc.url, failure_mode=mode, breaker_min_calls=3, breaker_cooldown=0.1
        )
        limit = Limit(1, HOUR, 5)
        try:
            # Warm the pool: several live connections that the kill will break.
            await asyncio.gather(*(rl.hit(f"warm{i}", limit) for i in range(8)))
            redis_proc.kill()
            await outage(rl, mode, "dead")
            redis_proc.start()  # same port, empty, no scripts cached: NOSCRIPT path
            r = await wait_until_recovered(rl, "back", limit)
            assert r.allowed and r.remaining == 4 and not r.backend_error
        finally:
            await rl.aclose()

    run(main())


def test_timed_out_calls_do_not_leak_tasks(redis_proc: RedisServer) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_proc.url, breaker_cooldown=0)
        limit = Limit(1, HOUR, 5)
        try:
            redis_proc.pause()
            try:
                results = await asyncio.gather(*(rl.hit(f"k{i}", limit) for i in range(20)))
            finally:
                redis_proc.resume()
            assert all(r.backend_error for r in results)
        finally:
            await rl.aclose()
        assert not rl._batches and not rl.pending
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    run(main())


@pytest.mark.parametrize("mode", list(FailureMode))
def test_listener_that_never_answers_is_bounded_then_recovers_when_redis_takes_over(
    mode: FailureMode, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that accepts and never answers: no error ever arrives, only the deadline
    ends each wait; the breaker opens, probes, and closes once a real Redis listens."""

    async def main(listener: SilentListener) -> RedisLimiter:
        rl = RedisLimiter.from_url(
            listener.url, failure_mode=mode, breaker_min_calls=5, breaker_cooldown=0.1
        )
        latencies: list[float] = []
        try:
            for _ in range(3):  # waves of concurrent checks, as a busy replica sends them
                out = await asyncio.gather(
                    *(timed(lambda i=i: rl.hit(f"k{i}", Limit(1, HOUR, 5))) for i in range(40))
                )
                assert all(r.backend_error or r.degraded for r, _ in out)
                latencies += [took for _, took in out]
            assert max(latencies) < rl.deadline + SLACK and p99(latencies) < ENVOY_TIMEOUT
            assert rl.breaker.opened >= 1 and not rl.healthy
            assert rl.pending == 0 and len(rl._batches) <= rl.max_inflight
            listener.close()
            with RedisServer(port=listener.port) as server:
                assert server.port == listener.port
                r = await wait_until_recovered(rl, "back", Limit(1, HOUR, 5))
                assert r.allowed and r.remaining == 4
        finally:
            await rl.aclose()
        return rl

    with caplog.at_level("INFO", logger="extauthz.ratelimit"), SilentListener() as listener:
        rl = run(main(listener))
        assert listener.accepted >= 1
    states = [rec.__dict__.get("state") for rec in caplog.records
              if rec.__dict__.get("event") == "ratelimit_breaker"]
    assert states[0] == "open" and states[-1] == "closed", states
    assert rl.timeouts > 0


def test_flood_against_hung_redis_is_capped_and_answered_at_once(
    redis_proc: RedisServer,
) -> None:
    """Nothing grows without bound: beyond `max_pending` queued checks the failure mode
    answers immediately; the queue drains to zero once Redis answers again."""

    async def main() -> None:
        rl = RedisLimiter.from_url(
            redis_proc.url, max_pending=100, breaker_cooldown=0, overlimit_entries=0
        )
        limit = Limit(1, HOUR, 1_000_000)
        try:
            await rl.start()
            redis_proc.pause()
            try:
                out = await asyncio.gather(
                    *(timed(lambda i=i: rl.hit(f"k{i % 50}", limit)) for i in range(3000))
                )
                peak = rl.pending
            finally:
                redis_proc.resume()
            assert all(r.backend_error and not r.allowed for r, _ in out)
            assert rl.queue_overflows >= 3000 - 100 - rl.max_inflight * rl.max_batch
            assert max(took for _, took in out) < rl.deadline + SLACK * 4
            assert peak <= rl.max_pending
            r = await wait_until_recovered(rl, "after", Limit(1, HOUR, 5))
            assert r.allowed and rl.pending == 0
        finally:
            await rl.aclose()
        assert not rl._batches

    run(main())


def test_over_limit_key_is_answered_locally_until_retry_after(redis_url: str) -> None:
    async def main() -> None:
        rl = RedisLimiter.from_url(redis_url, timeout=1.0)
        limit = Limit(rate=1, period=0.6, burst=2)  # one more every 0.6 s
        try:
            assert [(await rl.hit("p", limit)).allowed for _ in range(3)] == [True, True, False]
            trips = rl.round_trips
            local = [await rl.hit("p", limit) for _ in range(50)]
            assert rl.round_trips == trips  # no Redis round trip for a known over-limit key
            assert not any(r.allowed or r.backend_error for r in local)
            assert all(0 < r.retry_after <= 0.6 for r in local)
            assert limit_outcome(local[0]) is Outcome.RATE_LIMITED
            assert rl.overlimit.hits == 50
            await asyncio.sleep(local[-1].retry_after + 0.05)
            again = await rl.hit("p", limit)  # retry-after passed: Redis decides again
            assert again.allowed and rl.round_trips == trips + 1
        finally:
            await rl.aclose()

    run(main())


def test_bursts_over_three_limiters_with_default_deadline_never_fail(redis_url: str) -> None:
    async def main() -> None:
        replicas = [RedisLimiter.from_url(redis_url) for _ in range(3)]
        assert replicas[0].timeout == 0.15  # the default, not an inflated one
        try:
            for n, size in enumerate((60, 120, 200, 200, 200)):
                limit = Limit(1, HOUR, size // 3)
                out = await asyncio.gather(
                    *(replicas[i % 3].hit(f"burst{n}", limit) for i in range(size))
                )
                assert not any(r.backend_error or r.degraded for r in out)
                assert sum(r.allowed for r in out) == size // 3
            trips = sum(rl.round_trips for rl in replicas)
            sent = sum(rl.checks_sent for rl in replicas)
            assert trips * 10 <= sent, (trips, sent)  # pipelined: many checks per trip
        finally:
            for rl in replicas:
                await rl.aclose()

    run(main())


def test_limiter_metrics_show_latency_breaker_queue_and_cache(redis_url: str) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from extauthz.observe.metrics import _redis_limiter_metrics

    async def main() -> RedisLimiter:
        rl = RedisLimiter.from_url(redis_url)
        try:
            await asyncio.gather(*(rl.hit("m", Limit(1, HOUR, 10)) for _ in range(40)))
            await rl.hit("m", Limit(1, HOUR, 10))
        finally:
            await rl.aclose()
        return rl

    rl = run(main())

    class One(Collector):
        def collect(self) -> Any:
            return _redis_limiter_metrics(rl)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    text = generate_latest(registry).decode()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples["extauthz_ratelimit_redis_checks_total"]) == 40
    assert 1 <= float(samples["extauthz_ratelimit_redis_round_trips_total"]) <= 5
    assert float(samples["extauthz_ratelimit_redis_seconds_count"]) >= 1
    assert float(samples['extauthz_ratelimit_check_recent_seconds{quantile="0.99"}']) > 0
    assert float(samples["extauthz_ratelimit_breaker_state"]) == 0
    assert float(samples["extauthz_ratelimit_overlimit_cache_hits_total"]) == 1
    assert float(samples["extauthz_ratelimit_deadline_seconds"]) == 0.15  # fast: the floor


# --- the Docker path ---------------------------------------------------------------------


def test_testcontainers_redis_when_docker_answers() -> None:
    if not docker_available():
        pytest.skip("no Docker engine answers: the testcontainers path is not exercised here")
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7-alpine") as container:
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}"

        async def main() -> Any:
            rl = RedisLimiter.from_url(url, timeout=1.0)
            try:
                return [await rl.hit("k", Limit(1, HOUR, 2)) for _ in range(3)]
            finally:
                await rl.aclose()

        assert [r.allowed for r in run(main())] == [True, True, False]
