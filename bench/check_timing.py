"""Per-check time of `Authorizer.check` alone: cache hit and cache miss, with and without limits.

Issue 14 asks that restructuring the check (one pass: guards -> cache -> policy -> limits) makes
neither the hit nor the miss slower. This times the pure core only, through the public entry
point the gRPC edge calls, on the benchmark's 10,000-rule policy plus one small file whose
principal and rule carry (never exhausted) limits, so the limits step is exercised too.

    python bench/check_timing.py [POLICY_DIR]      # best of 7 rounds, microseconds per check
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import make_request
import policies

from extauthz.settings import Settings
from extauthz.transport.grpc_proto import to_request

try:  # the app moves out of the gRPC module (issue 15); either place works
    from extauthz.app import build_app  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from extauthz.transport.grpc_server import build_app

LIMITED = "spiffe://prod.example/ns/bench/sa/limited"
LIMITS_POLICY = f"""\
apiVersion: extauthz/v1
owner: team-bench
service: limited
hosts: [limited.mesh.local]
principals:
  - name: limited
    spiffe: {LIMITED}
    limit: {{rate: 1000000000, period: 1s, burst: 1000000000}}
rules:
  - name: limited-read
    methods: [GET]
    path_prefix: /v1
    allow: [limited]
    limit: {{rate: 1000000000, period: 1s, burst: 1000000000}}
"""


def run_to_completion(coro: Coroutine[Any, Any, Any]) -> Any:
    """The in-process limiter never suspends, so a check runs without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the check suspended")


def best_us(fn: Callable[[], object], n: int, rounds: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main(policy: Path, n: int = 20_000) -> None:
    apps = {}
    for name, size in (("hit", 100_000), ("miss", 0)):
        settings = Settings(policy=policy, cache_size=size, tracing=False, decision_log="none")
        apps[name] = build_app(settings)
    if not apps["hit"].store.reload():
        raise SystemExit(f"policy did not load: {apps['hit'].store.last_error}")
    apps["miss"].store.current = apps["hit"].store.current
    plain = to_request(make_request.check_request())
    limited = to_request(make_request.check_request(
        principal=LIMITED, host="limited.mesh.local", path="/v1/things/7?x=1"))
    for label, request in (("no limits", plain), ("limits", limited)):
        for kind, app in apps.items():
            check = app.authorizer.check
            result = run_to_completion(check(request))
            assert result.decision.allowed, result.decision
            us = best_us(lambda check=check, request=request: run_to_completion(check(request)), n)
            print(f"{kind:4}  {label:9}  {us:6.2f} µs  Authorizer.check")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        target = Path(tempfile.mkdtemp()) / "policy"
        policies.generate(target)
        (target / "limited.yaml").write_text(LIMITS_POLICY)
        try:
            main(target)
        finally:
            shutil.rmtree(target.parent)
