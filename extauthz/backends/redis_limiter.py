"""Rate limiting, the Redis edge: the GCRA of `ratelimit` in one Lua script per check,
the scripts of concurrent checks sent together as one pipeline.

Why it is built this way (docs/rate-limits.md has the measurements):

* **A burst costs round trips, not connections.** Checks do not talk to Redis themselves:
  each one queues its script call; once per event-loop turn the queue is sent as one
  pipeline of EVALSHA calls (at most `max_batch` per pipeline) on one connection, and at
  most `max_inflight` pipelines are in flight. While they are, new checks wait in the queue
  and leave together with the next pipeline. 200 concurrent checks are a handful of round
  trips on a few connections, where one connection per check used to miss the deadline
  while Redis was idle.
* **One script per check**, any number of keys, atomically: all limits allow or nothing is
  consumed (like `LocalLimiter.hit_many`). EVALSHA; the calls that get NOSCRIPT (a Redis
  restart, SCRIPT FLUSH, a new cluster node) are sent again as EVAL, which re-caches it.
* **Time comes from Redis** `TIME` inside the script, so replicas with skewed clocks agree.
* Every written key gets a PX TTL equal to the time until its TAT passes.
* **Deadline** per check, measured from the moment it is queued: twice the recent p99 of
  successful checks' waits, between the configured `timeout` (default `DEFAULT_TIMEOUT`),
  which is also the deadline until the first measurement, and `max_timeout` (`_adapt`).
  A check never waits longer, whatever Redis does (give or take the few event-loop turns
  of `EXPIRY_TURNS`); a pipeline still unanswered two ceilings later is cancelled and its
  connection dropped. A cancelled script may still run on Redis and consume budget (errs
  towards denying).
* **Failure modes** when Redis errs, times out, or the breaker is open: `closed` denies with
  `backend_error` (503), `open` allows with `backend_error`, `local` asks a per-process
  `LocalLimiter` (`degraded`).
* **Breaker on an error rate** (`breaker.RateBreaker`): opens when at least half of at
  least 20 checks within 2 s failed, skips Redis for the cooldown, then lets one probe
  through. Transitions are logged (`ratelimit_breaker`) and exported as metrics.
* **Bounded**: at most `max_pending` queued checks (beyond: the failure mode answers at
  once), `max_inflight` pipelines, `max_batch` scripts per pipeline, a bounded over-limit
  cache; the latency sample is a fixed ring.
* **Over-limit cache** (`ratelimit.OverLimitCache`): a key Redis just denied is denied
  locally until its retry-after, without a round trip.

Deployments: one Redis, Redis Cluster or Sentinel (`redis_url.parse_redis_url`), through
redis-py's own clients. Keys carry the principal as a cluster hash tag, so all keys of one
check live in one slot and one script can touch them together.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from extauthz.backends.breaker import BreakerState, RateBreaker
from extauthz.backends.redis_url import RedisKind, RedisTarget, parse_redis_url, redacted
from extauthz.decide.ratelimit import (
    Limit,
    Limiter,
    LimitResult,
    LocalLimiter,
    OverLimitCache,
    check_cost,
    evaluate,
    most_restrictive,
    unavailable_result,
)

log = logging.getLogger("extauthz.ratelimit")

DEFAULT_PREFIX = "extauthz:rl:"
# Per-check deadline floor. Measured (docs/rate-limits.md, "Deadline"): bursts of 200
# checks over three serving processes on a busy 2-core machine wait 56-88 ms (p99) for
# their answer while Redis answers each pipeline in a few ms: the time is the process's own
# event loop. 150 ms is about twice the worst p99 and keeps a failure-mode answer, with
# scheduling noise, inside Envoy's 250 ms ext_authz timeout.
DEFAULT_TIMEOUT = 0.150
# The deadline grows with what checks measurably wait (twice the recent p99) up to this
# ceiling, which keeps a failure-mode answer inside Envoy's 250 ms ext_authz timeout.
DEFAULT_MAX_TIMEOUT = 0.200
ADAPT_EVERY = 16  # successful checks between two re-computations of the deadline
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_PENDING = 4096
DEFAULT_OVERLIMIT_ENTRIES = 10_000
# Seconds; fine at the low end where a healthy Redis lives, so p50/p99 can be read off.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

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


class DeadlineExceeded(Exception):
    """A check got no answer from Redis within its deadline."""


class LatencyHistogram:
    """Cumulative histogram (for Prometheus) plus a ring of recent samples (for p50/p99)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS, recent: int = 256) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._recent: deque[float] = deque(maxlen=recent)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1
        self._recent.append(seconds)

    def quantile(self, q: float) -> float:
        """The q-quantile of the recent samples (0.0 when there are none)."""
        recent = sorted(self._recent)
        if not recent:
            return 0.0
        return recent[min(len(recent) - 1, int(q * len(recent)))]


