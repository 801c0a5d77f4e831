"""Rate limiting, the pure core: GCRA arithmetic, a bounded in-process limiter, headers.

Algorithm: GCRA (Generic Cell Rate Algorithm, a.k.a. "virtual scheduling" leaky bucket).

Why GCRA rather than fixed or sliding windows:

* No double bursts at window edges. A fixed window of N per second lets a caller send N at
  t=0.999 and N more at t=1.000. GCRA has no windows: capacity refills continuously at
  `rate/period`, so in *any* interval of length d at most `burst + d*rate/period` requests
  get through.
* O(1) state: one number per key, the TAT (theoretical arrival time). No per-request
  timestamps, no counters per window.
* It maps 1:1 onto one Redis script (GET, compare, SET with a TTL): the local and the Redis
  limiter share the arithmetic in this module and answer identically.

Semantics of `Limit(rate, period, burst)`:

* the emission interval is `T = period / rate` (one request per T, sustained);
* `burst` requests may arrive at once on a fresh key; afterwards one more every T;
* a request of `cost` c is allowed iff `max(TAT, now) + c*T - burst*T <= now`, and then the
  TAT becomes `max(TAT, now) + c*T`. A TAT at or before `now` is exactly a fresh key.

Arithmetic is done in integer microseconds (T rounded to the nearest microsecond, minimum 1),
so "exactly `burst` then denied" holds without epsilon fudging, the Lua script (doubles, exact
to 2**53) computes the very same numbers, and the highest expressible rate is 1e6/s per key.

Keys are strings the caller builds from the *verified* identity (see `principal_key` and
`rule_key`); never from unverified request input, or an attacker could mint keys at will.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extauthz.model import Outcome

US_PER_S = 1_000_000


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` requests per `period` seconds sustained; `burst` (>= 1) may arrive at once."""

    rate: int
    period: float
    burst: int
    # Derived, in whole microseconds: the emission interval T (>= 1) and burst * T.
    interval_us: int = field(init=False, repr=False, compare=False)
    tolerance_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"rate must be an integer >= 1, got {self.rate!r}")
        if not (isinstance(self.period, int | float) and math.isfinite(self.period)):
            raise ValueError(f"period must be a finite number of seconds, got {self.period!r}")
        if self.period <= 0:
            raise ValueError(f"period must be > 0 seconds, got {self.period!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")
        interval = max(1, round(self.period * US_PER_S / self.rate))
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "tolerance_us", self.burst * interval)


