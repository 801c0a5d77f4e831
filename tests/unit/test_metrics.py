"""Metrics: counted in plain ints, exposed by a collector, principal labels bounded by policy."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extauthz.decide.pipeline import CheckResult
from extauthz.decide.ratelimit import LimitResult
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request
from extauthz.observe.metrics import (
    CheckMetrics,
    Sources,
    registry_for,
    start_metrics_server,
)
from extauthz.policy.compiled import CompiledPolicy

from .policy_fixtures import BILLING, CHECKOUT, compiled

RULES = [{"name": "read", "methods": ["GET"], "path_prefix": "/v1", "allow": ["checkout"]}]
SECRET = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"


@dataclass
class Store:
    current: CompiledPolicy | None
    reloads: int = 1
    reload_failures: int = 0


@dataclass
class Cache:
    hits: int = 7
    misses: int = 3
    size: int = 3
    maxsize: int = 100


@dataclass
class Caches:
    items: list[Any] = field(default_factory=list)


def result(principal: str | None, outcome: Outcome = Outcome.ALLOW,
           reason: Reason = Reason.ALLOWED, limit: LimitResult | None = None) -> CheckResult:
    ident = Identity(principal, IdentitySource.MTLS, "prod.example") if principal else None
    return CheckResult(Decision(outcome, reason, identity=ident), limit=limit)


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_checks_principals_and_latency_are_exposed() -> None:
    m = CheckMetrics()
    m.bind(Store(compiled(RULES)))
    req = Request(method="GET", host="orders.mesh.local", path="/v1")
    m.observe(req, result(CHECKOUT), 0.00004)
    m.observe(req, result(CHECKOUT), 0.0003)
    m.observe(req, result(BILLING, Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED), 0.002)
    m.observe(req, result("spiffe://prod.example/ns/shop/sa/cart"), 0.002)  # pattern "shop"
    m.observe(req, result(None, Outcome.UNAUTHENTICATED, Reason.NO_IDENTITY), 0.001)
    m.observe(req, result(CHECKOUT, Outcome.RATE_LIMITED, Reason.RATE_LIMITED,
                          LimitResult(False, 3, 0, 1.0, 1.0)), 0.001)
    m.observe(None, result(None, Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR), 0.001)
    s = samples(registry_for(Sources(metrics=m), process=False))
    assert s[("extauthz_checks_total", (("decision", "allow"), ("reason", "allowed"),
                                        ("status", "200")))] == 3
    assert s[("extauthz_checks_total", (("decision", "deny"), ("reason", "rate_limited"),
                                        ("status", "429")))] == 1
    assert s[("extauthz_rate_limited_total", ())] == 1
    p = {k[1]: v for k, v in s.items() if k[0] == "extauthz_principal_checks_total"}
    assert p[(("decision", "allow"), ("principal", "checkout"), ("reason", "allowed"))] == 2
    assert p[(("decision", "deny"), ("principal", "billing"),
              ("reason", "principal_not_allowed"))] == 1
    assert p[(("decision", "allow"), ("principal", "shop"), ("reason", "allowed"))] == 1
    assert p[(("decision", "deny"), ("principal", "none"), ("reason", "no_identity"))] == 1
    le = {dict(k[1])["le"]: v for k, v in s.items()
          if k[0] == "extauthz_check_duration_seconds_bucket" and ("decision", "allow") in k[1]}
    assert le["5e-05"] == 1 and le["0.0005"] == 2 and le["0.0025"] == 3 and le["+Inf"] == 3
    assert s[("extauthz_check_duration_seconds_count", (("decision", "allow"),))] == 3
    assert s[("extauthz_check_duration_seconds_sum", (("decision", "allow"),))] \
        == sum((0.00004, 0.0003, 0.002))


def test_principal_label_set_is_bounded_by_the_policy() -> None:
    m = CheckMetrics()
    store = Store(compiled(RULES))
    m.bind(store)
    for i in range(500):
        m.observe(None, result(f"spiffe://elsewhere.example/sa/{i}", Outcome.FORBIDDEN,
                               Reason.NO_MATCHING_RULE), 0.001)
    names = {k[0] for k in m.by_principal}
    assert names == {"unknown"}
    # A new policy version relabels (the name cache is per version).
    store.current = compiled(RULES, version="v2", principals=[
        {"name": "checkout", "spiffe": CHECKOUT},
        {"name": "elsewhere", "spiffe": "spiffe://elsewhere.example/sa/*"}])
    m.observe(None, result("spiffe://elsewhere.example/sa/1"), 0.001)
    assert {k[0] for k in m.by_principal} == {"unknown", "elsewhere"}


def test_unbound_metrics_say_unknown() -> None:
    m = CheckMetrics()
    m.observe(None, result(CHECKOUT), 0.001)
    assert list(m.by_principal) == [("unknown", "allow", "allowed")]


def test_app_metrics_are_read_lazily_at_scrape_time() -> None:
    policy = compiled(RULES)
    cache = Cache()
    app = SimpleNamespace(cache=cache, store=Store(policy, reloads=2, reload_failures=1),
                          stats=SimpleNamespace(errors=4))
    jwks = SimpleNamespace(name="https://issuer.example", fetch_count=5, ready=True,
                           fetch_failures=1)
    dl = SimpleNamespace(written=10, dropped=1, sampled_out=2, write_errors=0, queued=0,
                         reopens=0)
    sp = SimpleNamespace(exported=3, dropped=2, export_failures=1, queued=0)
    registry = registry_for(Sources(app=app, decision_log=dl, span_processor=sp,
                                    key_caches=lambda: [jwks]), process=False)
    s = samples(registry)
    assert s[("extauthz_decision_cache_hits_total", ())] == 7
    assert s[("extauthz_decision_cache_entries", ())] == 3
    assert s[("extauthz_policy_reloads_total", ())] == 2
    assert s[("extauthz_policy_reload_failures_total", ())] == 1
    assert s[("extauthz_policy_info", (("version", "v1"),))] == 1
    assert s[("extauthz_check_errors_total", ())] == 4
    assert s[("extauthz_jwks_fetches_total", (("issuer", "https://issuer.example"),))] == 5
    assert s[("extauthz_jwks_fetch_failures_total", (("issuer", "https://issuer.example"),))] == 1
    assert s[("extauthz_decision_log_lines_total", (("result", "dropped"),))] == 1
    assert s[("extauthz_trace_spans_total", (("result", "dropped"),))] == 2
    cache.hits = 8  # nothing is cached by the collector
    assert samples(registry)[("extauthz_decision_cache_hits_total", ())] == 8


def test_revocation_reload_failures_and_jwks_state_are_exposed() -> None:
    app = SimpleNamespace(cache=Cache(), store=Store(compiled(RULES)),
                          revocation_failures=2, revocation_version="abc123")
    good = SimpleNamespace(name="https://a.example", fetch_count=3, ready=True, last_error="")
    bad = SimpleNamespace(name="https://b.example", fetch_count=4, ready=False,
                          last_error="URLError: refused")
    s = samples(registry_for(Sources(app=app, key_caches=lambda: [good, bad]), process=False))
    assert s[("extauthz_revocation_reload_failures_total", ())] == 2
    assert s[("extauthz_revocation_info", (("version", "abc123"),))] == 1
    assert s[("extauthz_jwks_fetches_total", (("issuer", "https://b.example"),))] == 4
    assert s[("extauthz_jwks_last_fetch_failed", (("issuer", "https://a.example"),))] == 0
    assert s[("extauthz_jwks_last_fetch_failed", (("issuer", "https://b.example"),))] == 1
    assert s[("extauthz_jwks_ready", (("issuer", "https://b.example"),))] == 0


def test_real_jwks_caches_are_found_after_a_revocation_reload(tmp_path: Any) -> None:
    """A revocation reload swaps in a resolver that shares the JWKS caches without owning
    them: the metrics must still find them (on their one owner, App.keys)."""
    import json
    from pathlib import Path

    from extauthz.app import apply_revocations, build_app
    from extauthz.observe.wiring import _key_caches
    from extauthz.settings import Settings
    from extauthz.sources.jwks import JwksCache

    policy = Path(tmp_path) / "policy"
    policy.mkdir()
    (policy / "p.yaml").write_text(json.dumps({
        "apiVersion": "extauthz/v1", "owner": "o", "service": "s", "hosts": ["h.example"],
        "principals": [{"name": "checkout", "spiffe": CHECKOUT}],
        "rules": [{"name": "r", "methods": ["GET"], "path_prefix": "/", "allow": ["checkout"]}],
    }))
    jwks = Path(tmp_path) / "jwks.json"
    jwks.write_text('{"keys": []}')
    revoked = Path(tmp_path) / "revoked.yaml"
    revoked.write_text("principals: []\n")
    settings = Settings(policy=policy, revocation_file=revoked, identity={"jwt": {"issuers": [
        {"issuer": "https://idp.example", "audiences": ["s"], "jwks_file": str(jwks)}]}})
    app = build_app(settings)
    first = app.authorizer.identity
    assert apply_revocations(app)
    assert app.authorizer.identity is not first
    caches = list(_key_caches(app))
    assert [c.name for c in caches] == ["https://idp.example"]
    assert all(isinstance(c, JwksCache) for c in caches)
    s = samples(registry_for(Sources(app=app, key_caches=lambda: _key_caches(app)),
                             process=False))
    assert ("extauthz_jwks_fetches_total", (("issuer", "https://idp.example"),)) in s
    assert s[("extauthz_revocation_reload_failures_total", ())] == 0
    revoked.write_text("principals: {not: a list}\n")
    assert not apply_revocations(app)
    s = samples(registry_for(Sources(app=app), process=False))
    assert s[("extauthz_revocation_reload_failures_total", ())] == 1


def test_real_jwks_cache_refreshes_and_failures_are_counted() -> None:
    from extauthz.sources.jwks import JwksCache

    def failing() -> bytes:
        raise OSError("connection refused")

    cache = JwksCache(failing, name="https://idp.example")
    assert cache.refresh() is False
    s = samples(registry_for(Sources(key_caches=lambda: [cache]), process=False))
    issuer = (("issuer", "https://idp.example"),)
    assert s[("extauthz_jwks_fetches_total", issuer)] == 1
    assert s[("extauthz_jwks_last_fetch_failed", issuer)] == 1
    assert s[("extauthz_jwks_fetch_failures_total", issuer)] == 1


def test_endpoint_serves_over_http_and_never_shows_a_token() -> None:
    m = CheckMetrics()
    m.observe(Request(headers={"authorization": f"Bearer {SECRET}"}), result(CHECKOUT), 0.001)
    server = start_metrics_server("127.0.0.1:0", registry_for(Sources(metrics=m)))
    try:
        url = f"http://{server.address}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
    finally:
        server.close()
    assert "extauthz_checks_total" in body and "process_cpu_seconds_total" in body
    assert SECRET not in body and CHECKOUT not in body  # names, never raw identities


def test_every_metric_the_dashboard_queries_exists() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[2] / "examples" / "grafana" / \
        "extauthz-dashboard.json"
    text = dashboard.read_text()
    json.loads(text)
    wanted = set(re.findall(r"\bextauthz_[a-z_]+", text))
    m = CheckMetrics()
    m.observe(None, result(CHECKOUT), 0.001)
    app = SimpleNamespace(cache=Cache(), store=Store(compiled(RULES)),
                          stats=SimpleNamespace(errors=0),
                          revocation_failures=0, revocation_version="")
    jwks = SimpleNamespace(name="i", fetch_count=1, ready=True, fetch_failures=0,
                           last_error="")
    dl = SimpleNamespace(written=0, dropped=0, sampled_out=0, write_errors=0, queued=0,
                         reopens=0)
    sp = SimpleNamespace(exported=0, dropped=0, export_failures=0, queued=0)
    exposed = {name for name, _ in samples(registry_for(
        Sources(metrics=m, app=app, decision_log=dl, span_processor=sp,
                key_caches=lambda: [jwks]), process=False))}
    assert wanted - exposed == set()


def test_the_documented_scrape_and_metric_table_are_current() -> None:
    """Every metric named in docs/observability.md is one the collector can expose."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    named = set(re.findall(r"\bextauthz_[a-z_]+", doc))
    m = CheckMetrics()
    m.observe(None, result(CHECKOUT), 0.001)
    m.observe(None, result(CHECKOUT, Outcome.RATE_LIMITED, Reason.RATE_LIMITED,
                           LimitResult(False, 3, 0, 1.0, 1.0, backend_error=True)), 0.001)
    from extauthz.backends.redis_limiter import RedisLimiter  # its metrics need no Redis

    app = SimpleNamespace(cache=Cache(), store=Store(compiled(RULES)),
                          stats=SimpleNamespace(errors=0),
                          revocation_failures=0, revocation_version="v",
                          authorizer=SimpleNamespace(limiter=RedisLimiter(None)))
    jwks = SimpleNamespace(name="i", fetch_count=1, ready=True, fetch_failures=0, last_error="")
    dl = SimpleNamespace(written=0, dropped=0, sampled_out=0, write_errors=0, queued=0,
                         reopens=0)
    sp = SimpleNamespace(exported=0, dropped=0, export_failures=0, queued=0)
    exposed = {name for name, _ in samples(registry_for(
        Sources(metrics=m, app=app, decision_log=dl, span_processor=sp,
                key_caches=lambda: [jwks]), process=False))}
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
                .removesuffix("_sum") for n in exposed}
    # The table abbreviates `extauthz_decision_cache_hits_total, _misses_total`.
    missing = {n for n in named if n not in exposed and n.removesuffix("_total") not in families
               and not n.endswith("_")}
    assert missing == set()
