"""Spans per check: parentage (W3C, B3), the parent's sampling decision, attributes, SDK set-up."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from extauthz.decide.pipeline import CheckResult
from extauthz.decide.ratelimit import LimitResult
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request
from extauthz.observe.tracing import NO_TRACE, SpanRecorder, parent_of
from extauthz.observe.tracing_sdk import BoundedSpanProcessor, setup_tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
PRINCIPAL = "spiffe://demo.local/ns/shop/sa/checkout"
SECRET = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"

IDENTITY = Identity(PRINCIPAL, IdentitySource.MTLS, "demo.local")
ALLOW = CheckResult(
    Decision(Outcome.ALLOW, Reason.ALLOWED, rule="read-orders", identity=IDENTITY,
             policy_version="0123456789abcdef"),
    cache_hit=True,
    limit=LimitResult(allowed=True, limit=5, remaining=3, reset_after=1.0, retry_after=0.0),
    host="orders.demo.local",  # as the check normalized the request's host and path
    path="/v1/orders/42",
)
DENY = CheckResult(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE, identity=IDENTITY,
                            policy_version="0123456789abcdef"))


def request(headers: dict[str, str] | None = None, path: str = "/v1/orders/42") -> Request:
    return Request(method="GET", host="Orders.demo.local:8443", path=path, headers=headers or {})


def recorder(root_sampled: bool = True) -> tuple[SpanRecorder, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON if root_sampled else ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SpanRecorder(provider.get_tracer("test")), exporter


def one_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, spans
    return spans[0]


def test_w3c_parent_span_is_the_parent_and_attributes_are_set() -> None:
    rec, exporter = recorder()
    ids = rec.record(request({"traceparent": f"00-{TRACE}-{PARENT}-01",
                              "tracestate": "vendor=x"}), ALLOW, 0.000250)
    span = one_span(exporter)
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT
    assert format(span.context.trace_id, "032x") == TRACE
    assert span.context.trace_state.get("vendor") == "x"
    assert ids.trace_id == TRACE and ids.span_id == format(span.context.span_id, "016x")
    a = span.attributes
    assert a is not None
    assert a["enduser.id"] == PRINCIPAL and a["extauthz.principal"] == PRINCIPAL
    assert a["extauthz.identity_source"] == "mtls"
    assert a["extauthz.trust_domain"] == "demo.local"
    assert a["extauthz.decision"] == "allow"
    assert a["http.response.status_code"] == 200
    assert a["extauthz.reason"] == "allowed"
    assert a["extauthz.rule"] == "read-orders"
    assert a["extauthz.policy_version"] == "0123456789abcdef"
    assert a["extauthz.cache_hit"] is True
    assert a["extauthz.ratelimit.remaining"] == 3
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/v1/orders/42"
    assert a["server.address"] == "orders.demo.local"
    # Backdated to when the check started.
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time - span.start_time == pytest.approx(250_000, abs=1_000)



def test_a_check_from_the_http_transport_is_not_labelled_as_a_grpc_call() -> None:
    rec, exporter = recorder()
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    allowed = CheckResult(Decision(Outcome.ALLOW, Reason.ALLOWED, rule="r", identity=IDENTITY))
    rec.record(Request(method="GET", host="h", path="/x", headers=headers, transport="http"),
               allowed, 0.001)
    a = one_span(exporter).attributes
    assert a is not None
    assert a["extauthz.transport"] == "http" and a["network.protocol.name"] == "http"
    assert not any(k.startswith("rpc.") for k in a)
    exporter.clear()
    rec.record(Request(method="GET", host="h", path="/x", headers=headers), allowed, 0.001)
    a = one_span(exporter).attributes
    assert a is not None
    assert (a["extauthz.transport"], a["rpc.system"]) == ("grpc", "grpc")

def test_b3_multi_parent() -> None:
    rec, exporter = recorder()
    rec.record(request({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "1"}),
               DENY, 0.001)
    span = one_span(exporter)
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT
    assert format(span.context.trace_id, "032x") == TRACE
    assert span.attributes is not None
    assert span.attributes["extauthz.decision"] == "deny"
    assert span.attributes["http.response.status_code"] == 403


def test_b3_single_parent_and_64_bit_trace_id() -> None:
    rec, exporter = recorder()
    short = TRACE[16:]
    ids = rec.record(request({"b3": f"{short}-{PARENT}-1"}), ALLOW, 0.001)
    span = one_span(exporter)
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT
    assert format(span.context.trace_id, "032x") == "0" * 16 + short
    assert ids.trace_id == "0" * 16 + short


@pytest.mark.parametrize("headers", [
    {"traceparent": f"00-{TRACE}-{PARENT}-00"},
    {"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "0"},
    {"x-b3-traceid": TRACE, "x-b3-spanid": PARENT},  # no decision: OpenTelemetry says unsampled
    {"b3": f"{TRACE}-{PARENT}-0"},
    {"b3": "0"},
])
def test_unsampled_parent_records_no_span_but_keeps_the_trace_id(headers: dict[str, str]) -> None:
    rec, exporter = recorder(root_sampled=True)  # even a sampler that would start roots
    ids = rec.record(request(headers), ALLOW, 0.001)
    assert exporter.get_finished_spans() == ()
    assert ids.span_id == ""
    assert ids.trace_id in (TRACE, "")


def test_no_parent_follows_the_root_sampler() -> None:
    rec, exporter = recorder(root_sampled=False)
    assert rec.record(request(), ALLOW, 0.001) == NO_TRACE
    assert exporter.get_finished_spans() == ()
    # Told that the sampler never starts roots, the recorder does not even ask it.
    assert SpanRecorder(_Exploding(), roots=False).record(request(), ALLOW, 0.001) == NO_TRACE
    rec, exporter = recorder(root_sampled=True)
    ids = rec.record(request(), ALLOW, 0.001)
    span = one_span(exporter)
    assert span.parent is None and ids.span_id == format(span.context.span_id, "016x")


def test_invalid_traceparent_is_ignored_and_b3_used() -> None:
    assert parent_of({"traceparent": f"00-{'0' * 32}-{PARENT}-01"}) is None
    assert parent_of({"traceparent": f"ff-{TRACE}-{PARENT}-01"}) is None
    assert parent_of({"traceparent": "garbage"}) is None
    found = parent_of({"traceparent": "garbage", "b3": f"{TRACE}-{PARENT}-1"})
    assert found is not None and found.trace_id == TRACE and found.sampled
    other = "a" * 32
    both = parent_of({"traceparent": f"00-{other}-{PARENT}-01", "b3": f"{TRACE}-{PARENT}-1"})
    assert both is not None and both.trace_id == other  # a valid W3C context wins
    # A future version may add fields; version 00 may not.
    assert parent_of({"traceparent": f"01-{TRACE}-{PARENT}-01-extra"}) is not None
    assert parent_of({"traceparent": f"00-{TRACE}-{PARENT}-01-extra"}) is None


def test_tracing_off_records_nothing_but_correlates() -> None:
    rec = SpanRecorder(None)
    assert not rec.enabled
    ids = rec.record(request({"traceparent": f"00-{TRACE}-{PARENT}-01"}), ALLOW, 0.001)
    assert ids.trace_id == TRACE and ids.span_id == ""
    assert rec.record(request(), ALLOW, 0.001) == NO_TRACE
    assert rec.record(None, ALLOW, 0.001) == NO_TRACE


def test_internal_error_marks_the_span_as_error() -> None:
    rec, exporter = recorder()
    result = CheckResult(Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR))
    rec.record(None, result, 0.001)
    span = one_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and "enduser.id" not in span.attributes


def test_no_token_query_or_certificate_in_attributes_and_odd_values_are_escaped() -> None:
    rec, exporter = recorder()
    subject = "spiffe://demo.local/" + "a" * 10_000 + "\r\nX-Injected: 1"
    ident = Identity(subject, IdentitySource.JWT, "demo.local", issuer="https://issuer\n.test")
    result = CheckResult(Decision(Outcome.ALLOW, Reason.ALLOWED, identity=ident))
    req = Request(method="GET", host="orders.demo.local", path=f"/v1/x?access_token={SECRET}",
                  headers={"authorization": f"Bearer {SECRET}", "cookie": f"s={SECRET}",
                           "traceparent": f"00-{TRACE}-{PARENT}-01"},
                  peer_certificate="-----BEGIN CERTIFICATE-----MIIB" + SECRET)
    rec.record(req, result, 0.001)
    span = one_span(exporter)
    dumped = span.to_json()
    assert SECRET not in dumped and "BEGIN CERTIFICATE" not in dumped
    a = span.attributes
    assert a is not None
    assert a["url.path"] == "/v1/x"
    principal = str(a["enduser.id"])
    assert len(principal) <= 512 and "\r" not in principal and "\n" not in principal
    assert principal.endswith("...")
    assert a["extauthz.jwt.issuer"] == "https://issuer\\n.test"


def test_route_presented_principal_allow_rule_and_odd_methods() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True, slots=True)
    class Wired(Decision):  # what model.Decision will carry once the pipeline sets these
        presented_principal: str = ""
        allow_rule: str = ""

    rec, exporter = recorder()
    req = Request(method="PURGE\r\n", host="orders.demo.local", path="/v1/x",
                  headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
                  context_extensions={"route": "orders-api"})
    revoked = CheckResult(Wired(Outcome.UNAUTHENTICATED, Reason.REVOKED,
                                presented_principal=PRINCIPAL))
    rec.record(req, revoked, 0.001)
    a = one_span(exporter).attributes
    assert a is not None
    assert a["extauthz.route"] == "orders-api"
    assert a["extauthz.presented_principal"] == PRINCIPAL and "enduser.id" not in a
    assert a["http.request.method"] == "_OTHER"
    assert a["http.request.method_original"] == "PURGE\\r\\n"
    assert (a["rpc.service"], a["rpc.method"]) == ("envoy.service.auth.v3.Authorization", "Check")
    exporter.clear()
    dry = CheckResult(Wired(Outcome.ALLOW, Reason.DRY_RUN, rule="new-deny", identity=IDENTITY,
                            dry_run=True, allow_rule="read-orders"))
    rec.record(request({"traceparent": f"00-{TRACE}-{PARENT}-01"}), dry, 0.001)
    a = one_span(exporter).attributes
    assert a is not None
    assert (a["extauthz.rule"], a["extauthz.allow_rule"], a["extauthz.dry_run"]) == \
        ("new-deny", "read-orders", True)
    assert "extauthz.route" not in a


class _Exploding:
    def start_span(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("no span expected")


class _BlockingExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(5)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_bounded_processor_drops_and_counts_instead_of_blocking() -> None:
    exporter = _BlockingExporter()
    processor = BoundedSpanProcessor(exporter, max_queue_size=4, max_export_batch_size=2,
                                     schedule_delay=60)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(processor)
    rec = SpanRecorder(provider.get_tracer("test"))
    for _ in range(10):
        rec.record(request(), ALLOW, 0.001)  # never waits for the (stuck) exporter
    assert processor.dropped >= 10 - 4 - 2  # queue bound + at most one batch in flight
    exporter.release.set()
    processor.shutdown()
    assert processor.exported + processor.dropped == 10
    assert len(exporter.exported) == processor.exported


def test_setup_from_standard_env() -> None:
    assert setup_tracing(False, {}) is None
    assert setup_tracing(True, {"OTEL_SDK_DISABLED": "true"}) is None
    assert setup_tracing(True, {"OTEL_TRACES_EXPORTER": "none"}) is None
    tracing = setup_tracing(True, {"OTEL_TRACES_EXPORTER": "console",
                                   "OTEL_SERVICE_NAME": "authz-prod",
                                   "OTEL_BSP_MAX_QUEUE_SIZE": "7"})
    assert tracing is not None
    try:
        assert tracing.exporter_name == "console"
        assert tracing.provider.resource.attributes["service.name"] == "authz-prod"
        assert tracing.processor._max == 7
        assert tracing.roots is False
        # Default sampler: parent-based, no root spans of our own.
        assert "ParentBased" in tracing.provider.sampler.get_description()
        assert "AlwaysOffSampler" in tracing.provider.sampler.get_description()
    finally:
        tracing.shutdown()
    tracing = setup_tracing(True, {"OTEL_TRACES_EXPORTER": "console",
                                   "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                   "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "extauthz"
        assert "0.25" in tracing.provider.sampler.get_description()
        assert tracing.roots is True
    finally:
        tracing.shutdown()


def test_setup_otlp_builds_the_exporter_without_connecting() -> None:
    tracing = setup_tracing(True, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert tracing is not None and tracing.exporter_name == "otlp"
    tracing.shutdown()
    tracing = setup_tracing(True, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                   "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"})
    assert tracing is not None
    tracing.shutdown()


def test_the_per_check_half_never_imports_the_sdk() -> None:
    import subprocess
    import sys

    code = ("import sys, extauthz.observe.tracing; "
            "bad = sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')); "
            "print(bad); raise SystemExit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_exporter_configured_means_no_sdk_and_no_spans() -> None:
    from extauthz.observe.wiring import build_observers
    from extauthz.settings import Settings

    assert setup_tracing(True, {}) is None
    assert setup_tracing(True, {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}) is None
    obs = build_observers(Settings(decision_log="none"), environ={})
    try:
        assert obs.tracing is None
        assert obs.observers == ()  # nothing at all runs per check
    finally:
        obs.close()
    tracing = setup_tracing(True, {"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    tracing.shutdown()


def test_b3_sampling_only_deny_records_nothing_even_with_a_root_sampler() -> None:
    rec, exporter = recorder(root_sampled=True)
    for headers in ({"b3": "0"}, {"x-b3-sampled": "0"}):
        assert rec.record(request(headers), ALLOW, 0.001) == NO_TRACE
    assert exporter.get_finished_spans() == ()