@dataclass(frozen=True, slots=True)
class LimitResult:
    """What a limiter decided.

    * `limit`: the burst (the most the caller may send at once); `remaining`: how many more
      unit-cost requests would be allowed right now.
    * `reset_after`: seconds until the full burst is available again.
    * `retry_after`: seconds until this request would be allowed (0 when allowed).
    * `backend_error`: no limiter evaluated this request (Redis down/slow in fail-open or
      fail-closed mode, or the local table is full of active entries). A denial with this
      flag is an outage (503), never a rate-limit verdict (429).
    * `degraded`: answered by the per-process fallback limiter because Redis failed
      (failure mode `local`). Its denials are genuine rate limits (429).
    * `key`: the key that decided (the most restrictive one for `hit_many`).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    backend_error: bool = False
    degraded: bool = False
    key: str = ""


def unavailable_result(*, allowed: bool, key: str = "") -> LimitResult:
    """A failure-mode verdict: nothing was evaluated (fail open when `allowed`, else closed)."""
    return LimitResult(
        allowed=allowed,
        limit=0,
        remaining=0,
        reset_after=0.0,
        retry_after=0.0,
        backend_error=True,
        key=key,
    )


def evaluate(
    tat_us: int | None, now_us: int, limit: Limit, cost: int, key: str = ""
) -> tuple[int | None, LimitResult]:
    """One GCRA step. Returns (new TAT to store, or None to leave the state alone; result).

    `tat_us` is the stored TAT (None for an absent key). Shared by the local and Redis
    limiters so both report identical numbers.
    """
    interval = limit.interval_us
    tolerance = limit.tolerance_us
    base = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = base + cost * interval
    allow_at = new_tat - tolerance
    if allow_at <= now_us:
        return (new_tat if cost > 0 else None), LimitResult(
            allowed=True,
            limit=limit.burst,
            remaining=(now_us + tolerance - new_tat) // interval,
            reset_after=(new_tat - now_us) / US_PER_S,
            retry_after=0.0,
            key=key,
        )
    return None, LimitResult(
        allowed=False,
        limit=limit.burst,
        remaining=max(0, (now_us + tolerance - base) // interval),
        reset_after=(base - now_us) / US_PER_S,
        retry_after=(allow_at - now_us) / US_PER_S,
        key=key,
    )


def most_restrictive(results: Iterable[LimitResult]) -> LimitResult:
    """The result to report for several limits checked together.

    Any denial wins over allowance; among denials the longest `retry_after`; among allowances
    the fewest `remaining`, then the longest `reset_after`.
    """
    items = list(results)
    if not items:
        raise ValueError("no results")
    denied = [r for r in items if not r.allowed]
    if denied:
        return max(denied, key=lambda r: (r.retry_after, -r.remaining))
    return min(items, key=lambda r: (r.remaining, -r.reset_after))


def check_cost(cost: int, checks: Sequence[tuple[str, Limit]]) -> None:
    """Validate a `hit_many` call (shared with the Redis limiter)."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"cost must be an integer >= 0, got {cost!r}")
    if not checks:
        raise ValueError("hit_many needs at least one (key, limit)")
    keys = [k for k, _ in checks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in one check: {keys!r}")
    for key, limit in checks:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        if not isinstance(limit, Limit):
            raise TypeError(f"expected a Limit for {key!r}, got {type(limit).__name__}")


def _escape(part: str) -> str:
    # `{` and `}` delimit the Redis Cluster hash tag; SPIFFE IDs never contain them, but a
    # key must stay unambiguous whatever it is given.
    return part.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def principal_key(principal: str) -> str:
    """Key of the per-principal limit. `principal` must come from a verified Identity.

    The principal is wrapped in a Redis Cluster hash tag so that its per-principal and
    per-rule keys land in one slot and can be checked in one script.
    """
    if not principal:
        raise ValueError("principal must be non-empty")
    return "{" + _escape(principal) + "}"


def rule_key(principal: str, rule: str) -> str:
    """Key of the principal x rule limit."""
    if not rule:
        raise ValueError("rule must be non-empty")
    return principal_key(principal) + "rule:" + _escape(rule)


def _ceil_seconds(seconds: float) -> int:
    return max(0, math.ceil(round(seconds, 6)))


def rate_limit_headers(result: LimitResult) -> tuple[tuple[str, str], ...]:
    """Response headers (IETF draft-ietf-httpapi-ratelimit-headers, plus `retry-after`).

    `ratelimit-limit` is the burst, `ratelimit-remaining` what is left of it,
    `ratelimit-reset` whole seconds (ceil) until it is full again; a denial adds
    `retry-after` in whole seconds (ceil, >= 1). A failure-mode verdict (`backend_error`)
    carries no quota numbers: nothing was counted; its denial says `retry-after: 1`.
    """
    if result.backend_error:
        return () if result.allowed else (("retry-after", "1"),)
    headers: tuple[tuple[str, str], ...] = (
        ("ratelimit-limit", str(result.limit)),
        ("ratelimit-remaining", str(result.remaining)),
        ("ratelimit-reset", str(_ceil_seconds(result.reset_after))),
    )
    if not result.allowed:
        headers += (("retry-after", str(max(1, _ceil_seconds(result.retry_after)))),)
    return headers


def limit_outcome(result: LimitResult) -> Outcome:
    """ALLOW, RATE_LIMITED (429), or UNAVAILABLE (503) when no limiter could decide."""
    if result.allowed:
        return Outcome.ALLOW
    return Outcome.UNAVAILABLE if result.backend_error else Outcome.RATE_LIMITED


class LocalLimiter:
    """GCRA in process memory, bounded to `max_keys` entries. Thread-safe.

    Memory: only *active* entries (TAT > now) carry information; an entry whose TAT has
    passed is indistinguishable from an absent key. A min-heap ordered by TAT finds them:
    every call first drops the entries whose TAT has passed (amortised O(log n), each stored
    TAT is pushed once and popped once), so eviction never resets an active limiter.

    Full table (max_keys *active* entries, i.e. max_keys keys each hit within the last
    burst*T): a check that needs a new entry is denied with `backend_error=True` (503, never
    429) and counted in `overflow_denials`; existing keys keep working. We fail closed rather
    than evict an active entry, because evicting would silently hand that principal a fresh
    burst. Keys come from verified identities, so a full table means `max_keys` is sized
    below (principals x rules active at once): raise it.
    """

    def __init__(self, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._clock = clock
        self.max_keys = max_keys
        self._tats: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self.overflow_denials = 0

    def __len__(self) -> int:
        return len(self._tats)

    def _now_us(self) -> int:
        return round(self._clock() * US_PER_S)

    def _purge(self, now_us: int) -> None:
        heap, tats = self._heap, self._tats
        while heap and heap[0][0] <= now_us:
            tat, key = heapq.heappop(heap)
            if tats.get(key) == tat:
                del tats[key]
        if len(heap) > 2 * len(tats) + 1024:
            self._compact()

    def _compact(self) -> None:
        # Drop superseded heap entries (older TATs of hot keys): memory stays O(max_keys).
        self._heap = [(tat, key) for key, tat in self._tats.items()]
        heapq.heapify(self._heap)

    def hit(self, key: str, limit: Limit, cost: int = 1) -> LimitResult:
        """Check and, if allowed, consume `cost` from `key`'s limit."""
        if type(key) is not str or not key or type(cost) is not int or cost < 0:
            check_cost(cost, ((key, limit),))  # raises with a precise message
        if type(limit) is not Limit:
            raise TypeError(f"expected a Limit, got {type(limit).__name__}")
        with self._lock:
            now = round(self._clock() * US_PER_S)
            heap = self._heap
            if heap and heap[0][0] <= now:
                self._purge(now)
            tats = self._tats
            tat, result = evaluate(tats.get(key), now, limit, cost, key)
            if tat is None:
                return result
            if key not in tats and len(tats) >= self.max_keys:
                self.overflow_denials += 1
                return unavailable_result(allowed=False, key=key)
            tats[key] = tat
            heapq.heappush(heap, (tat, key))
            if len(heap) > 2 * len(tats) + 1024:
                self._compact()
            return result

    def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult:
        """Check all limits; consume from all only if all allow. Reports the most restrictive."""
        check_cost(cost, items)
        with self._lock:
            now = self._now_us()
            if self._heap and self._heap[0][0] <= now:
                self._purge(now)
            tats = self._tats
            outcomes = [evaluate(tats.get(key), now, limit, cost, key) for key, limit in items]
            result = most_restrictive(r for _, r in outcomes)
            if not result.allowed:
                return result
            writes = [
                (key, tat)
                for (key, _), (tat, _) in zip(items, outcomes, strict=True)
                if tat is not None
            ]
            new_keys = sum(1 for key, _ in writes if key not in tats)
            if len(tats) + new_keys > self.max_keys:
                self.overflow_denials += 1
                return unavailable_result(allowed=False, key=result.key)
            for key, tat in writes:
                tats[key] = tat
                heapq.heappush(self._heap, (tat, key))
            if len(self._heap) > 2 * len(tats) + 1024:
                self._compact()
            return result


class Limiter(Protocol):
    """What the authorizer and the server's lifecycle need from a rate limiter.

    `start` runs once before serving (connect, preload scripts); it may raise, and the server
    then logs that the backend is unreachable and serves under the limiter's failure mode.
    `aclose` runs once at shutdown. `hit_many` is per check: consume `cost` from every
    (key, limit) only if all allow, and report the most restrictive result.
    """

    async def start(self) -> None: ...

    async def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult: ...

    async def aclose(self) -> None: ...


class InProcessLimiter:
    """The local GCRA limiter behind the async Limiter interface (no I/O, never awaits)."""

    def __init__(self, limiter: LocalLimiter) -> None:
        self.local = limiter

    async def start(self) -> None:
        """Nothing to connect to."""

    async def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult:
        return self.local.hit_many(items, cost)

    async def aclose(self) -> None:
        """Nothing to release: the state is process memory."""


class OverLimitCache:
    """Keys known to be over their limit, answered locally until their retry-after.

    A GCRA denial consumes nothing and a key's TAT only moves forward, so a key denied for
    a check of cost `c` stays denied for any check of cost >= `c` until `retry_after` has
    passed: answering those checks here, without a round trip, gives the answer the shared
    limiter would give. What it trades (docs/rate-limits.md, "Over-limit cache"):

    * the deadline is measured from when the denial *arrived*, so a key may be refused up to
      one round trip longer than the shared limiter would refuse it;
    * if the shared state is lost (Redis restarted or flushed, a failover lost the last
      writes), a cached key stays refused until its retry-after instead of getting its fresh
      burst at once;
    * an entry is used only for the same limit (emission interval and burst): a policy
      change that alters the limit asks the shared limiter again.

    Bounded: at most `max_entries` keys; expired entries are dropped when looked up or when
    the table is full; a full table of live entries caches nothing more (correct, only
    slower). Single-threaded: the event loop is the only caller.
    """

    def __init__(self, clock: Callable[[], float], max_entries: int = 10_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self._clock = clock
        self.max_entries = max_entries
        # key -> (denied until, interval_us, tolerance_us, min cost, remaining, reset at)
        self._entries: dict[str, tuple[float, int, int, int, int, float]] = {}
        self._sweep_at = 0.0
        self.hits = 0
        self.full = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, items: Sequence[tuple[str, Limit]], cost: int) -> LimitResult | None:
        """The local denial for this check, or None when the shared limiter must decide."""
        entries = self._entries
        if not entries or cost == 0:
            return None
        now = -1.0
        for key, limit in items:
            entry = entries.get(key)
            if entry is None:
                continue
            if now < 0:
                now = self._clock()
            until, interval, tolerance, min_cost, remaining, reset_at = entry
            if now >= until:
                del entries[key]
                continue
            if interval != limit.interval_us or tolerance != limit.tolerance_us:
                continue
            if cost < min_cost:
                continue
            self.hits += 1
            return LimitResult(
                allowed=False,
                limit=limit.burst,
                remaining=remaining,
                reset_after=max(0.0, reset_at - now),
                retry_after=until - now,
                key=key,
            )
        return None

    def put(self, items: Sequence[tuple[str, Limit]], cost: int, result: LimitResult) -> None:
        """Remember a genuine denial (never an outage answer or a fallback's verdict)."""
        if (
            result.allowed
            or result.backend_error
            or result.degraded
            or cost == 0
            or result.retry_after <= 0
            or self.max_entries == 0
        ):
            return
        limit = next((lim for key, lim in items if key == result.key), None)
        if limit is None:
            return
        entries = self._entries
        now = self._clock()
        if result.key not in entries and len(entries) >= self.max_entries:
            # Sweep only when some entry can have expired: a table full of live entries
            # costs one comparison per denial, not a scan.
            if now >= self._sweep_at:
                for key in [k for k, e in entries.items() if e[0] <= now]:
                    del entries[key]
                self._sweep_at = min((e[0] for e in entries.values()), default=0.0)
            if len(entries) >= self.max_entries:
                self.full += 1
                return
        entries[result.key] = (
            now + result.retry_after,
            limit.interval_us,
            limit.tolerance_us,
            cost,
            result.remaining,
            now + result.reset_after,
        )