@dataclass(slots=True)
class _Queued:
    keys: list[str]
    args: list[int]
    future: asyncio.Future[Any]
    queued_at: float


def connect(target: RedisTarget | str, *, max_connections: int, socket_timeout: float) -> Any:
    """A redis-py client for the deployment: `Redis`, `RedisCluster`, or a Sentinel-managed
    `Redis`. No client-side retries anywhere: the per-check deadline is the retry policy."""
    if isinstance(target, str):
        target = parse_redis_url(target)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.kind is RedisKind.SINGLE:
        pool = aioredis.BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=None, **common
        )
        return aioredis.Redis(connection_pool=pool)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind is RedisKind.CLUSTER:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=max_connections,
            **auth,
            **common,
        )
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client = sentinel.master_for(
        target.service, db=target.db, max_connections=max_connections, **auth, **common
    )
    # The Sentinels' own clients are not closed with the master's: the limiter closes them.
    client.extauthz_sentinels = sentinel.sentinels
    return client


class RedisLimiter:
    """Shared GCRA across workers and replicas. Use one instance per process."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        max_timeout: float = DEFAULT_MAX_TIMEOUT,
        failure_mode: FailureMode | str = FailureMode.CLOSED,
        fallback: LocalLimiter | None = None,
        breaker_cooldown: float = 0.5,
        breaker_min_calls: int = 20,
        breaker_error_rate: float = 0.5,
        breaker_window: float = 2.0,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        overlimit_entries: int = DEFAULT_OVERLIMIT_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        owns_client: bool = False,
        description: str = "redis",
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if min(max_inflight, max_batch, max_pending) < 1:
            raise ValueError("max_inflight, max_batch and max_pending must be >= 1")
        self._client = client
        self.prefix = prefix
        self.timeout = timeout  # the configured deadline: the floor
        self.max_timeout = max(timeout, max_timeout)
        # In force: sized from measured latency (see _adapt); the floor until measured, so
        # that a Redis down at start-up costs the least. (The first burst's cold
        # connections are opened by start().)
        self.deadline = timeout
        self._since_adapt = 0
        self.failure_mode = FailureMode(failure_mode)
        if self.failure_mode is FailureMode.LOCAL and fallback is None:
            fallback = LocalLimiter(clock)
        self._fallback = fallback
        self.breaker = RateBreaker(
            clock=clock,
            window=breaker_window,
            error_rate=breaker_error_rate,
            min_calls=breaker_min_calls,
            cooldown=breaker_cooldown,
            on_change=self._breaker_changed,
        )
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.overlimit = OverLimitCache(clock, overlimit_entries)
        self._clock = clock
        self._owns_client = owns_client
        self.description = description
        self._queue: deque[_Queued] = deque()
        self._flush_scheduled = False
        self._busy = 0
        self._batches: set[asyncio.Task[None]] = set()
        # Counters and histograms, read by the metrics collector at scrape time.
        self.redis_latency = LatencyHistogram()  # one pipeline round trip
        self.check_latency = LatencyHistogram()  # one check: queued -> answered by Redis
        self.round_trips = 0
        self.checks_sent = 0
        self.backend_errors = 0
        self.timeouts = 0
        self.queue_overflows = 0

    @classmethod
    def from_url(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        **kwargs: Any,
    ) -> RedisLimiter:
        """A limiter with its own client for `url` (one Redis, `redis+cluster://` or
        `redis+sentinel://`). Sockets time out after 1 s at the least: a pipeline that
        outlives its checks' deadline is cancelled long before."""
        target = parse_redis_url(url)
        client = connect(
            target,
            max_connections=max_inflight + 1,  # + one for start() and probes outside batches
            socket_timeout=max(1.0, timeout * 10),
        )
        return cls(
            client,
            timeout=timeout,
            max_inflight=max_inflight,
            owns_client=True,
            description=f"{target.kind.value} {redacted(url)}",
            **kwargs,
        )

    @property
    def fallback(self) -> LocalLimiter | None:
        return self._fallback

    @property
    def healthy(self) -> bool:
        """False while the breaker keeps Redis out of the path (open or probing)."""
        return self.breaker.state is BreakerState.CLOSED

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _breaker_changed(self, old: BreakerState, new: BreakerState, why: str) -> None:
        log.log(
            logging.INFO if new is BreakerState.CLOSED else logging.WARNING,
            "rate-limit backend breaker %s",
            new.name.lower(),
            extra={
                "event": "ratelimit_breaker",
                "state": new.name.lower(),
                "previous": old.name.lower(),
                "why": why,
                "backend": self.description,
            },
        )

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> LimitResult:
        return await self.hit_many(((key, limit),), cost)

    async def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult:
        """All limits allow or none is consumed; reports the most restrictive result."""
        check_cost(cost, items)
        cached = self.overlimit.get(items, cost)
        if cached is not None:
            return cached
        if not self.breaker.allow():
            return self._on_failure(items, cost)
        if len(self._queue) >= self.max_pending:
            self.queue_overflows += 1
            self.breaker.record(False)
            return self._on_failure(items, cost)
        loop = asyncio.get_running_loop()
        keys = [self.prefix + key for key, _ in items]
        args: list[int] = [cost]
        for _, limit in items:
            args += (limit.interval_us, limit.tolerance_us)
        future: asyncio.Future[Any] = loop.create_future()
        queued_at = time.perf_counter()
        self._queue.append(_Queued(keys, args, future, queued_at))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        timer = loop.call_later(self.deadline, _expire, future)
        try:
            reply = await future
        except DeadlineExceeded:
            self.timeouts += 1
            self.breaker.record(False)
            return self._on_failure(items, cost)
        except Exception:  # RedisError, OSError, cluster errors: whatever it is, fail per mode
            self.breaker.record(False)
            return self._on_failure(items, cost)
        finally:
            timer.cancel()
        self.check_latency.observe(time.perf_counter() - queued_at)
        self._since_adapt += 1
        if self._since_adapt >= ADAPT_EVERY:
            self._adapt()
        self.breaker.record(True)
        result = self._result(items, cost, reply)
        self.overlimit.put(items, cost, result)
        return result

    def _adapt(self) -> None:
        """Size the deadline from what successful checks waited recently: twice their p99,
        never below the configured deadline nor above the ceiling. A busy process (a burst,
        a CPU limit, a noisy neighbour) makes every wait longer, Redis or not; a deadline
        fixed below that turns a healthy Redis into failure-mode answers. A Redis that
        stops answering produces no successful samples, so it cannot stretch the deadline."""
        self._since_adapt = 0
        p99 = self.check_latency.quantile(0.99)
        self.deadline = min(self.max_timeout, max(self.timeout, 2 * p99))

    def _flush(self) -> None:
        """Send what is queued: one pipeline per `max_batch` checks, while a slot is free."""
        self._flush_scheduled = False
        queue = self._queue
        while queue and self._busy < self.max_inflight:
            batch: list[_Queued] = []
            while queue and len(batch) < self.max_batch:
                entry = queue.popleft()
                if not entry.future.done():  # expired or cancelled while queued: not sent
                    batch.append(entry)
            if not batch:
                break
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        started = time.perf_counter()
        self.round_trips += 1
        self.checks_sent += len(batch)
        try:
            # The checks give up at their own deadline; the pipeline is cancelled (and its
            # connection dropped) a deadline later, so a reply that is merely late is still
            # read, and a silent Redis holds a connection for a bounded time.
            async with asyncio.timeout(2 * self.max_timeout):
                replies = await self._execute(batch)
        except asyncio.CancelledError:
            _fail(batch, DeadlineExceeded())
            raise
        except TimeoutError:
            # The pipeline outlived the deadline: its connection was dropped by the cancel.
            _fail(batch, DeadlineExceeded())
        except Exception as exc:  # any failure of the pipeline is a failure of its checks
            _fail(batch, exc)
        else:
            self.redis_latency.observe(time.perf_counter() - started)
            for entry, reply in zip(batch, replies, strict=True):
                if entry.future.done():
                    continue
                if isinstance(reply, BaseException):
                    entry.future.set_exception(reply)
                else:
                    entry.future.set_result(reply)
        finally:
            self._busy -= 1
            if self._queue and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, batch: list[_Queued]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for entry in batch:
            # execute_command, not .evalsha(): redis-py's cluster pipeline refuses the
            # method (it cannot know the keys) but routes the raw command by its keys.
            pipe.execute_command("EVALSHA", GCRA_SHA, len(entry.keys), *entry.keys, *entry.args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted, SCRIPT FLUSH, or a node that never saw the script: EVAL runs
            # it and caches it again.
            self.round_trips += 1
            pipe = self._client.pipeline(transaction=False)
            for i in missing:
                entry = batch[i]
                pipe.execute_command(
                    "EVAL", GCRA_SCRIPT, len(entry.keys), *entry.keys, *entry.args
                )
            again = await pipe.execute(raise_on_error=False)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

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

    def _on_failure(self, checks: Sequence[tuple[str, Limit]], cost: int) -> LimitResult:
        self.backend_errors += 1
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

    async def start(self) -> None:
        """Load the script (on every master of a cluster) and open the connections the
        pipelines will use (`max_inflight` concurrent loads), so the first burst pays for
        neither: connection set-up under a burst on a busy machine is what used to miss
        deadlines. Raises when Redis is unreachable; checks are covered by the failure mode
        either way."""
        await asyncio.gather(
            *(self._client.script_load(GCRA_SCRIPT) for _ in range(self.max_inflight))
        )

    async def aclose(self) -> None:
        """Answer what is queued with the failure mode, stop the pipelines, close the client."""
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(DeadlineExceeded())
        for task in list(self._batches):
            task.cancel()
        for task in list(self._batches):
            with contextlib.suppress(BaseException):
                await task
        if self._owns_client:
            await self._client.aclose()
            pool = getattr(self._client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()
            for sentinel in getattr(self._client, "extauthz_sentinels", ()):
                await sentinel.aclose()


# Loop turns a check waits past its deadline before it fails. A busy process runs the
# deadline's timer in the same turn in which Redis's reply becomes readable, but reading and
# parsing the reply takes the next turn or two: without these hops a reply that did arrive
# in time would be thrown away. They cost nothing when Redis is really silent (the loop is
# idle then and a turn takes microseconds).
EXPIRY_TURNS = 3


def _expire(future: asyncio.Future[Any], turns: int = EXPIRY_TURNS) -> None:
    if future.done():
        return
    if turns > 0:
        future.get_loop().call_soon(_expire, future, turns - 1)
        return
    future.set_exception(DeadlineExceeded())


def _fail(batch: list[_Queued], exc: BaseException) -> None:
    for entry in batch:
        if not entry.future.done():
            entry.future.set_exception(exc)


def as_limiter(limiter: RedisLimiter) -> Limiter:
    """The Redis limiter is a `ratelimit.Limiter` (mypy checks this assignment)."""
    return limiter
