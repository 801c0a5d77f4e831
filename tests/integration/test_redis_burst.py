"""Bursts against a healthy Redis never produce failure-mode answers (issue 18, item 6).

Three real `extauthz serve` processes with the DEFAULT Redis deadline share one real Redis;
the test fires bursts of 60 to 200 concurrent checks spread over the three, from the same
2-core machine (client, servers and Redis compete for the CPU). Every answer must be a
genuine verdict: exactly the burst allowed per principal, the rest 429, never a 503
`ratelimit_unavailable` and never a `local`-mode over-admission.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest

from .limit_traffic import grpc_burst, limited_policy
from .server_process import running_server

pytestmark = pytest.mark.redis

BURST = 40  # each principal's budget: 40 at once, then one per minute


@pytest.mark.parametrize("mode", ["closed", "local"])
def test_bursts_across_three_replicas_with_default_deadline_get_exact_budget_and_no_503(
    redis_url: str, tmp_path: Path, mode: str
) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "orders.yaml").write_text(limited_policy(BURST))
    # The default --redis-timeout on purpose: what a user gets.
    args = ["--rate-limit-backend", "redis", "--redis-url", redis_url,
            "--redis-failure-mode", mode, "--decision-log", "none"]
    with (
        running_server(policy, tmp_path, extra=args) as a,
        running_server(policy, tmp_path, extra=args) as b,
        running_server(policy, tmp_path, extra=args) as c,
    ):
        targets = [a.target, b.target, c.target]
        rounds = []
        for n, size in enumerate((60, 120, 200, 200, 60, 200)):
            principal = f"spiffe://prod.example/ns/burst/sa/{mode}-{n}"
            rounds.append((size, asyncio.run(grpc_burst(targets, principal, size))))
        logs = a.log() + b.log() + c.log()
    events = [line[:300] for line in logs.splitlines() if "ratelimit" in line or "limiter" in line]
    for size, answers in rounds:
        # Exactly the budget, whoever answered; every other answer a genuine 429.
        expected = Counter({"allow": BURST, "429:rate_limited": size - BURST})
        assert answers == expected, (answers, events[:5])
    assert "ratelimit_breaker" not in logs
    assert not re.search(r"ratelimit_unavailable|degraded", logs)
