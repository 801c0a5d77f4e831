"""Prometheus metrics: counted in plain ints on the check path, exposed by a custom collector.

`CheckMetrics.observe` (a CheckObserver) does a few dict increments and one bisect: no locks,
no label-child lookups (prometheus_client's `Counter.labels(...).inc()` costs several times
more). Everything else (decision cache, policy reloads, JWKS, decision log, span export) is
read only when Prometheus scrapes, from the objects that already count it.

The per-principal series are bounded by the policy: the label is the *declared* principal's
name (`principals:` in the policy), `unknown` for a verified identity the policy does not
declare, and `none` when no identity was established. A caller can therefore not create
series by presenting new identities.

The endpoint (`--metrics-listen HOST:PORT`) is prometheus_client's own HTTP server on its own
thread; a scrape never runs on the event loop.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from extauthz import __version__
from extauthz.decide.pipeline import CheckResult
from extauthz.memo import Memo
from extauthz.model import Identity, Reason, Request
from extauthz.observe.decision_log import clean
from extauthz.policy.compiled import CompiledPolicy
from extauthz.settings import SettingsError, parse_listen_address

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("extauthz.metrics")

# Seconds. A check is tens of microseconds when cached, a few ms with a remote limiter.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
NO_IDENTITY = "none"
UNDECLARED = "unknown"
MAX_REMEMBERED_PRINCIPALS = 10_000


class _PolicySource(Protocol):
    @property
    def current(self) -> CompiledPolicy | None: ...


class CheckMetrics:
    """Per-check counters; see the module docstring. One writer: the event loop."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        # (decision, status, reason) -> count
        self.checks: dict[tuple[str, int, str], int] = {}
        # (principal name, decision, reason) -> count
        self.by_principal: dict[tuple[str, str, str], int] = {}
        # decision -> [per-bucket counts..., +Inf], sum of seconds
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.ratelimit_backend_errors = 0
        self.ratelimit_degraded = 0
        self._policies: _PolicySource | None = None
        self._names: Memo[str, str] = Memo(MAX_REMEMBERED_PRINCIPALS)
        self._names_version = ""

    def bind(self, policies: _PolicySource) -> None:
        """Where declared principal names come from (the app's PolicyStore)."""
        self._policies = policies
        self._names.clear()

    def principal_name(self, principal: str, identity: Identity | None = None) -> str:
        """The declared name of a caller (bounded label set). JWT principals are declared by
        issuer and subject, so their memo key carries the issuer too."""
        if not principal:
            return NO_IDENTITY
        policy = self._policies.current if self._policies is not None else None
        if policy is None:
            return UNDECLARED
        if policy.version != self._names_version:
            self._names.clear()
            self._names_version = policy.version
        key = (
            f"{identity.issuer}\0{principal}"
            if identity is not None and identity.issuer
            else principal
        )
        name = self._names.get(key)
        if name is None:
            decl = policy.declared_principal(identity if identity is not None else principal)
            name = self._names.put(key, decl.name if decl is not None else UNDECLARED)
        return name

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None:
        decision = result.decision
        verdict = "allow" if decision.outcome.value == 200 else "deny"
        reason = decision.reason.value
        key = (verdict, decision.outcome.value, reason)
        checks = self.checks
        checks[key] = checks.get(key, 0) + 1
        identity = decision.identity
        pkey = (
            self.principal_name(identity.principal if identity is not None else "", identity),
            verdict,
            reason,
        )
        by_principal = self.by_principal
        by_principal[pkey] = by_principal.get(pkey, 0) + 1
        counts = self.latency.get(verdict)
        if counts is None:
            counts = self.latency[verdict] = [0] * (len(self.buckets) + 1)
            self.latency_sum[verdict] = 0.0
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.latency_sum[verdict] += seconds
        limit = result.limit
        if limit is not None and (limit.backend_error or limit.degraded):
            if limit.backend_error:
                self.ratelimit_backend_errors += 1
            else:
                self.ratelimit_degraded += 1


