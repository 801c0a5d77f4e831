"""GCRA core and LocalLimiter: injected clock, no sleeps. Bad paths first."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.decide.ratelimit import (
    Limit,
    LimitResult,
    LocalLimiter,
    OverLimitCache,
    limit_outcome,
    principal_key,
    rate_limit_headers,
    rule_key,
    unavailable_result,
)
from extauthz.model import Outcome

from .conftest import Clock


def make(max_keys: int = 1000, t: float = 1000.0) -> tuple[LocalLimiter, Clock]:
    clock = Clock(t)
    return LocalLimiter(clock, max_keys=max_keys), clock


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "period": 1.0, "burst": 1},
        {"rate": -1, "period": 1.0, "burst": 1},
        {"rate": 1.5, "period": 1.0, "burst": 1},
        {"rate": True, "period": 1.0, "burst": 1},
        {"rate": 1, "period": 0, "burst": 1},
        {"rate": 1, "period": -1.0, "burst": 1},
        {"rate": 1, "period": math.inf, "burst": 1},
        {"rate": 1, "period": math.nan, "burst": 1},
        {"rate": 1, "period": 1.0, "burst": 0},
        {"rate": 1, "period": 1.0, "burst": 2.0},
    ],
)
def test_limit_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limit(**kwargs)  # type: ignore[arg-type]


def test_hit_rejects_bad_calls() -> None:
    lim, _ = make()
    one = Limit(1, 1.0, 1)
    with pytest.raises(ValueError):
        lim.hit("", one)
    with pytest.raises(ValueError):
        lim.hit("k", one, cost=-1)
    with pytest.raises(ValueError):
        lim.hit_many([])
    with pytest.raises(ValueError):
        lim.hit_many([("k", one), ("k", one)])
    with pytest.raises(TypeError):
        lim.hit_many([("k", (1, 1.0, 1))])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        LocalLimiter(time.monotonic, max_keys=0)
    assert len(lim) == 0


def test_cost_above_burst_is_always_denied_and_consumes_nothing() -> None:
    lim, _ = make()
    limit = Limit(10, 1.0, 5)
    r = lim.hit("k", limit, cost=6)
    assert not r.allowed and r.retry_after > 0 and not r.backend_error
    assert lim.hit("k", limit, cost=5).allowed


# --- exact counting ----------------------------------------------------------------------


@pytest.mark.parametrize("burst", [1, 2, 7, 100])
def test_exactly_burst_then_denied(burst: int) -> None:
    lim, _ = make()
    limit = Limit(rate=burst, period=60.0, burst=burst)
    results = [lim.hit("p", limit) for _ in range(burst + 5)]
    assert [r.allowed for r in results] == [True] * burst + [False] * 5
    assert [r.remaining for r in results[:burst]] == list(range(burst - 1, -1, -1))
    denied = results[-1]
    assert denied.remaining == 0 and denied.limit == burst
    assert denied.retry_after == pytest.approx(60.0 / burst)


def test_odd_intervals_still_count_exactly() -> None:
    # T = 1/3 s is not representable in binary floating point; integers keep it exact.
    lim, clock = make()
    limit = Limit(rate=3, period=1.0, burst=3)
    for _ in range(50):
        assert [lim.hit("p", limit).allowed for _ in range(4)] == [True, True, True, False]
        clock.advance(1.0)


def test_burst_semantics_rate_and_burst_differ() -> None:
    lim, clock = make()
    limit = Limit(rate=10, period=1.0, burst=3)  # 3 at once, then one per 100 ms
    assert [lim.hit("p", limit).allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(0.099)
    assert not lim.hit("p", limit).allowed
    clock.advance(0.001)
    assert lim.hit("p", limit).allowed
    assert not lim.hit("p", limit).allowed
    # Over a long stretch the sustained rate is exactly rate/period, plus the burst.
    lim2, clock2 = make()
    allowed = 0
    for _ in range(10_000):  # hammering every 1 ms from t=0 to t=9.999 s
        allowed += lim2.hit("p", limit).allowed
        clock2.advance(0.001)
    assert allowed == 3 + 99  # the burst, then one per 100 ms at 0.1 ... 9.9 s


def test_window_edge_gives_no_double_burst() -> None:
    lim, clock = make(t=999.999)
    limit = Limit(rate=10, period=1.0, burst=10)
    assert sum(lim.hit("p", limit).allowed for _ in range(20)) == 10
    clock.now = 1000.0  # a fixed-window limiter would start a fresh window here
    assert sum(lim.hit("p", limit).allowed for _ in range(20)) == 0
    clock.now = 1000.001
    assert sum(lim.hit("p", limit).allowed for _ in range(20)) == 0
    clock.now = 1000.099  # one emission interval after the burst: exactly one more
    assert sum(lim.hit("p", limit).allowed for _ in range(20)) == 1


def test_refill_after_time_passes() -> None:
    lim, clock = make()
    limit = Limit(rate=2, period=1.0, burst=4)
    assert sum(lim.hit("p", limit).allowed for _ in range(10)) == 4
    clock.advance(0.5)
    assert sum(lim.hit("p", limit).allowed for _ in range(10)) == 1
    clock.advance(10.0)  # long idle: back to the full burst, never more
    assert sum(lim.hit("p", limit).allowed for _ in range(10)) == 4


def test_principals_are_isolated() -> None:
    lim, _ = make()
    limit = Limit(rate=1, period=60.0, burst=2)
    a, b = principal_key("spiffe://td/ns/a/sa/x"), principal_key("spiffe://td/ns/b/sa/y")
    assert [lim.hit(a, limit).allowed for _ in range(3)] == [True, True, False]
    assert [lim.hit(b, limit).allowed for _ in range(3)] == [True, True, False]


def test_key_builders_are_unambiguous_and_hash_tagged() -> None:
    p = "spiffe://td/ns/a/sa/x"
    assert principal_key(p) == "{spiffe://td/ns/a/sa/x}"
    assert rule_key(p, "read") == "{spiffe://td/ns/a/sa/x}rule:read"
    assert principal_key("a}rule:b") != rule_key("a", "b")
    assert rule_key("a", "b}") != rule_key("a}", "b")
    with pytest.raises(ValueError):
        principal_key("")
    with pytest.raises(ValueError):
        rule_key(p, "")


# --- several limits at once --------------------------------------------------------------


def test_hit_many_consumes_nothing_when_one_denies() -> None:
    lim, _ = make()
    per_principal = Limit(rate=100, period=60.0, burst=100)
    per_rule = Limit(rate=2, period=60.0, burst=2)
    p = "spiffe://td/a"
    pk, rk = principal_key(p), rule_key(p, "write")
    for _ in range(2):
        assert lim.hit_many([(pk, per_principal), (rk, per_rule)]).allowed
    for _ in range(50):
        r = lim.hit_many([(pk, per_principal), (rk, per_rule)])
        assert not r.allowed and r.key == rk
    # The per-principal budget only paid for the two allowed calls.
    assert lim.hit(pk, per_principal, cost=0).remaining == 98


def test_hit_many_reports_most_restrictive() -> None:
    lim, _ = make()
    wide, narrow = Limit(100, 1.0, 100), Limit(1, 1.0, 5)
    r = lim.hit_many([("a", wide), ("b", narrow)])
    assert r.allowed and r.key == "b" and r.remaining == 4 and r.limit == 5
    for _ in range(4):
        lim.hit("b", narrow)
    r = lim.hit_many([("a", wide), ("b", narrow)])
    assert not r.allowed and r.key == "b" and r.retry_after == pytest.approx(1.0)


def test_cost_zero_peeks_without_consuming() -> None:
    lim, _ = make()
    limit = Limit(1, 1.0, 3)
    assert lim.hit("k", limit, cost=0).remaining == 3
    assert len(lim) == 0
    assert lim.hit("k", limit, cost=2).remaining == 1


# --- bounded memory ----------------------------------------------------------------------


def test_full_table_of_active_entries_denies_new_keys_with_backend_error() -> None:
    lim, _ = make(max_keys=3)
    limit = Limit(1, 60.0, 5)
    for k in "abc":
        assert lim.hit(k, limit).allowed
    r = lim.hit("d", limit)
    assert not r.allowed and r.backend_error
    assert limit_outcome(r) is Outcome.UNAVAILABLE
    assert lim.overflow_denials == 1 and len(lim) == 3
    # Existing active keys keep their state: nothing was reset to make room.
    assert lim.hit("a", limit).remaining == 3


def test_evicting_idle_never_resets_an_active_limiter() -> None:
    lim, clock = make(max_keys=10)
    slow = Limit(rate=1, period=3600.0, burst=2)  # stays active for two hours
    fast = Limit(rate=1000, period=1.0, burst=1)  # idle after 1 ms
    assert lim.hit("victim", slow).allowed and lim.hit("victim", slow).allowed
    assert not lim.hit("victim", slow).allowed
    for i in range(10_000):  # way more keys than fit: only idle ones may go
        clock.advance(0.002)
        assert lim.hit(f"k{i}", fast).allowed
        assert len(lim) <= 10
    r = lim.hit("victim", slow)
    assert not r.allowed and not r.backend_error  # still limited: never evicted


def test_one_million_distinct_keys_stay_bounded() -> None:
    max_keys = 5_000
    lim, clock = make(max_keys=max_keys)
    limit = Limit(rate=1, period=1.0, burst=1)  # each key active for 1 s
    n = 1_000_000
    started = time.perf_counter()
    high = 0
    for i in range(n):
        clock.now += 0.0005  # 2000 new keys per second: ~2000 active at a time
        r = lim.hit(f"spiffe://td/w{i}", limit)
        if not r.allowed:
            raise AssertionError(f"key {i} denied: {r}")
        if not i % 1000:
            high = max(high, len(lim), len(lim._heap) // 3)
    elapsed = time.perf_counter() - started
    assert high <= max_keys and len(lim) <= max_keys
    assert len(lim._heap) <= 2 * max_keys + 1024
    assert elapsed < 15, f"{n} hits took {elapsed:.1f}s"


def test_frozen_clock_table_is_capped() -> None:
    lim, _ = make(max_keys=1000)
    limit = Limit(1, 1.0, 1)
    denied = 0
    for i in range(200_000):
        denied += not lim.hit(f"k{i}", limit).allowed
    assert len(lim) == 1000 and denied == 199_000 == lim.overflow_denials


def test_hot_key_heap_is_compacted() -> None:
    lim, clock = make(max_keys=10)
    limit = Limit(rate=1_000_000, period=1.0, burst=1_000_000)  # T = 1 us, never denies here
    for _ in range(20_000):
        assert lim.hit("hot", limit).allowed
    assert len(lim) == 1 and len(lim._heap) <= 2 + 1024 + 1
    clock.advance(100.0)
    lim.hit("other", limit)
    assert len(lim) == 1


# --- headers and outcome -----------------------------------------------------------------


def test_headers_on_denial() -> None:
    r = LimitResult(allowed=False, limit=10, remaining=0, reset_after=2.2, retry_after=0.0001)
    assert rate_limit_headers(r) == (
        ("ratelimit-limit", "10"),
        ("ratelimit-remaining", "0"),
        ("ratelimit-reset", "3"),
        ("retry-after", "1"),
    )
    assert limit_outcome(r) is Outcome.RATE_LIMITED


def test_headers_on_allow_and_exact_seconds() -> None:
    r = LimitResult(allowed=True, limit=5, remaining=4, reset_after=2.0, retry_after=0.0)
    assert rate_limit_headers(r) == (
        ("ratelimit-limit", "5"),
        ("ratelimit-remaining", "4"),
        ("ratelimit-reset", "2"),
    )
    assert limit_outcome(r) is Outcome.ALLOW


def test_headers_from_limiter() -> None:
    lim, _ = make()
    limit = Limit(rate=1, period=10.0, burst=2)
    lim.hit("k", limit)
    assert dict(rate_limit_headers(lim.hit("k", limit))) == {
        "ratelimit-limit": "2",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "20",
    }
    h = dict(rate_limit_headers(lim.hit("k", limit)))
    assert h["retry-after"] == "10" and h["ratelimit-reset"] == "20"


def test_headers_for_failure_mode_verdicts() -> None:
    closed = LimitResult(False, 0, 0, 0.0, 0.0, backend_error=True)
    opened = LimitResult(True, 0, 0, 0.0, 0.0, backend_error=True)
    assert rate_limit_headers(closed) == (("retry-after", "1"),)
    assert rate_limit_headers(opened) == ()
    assert limit_outcome(closed) is Outcome.UNAVAILABLE
    assert limit_outcome(opened) is Outcome.ALLOW


# --- the invariant, for arbitrary traffic ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(1, 50),
    period=st.sampled_from([0.1, 1.0, 7.0, 60.0]),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0, 2.0, allow_nan=False), st.integers(0, 3)), max_size=200),
)
def test_no_interval_ever_exceeds_burst_plus_rate(
    rate: int, period: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    limit = Limit(rate, period, burst)
    lim, clock = make()
    log: list[tuple[float, int]] = []  # (time, cost) of allowed requests
    for dt, cost in steps:
        clock.advance(dt)
        if lim.hit("k", limit, cost).allowed:
            log.append((clock.now, cost))
    interval = limit.interval_us / 1e6
    for i, (t0, _) in enumerate(log):
        used = 0
        for t1, cost in log[i:]:
            used += cost
            assert used <= burst + math.floor((t1 - t0) / interval + 1e-6), (t0, t1)


# --- over-limit cache ----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _denial(key: str, retry_after: float, remaining: int = 0) -> LimitResult:
    return LimitResult(False, 5, remaining, retry_after + 1.0, retry_after, key=key)


def test_overlimit_cache_denies_locally_until_retry_after_then_asks_again() -> None:
    clock = _Clock()
    cache = OverLimitCache(clock)
    lim = Limit(1, 10.0, 5)
    items = [("p", lim), ("p:r", Limit(1, 1.0, 1))]
    cache.put(items, 1, _denial("p", 2.0))
    clock.now += 1.5
    hit = cache.get(items, 1)
    assert hit is not None and not hit.allowed and not hit.backend_error
    assert hit.key == "p" and hit.retry_after == pytest.approx(0.5)
    assert hit.limit == 5 and hit.reset_after == pytest.approx(1.5)
    assert limit_outcome(hit) is Outcome.RATE_LIMITED
    clock.now += 0.5
    assert cache.get(items, 1) is None and len(cache) == 0  # expired: dropped
    assert cache.hits == 1


def test_overlimit_cache_ignores_other_limits_smaller_costs_and_peeks() -> None:
    clock = _Clock()
    cache = OverLimitCache(clock)
    lim = Limit(1, 10.0, 5)
    cache.put([("p", lim)], 3, _denial("p", 5.0))
    assert cache.get([("p", Limit(2, 10.0, 5))], 3) is None  # the policy changed the limit
    assert cache.get([("p", lim)], 1) is None  # a cheaper check may fit
    assert cache.get([("p", lim)], 0) is None  # a peek
    assert cache.get([("q", lim)], 3) is None
    assert cache.get([("p", lim)], 3) is not None


@pytest.mark.parametrize(
    "result",
    [
        LimitResult(True, 5, 4, 1.0, 0.0, key="p"),
        unavailable_result(allowed=False, key="p"),
        LimitResult(False, 5, 0, 1.0, 1.0, degraded=True, key="p"),
        LimitResult(False, 5, 0, 1.0, 0.0, key="p"),
        LimitResult(False, 5, 0, 1.0, 1.0, key="not-in-the-check"),
    ],
)
def test_overlimit_cache_remembers_only_genuine_denials(result: LimitResult) -> None:
    cache = OverLimitCache(_Clock())
    cache.put([("p", Limit(1, 1.0, 5))], 1, result)
    assert len(cache) == 0


def test_overlimit_cache_is_bounded_and_reuses_expired_slots() -> None:
    clock = _Clock()
    cache = OverLimitCache(clock, max_entries=3)
    lim = Limit(1, 10.0, 5)
    for i in range(3):
        cache.put([(f"k{i}", lim)], 1, _denial(f"k{i}", 1.0 + i))
    cache.put([("k3", lim)], 1, _denial("k3", 9.0))
    assert len(cache) == 3 and cache.full == 1 and cache.get([("k3", lim)], 1) is None
    clock.now += 1.5  # k0 expired: its slot is reused
    cache.put([("k3", lim)], 1, _denial("k3", 9.0))
    assert len(cache) == 3 and cache.get([("k3", lim)], 1) is not None
    with pytest.raises(ValueError):
        OverLimitCache(clock, max_entries=-1)
    disabled = OverLimitCache(clock, max_entries=0)
    disabled.put([("k", lim)], 1, _denial("k", 1.0))
    assert len(disabled) == 0
