"""The Redis limiter's deadline is sized from measured latency, within fixed bounds.

No Redis needed: the sizing reads only the limiter's own latency sample.
"""

from __future__ import annotations

import pytest

from extauthz.backends.redis_limiter import (
    DEFAULT_MAX_TIMEOUT,
    DEFAULT_TIMEOUT,
    LatencyHistogram,
    RedisLimiter,
)


def test_defaults_are_the_documented_ones() -> None:
    rl = RedisLimiter(None)
    assert (rl.timeout, rl.deadline, rl.max_timeout) == (0.15, 0.15, 0.2)
    assert (DEFAULT_TIMEOUT, DEFAULT_MAX_TIMEOUT) == (0.15, 0.2)


@pytest.mark.parametrize("kw", [{"timeout": 0}, {"max_inflight": 0}, {"max_batch": 0},
                                {"max_pending": 0}, {"failure_mode": "sideways"}])
def test_bad_parameters_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RedisLimiter(None, **kw)  # type: ignore[arg-type]


def test_fast_answers_keep_the_configured_deadline() -> None:
    rl = RedisLimiter(None, timeout=0.1)
    for _ in range(1000):
        rl.check_latency.observe(0.0005)
    rl._adapt()
    assert rl.deadline == 0.1


def test_a_busy_process_stretches_the_deadline_to_twice_its_p99() -> None:
    rl = RedisLimiter(None, timeout=0.1)
    for i in range(1000):
        rl.check_latency.observe(0.070 if i % 10 == 0 else 0.010)  # p99 = 70 ms
    rl._adapt()
    assert rl.deadline == pytest.approx(0.140)


def test_the_deadline_never_passes_the_ceiling() -> None:
    rl = RedisLimiter(None, timeout=0.1, max_timeout=0.2)
    for _ in range(100):
        rl.check_latency.observe(0.5)
    rl._adapt()
    assert rl.deadline == 0.2
    slow = RedisLimiter(None, timeout=0.3, max_timeout=0.2)  # a ceiling below the floor
    assert slow.max_timeout == 0.3 and slow.deadline == 0.3


def test_the_sample_is_a_bounded_ring_and_quantiles_follow_the_recent_past() -> None:
    h = LatencyHistogram(recent=100)
    assert h.quantile(0.99) == 0.0
    for _ in range(1000):
        h.observe(1.0)
    for _ in range(100):
        h.observe(0.001)
    assert h.quantile(0.99) == 0.001 and h.count == 1100
    assert sum(h.counts) == 1100 and h.sum == pytest.approx(1000.1)