@dataclass
class Sources:
    """What the collector reads at scrape time; every part is optional."""

    metrics: CheckMetrics | None = None
    app: Any = None  # extauthz.app.App
    decision_log: Any = None  # extauthz.observe.decision_log.DecisionLog
    span_processor: Any = None  # extauthz.observe.tracing.BoundedSpanProcessor
    key_caches: Callable[[], Iterable[Any]] = field(default=lambda: ())


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ExtauthzCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        info = GaugeMetricFamily("extauthz_build_info", "extauthz version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if s.metrics is not None:
            yield from _check_metrics(s.metrics)
        if s.app is not None:
            yield from _app_metrics(s.app)
        yield from _jwks_metrics(list(s.key_caches()))
        if s.decision_log is not None:
            dl = s.decision_log
            lines = CounterMetricFamily(
                "extauthz_decision_log_lines",
                "Decision-log lines by outcome: written, "
                "dropped (queue full), sampled_out (allowed decisions not sampled), "
                "write_error",
                labels=["result"],
            )
            for result, value in (
                ("written", dl.written),
                ("dropped", dl.dropped),
                ("sampled_out", dl.sampled_out),
                ("write_error", dl.write_errors),
            ):
                lines.add_metric([result], value)
            yield lines
            yield _gauge(
                "extauthz_decision_log_queue", "Decision-log lines waiting to be written", dl.queued
            )
            yield _counter(
                "extauthz_decision_log_reopens",
                "Times the decision-log file was reopened (rotation)",
                dl.reopens,
            )
        if s.span_processor is not None:
            sp = s.span_processor
            spans = CounterMetricFamily(
                "extauthz_trace_spans",
                "Sampled spans by outcome: exported, dropped (queue full), export_failed",
                labels=["result"],
            )
            for result, value in (
                ("exported", sp.exported),
                ("dropped", sp.dropped),
                ("export_failed", sp.export_failures),
            ):
                spans.add_metric([result], value)
            yield spans
            yield _gauge("extauthz_trace_queue", "Spans waiting to be exported", sp.queued)


def _check_metrics(m: CheckMetrics) -> Iterator[Metric]:
    checks = CounterMetricFamily(
        "extauthz_checks",
        "Checks by decision, HTTP status and reason",
        labels=["decision", "status", "reason"],
    )
    rate_limited = 0
    for (verdict, status, reason), value in list(m.checks.items()):
        checks.add_metric([verdict, str(status), reason], value)
        if reason == Reason.RATE_LIMITED.value:
            rate_limited += value
    yield checks
    yield _counter("extauthz_rate_limited", "Checks denied by a rate limit (429)", rate_limited)
    yield _counter(
        "extauthz_ratelimit_backend_errors",
        "Checks for which the shared limiter did not answer (fail-open or fail-closed)",
        m.ratelimit_backend_errors,
    )
    yield _counter(
        "extauthz_ratelimit_degraded",
        "Checks answered by the local fallback limiter because the shared one failed",
        m.ratelimit_degraded,
    )
    principals = CounterMetricFamily(
        "extauthz_principal_checks",
        "Checks by declared principal name (unknown: a verified "
        "identity the policy does not declare; none: no identity), decision and reason",
        labels=["principal", "decision", "reason"],
    )
    for (name, verdict, reason), value in list(m.by_principal.items()):
        principals.add_metric([name, verdict, reason], value)
    yield principals
    hist = HistogramMetricFamily(
        "extauthz_check_duration_seconds",
        "Time from CheckRequest to CheckResponse inside extauthz",
        labels=["decision"],
    )
    for verdict, counts in list(m.latency.items()):
        snapshot = list(counts)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*m.buckets, float("inf")), snapshot, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        hist.add_metric([verdict], buckets, m.latency_sum.get(verdict, 0.0))
    yield hist


