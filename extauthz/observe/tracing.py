"""OpenTelemetry tracing, the per-check half: one SERVER span per check, a child of the
caller's trace, using only the OpenTelemetry **API** (the SDK is set up once, at the entry
point, by `extauthz.observe.tracing_sdk`; this module never imports it).

`SpanRecorder` (a check observer) reads the trace context Envoy forwarded with OpenTelemetry's
own propagators: W3C Trace Context (`traceparent`/`tracestate`) and B3 (single `b3` or multi
`x-b3-*`, opentelemetry-propagator-b3), W3C winning when both are valid. It records one span per
check, backdated to when the check started (the observer runs after the decision). By default
a span exists only when the caller's trace is sampled: a check without trace headers costs three
dictionary lookups, an unsampled parent its extraction (kept for the decision log's trace id),
and extauthz never samples more than the mesh does.

No token, key, certificate body or query string ever becomes an attribute: the recorder reads
only the trace headers, and every value is truncated and escaped (`decision_log.clean`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extauthz.model import EMPTY, IdentitySource, Outcome, Request
from extauthz.observe.decision_log import (
    allow_rule_of,
    clean,
    condition_of,
    presented_of,
    route_of,
    safe_host,
    safe_path,
)

if TYPE_CHECKING:
    from extauthz.decide.pipeline import CheckResult

TRACER_NAME = "extauthz"
SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"

# B3 (single or multi) first, W3C last: a later propagator's valid context replaces an earlier
# one's, so W3C wins when both are present and valid, and B3 is used when W3C is absent or bad.
PROPAGATOR = CompositePropagator([B3MultiFormat(), TraceContextTextMapPropagator()])
_TRACE_HEADERS = ("traceparent", "b3", "x-b3-traceid")
# B3's sampling-only form ("b3: 0", "x-b3-sampled: 0" without ids) carries no context, so the
# propagators yield nothing; it still means "do not trace this request".
_B3_DENY = ("0", "false")


class Parent(NamedTuple):
    """The caller's trace context as Envoy forwarded it (lower-case hex ids)."""

    trace_id: str  # "" for a B3 sampling-only header
    span_id: str
    flags: int  # W3C trace-flags; bit 0 is "sampled"
    context: Context | None = None  # what the propagators extracted (None: sampling only)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


class TraceIds(NamedTuple):
    """What a decision-log line is correlated by: the check's span (or the caller's trace)."""

    trace_id: str = ""
    span_id: str = ""


NO_TRACE = TraceIds()
_DENIED = Parent("", "", 0)


def parent_of(headers: Mapping[str, str]) -> Parent | None:
    """The caller's trace context (W3C first when valid, then B3); None when there is none."""
    if not any(h in headers for h in _TRACE_HEADERS):
        if headers.get("x-b3-sampled", "").strip().lower() in _B3_DENY:
            return _DENIED
        return None
    context = PROPAGATOR.extract(headers)
    found = trace.get_current_span(context).get_span_context()
    if not found.is_valid:
        if headers.get("b3", "").strip().lower() in _B3_DENY or headers.get(
                "x-b3-sampled", "").strip().lower() in _B3_DENY:
            return _DENIED
        return None
    return Parent(format(found.trace_id, "032x"), format(found.span_id, "016x"),
                  int(found.trace_flags), context)


