"""`extauthz test`: policy unit tests that live beside the policies (`*_test.yaml`).

    # orders_test.yaml
    host: orders.mesh.local          # optional; default: the first host of orders.yaml
    cases:
      - name: checkout reads an order
        principal: checkout          # a declared principal name or a SPIFFE ID
        method: GET
        path: /v1/orders/42
        expect: allow                # or {decision, reason, rule, status, dry_run}
      - name: nobody else may create orders
        principal: spiffe://prod.example/ns/shop/sa/cart
        method: POST
        path: /v1/orders
        headers: {x-tenant: acme}    # optional
        claims: {iss: https://idp.example, scope: orders}  # optional: caller shows a JWT
        time: 2025-01-06T10:00:00Z   # optional: for `when` conditions reading `now`
        expect: {decision: deny, reason: principal_not_allowed}
      - name: the 11th order in one second is rate limited
        principal: checkout
        method: POST
        path: /v1/orders
        calls: 11                    # optional: identical requests, the last one is checked
        over: 1s                     # optional: spread evenly over this long (default: at once)
        expect: {status: 429, reason: rate_limited}

Each case runs through the same path as a real check (normalization, method checks,
policy evaluation, a fresh in-memory rate limiter on an injected clock; no cache).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from extauthz.model import Decision, Reason
from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.reader import LineMap, PolicyError, Reader, load_yaml
from extauthz.sources.policy_store import TEST_SUFFIXES
from extauthz.tools.explain import (
    MAX_CALLS,
    CallerError,
    Probe,
    decide,
    describe_decision,
    explain,
    format_explanation,
    parse_duration,
)

_CASE_FIELDS = {"name", "principal", "method", "path", "host", "headers", "claims", "time",
                "calls", "over", "expect"}
_EXPECT_FIELDS = {"decision", "reason", "rule", "status", "dry_run"}
_REASONS = {r.value for r in Reason}


def find_test_files(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.name.endswith(TEST_SUFFIXES) and path.is_file():
            found.append(path)
    return found


@dataclass(frozen=True, slots=True)
class Expect:
    decision: str = ""  # "allow" | "deny" | ""
    reason: str = ""
    rule: str | None = None
    status: int | None = None
    dry_run: bool | None = None

    def describe(self) -> str:
        parts = [self.decision or "any decision"]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.rule is not None:
            parts.append(f"rule={self.rule or '(none)'}")
        if self.dry_run is not None:
            parts.append(f"dry_run={str(self.dry_run).lower()}")
        return " ".join(parts)

    def mismatches(self, d: Decision) -> list[str]:
        out = []
        if self.decision and (self.decision == "allow") != d.allowed:
            out.append("decision")
        if self.status is not None and self.status != d.outcome.http_status:
            out.append("status")
        if self.reason and self.reason != d.reason.value:
            out.append("reason")
        if self.rule is not None and self.rule != d.rule:
            out.append("rule")
        if self.dry_run is not None and self.dry_run != d.dry_run:
            out.append("dry_run")
        return out


@dataclass(frozen=True, slots=True)
class Case:
    file: str
    line: int | None
    name: str
    probe: Probe
    expect: Expect


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    decision: Decision | None
    failures: tuple[str, ...]  # empty: passed
    error: str = ""
    explanation: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures and not self.error


def load_cases(path: Path, source: str, policy: CompiledPolicy) -> list[Case]:
    data = load_yaml(path.read_bytes(), source)
    if not isinstance(data, Mapping):
        raise PolicyError(source, "", "a policy test file must be a YAML mapping")
    top = Reader.of(source, "", data)
    top.reject_unknown({"apiVersion", "host", "cases"})
    host = top.string("host", required=False) or _default_host(policy, source)
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise top.error("cases", "must be a non-empty list of test cases")
    cases = []
    names: set[str] = set()
    for i, raw in enumerate(raw_cases):
        case = _case(top.child("cases", raw, i), host)
        if case.name in names:
            raise top.child("cases", raw, i).error("name", f"duplicate case name {case.name!r}")
        names.add(case.name)
        cases.append(case)
    return cases


def _default_host(policy: CompiledPolicy, source: str) -> str:
    stem = source
    for suffix in TEST_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    for doc in policy.documents:
        if doc.source.rsplit(".", 1)[0] == stem:
            return doc.hosts[0]
    return ""


def _case(r: Reader, host: str) -> Case:
    r.reject_unknown(_CASE_FIELDS)
    name = r.string("name")
    headers = _str_map(r, "headers")
    claims = r.data.get("claims")
    if claims is not None and not isinstance(claims, Mapping):
        raise r.error("claims", "must be a mapping of claim name to value")
    calls, over = _series(r)
    host = r.string("host", required=False) or host
    if not host:
        raise r.error("host", "is required (no policy file matches this test file's name)")
    return Case(
        file=r.source,
        line=r.line,
        name=name,
        probe=Probe(
            principal=r.string("principal"),
            method=r.string("method").upper(),
            path=r.string("path"),
            host=host,
            headers=headers,
            claims=_plain(claims) if claims is not None else None,
            now=_time(r),
            calls=calls,
            over=over,
        ),
        expect=_expect(r),
    )


def _series(r: Reader) -> tuple[int, float]:
    """`calls: 11` and `over: 1s`: the case sends that many identical requests through the
    rate limiter on an injected clock, and `expect` is the last call's answer."""
    calls = r.data.get("calls", 1)
    if not isinstance(calls, int) or isinstance(calls, bool) or not 1 <= calls <= MAX_CALLS:
        raise r.error("calls", f"must be a whole number from 1 to {MAX_CALLS}")
    over_raw = r.data.get("over", 0)
    try:
        over = parse_duration(str(over_raw))
    except ValueError as exc:
        raise r.error("over", str(exc)) from None
    return calls, over


