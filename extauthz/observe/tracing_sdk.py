"""OpenTelemetry tracing, the set-up half: the SDK, built once at the entry point.

`setup_tracing()` builds the SDK from the standard `OTEL_*` environment variables, exactly like
any OpenTelemetry-instrumented Python service: `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`
(otlp | console | none), `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (grpc | http/protobuf; default
grpc), `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`/`_HEADERS`/..., `OTEL_SERVICE_NAME` (default
"extauthz"), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG` (default
parentbased_always_off: see DEFAULT_SAMPLER) and `OTEL_BSP_MAX_QUEUE_SIZE`/`_SCHEDULE_DELAY`/
`_MAX_EXPORT_BATCH_SIZE`.

Defaults that cost nothing: with no exporter configured (neither `OTEL_TRACES_EXPORTER` nor an
OTLP endpoint), no SDK is built and no span is recorded; a collector that may not exist is never
dialled. Spans go through a bounded queue to an exporter thread: a slow or absent collector
drops spans (counted in `BoundedSpanProcessor.dropped`), it never delays a check.

The per-check half (`extauthz.observe.tracing`) uses only the OpenTelemetry API.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from extauthz import __version__
from extauthz.observe.tracing import TRACER_NAME, SpanRecorder

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler

log = logging.getLogger("extauthz.telemetry")

# Unlike the SDK's own default (parentbased_always_on): a check whose request carries no trace
# context is one the mesh is not tracing, and extauthz never samples more than the mesh. Set
# OTEL_TRACES_SAMPLER=parentbased_always_on to also start root traces here.
DEFAULT_SAMPLER = "parentbased_always_off"
_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


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
        configured = env.get("OTEL_TRACES_EXPORTER", "").strip()
        if not configured and not any(env.get(k, "").strip() for k in _OTLP_ENDPOINTS):
            return None  # nothing to export to: no SDK, no spans, no dialling a collector
        names = [n.strip().lower() for n in (configured or "otlp").split(",") if n.strip()]
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
    "DEFAULT_SAMPLER",
    "BoundedSpanProcessor",
    "Tracing",
    "recorder_for",
    "setup_tracing",
)
