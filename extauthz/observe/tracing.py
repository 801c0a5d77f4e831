"""OpenTelemetry tracing: one SERVER span per check, a child of the caller's trace.

Two halves, kept apart on purpose:

* `SpanRecorder` (a check observer) uses only the OpenTelemetry **API**. It reads the trace
  context Envoy forwarded in the CheckRequest headers (W3C `traceparent`/`tracestate`, B3
  single `b3` or multi `x-b3-*`), and records one span per check, backdated to when the check
  started (the observer runs after the decision). A parent that says "not sampled" costs a
  header lookup and nothing else: extauthz never samples more than the mesh does.
  The headers are parsed here (validated as OpenTelemetry's W3C and B3 propagators do) so
  that the unsampled path needs no OpenTelemetry call at all.
* `setup_tracing()` (called once at the entry point) builds the SDK from the standard
  `OTEL_*` environment variables, exactly like any OpenTelemetry-instrumented Python service:
  `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER` (otlp | console | none; default otlp),
  `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (grpc | http/protobuf; default grpc),
  `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`/`_HEADERS`/..., `OTEL_SERVICE_NAME` (default
  "extauthz"), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG` (default
  parentbased_always_off: see DEFAULT_SAMPLER) and `OTEL_BSP_MAX_QUEUE_SIZE`/`_SCHEDULE_DELAY`/
  `_MAX_EXPORT_BATCH_SIZE`. Spans go through a bounded queue to an exporter thread: a slow or
  absent collector drops spans (counted in `BoundedSpanProcessor.dropped`), it never delays a
  check.

No token, key, certificate body or query string ever becomes an attribute: the recorder reads
only the trace headers, and every value is truncated and escaped (`decision_log.clean`).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context

# The SDK is used by the set-up half only (the entry point); SpanRecorder needs only the API.
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from extauthz import __version__
from extauthz.model import EMPTY, IdentitySource, Outcome, Request
from extauthz.observe.decision_log import (
    allow_rule_of,
    clean,
    presented_of,
    route_of,
    safe_host,
    safe_path,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler

    from extauthz.decide.pipeline import CheckResult

log = logging.getLogger("extauthz.telemetry")

TRACER_NAME = "extauthz"
# Unlike the SDK's own default (parentbased_always_on): a check whose request carries no trace
# context is one the mesh is not tracing, and extauthz never samples more than the mesh. Set
# OTEL_TRACES_SAMPLER=parentbased_always_on to also start root traces here.
DEFAULT_SAMPLER = "parentbased_always_off"
SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"

# W3C: version "-" trace-id "-" parent-id "-" flags [ "-" future fields, version > 00 only ]
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_B3_SAMPLED = frozenset(("1", "true", "True", "d"))


class Parent(NamedTuple):
    """The caller's trace context as Envoy forwarded it (lower-case hex ids)."""

    format: str  # "w3c" | "b3"
    trace_id: str  # "" for a B3 sampling-only header
    span_id: str
    flags: int  # W3C trace-flags; bit 0 is "sampled"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


class TraceIds(NamedTuple):
    """What a decision-log line is correlated by: the check's span (or the caller's trace)."""

    trace_id: str = ""
    span_id: str = ""


NO_TRACE = TraceIds()


