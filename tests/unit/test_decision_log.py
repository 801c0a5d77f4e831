"""The decision log: schema, safety (no secrets, no broken lines), sampling, bounds, rotation."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from extauthz.decide.pipeline import CheckResult
from extauthz.decide.ratelimit import LimitResult
from extauthz.memo import Memo
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request
from extauthz.observe.decision_log import (
    FRAGMENT_MEMO_SIZE,
    ROUTE_KEY,
    SCHEMA_MINOR,
    SCHEMA_VERSION,
    DecisionLog,
    FragmentMemo,
    clean,
    fast_line,
    format_line,
    record,
)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "decision-log.schema.json"
PRINCIPAL = "spiffe://demo.local/ns/shop/sa/checkout"
SECRET = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

MTLS = Identity(PRINCIPAL, IdentitySource.MTLS, "demo.local")
JWT = Identity("spiffe://demo.local/ns/batch/sa/job", IdentitySource.JWT, "demo.local",
               issuer="https://issuer.demo.local", subject="job",
               claims={"iat": 1_764_000_000, "exp": 1_764_000_900, "sub": "job"})
REQ = Request(method="GET", host="Orders.demo.local:8443", path="/v1/orders/../orders/42?x=1",
              headers={"authorization": f"Bearer {SECRET}"})


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def allow(**kw: Any) -> CheckResult:
    return CheckResult(Decision(Outcome.ALLOW, Reason.ALLOWED, rule="read-orders", identity=MTLS,
                                policy_version="0123456789abcdef", **kw))


DENY = CheckResult(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE, identity=MTLS,
                            policy_version="0123456789abcdef"))
DRY_RUN = CheckResult(Decision(Outcome.ALLOW, Reason.DRY_RUN, rule="new-rule", identity=MTLS,
                               policy_version="0123456789abcdef", dry_run=True))

CASES: list[tuple[Request | None, CheckResult]] = [
    (REQ, CheckResult(allow().decision, cache_hit=True,
                      limit=LimitResult(True, 5, 4, 1.0, 0.0))),
    (REQ, DENY),
    (REQ, DRY_RUN),
    (REQ, CheckResult(Decision(Outcome.UNAUTHENTICATED, Reason.NO_IDENTITY,
                               policy_version="0123456789abcdef"))),
    (REQ, CheckResult(Decision(Outcome.ALLOW, Reason.ALLOWED, identity=JWT))),
    (REQ, CheckResult(Decision(Outcome.RATE_LIMITED, Reason.RATE_LIMITED, identity=MTLS),
                      limit=LimitResult(False, 2, 0, 5.0, 5.0))),
    (Request(source_principal=PRINCIPAL, is_http=False),
     CheckResult(Decision(Outcome.FORBIDDEN, Reason.MALFORMED_REQUEST, identity=MTLS))),
    (None, CheckResult(Decision(Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR))),
    (REQ, CheckResult(Decision(Outcome.UNAVAILABLE, Reason.POLICY_NOT_LOADED))),
]


@dataclass(frozen=True, slots=True)
class _WiredDecision(Decision):
    """Decision as it will be once the pipeline carries these (model.py change); the log
    reads them with getattr, so the same test holds before and after."""

    presented_principal: str = ""
    allow_rule: str = ""


def wired(decision: Decision, **extra: Any) -> Decision:
    if all(hasattr(decision, k) for k in extra):
        return replace(decision, **extra)  # type: ignore[arg-type]
    return _WiredDecision(**{f.name: getattr(decision, f.name) for f in fields(decision)},
                          **extra)


ROUTED = Request(method="GET", host="orders.demo.local", path="/v1/orders/1",
                 context_extensions={ROUTE_KEY: "orders-api"})
REVOKED = CheckResult(wired(Decision(Outcome.UNAUTHENTICATED, Reason.REVOKED,
                                     "principal is revoked", policy_version="0123456789abcdef"),
                            presented_principal=PRINCIPAL))
FOREIGN = CheckResult(wired(Decision(Outcome.UNAUTHENTICATED, Reason.UNTRUSTED_TRUST_DOMAIN),
                            presented_principal="spiffe://other.example/sa/x\r\n" + "a" * 900))
DRY_RUN_WIRED = CheckResult(wired(DRY_RUN.decision, allow_rule="read-orders"))
CASES += [(ROUTED, REVOKED), (ROUTED, FOREIGN), (ROUTED, DRY_RUN_WIRED)]


def lines(buf: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().decode("ascii").splitlines()]


def make(**kw: Any) -> tuple[DecisionLog, io.BytesIO]:
    buf = io.BytesIO()
    kw.setdefault("flush_interval", 60.0)
    return DecisionLog("stdout", stream=buf, **kw), buf


@pytest.mark.parametrize(("req", "result"), CASES)
def test_every_line_validates_against_the_documented_schema(
    req: Request | None, result: CheckResult
) -> None:
    entry = record(time.time(), req, result, 0.000123, trace_id=TRACE, span_id=SPAN)
    line = format_line(entry)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    validator().validate(json.loads(line))


@pytest.mark.parametrize(("req", "result"), CASES)
def test_the_writers_fast_formatter_writes_exactly_the_record(
    req: Request | None, result: CheckResult
) -> None:
    ts = 1_764_000_000.123456
    for trace_id, span_id in ((TRACE, SPAN), ("", "")):
        fast = fast_line((ts, req, result, 0.000123, trace_id, span_id))
        assert fast.encode("ascii") == format_line(
            record(ts, req, result, 0.000123, trace_id=trace_id, span_id=span_id))



def test_a_shared_fragment_memo_never_gives_one_decision_another_decisions_fields() -> None:
    """The writer keeps each decision's rendered fields; over every case, in order and
    reversed, with one memo, each line is still exactly its own record."""
    ts = 1_764_000_000.123456
    memo: FragmentMemo = Memo(FRAGMENT_MEMO_SIZE)
    for req, result in [*CASES, *reversed(CASES), *CASES]:
        fast = fast_line((ts, req, result, 0.000123, "", ""), memo)
        assert fast.encode("ascii") == format_line(record(ts, req, result, 0.000123))
    assert memo, "the memo was never used"

V1_0_FIELDS = [
    "schema_version", "time", "trace_id", "span_id", "principal", "identity_source",
    "trust_domain", "issuer", "method", "host", "path", "decision", "status", "reason",
    "rule", "policy_version", "cache_hit", "dry_run", "ratelimit_remaining", "latency_us",
    "token_lifetime_s",
]


def test_schema_lists_every_field_and_every_reason() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    entry = record(time.time(), REQ, allow(), 0.001)
    assert list(schema["properties"]) == list(entry)  # same fields, same order
    assert set(schema["properties"]["reason"]["enum"]) == {r.value for r in Reason}
    assert schema["properties"]["schema_version"]["const"] == entry["schema_version"]


def test_schema_version_is_honest_minor_versions_only_append() -> None:
    """1.1 appended six fields, 1.2 one: the major in every line is unchanged, 1.0 fields keep
    their order and stay the required ones, so a 1.0 line still validates."""
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["x-schema-version"] == f"{SCHEMA_VERSION}.{SCHEMA_MINOR}" == "1.2"
    assert schema["required"] == V1_0_FIELDS
    entry = record(time.time(), REQ, allow(), 0.001)
    assert list(entry)[: len(V1_0_FIELDS)] == V1_0_FIELDS
    assert list(entry)[len(V1_0_FIELDS):] == [
        "route", "presented_principal", "allow_rule", "subject", "peer", "notes", "condition"]
    old_line = {k: v for k, v in entry.items() if k in V1_0_FIELDS}
    validator().validate(old_line)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate({**entry, "undocumented": 1})


def test_route_comes_from_envoys_context_extensions() -> None:
    from extauthz.envoyconf.config import ROUTE_CONTEXT_KEY

    assert ROUTE_KEY == ROUTE_CONTEXT_KEY  # the key the generated Envoy config sets
    assert record(1.0, ROUTED, DENY, 0.001)["route"] == "orders-api"
    assert record(1.0, REQ, DENY, 0.001)["route"] is None
    assert record(1.0, None, DENY, 0.001)["route"] is None
    odd = Request(context_extensions={ROUTE_KEY: "r\r\n" * 200})
    route = record(1.0, odd, DENY, 0.001)["route"]
    assert "\r" not in route and len(route) <= 256


def test_presented_principal_only_for_revoked_and_foreign_401s() -> None:
    entry = record(1.0, ROUTED, REVOKED, 0.001)
    assert (entry["principal"], entry["presented_principal"], entry["status"]) == \
        (None, PRINCIPAL, 401)
    foreign = record(1.0, ROUTED, FOREIGN, 0.001)["presented_principal"]
    assert len(foreign) <= 512 and "\n" not in foreign and foreign.endswith("...")
    # Other reasons never carry it, even if a decision had it set.
    other = CheckResult(wired(Decision(Outcome.UNAUTHENTICATED, Reason.INVALID_IDENTITY),
                              presented_principal=PRINCIPAL))
    assert record(1.0, REQ, other, 0.001)["presented_principal"] is None
    # Before the pipeline carries it: null, not an error.
    plain = CheckResult(Decision(Outcome.UNAUTHENTICATED, Reason.REVOKED))
    assert record(1.0, REQ, plain, 0.001)["presented_principal"] is None


def test_allow_rule_only_for_dry_run_decisions() -> None:
    entry = record(1.0, REQ, DRY_RUN_WIRED, 0.001)
    assert (entry["rule"], entry["allow_rule"], entry["dry_run"]) == \
        ("new-rule", "read-orders", True)
    assert record(1.0, REQ, DRY_RUN, 0.001)["allow_rule"] is None
    enforced = CheckResult(wired(allow().decision, allow_rule="read-orders"))
    assert record(1.0, REQ, enforced, 0.001)["allow_rule"] is None


def test_fields_of_an_allowed_line() -> None:
    log, buf = make()
    log.observe(REQ, CheckResult(allow().decision, cache_hit=True,
                                 limit=LimitResult(True, 5, 4, 1.0, 0.0),
                                 host="orders.demo.local", path="/v1/orders/42"), 0.000250,
                TRACE, SPAN)
    log.close()
    [entry] = lines(buf)
    assert entry["principal"] == PRINCIPAL and entry["identity_source"] == "mtls"
    assert entry["decision"] == "allow" and entry["status"] == 200
    assert entry["reason"] == "allowed" and entry["rule"] == "read-orders"
    assert entry["host"] == "orders.demo.local"
    assert entry["path"] == "/v1/orders/42"  # as the check normalized it, no query
    assert entry["cache_hit"] is True and entry["ratelimit_remaining"] == 4
    assert entry["latency_us"] == 250
    assert entry["trace_id"] == TRACE and entry["span_id"] == SPAN
    assert entry["time"].endswith("Z")


def test_a_10kb_crlf_subject_cannot_break_a_line_and_no_secret_is_written() -> None:
    evil = "spiffe://demo.local/" + "A" * 10_000 + "\r\n{\"decision\":\"allow\"}\x00\u2028"
    ident = Identity(evil, IdentitySource.JWT, "demo.local", issuer="iss\r\nx" * 1000,
                     claims={"token": SECRET})
    req = Request(method="GET\r\n", host="orders.demo.local\r\nx", path=f"/a?token={SECRET}",
                  headers={"authorization": f"Bearer {SECRET}", "cookie": SECRET},
                  peer_certificate=f"-----BEGIN CERTIFICATE-----{SECRET}")
    log, buf = make()
    result = CheckResult(Decision(Outcome.FORBIDDEN, Reason.DENIED_BY_RULE, detail=SECRET,
                                  identity=ident, rule="r\n" * 500))
    log.observe(req, result, 0.001)
    assert fast_line((1.0, req, result, 0.001, "", "")).encode() == format_line(
        record(1.0, req, result, 0.001))
    log.close()
    raw = buf.getvalue()
    assert raw.count(b"\n") == 1 and b"\r" not in raw
    assert SECRET.encode() not in raw and b"BEGIN CERTIFICATE" not in raw
    assert len(raw) < 4096
    [entry] = lines(buf)
    validator().validate(entry)
    assert len(entry["principal"]) <= 512 and entry["principal"].endswith("...")
    assert "\r" not in entry["principal"] and "\n" not in entry["principal"]
    assert entry["path"] == "/a"


def test_jwt_lines_carry_the_token_lifetime_and_nothing_else_of_the_token() -> None:
    entry = record(time.time(), REQ, CheckResult(Decision(Outcome.ALLOW, Reason.ALLOWED,
                                                          identity=JWT)), 0.001)
    assert entry["token_lifetime_s"] == 900 and entry["issuer"] == "https://issuer.demo.local"
    assert record(time.time(), REQ, allow(), 0.001)["token_lifetime_s"] is None


def test_clean() -> None:
    assert clean("plain") == "plain"
    assert clean("a\r\nb") == "a\\r\\nb"
    assert clean("caf\u00e9") == "caf\\xe9"
    assert clean("x" * 300) == "x" * 253 + "..."
    assert len(clean("\x00" * 100_000)) == 256


def test_sampling_keeps_every_denial_and_dry_run() -> None:
    log, buf = make(sample_allowed=0.0)
    for _ in range(5):
        log.observe(REQ, allow(), 0.001)
    log.observe(REQ, DENY, 0.001)
    log.observe(REQ, DRY_RUN, 0.001)
    log.close()
    assert [e["reason"] for e in lines(buf)] == ["no_matching_rule", "dry_run_would_deny"]
    assert log.sampled_out == 5 and log.written == 2


def test_partial_sampling_uses_the_rate() -> None:
    draws = iter([0.1, 0.6, 0.4, 0.9])
    log, buf = make(sample_allowed=0.5, rand=lambda: next(draws))
    for _ in range(4):
        log.observe(REQ, allow(), 0.001)
    log.close()
    assert len(lines(buf)) == 2 and log.sampled_out == 2
    with pytest.raises(ValueError, match="between 0 and 1"):
        DecisionLog("none", sample_allowed=1.5)


def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    log, buf = make(max_queue=3, wake_at=1000)
    for _ in range(10):
        log.observe(REQ, DENY, 0.001)
    assert log.dropped == 7 and log.queued == 3
    log.close()
    assert len(lines(buf)) == 3 and log.written == 3


def test_the_writer_thread_flushes_periodically() -> None:
    log, buf = make(flush_interval=0.02)
    log.observe(REQ, DENY, 0.001)
    deadline = time.monotonic() + 5
    while not buf.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(lines(buf)) == 1
    log.close()


def test_file_target_appends_and_reopens_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    path.write_text('{"existing": true}\n')
    log = DecisionLog(str(path), flush_interval=60.0, reopen_check_interval=0.0)
    try:
        log.observe(REQ, DENY, 0.001)
        log.flush()
        assert len(path.read_text().splitlines()) == 2  # appended
        os.rename(path, tmp_path / "decisions.log.1")  # logrotate `create` style
        log.observe(REQ, DENY, 0.001)
        log.flush()
        assert len(path.read_text().splitlines()) == 1
        assert len((tmp_path / "decisions.log.1").read_text().splitlines()) == 2
        assert log.reopens == 1
        log.reopen()  # what a SIGHUP handler would call
        log.observe(REQ, DENY, 0.001)
        log.flush()
        assert len(path.read_text().splitlines()) == 2 and log.reopens == 2
    finally:
        log.close()
    assert log.write_errors == 0 and log.dropped == 0


def test_unwritable_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        DecisionLog(str(tmp_path / "missing-dir" / "d.log"))


def test_the_combined_observer_logs_with_the_span_ids_and_survives_a_failing_part() -> None:
    from extauthz.observe.metrics import CheckMetrics
    from extauthz.observe.tracing import SpanRecorder, TraceIds
    from extauthz.observe.wiring import DecisionObserver

    class Spans(SpanRecorder):
        def __init__(self, fail: bool) -> None:
            super().__init__(None)
            self.fail = fail

        def record(self, request: Request | None, result: CheckResult,
                   seconds: float) -> TraceIds:
            if self.fail:
                raise RuntimeError("exporter exploded")
            return TraceIds(TRACE, SPAN)

    log, buf = make()
    metrics = CheckMetrics()
    DecisionObserver(Spans(False), log, metrics).observe(REQ, DENY, 0.001)
    DecisionObserver(Spans(True), log, metrics).observe(REQ, DENY, 0.001)
    log.close()
    first, second = lines(buf)
    assert (first["trace_id"], first["span_id"]) == (TRACE, SPAN)
    assert (second["trace_id"], second["span_id"]) == (None, None)
    assert sum(metrics.checks.values()) == 2


def test_the_documented_example_lines_are_current() -> None:
    """docs/observability.md shows real lines from the demo: they must still match the
    schema and the writer's field order (regenerate them when a field is added)."""
    doc = (SCHEMA_PATH.parent / "observability.md").read_text()
    examples = [json.loads(line) for line in doc.splitlines()
                if line.startswith('{"schema_version":')]
    assert len(examples) >= 3
    fields_now = list(record(time.time(), REQ, allow(), 0.001))
    for entry in examples:
        validator().validate(entry)
        assert list(entry) == fields_now


def test_host_and_path_are_logged_as_the_check_normalized_them_never_normalized_again() -> None:
    """The check result carries the route; the log shows it, or the raw values (query cut)
    when the check could not normalize them, and never runs the normalizer itself."""
    seen = record(1.0, REQ, CheckResult(DENY.decision, host="h.example", path="/as/checked"), 0.0)
    assert (seen["host"], seen["path"]) == ("h.example", "/as/checked")
    raw = record(1.0, REQ, DENY, 0.0)
    assert (raw["host"], raw["path"]) == ("Orders.demo.local:8443", "/v1/orders/../orders/42")