def _app_metrics(app: Any) -> Iterator[Metric]:
    cache = app.cache
    yield _counter("extauthz_decision_cache_hits", "Decision cache hits", cache.hits)
    yield _counter("extauthz_decision_cache_misses", "Decision cache misses", cache.misses)
    yield _gauge("extauthz_decision_cache_entries", "Decisions currently cached", cache.size)
    yield _gauge("extauthz_decision_cache_capacity", "Decision cache size bound", cache.maxsize)
    store = app.store
    yield _counter("extauthz_policy_reloads", "Policy versions swapped in", store.reloads)
    yield _counter(
        "extauthz_policy_reload_failures",
        "Policy reloads that failed (the previous version kept serving)",
        store.reload_failures,
    )
    policy = store.current
    yield _gauge("extauthz_policy_loaded", "1 when a policy is loaded", 1 if policy else 0)
    if policy is not None:
        version = GaugeMetricFamily(
            "extauthz_policy_info", "The serving policy version", labels=["version"]
        )
        version.add_metric([policy.version], 1)
        yield version
        yield _gauge("extauthz_policy_rules", "Rules in the serving policy", len(policy.rules))
        yield _gauge(
            "extauthz_policy_principals",
            "Principals declared by the serving policy",
            len(policy.principals),
        )
    revocation_failures = getattr(app, "revocation_failures", None)
    if revocation_failures is not None:
        yield _counter(
            "extauthz_revocation_reload_failures",
            "Revocation-list reloads that failed (the previous list kept in force)",
            revocation_failures,
        )
        revoked_version = str(getattr(app, "revocation_version", "") or "")
        if revoked_version:  # a revocation file is configured and loaded
            revocation = GaugeMetricFamily(
                "extauthz_revocation_info",
                "The revocation list in force (version: hash of the file)",
                labels=["version"],
            )
            revocation.add_metric([revoked_version], 1)
            yield revocation
    limiter = getattr(getattr(app, "authorizer", None), "limiter", None)
    if limiter is not None and hasattr(limiter, "redis_latency"):
        yield from _redis_limiter_metrics(limiter)
    stats = getattr(app, "stats", None)
    if stats is not None:
        yield _counter(
            "extauthz_check_errors",
            "Checks that failed unexpectedly (answered 503 internal_error)",
            stats.errors,
        )


def _histogram(name: str, doc: str, hist: Any) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*hist.buckets, float("inf")), list(hist.counts), strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family.add_metric([], buckets, hist.sum)
    return family


def _redis_limiter_metrics(rl: Any) -> Iterator[Metric]:
    """The shared limiter (extauthz.backends.redis_limiter.RedisLimiter): latency of the
    Redis call, recent p50/p99 (so the deadline can be compared with what Redis does), the
    breaker, the queue and the over-limit cache."""
    yield _histogram(
        "extauthz_ratelimit_redis_seconds",
        "Round trip of one pipeline of rate-limit scripts to Redis",
        rl.redis_latency,
    )
    yield _histogram(
        "extauthz_ratelimit_check_seconds",
        "One check's wait for the shared limiter, from queued to answered by Redis",
        rl.check_latency,
    )
    recent = GaugeMetricFamily(
        "extauthz_ratelimit_check_recent_seconds",
        "Quantiles of the last 256 checks' wait for Redis (compare with the deadline)",
        labels=["quantile"],
    )
    for q in (0.5, 0.99):
        recent.add_metric([str(q)], rl.check_latency.quantile(q))
    yield recent
    yield _gauge(
        "extauthz_ratelimit_deadline_seconds",
        "Per-check Redis deadline in force (configured, stretched to 2x the recent p99 "
        "of successful waits up to the ceiling)",
        rl.deadline,
    )
    yield _counter(
        "extauthz_ratelimit_redis_round_trips",
        "Pipelines sent to Redis (each carries the scripts of many checks)",
        rl.round_trips,
    )
    yield _counter(
        "extauthz_ratelimit_redis_checks", "Checks sent to Redis", rl.checks_sent
    )
    yield _counter(
        "extauthz_ratelimit_deadline_exceeded",
        "Checks that got no answer from Redis within the deadline",
        rl.timeouts,
    )
    yield _counter(
        "extauthz_ratelimit_queue_overflows",
        "Checks answered by the failure mode because the Redis queue was full",
        rl.queue_overflows,
    )
    yield _gauge("extauthz_ratelimit_queue", "Checks waiting to be sent to Redis", rl.pending)
    yield _gauge(
        "extauthz_ratelimit_breaker_state",
        "Redis breaker: 0 closed (Redis asked), 1 open (failure mode answers), 2 half-open",
        int(rl.breaker.state),
    )
    yield _counter(
        "extauthz_ratelimit_breaker_opened", "Times the Redis breaker opened", rl.breaker.opened
    )
    yield _counter(
        "extauthz_ratelimit_overlimit_cache_hits",
        "Checks denied locally because the key was known to be over its limit",
        rl.overlimit.hits,
    )
    yield _gauge(
        "extauthz_ratelimit_overlimit_cache_entries",
        "Keys currently known to be over their limit",
        len(rl.overlimit),
    )


