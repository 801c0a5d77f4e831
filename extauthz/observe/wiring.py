"""Wires spans, decision logs and metrics from the settings: the one call `serve` makes.

    obs = build_observers(settings)
    app = build_app(settings, observers=obs.observers)
    obs.attach(app)          # metrics read the app's cache/policy store; endpoint starts
    try: ... serve(app, transports) ...
    finally: obs.close()     # flush decision log and queued spans

The three parts share one observer (`DecisionObserver`) so that a decision-log line carries
the id of the span recorded for the same check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from extauthz.decide.pipeline import CheckResult
from extauthz.model import Request
from extauthz.observe.decision_log import DecisionLog, open_decision_log
from extauthz.observe.tracing import NO_TRACE, SpanRecorder
from extauthz.observe.tracing_sdk import Tracing, recorder_for, setup_tracing
from extauthz.settings import Settings, SettingsError

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are enabled
    from extauthz.app import App
    from extauthz.observe.metrics import CheckMetrics, MetricsServer
    from extauthz.sources.jwks import JwksCache

log = logging.getLogger("extauthz.observability")


class DecisionObserver:
    """Span first (its ids go into the log line), then the decision log, then metrics.

    A failure in one part never stops the others (the servicer would only catch the first).
    """

    def __init__(
        self,
        spans: SpanRecorder,
        decision_log: DecisionLog | None = None,
        metrics: CheckMetrics | None = None,
    ) -> None:
        self.spans = spans
        self.decision_log = decision_log
        self.metrics = metrics

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None:
        try:
            ids = self.spans.record(request, result, seconds)
        except Exception:
            log.exception("span recording failed", extra={"event": "observer_error"})
            ids = NO_TRACE
        if self.decision_log is not None:
            try:
                self.decision_log.observe(request, result, seconds, ids.trace_id, ids.span_id)
            except Exception:
                log.exception("decision log failed", extra={"event": "observer_error"})
        if self.metrics is not None:
            self.metrics.observe(request, result, seconds)


def _key_caches(app: App) -> Iterable[JwksCache]:
    """The JWKS caches, from their one owner (`App.keys`), whichever resolver serves."""
    return app.keys.caches


@dataclass
class Observability:
    settings: Settings
    observer: DecisionObserver
    tracing: Tracing | None = None
    decision_log: DecisionLog | None = None
    metrics: CheckMetrics | None = None
    metrics_server: MetricsServer | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def observers(self) -> tuple[DecisionObserver, ...]:
        """None at all when spans, the decision log and metrics are all off: even reading
        the trace context costs a couple of microseconds per check."""
        if self.tracing is None and self.decision_log is None and self.metrics is None:
            return ()
        return (self.observer,)

    def attach(self, app: App) -> None:
        """Bind metrics to the app (cache, policy store, JWKS) and start the endpoint."""
        if self.metrics is None:
            return
        from extauthz.observe.metrics import Sources, registry_for, start_metrics_server  # noqa: PLC0415

        self.metrics.bind(app.store)
        sources = Sources(
            metrics=self.metrics,
            app=app,
            decision_log=self.decision_log,
            span_processor=self.tracing.processor if self.tracing is not None else None,
            key_caches=lambda: _key_caches(app),
        )
        self.metrics_server = start_metrics_server(self.settings.metrics_listen,
                                                   registry_for(sources))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.decision_log is not None:
            self.decision_log.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.close()


def build_observers(settings: Settings, environ: Mapping[str, str] | None = None) -> Observability:
    """Everything issue 7 adds, from the settings (and the standard OTEL_* environment)."""
    tracing = setup_tracing(settings.tracing, os.environ if environ is None else environ)
    try:
        decision_log = open_decision_log(settings.decision_log,
                                         settings.decision_log_sample_allowed)
    except OSError as exc:
        if tracing is not None:
            tracing.shutdown()
        raise SettingsError(f"decision_log: cannot open {settings.decision_log}: "
                            f"{exc.strerror or exc}") from None
    metrics = None
    if settings.metrics_listen:
        from extauthz.observe.metrics import CheckMetrics  # noqa: PLC0415

        metrics = CheckMetrics()
    observer = DecisionObserver(recorder_for(tracing), decision_log, metrics)
    return Observability(settings, observer, tracing, decision_log, metrics)