def _w3c(value: str) -> Parent | None:
    """W3C Trace Context `traceparent`, validated as the W3C propagator does."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE \
            or span_id == _ZERO_SPAN:
        return None
    return Parent("w3c", trace_id, span_id, int(flags, 16))


def _b3(headers: Mapping[str, str]) -> Parent | None:
    """B3 single (`b3`) or multi (`x-b3-*`) headers, read as OpenTelemetry's B3 propagator
    reads them (a deferred decision counts as sampled for `b3: {trace}-{span}`, as unsampled
    for multi headers without `x-b3-sampled`)."""
    single = headers.get("b3")
    if single:
        fields = single.strip().split("-")
        if len(fields) == 1:  # sampling decision only, no ids
            return Parent("b3", "", "", int(fields[0] in _B3_SAMPLED))
        trace_id, span_id = fields[0].lower(), fields[1].lower()
        sampled = len(fields) == 2 or fields[2] in _B3_SAMPLED
    else:
        trace_id = headers.get("x-b3-traceid", "").strip().lower()
        span_id = headers.get("x-b3-spanid", "").strip().lower()
        flag = headers.get("x-b3-sampled", "").strip()
        if not trace_id:
            return Parent("b3", "", "", int(flag in _B3_SAMPLED)) if flag else None
        sampled = flag in _B3_SAMPLED or headers.get("x-b3-flags", "").strip() == "1"
    if len(trace_id) == 16:
        trace_id = "0" * 16 + trace_id
    if len(trace_id) != 32 or len(span_id) != 16 or not _is_hex(trace_id + span_id) \
            or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent("b3", trace_id, span_id, int(sampled))


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


def parent_of(headers: Mapping[str, str]) -> Parent | None:
    """The caller's trace context: W3C first (when valid), then B3; None when there is none."""
    tp = headers.get("traceparent")
    if tp is not None:
        found = _w3c(tp)
        if found is not None:
            return found
    if "b3" in headers or "x-b3-traceid" in headers or "x-b3-sampled" in headers:
        return _b3(headers)
    return None


def _parent_context(parent: Parent, headers: Mapping[str, str]) -> Context | None:
    """The OpenTelemetry context holding the remote parent (what a propagator's extract()
    returns, built from the ids already parsed: half the cost)."""
    if not parent.trace_id:
        return None
    state = None
    if parent.format == "w3c":
        raw = headers.get("tracestate")
        if raw:
            state = TraceState.from_header([raw])
    remote = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(parent.flags), trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(remote))


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
        context = _parent_context(parent, headers) if parent is not None else None
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


def span_attributes(request: Request | None, result: CheckResult) -> dict[str, Any]:
    decision = result.decision
    attrs: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": "envoy.service.auth.v3.Authorization",
        "rpc.method": "Check",
        "extauthz.decision": "allow" if decision.allowed else "deny",
        "extauthz.reason": decision.reason.value,
        "http.response.status_code": decision.outcome.http_status,
        "extauthz.cache_hit": result.cache_hit,
    }
    if decision.policy_version:
        attrs["extauthz.policy_version"] = clean(decision.policy_version, 64)
    if decision.rule:
        attrs["extauthz.rule"] = clean(decision.rule)
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


# -- SDK, at the entry point only ----------------------------------------------------------------


