"""A circuit breaker that opens on an error *rate*, not on a streak of errors.

Why a rate: under a burst a handful of checks may miss their deadline while Redis is fine
(the process itself was busy); three consecutive misses used to open the old breaker and
turn a healthy Redis into an outage. An outage shows up as most calls failing, so the
breaker opens only when, over the last `window` seconds, at least `min_calls` calls were
made and at least `error_rate` of them failed.

States: CLOSED (Redis is asked) -> OPEN (Redis is not asked for `cooldown` seconds; the
failure mode answers at once, so an outage costs no latency per check) -> HALF_OPEN (one
probe call at a time is let through; success closes, failure re-opens) -> ...

Pure and single-threaded (the event loop is the only caller); time comes from `clock`.
Every transition is reported to `on_change`, which logs and counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    """Values are the metric's gauge values."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class RateBreaker:
    """Error-rate breaker over a sliding window of `buckets` time buckets."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        window: float = 2.0,
        error_rate: float = 0.5,
        min_calls: int = 20,
        cooldown: float = 0.5,
        buckets: int = 10,
        on_change: Callable[[BreakerState, BreakerState, str], None] | None = None,
    ) -> None:
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        if not 0.0 < error_rate <= 1.0:
            raise ValueError("error_rate must be in (0, 1]")
        if min_calls < 1:
            raise ValueError("min_calls must be >= 1")
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0")
        self._clock = clock
        self.window = window
        self.error_rate = error_rate
        self.min_calls = min_calls
        self.cooldown = cooldown
        self._width = window / buckets
        # Ring of (bucket index, calls, errors); a slot whose index is stale counts as empty.
        self._ring: list[list[int]] = [[-1, 0, 0] for _ in range(buckets)]
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._open_until = 0.0
        self._probing = False
        self._probe_started = 0.0
        self.opened = 0  # times the breaker opened (a counter metric)

    def _slot(self, now: float) -> list[int]:
        index = int(now / self._width)
        slot = self._ring[index % len(self._ring)]
        if slot[0] != index:
            slot[0], slot[1], slot[2] = index, 0, 0
        return slot

    def totals(self) -> tuple[int, int]:
        """(calls, errors) within the window."""
        oldest = int(self._clock() / self._width) - len(self._ring) + 1
        calls = errors = 0
        for index, c, e in self._ring:
            if index >= oldest:
                calls += c
                errors += e
        return calls, errors

    def allow(self) -> bool:
        """May this call go to the backend? In HALF_OPEN only one probe is in flight."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            if self._clock() < self._open_until:
                return False
            self._move(BreakerState.HALF_OPEN, "cooldown over: probing")
        now = self._clock()
        if self._probing and now < self._probe_started + self.window:
            return False  # (a probe whose outcome was never recorded expires after `window`)
        self._probing = True
        self._probe_started = now
        return True

    def record(self, ok: bool, calls: int = 1) -> None:
        """The outcome of `calls` calls that `allow()` let through."""
        if self.state is BreakerState.OPEN:
            return  # calls let through before it opened: the window was already judged
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False
            if ok:
                self._reset()
                self._move(BreakerState.CLOSED, "probe succeeded")
            else:
                self._open("probe failed")
            return
        slot = self._slot(self._clock())
        slot[1] += calls
        if not ok:
            slot[2] += calls
            total, errors = self.totals()
            if total >= self.min_calls and errors >= self.error_rate * total:
                self._open(f"{errors} of {total} calls failed within {self.window:g}s")

    def _reset(self) -> None:
        for slot in self._ring:
            slot[0], slot[1], slot[2] = -1, 0, 0

    def _open(self, why: str) -> None:
        if self.cooldown <= 0:  # a breaker that never opens: every call is tried
            return
        self._open_until = self._clock() + self.cooldown
        self.opened += 1
        self._reset()
        self._move(BreakerState.OPEN, why)

    def _move(self, new: BreakerState, why: str) -> None:
        old, self.state = self.state, new
        if old is not new and self._on_change is not None:
            self._on_change(old, new, why)
