"""What both transports build their answer from, memoized the same way.

An answer depends on the decision's outcome, reason, rule, principal, identity source, policy
version and extra headers, and on nothing else of the request; so a check that decides like an
earlier one (a cache hit, or a miss with the same result) reuses the bytes or message built
then. Answers that carry per-request headers (429 with retry-after, budget headers on an
allow) are built fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from extauthz.decide.pipeline import CheckResult
from extauthz.decide.ratelimit import rate_limit_headers
from extauthz.memo import Memo
from extauthz.model import Decision, Outcome

ANSWER_MEMO_SIZE = 4096

T = TypeVar("T")
Build = Callable[[Decision, Sequence[tuple[str, str]]], T]


def answer_key(decision: Decision) -> tuple[object, ...]:
    """Everything an answer is built from."""
    identity = decision.identity
    return (
        decision.outcome,
        decision.reason,
        decision.rule,
        identity.principal if identity is not None else "",
        identity.source if identity is not None else None,
        decision.policy_version,
        decision.headers,
    )


class Answers(Generic[T]):
    """A transport's answers by `answer_key`, bounded."""

    def __init__(self, build: Build[T], *, budget_headers: bool,
                 size: int = ANSWER_MEMO_SIZE) -> None:
        self._build = build
        self._budget_headers = budget_headers
        self._memo: Memo[tuple[object, ...], T] = Memo(size)

    def answer(self, result: CheckResult) -> T:
        decision = result.decision
        if self._budget_headers and result.limit is not None and decision.allowed:
            return self._build(decision, rate_limit_headers(result.limit))
        if decision.outcome is Outcome.RATE_LIMITED:
            return self._build(decision, ())
        key = answer_key(decision)
        answer = self._memo.get(key)
        if answer is None:
            answer = self._memo.put(key, self._build(decision, ()))
        return answer