class BoundedSpanProcessor(SpanProcessor):
    """A batching span processor with a hard queue bound and an exporter thread.

    `on_end` (on the event loop) is an append to a deque: when the queue is full the span is
    dropped and counted in `dropped`, never waited for. Implements the SDK's SpanProcessor
    interface; our own (rather than the SDK's BatchSpanProcessor) so drops are countable
    through a public attribute on every SDK version.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay: float = 5.0,
    ) -> None:
        self._exporter = exporter
        self._max = max(1, max_queue_size)
        self._batch = max(1, min(max_export_batch_size, self._max))
        self._delay = max(0.01, schedule_delay)
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopping = False
        self.dropped = 0
        self.exported = 0
        self.export_failures = 0
        self._thread = threading.Thread(target=self._run, name="extauthz-span-export",
                                        daemon=True)
        self._thread.start()

    # SpanProcessor interface ---------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or span.context is None or not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == self._batch:
            self._wake.set()

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(10.0)
        self._drain()
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._drain()
        return not self._queue

    # ---------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        with self._export_lock:
            queue = self._queue
            while queue:
                batch = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
                try:
                    ok = self._exporter.export(batch) is SpanExportResult.SUCCESS
                except Exception:
                    log.exception("span export failed", extra={"event": "span_export_error"})
                    ok = False
                if ok:
                    self.exported += len(batch)
                else:
                    self.export_failures += len(batch)


@dataclass
class Tracing:
    """The SDK objects `setup_tracing` built; `shutdown()` flushes what is queued."""

    provider: TracerProvider
    processor: BoundedSpanProcessor
    exporter_name: str
    roots: bool = False  # whether the sampler may start traces itself

    def tracer(self) -> trace.Tracer:
        return self.provider.get_tracer(TRACER_NAME, __version__)

    def shutdown(self) -> None:
        self.processor.shutdown()


def _sampler_name(environ: Mapping[str, str]) -> str:
    name = (environ.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER).strip().lower()
    if name not in _SAMPLERS:
        log.warning("unsupported OTEL_TRACES_SAMPLER %r; using %s", name, DEFAULT_SAMPLER)
        name = DEFAULT_SAMPLER
    return name


_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")
_NO_ROOTS = ("always_off", "parentbased_always_off")


def _sampler(name: str, environ: Mapping[str, str]) -> Sampler:
    from opentelemetry.sdk.trace import sampling  # noqa: PLC0415

    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG") or "1.0")
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; using 1.0")
        ratio = 1.0
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }
    return samplers[name]()


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter | None:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        # One JSON object per line, so stdout stays line-oriented next to decision logs.
        return ConsoleSpanExporter(out=sys.stdout,
                                   formatter=lambda s: s.to_json(indent=None) + "\n")
    if name != "otlp":
        log.warning("unsupported OTEL_TRACES_EXPORTER %r; traces are not exported", name)
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as HttpExporter,
            )

            return HttpExporter()
    except ImportError as exc:
        log.warning("OTLP %s exporter not installed (%s); traces are not exported",
                    protocol, exc.name, extra={"event": "tracing_disabled"})
        return None
    log.warning("unsupported OTLP protocol %r; traces are not exported", protocol)
    return None


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(environ.get(name) or default)
    except ValueError:
        log.warning("%s is not an integer; using %d", name, default)
        return default


def setup_tracing(
    enabled: bool = True,
    environ: Mapping[str, str] | None = None,
    *,
    exporter: SpanExporter | None = None,
) -> Tracing | None:
    """Build the SDK from the standard `OTEL_*` variables; None means "record no spans".

    `exporter` overrides `OTEL_TRACES_EXPORTER` (tests). The provider is not made global:
    the SpanRecorder is handed its tracer, so nothing else in the process is affected.
    """
    env = os.environ if environ is None else environ
    if not enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415

    name = "custom"
    if exporter is None:
        names = [n.strip().lower() for n in
                 (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
        names = [n for n in names if n != "none"]
        if not names:
            return None
        if len(names) > 1:
            log.warning("OTEL_TRACES_EXPORTER lists several exporters; using %r", names[0])
        name = names[0]
        exporter = _exporter(name, env)
        if exporter is None:
            return None
    attrs: dict[str, str] = {"service.version": __version__}
    resource_env = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    service_name = env.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        attrs["service.name"] = service_name
    elif "service.name=" not in resource_env:
        attrs["service.name"] = "extauthz"
    # Resource.create() also reads OTEL_RESOURCE_ATTRIBUTES (from os.environ).
    resource = Resource.create(attrs)
    sampler = _sampler_name(env)
    provider = TracerProvider(sampler=_sampler(sampler, env), resource=resource)
    processor = BoundedSpanProcessor(
        exporter,
        max_queue_size=_int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        max_export_batch_size=_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        schedule_delay=_int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0,
    )
    provider.add_span_processor(processor)
    return Tracing(provider, processor, name, roots=sampler not in _NO_ROOTS)


def recorder_for(tracing: Tracing | None) -> SpanRecorder:
    if tracing is None:
        return SpanRecorder(None)
    return SpanRecorder(tracing.tracer(), roots=tracing.roots)


__all__: Sequence[str] = (
    "NO_TRACE",
    "BoundedSpanProcessor",
    "Parent",
    "SpanRecorder",
    "TraceIds",
    "Tracing",
    "parent_of",
    "recorder_for",
    "setup_tracing",
    "span_attributes",
)
