"""The Redis breaker opens on an error rate over a window, probes when half-open."""

from __future__ import annotations

import pytest

from extauthz.backends.breaker import BreakerState, RateBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw: float) -> tuple[RateBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    b = RateBreaker(
        clock=clock,
        on_change=lambda old, new, why: changes.append((old.name, new.name)),
        **kw,  # type: ignore[arg-type]
    )
    return b, changes


@pytest.mark.parametrize(
    "kw",
    [{"window": 0}, {"error_rate": 0}, {"error_rate": 1.5}, {"min_calls": 0}, {"cooldown": -1}],
)
def test_bad_parameters_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateBreaker(clock=Clock(), **kw)  # type: ignore[arg-type]


def test_a_few_misses_among_many_successes_never_open_it() -> None:
    clock = Clock()
    b, changes = make(clock, min_calls=20, error_rate=0.5)
    for i in range(1000):  # 10% misses, as a busy process may see under a burst
        assert b.allow()
        b.record(ok=i % 10 != 0)
        clock.now += 0.001
    assert b.state is BreakerState.CLOSED and changes == []


def test_three_consecutive_misses_alone_do_not_open_it() -> None:
    clock = Clock()
    b, _ = make(clock, min_calls=20)
    for _ in range(3):
        b.record(ok=False)
    assert b.state is BreakerState.CLOSED and b.allow()


def test_error_rate_over_threshold_opens_then_probe_closes() -> None:
    clock = Clock()
    b, changes = make(clock, min_calls=10, error_rate=0.5, cooldown=0.5)
    for _ in range(5):
        b.record(ok=True)
    for _ in range(5):
        b.record(ok=False)  # 5 of 10 failed: rate 0.5 reached
    assert b.state is BreakerState.OPEN and b.opened == 1
    assert not b.allow()  # cooldown: no call reaches the backend
    clock.now += 0.5
    assert b.allow()  # one probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record(ok=True)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert changes == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")]


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b, _ = make(clock, min_calls=2, cooldown=1.0)
    b.record(ok=False)
    b.record(ok=False)
    clock.now += 1.0
    assert b.allow()
    b.record(ok=False)
    assert b.state is BreakerState.OPEN and b.opened == 2
    clock.now += 0.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_late_outcomes_of_calls_made_before_opening_change_nothing() -> None:
    clock = Clock()
    b, _ = make(clock, min_calls=2, cooldown=1.0)
    b.record(ok=False)
    b.record(ok=False)
    b.record(ok=True)  # an answer that was already on its way
    b.record(ok=False)
    assert b.state is BreakerState.OPEN and b.opened == 1


def test_old_errors_leave_the_window() -> None:
    clock = Clock()
    b, _ = make(clock, min_calls=10, window=2.0)
    for _ in range(9):
        b.record(ok=False)
    clock.now += 2.5  # those nine are older than the window now
    assert b.totals() == (0, 0)
    b.record(ok=False)
    assert b.state is BreakerState.CLOSED


def test_lost_probe_expires_so_the_breaker_cannot_stick_half_open() -> None:
    clock = Clock()
    b, _ = make(clock, min_calls=1, cooldown=0.5, window=2.0)
    b.record(ok=False)
    clock.now += 0.5
    assert b.allow()  # a probe whose outcome never comes back
    assert not b.allow()
    clock.now += 2.0
    assert b.allow()


def test_zero_cooldown_never_opens() -> None:
    clock = Clock()
    b, changes = make(clock, min_calls=1, cooldown=0)
    for _ in range(50):
        b.record(ok=False)
    assert b.state is BreakerState.CLOSED and b.allow() and changes == []
