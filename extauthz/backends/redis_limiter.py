"""Rate limiting, the Redis edge: the GCRA of `ratelimit` in one Lua script per check.

* One script call per check, any number of keys, atomically: all limits allow or nothing is
  consumed (like `LocalLimiter.hit_many`). EVALSHA first; EVAL (which also caches the
  script) on NOSCRIPT, e.g. after a Redis restart or SCRIPT FLUSH.
* Time comes from Redis `TIME` inside the script, so replicas with skewed clocks agree.
* Every written key gets a PX TTL equal to the time until its TAT passes (when the key is
  worth nothing any more), so Redis holds only active state.
* Each check is bounded by `timeout` (default 20 ms) even when Redis hangs: the command runs
  in its own task and we stop waiting at the deadline; the connection it used is dropped.
  A timed-out script may still run later on Redis and consume budget (errs towards denying).
* On error or timeout the `failure_mode` answers: `closed` denies with `backend_error`
  (503), `open` allows with `backend_error`, `local` asks a per-process `LocalLimiter`
  (`degraded`). After `breaker_threshold` consecutive failures Redis is not asked at all for
  `breaker_cooldown` seconds, so an outage costs no latency per check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from extauthz.decide.ratelimit import (
    Limit,
    LimitResult,
    LocalLimiter,
    check_cost,
    evaluate,
    most_restrictive,
    unavailable_result,
)

DEFAULT_PREFIX = "extauthz:rl:"
DEFAULT_TIMEOUT = 0.020

# KEYS[i]: the limiter keys. ARGV[1]: cost; ARGV[2i], ARGV[2i+1]: interval_us, tolerance_us.
# Returns {allowed, now_us, tat_1, ..., tat_n}: tat_i is max(stored TAT, now) *before* this
# request, from which the caller recomputes the result with `ratelimit.evaluate`.
# All values are integers below 2**53, exact in Lua's doubles.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local tats = {}
local ok = 1
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat
  if tat + cost * tonumber(ARGV[2 * i]) - tonumber(ARGV[2 * i + 1]) > now then ok = 0 end
end
if ok == 1 and cost > 0 then
  for i = 1, n do
    local new_tat = tats[i] + cost * tonumber(ARGV[2 * i])
    local ttl = math.ceil((new_tat - now) / 1000)
    redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', ttl)
  end
end
local out = {ok, now}
for i = 1, n do out[i + 2] = tats[i] end
return out
"""
GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode(), usedforsecurity=False).hexdigest()


class FailureMode(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    LOCAL = "local"


class RedisLimiter:
    """Shared GCRA across workers and replicas. Use one instance per process (it pools)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        failure_mode: FailureMode | str = FailureMode.CLOSED,
        fallback: LocalLimiter | None = None,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        owns_client: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self._client = client
        self.prefix = prefix
        self.timeout = timeout
        self.failure_mode = FailureMode(failure_mode)
        if self.failure_mode is FailureMode.LOCAL and fallback is None:
            fallback = LocalLimiter(clock)
        self._fallback = fallback
        self.breaker_threshold = max(1, breaker_threshold)
        self.breaker_cooldown = max(0.0, breaker_cooldown)
        self._clock = clock
        self._owns_client = owns_client
        self._failures = 0
        self._skip_until = 0.0
        self._inflight: set[asyncio.Task[Any]] = set()
        self.backend_errors = 0

    @classmethod
    def from_url(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        max_connections: int = 64,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> RedisLimiter:
        """A limiter with its own blocking connection pool (waits for a free connection,
        bounded by `timeout` like everything else) and no client-side retries: the deadline
        is the only retry policy."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=max(1.0, timeout * 10),
            socket_connect_timeout=max(1.0, timeout * 10),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, timeout=timeout, owns_client=True, **kwargs)

    @property
    def fallback(self) -> LocalLimiter | None:
        return self._fallback

    @property
    def healthy(self) -> bool:
        """False while the breaker keeps Redis out of the path."""
        return self._clock() >= self._skip_until

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> LimitResult:
        return await self.hit_many(((key, limit),), cost)

    async def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult:
        """All limits allow or none is consumed; reports the most restrictive result."""
        check_cost(cost, items)
        if self._clock() < self._skip_until:
            return self._on_failure(items, cost, counted=False)
        task = asyncio.ensure_future(self._run_script(items, cost))
        try:
            done, _ = await asyncio.wait((task,), timeout=self.timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            # Do not wait for the cancellation to unwind (a hung socket may take a while):
            # the task finishes in the background; aclose() waits for stragglers.
            self._abandon(task)
            return self._on_failure(items, cost)
        try:
            reply = task.result()
        except (TimeoutError, RedisError, OSError):
            return self._on_failure(items, cost)
        self._failures = 0
        return self._result(items, cost, reply)

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        self._inflight.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieve, so asyncio does not log "never retrieved"

    async def _run_script(self, checks: Sequence[tuple[str, Limit]], cost: int) -> list[int]:
        keys = [self.prefix + key for key, _ in checks]
        args: list[int] = [cost]
        for _, limit in checks:
            args += (limit.interval_us, limit.tolerance_us)
        try:
            return await self._client.evalsha(GCRA_SHA, len(keys), *keys, *args)  # type: ignore[no-any-return]
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH: EVAL runs it and caches it again.
            return await self._client.eval(GCRA_SCRIPT, len(keys), *keys, *args)  # type: ignore[no-any-return]

    def _result(
        self, checks: Sequence[tuple[str, Limit]], cost: int, reply: list[int]
    ) -> LimitResult:
        now = int(reply[1])
        results = [
            evaluate(int(tat), now, limit, cost, key)[1]
            for (key, limit), tat in zip(checks, reply[2:], strict=True)
        ]
        result = most_restrictive(results)
        if result.allowed != bool(int(reply[0])):  # pragma: no cover - would be a bug
            raise AssertionError(f"script and core disagree: {reply!r}")
        return result

    def _on_failure(
        self, checks: Sequence[tuple[str, Limit]], cost: int, *, counted: bool = True
    ) -> LimitResult:
        self.backend_errors += 1
        if counted:
            self._failures += 1
            if self.breaker_cooldown > 0 and self._failures >= self.breaker_threshold:
                self._skip_until = self._clock() + self.breaker_cooldown
                self._failures = 0
        if self.failure_mode is FailureMode.LOCAL and self._fallback is not None:
            local = self._fallback.hit_many(checks, cost)
            if local.backend_error:
                return local
            return LimitResult(
                allowed=local.allowed,
                limit=local.limit,
                remaining=local.remaining,
                reset_after=local.reset_after,
                retry_after=local.retry_after,
                degraded=True,
                key=local.key,
            )
        return unavailable_result(allowed=self.failure_mode is FailureMode.OPEN)

    async def load_script(self) -> None:
        """Optionally preload the script at startup (saves one round trip on the first check)."""
        await self._client.script_load(GCRA_SCRIPT)

    async def start(self) -> None:
        """The Limiter interface's start-up step: preload the script (raises when Redis is
        unreachable; checks then follow the failure mode)."""
        await self.load_script()

    async def aclose(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(BaseException):
                await task
        if self._owns_client:
            await self._client.aclose()
            await self._client.connection_pool.disconnect()
