"""App.run_check: the one place every transport decides through (fail closed, observe once)."""

import asyncio
from typing import Any

import pytest

from extauthz.app import App
from extauthz.decide.cache import DecisionCache
from extauthz.decide.pipeline import Authorizer, CheckResult
from extauthz.identity.resolver import IdentityConfig, IdentityResolver
from extauthz.model import Outcome, Reason, Request
from extauthz.settings import Settings

from .policy_fixtures import CHECKOUT, compiled

RULES = [{"name": "read", "methods": ["GET"], "path_prefix": "/v1/orders", "allow": ["checkout"]}]
GOOD = Request(method="GET", host="orders.mesh.local", path="/v1/orders/1",
               source_principal=CHECKOUT)


class Holder:
    def __init__(self, policy: Any) -> None:
        self.current = policy


class Exploding:
    @property
    def current(self) -> Any:
        raise RuntimeError("policy store exploded")


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[Request | None, CheckResult]] = []
        self.fail = fail

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((request, result))
        if self.fail:
            raise RuntimeError("observer broke")


def make_app(source: Any, *observers: Any) -> App:
    clock = lambda: 1_000_000.0  # noqa: E731
    resolver = IdentityResolver.from_config(IdentityConfig())
    cache = DecisionCache(10, 60, clock)
    return App(Settings(), source, Authorizer(source, resolver, cache, clock), cache,
               IdentityConfig(), resolver, tuple(observers))


def test_allowed_check_is_counted_and_observed_once() -> None:
    seen = Recorder()
    app = make_app(Holder(compiled(RULES)), seen)
    result = asyncio.run(app.run_check(GOOD))
    assert result.decision.outcome is Outcome.ALLOW
    assert [r.decision.reason for _, r in seen.seen] == [Reason.ALLOWED]
    assert (app.stats.checks, app.stats.errors) == (1, 0)
    assert app.stats.by_reason == {"allowed": 1}


def test_pipeline_exception_fails_closed_503_and_is_still_observed(
        caplog: pytest.LogCaptureFixture) -> None:
    seen = Recorder()
    app = make_app(Exploding(), seen)
    with caplog.at_level("ERROR", logger="extauthz.server"):
        result = asyncio.run(app.run_check(GOOD))
    assert (result.decision.outcome, result.decision.reason) == (
        Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
    assert seen.seen == [(GOOD, result)]
    assert app.stats.errors == 1
    assert "policy store exploded" in caplog.text


def test_unreadable_request_is_503_internal_error_never_an_allow() -> None:
    seen = Recorder()
    app = make_app(Holder(compiled(RULES, version="v9")), seen)
    result = asyncio.run(app.run_check(None))
    assert result.decision.outcome is Outcome.UNAVAILABLE
    assert result.decision.reason is Reason.INTERNAL_ERROR
    assert result.decision.policy_version == "v9"
    assert seen.seen[0][0] is None
    assert app.stats.errors == 1


def test_a_failing_observer_neither_changes_the_answer_nor_stops_the_next() -> None:
    broken, after = Recorder(fail=True), Recorder()
    app = make_app(Holder(compiled(RULES)), broken, after)
    result = asyncio.run(app.run_check(GOOD))
    assert result.decision.allowed
    assert len(after.seen) == 1