def _plain(value: object) -> dict[str, object]:
    """A LineMap (and nested ones) as plain dicts/lists, as a JWT decoder returns them."""
    if isinstance(value, LineMap | dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return {}


def _plain_value(value: object) -> object:
    if isinstance(value, Mapping):
        return _plain(value)
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    return value


def _str_map(r: Reader, key: str) -> dict[str, str]:
    raw = r.data.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise r.error(key, "must be a mapping of names to string values")
    return {str(k).lower(): str(v) for k, v in raw.items()}


def _time(r: Reader) -> float | None:
    raw = r.data.get("time")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise r.error("time", "must be an ISO 8601 time like 2025-01-06T10:00:00Z") from None
    if isinstance(raw, datetime):
        return (raw if raw.tzinfo else raw.replace(tzinfo=UTC)).timestamp()
    if isinstance(raw, date):
        return datetime(raw.year, raw.month, raw.day, tzinfo=UTC).timestamp()
    raise r.error("time", "must be an ISO 8601 time like 2025-01-06T10:00:00Z")


def _expect(r: Reader) -> Expect:
    raw = r.data.get("expect")
    if isinstance(raw, str):
        raw = {"decision": raw}
    if raw is None:
        raise r.error("expect", "is required")
    e = r.child("expect", raw)
    e.reject_unknown(_EXPECT_FIELDS)
    decision = e.string("decision", required=False)
    if decision not in ("", "allow", "deny"):
        raise e.error("decision", "must be 'allow' or 'deny'")
    reason = e.string("reason", required=False)
    if reason and reason not in _REASONS:
        known = ", ".join(sorted(_REASONS))
        raise e.error("reason", f"unknown reason {reason!r} (one of: {known})")
    rule = e.data.get("rule")
    if rule is not None and not isinstance(rule, str):
        raise e.error("rule", "must be a rule name ('' for no rule)")
    status = e.data.get("status")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise e.error("status", "must be an HTTP status code")
    dry_run = e.data.get("dry_run")
    if dry_run is not None and not isinstance(dry_run, bool):
        raise e.error("dry_run", "must be true or false")
    result = Expect(decision, reason, rule, status, dry_run)
    if result == Expect():
        raise e.error("decision", "expect at least one of decision, reason, rule, status")
    return result


def run_case(policy: CompiledPolicy, case: Case, with_explanation: bool = False) -> CaseResult:
    try:
        decision, _ = decide(policy, case.probe)
    except CallerError as exc:
        return CaseResult(case, None, (), error=str(exc))
    failures = tuple(case.expect.mismatches(decision))
    text = ""
    if failures and with_explanation:
        text = format_explanation(explain(policy, case.probe), policy)
    return CaseResult(case, decision, failures, explanation=text)


@dataclass(frozen=True, slots=True)
class FileResult:
    file: str
    results: tuple[CaseResult, ...]
    error: str = ""  # the file itself could not be read
    seconds: float = 0.0


def run_directory(policy: CompiledPolicy, directory: Path,
                  with_explanation: bool = False) -> list[FileResult]:
    out = []
    for path in find_test_files(directory):
        source = str(path.relative_to(directory))
        started = time.perf_counter()
        try:
            cases = load_cases(path, source, policy)
        except (PolicyError, OSError) as exc:
            out.append(FileResult(source, (), error=str(exc)))
            continue
        results = tuple(run_case(policy, c, with_explanation) for c in cases)
        out.append(FileResult(source, results, seconds=time.perf_counter() - started))
    return out


def format_results(files: list[FileResult], verbose: bool = False) -> str:
    lines: list[str] = []
    passed = failed = 0
    for f in files:
        if f.error:
            failed += 1
            lines.append(f"ERROR {f.error}")
            continue
        for res in f.results:
            c = res.case
            where = f"{c.file}:{c.line}" if c.line else c.file
            if res.passed:
                passed += 1
                if verbose:
                    lines.append(f"PASS {where}: {c.name}")
                continue
            failed += 1
            lines.append(f"FAIL {where}: {c.name}")
            p = c.probe
            lines.append(f"     request:  {p.method} {p.host} {p.path} as {p.principal}")
            if res.error:
                lines.append(f"     error:    {res.error}")
                continue
            assert res.decision is not None
            lines.append(f"     expected: {c.expect.describe()}")
            lines.append(f"     got:      {describe_decision(res.decision)}")
            lines.append(f"     differs:  {', '.join(res.failures)}")
            if res.explanation:
                lines += ["     " + line for line in res.explanation.splitlines()]
    if not files:
        lines.append("no policy test files (*_test.yaml) found")
    lines.append(f"{len(files)} file(s): {passed} passed, {failed} failed")
    return "\n".join(lines)


def junit_xml(files: list[FileResult]) -> bytes:
    suites = ET.Element("testsuites", name="extauthz policy tests")
    for f in files:
        failures = sum(1 for r in f.results if r.failures)
        errors = sum(1 for r in f.results if r.error) + (1 if f.error else 0)
        suite = ET.SubElement(suites, "testsuite", name=f.file, tests=str(len(f.results) or 1),
                              failures=str(failures), errors=str(errors),
                              time=f"{f.seconds:.6f}")
        if f.error:
            case = ET.SubElement(suite, "testcase", classname=f.file, name="(load)")
            ET.SubElement(case, "error", message=f.error).text = f.error
            continue
        for res in f.results:
            c = res.case
            case = ET.SubElement(suite, "testcase", classname=f.file, name=c.name,
                                 file=c.file, line=str(c.line or 0))
            if res.error:
                ET.SubElement(case, "error", message=res.error).text = res.error
            elif res.failures:
                assert res.decision is not None
                msg = (f"expected {c.expect.describe()}, got {describe_decision(res.decision)}")
                ET.SubElement(case, "failure", message=msg).text = msg + (
                    "\n" + res.explanation if res.explanation else "")
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))
