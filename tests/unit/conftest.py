"""What many unit tests share: a settable clock (one class, not a copy per test module)."""

from __future__ import annotations

import pytest


class Clock:
    """A clock the test moves by hand: `clock()` reads it, `now` sets it, `advance` steps it.

    Pass it wherever the code takes a `Callable[[], float]` clock, so time-dependent behaviour
    (expiry, refill, refresh) is tested without sleeping and without flaking under load.
    """

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()