class SpanRecorder:
    """A CheckObserver: one span per check; `record` also returns the ids for the log line.

    `tracer` None (tracing off, SDK disabled, exporter none) records nothing and costs one
    header lookup per check (to still correlate log lines with the caller's trace).
    `roots` False (the sampler never starts a trace of its own, the default) skips checks
    without trace context just as cheaply.
    """

    def __init__(self, tracer: trace.Tracer | None, *, roots: bool = True) -> None:
        self._tracer = tracer
        self._roots = roots

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None:
        self.record(request, result, seconds)

    def record(self, request: Request | None, result: CheckResult, seconds: float) -> TraceIds:
        headers = request.headers if request is not None else EMPTY
        parent = parent_of(headers) if headers else None
        tracer = self._tracer
        if tracer is None or (not parent.sampled if parent is not None else not self._roots):
            if parent is None or not parent.trace_id:
                return NO_TRACE
            return TraceIds(parent.trace_id, "")
        end = time.time_ns()
        context = parent.context if parent is not None else None
        span = tracer.start_span(
            SPAN_NAME,
            context=context,
            kind=SpanKind.SERVER,
            attributes=span_attributes(request, result),
            start_time=end - int(seconds * 1e9),
        )
        decision = result.decision
        if decision.outcome is Outcome.UNAVAILABLE:
            span.set_status(Status(StatusCode.ERROR, decision.reason.value))
        span.end(end_time=end)
        ctx = span.get_span_context()
        if ctx.is_valid and ctx.trace_flags.sampled:
            return TraceIds(format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
        # Not recorded: correlate with the caller's trace, not with an id nobody stored.
        if parent is not None and parent.trace_id:
            return TraceIds(parent.trace_id, "")
        return NO_TRACE


# HTTP semantic conventions: a method outside this set is reported as "_OTHER", the original
# (cleaned) in http.request.method_original.
_HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH"))


# The protocol the check came in on: Envoy's gRPC Authorization service, or its HTTP
# authorization-service protocol (no rpc.* there: it is not an RPC).
_GRPC_ATTRIBUTES: dict[str, Any] = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.auth.v3.Authorization",
    "rpc.method": "Check",
    "extauthz.transport": "grpc",
}
_HTTP_ATTRIBUTES: dict[str, Any] = {"network.protocol.name": "http", "extauthz.transport": "http"}


def span_attributes(request: Request | None, result: CheckResult) -> dict[str, Any]:
    decision = result.decision
    attrs: dict[str, Any] = (
        _GRPC_ATTRIBUTES if request is None or request.transport == "grpc" else _HTTP_ATTRIBUTES
    ).copy()
    attrs |= {
        "extauthz.decision": "allow" if decision.allowed else "deny",
        "extauthz.reason": decision.reason.value,
        "http.response.status_code": decision.outcome.http_status,
        "extauthz.cache_hit": result.cache_hit,
    }
    if decision.policy_version:
        attrs["extauthz.policy_version"] = clean(decision.policy_version, 64)
    if decision.rule:
        attrs["extauthz.rule"] = clean(decision.rule)
    condition = condition_of(decision)  # condition_not_met: which condition failed
    if condition:
        attrs["extauthz.condition"] = condition
    if decision.dry_run:
        attrs["extauthz.dry_run"] = True
        allow_rule = allow_rule_of(decision)
        if allow_rule:
            attrs["extauthz.allow_rule"] = allow_rule
    identity = decision.identity
    if identity is not None:
        principal = clean(identity.principal, 512)
        attrs["enduser.id"] = principal
        attrs["extauthz.principal"] = principal
        attrs["extauthz.identity_source"] = identity.source.value
        if identity.trust_domain:
            attrs["extauthz.trust_domain"] = clean(identity.trust_domain)
        if identity.source is IdentitySource.JWT and identity.issuer:
            attrs["extauthz.jwt.issuer"] = clean(identity.issuer, 512)
    else:
        presented = presented_of(decision)  # a revoked / foreign identity, refused (401)
        if presented:
            attrs["extauthz.presented_principal"] = presented
    if result.limit is not None:
        attrs["extauthz.ratelimit.remaining"] = result.limit.remaining
    route = route_of(request)
    if route:
        attrs["extauthz.route"] = route  # Envoy's route name (context_extensions)
    if request is not None and request.is_http:
        method = request.method
        if method in _HTTP_METHODS:
            attrs["http.request.method"] = method
        else:
            attrs["http.request.method"] = "_OTHER"
            attrs["http.request.method_original"] = clean(method, 32)
        attrs["url.path"] = safe_path(request, result)
        attrs["server.address"] = safe_host(request, result)
    return attrs


__all__: Sequence[str] = (
    "NO_TRACE",
    "PROPAGATOR",
    "Parent",
    "SpanRecorder",
    "TraceIds",
    "parent_of",
    "span_attributes",
)