def _jwks_metrics(caches: list[Any]) -> Iterator[Metric]:
    if not caches:
        return
    fetches = CounterMetricFamily(
        "extauthz_jwks_fetches",
        "JWKS refresh attempts by issuer (scheduled, unknown kid, start-up)",
        labels=["issuer"],
    )
    ready = GaugeMetricFamily(
        "extauthz_jwks_ready", "1 while an issuer's keys are usable", labels=["issuer"]
    )
    failing = GaugeMetricFamily(
        "extauthz_jwks_last_fetch_failed",
        "1 when an issuer's last JWKS fetch failed (the previous keys are kept until stale)",
        labels=["issuer"],
    )
    failures = CounterMetricFamily(
        "extauthz_jwks_fetch_failures", "JWKS fetches that failed", labels=["issuer"]
    )
    any_failures = False
    for cache in caches:
        name = clean(str(cache.name))  # an issuer URL from the config: bounded, never a key
        fetches.add_metric([name], cache.fetch_count)
        ready.add_metric([name], 1 if cache.ready else 0)
        failing.add_metric([name], 1 if getattr(cache, "last_error", "") else 0)
        failed = getattr(cache, "fetch_failures", None)
        if failed is not None:
            any_failures = True
            failures.add_metric([name], failed)
    yield fetches
    yield ready
    yield failing
    if any_failures:  # JwksCache.fetch_failures (jwks.py); absent on older caches
        yield failures


def registry_for(sources: Sources, *, process: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExtauthzCollector(sources))
    if process:
        from prometheus_client import (  # noqa: PLC0415
            GCCollector,
            PlatformCollector,
            ProcessCollector,
        )

        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    httpd: WSGIServer
    address: str

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics_server(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve `/metrics` on HOST:PORT (port 0 picks one; the bound address is returned)."""
    from prometheus_client import start_http_server  # noqa: PLC0415

    host, port = parse_listen_address(listen)
    if host == "unix":
        raise SettingsError(f"metrics_listen: expected HOST:PORT, got {listen!r}")
    host = host.strip("[]")
    try:
        httpd, _thread = start_http_server(int(port), addr=host, registry=registry)
    except OSError as exc:
        raise SettingsError(
            f"metrics_listen: cannot bind {listen}: {exc.strerror or exc}"
        ) from None
    bound_port = httpd.server_port
    address = f"{host}:{bound_port}" if ":" not in host else f"[{host}]:{bound_port}"
    log.info("metrics serving", extra={"event": "metrics_serving", "address": address})
    return MetricsServer(httpd, address)
