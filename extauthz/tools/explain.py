"""Answer "why was this request allowed or denied?" with the matcher's own logic.

`decide` runs a request through the server's own synchronous `decide` (the same guards and
policy evaluation as `Authorizer.check`) and its GCRA limiter, minus the cache, with no event
loop; a series of calls on
an injected clock shows when a limit bites ("the 11th call in one second is 429"). `explain`
adds a trace of every rule on the request's host: whether its route matched (membership in
the matcher's own candidate list), how its headers and `when` condition came out, and
whether its allow/deny lists name the caller. The final decision always comes from
`CompiledPolicy.evaluate`, never from this module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from extauthz.decide import pipeline
from extauthz.decide.guards import normalize_host
from extauthz.decide.ratelimit import LocalLimiter
from extauthz.identity.spiffe import SpiffeId, SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import EMPTY, Decision, Identity, IdentitySource, Reason, Request
from extauthz.policy.compiled import CompiledPolicy, CompiledRule, FilterResult, RequestInputs
from extauthz.policy.paths import normalize_path


class CallerError(ValueError):
    """The caller given on the command line or in a test case cannot be turned into one."""


@dataclass(frozen=True, slots=True)
class Probe:
    """One request to decide, as a policy author writes it."""

    principal: str
    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    claims: Mapping[str, object] | None = None  # given: the caller presents a JWT
    now: float | None = None
    # Rate limits: send `calls` identical requests spread evenly over `over` seconds (all at
    # the same instant when 0) on an injected clock; the answer is the last call's.
    calls: int = 1
    over: float = 0.0


MAX_CALLS = 100_000  # a test case, not a load test
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")  # fixed, not an author's regex
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str) -> float:
    """`1s`, `500ms`, `2m` or plain seconds -> seconds; ValueError otherwise."""
    match = _DURATION.match(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 1s, 500ms or 2m")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def check_calls(calls: int, over: float) -> None:
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"calls must be between 1 and {MAX_CALLS}, not {calls}")
    if over < 0:
        raise ValueError("over must not be negative")


def caller_identity(policy: CompiledPolicy, principal: str,
                    claims: Mapping[str, object] | None = None) -> Identity:
    """`principal` is a SPIFFE ID, a declared principal name, or (with claims) a JWT `sub`."""
    decl = policy.principals.get(principal)
    if decl is not None and decl.jwt is not None:
        merged: dict[str, object] = dict(decl.jwt.claims)
        merged.update(claims or {})
        subject = decl.jwt.subject or str(merged.get("sub", f"{decl.name}-test-subject"))
        return Identity(subject, IdentitySource.JWT, "", issuer=decl.jwt.issuer,
                        subject=subject, claims=merged)
    if decl is not None:
        pattern = SpiffePattern.parse(decl.spiffe)
        if not pattern.is_exact:
            raise CallerError(f"principal {principal!r} is the pattern {decl.spiffe}; "
                              "give one concrete SPIFFE ID that it matches")
        principal = decl.spiffe
    if claims is not None:
        issuer = str(claims.get("iss", ""))
        subject = principal or str(claims.get("sub", ""))
        if not issuer or not subject:
            raise CallerError("a JWT caller needs an issuer ('iss' claim) and a subject")
        td = ""
        if subject.startswith("spiffe://"):
            td = _spiffe(subject).trust_domain
        return Identity(subject, IdentitySource.JWT, td, issuer=issuer, subject=subject,
                        claims=dict(claims))
    return Identity(principal, IdentitySource.MTLS, _spiffe(principal).trust_domain)


def _spiffe(principal: str) -> SpiffeId:
    try:
        return parse_spiffe_id(principal)
    except SpiffeIdError as exc:
        raise CallerError(f"{principal!r} is neither a declared principal name nor a "
                          f"valid SPIFFE ID: {exc}") from None


class _Clock:
    """The injected clock: the rate limiter sees the time of each call of a series."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def decide_series(policy: CompiledPolicy, probe: Probe) -> tuple[list[Decision], Identity]:
    """Every answer of `probe.calls` identical requests, through the server's own pipeline
    and GCRA limiter (in memory, fresh), on a clock that advances evenly over `probe.over`."""
    check_calls(probe.calls, probe.over)
    identity = caller_identity(policy, probe.principal, probe.claims)
    start = probe.now if probe.now is not None else time.time()
    clock = _Clock(start)
    limiter = LocalLimiter(clock, max_keys=1024)
    request = Request(method=probe.method, host=probe.host, path=probe.path,
                      headers={k.lower(): v for k, v in probe.headers.items()},
                      source_principal=identity.principal)
    step = probe.over / (probe.calls - 1) if probe.calls > 1 else 0.0
    answers = []
    for i in range(probe.calls):
        clock.now = start + i * step
        decision = pipeline.decide(policy, identity, request, clock.now)
        limits = policy.limits(decision)
        if limits:
            decision = pipeline.limited(decision, limiter.hit_many(limits))
        answers.append(decision)
    return answers, identity


def decide(policy: CompiledPolicy, probe: Probe) -> tuple[Decision, Identity]:
    """The answer to the probe (the last one, for a series of calls)."""
    answers, identity = decide_series(policy, probe)
    return answers[-1], identity


def summarize_series(answers: list[Decision]) -> str:
    """`calls 1-10: 200 allowed; call 11: 429 rate_limited`."""
    runs: list[tuple[int, int, str]] = []
    for i, d in enumerate(answers, 1):
        label = f"{d.outcome.http_status} {d.reason.value}"
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], i, label)
        else:
            runs.append((i, i, label))
    parts = [f"call {a}: {label}" if a == b else f"calls {a}-{b}: {label}"
             for a, b, label in runs]
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule: CompiledRule
    route: bool  # host, method and path matched
    notes: tuple[str, ...]
    verdict: str  # what this rule contributed


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    identity: Identity
    host: str | None
    path: str | None
    rules: tuple[RuleTrace, ...]
    preface: tuple[str, ...] = ()


def explain(policy: CompiledPolicy, probe: Probe) -> Explanation:
    decision, identity = decide(policy, probe)
    host = normalize_host(probe.host)
    path = normalize_path(probe.path)
    preface: list[str] = []
    params = path is not None and decision.reason is Reason.AMBIGUOUS_PATH and ";" in path
    if host is None or path is None or (not params and decision.reason in (
            Reason.MALFORMED_REQUEST, Reason.AMBIGUOUS_PATH, Reason.METHOD_OVERRIDE)):
        preface.append(f"denied before any rule: {decision.detail}")
        return Explanation(decision, identity, host, path, (), tuple(preface))
    if path != probe.path:
        preface.append(f"path {probe.path!r} normalizes to {path!r}")
    if params:
        preface.append(f"allowed as {path!r}, but {decision.detail}")
    rules = policy.rules_for_host(host)
    if not rules:
        known = ", ".join(policy.hosts) or "none"
        preface.append(f"no rule names host {host!r} (hosts with rules: {known})")
    headers = {k.lower(): v for k, v in probe.headers.items()}
    now = probe.now if probe.now is not None else time.time()
    route = {id(r) for r in policy.candidates(host, probe.method, path)}
    inputs = RequestInputs(identity, host, probe.method, path, headers, now)
    traces = [_trace(rule, id(rule) in route, inputs) for rule in rules]
    return Explanation(decision, identity, host, path, tuple(traces), tuple(preface))


def _trace(rule: CompiledRule, route: bool, inputs: RequestInputs) -> RuleTrace:
    decl = rule.decl
    where = f"{decl.path.kind} {decl.path.value}"
    if not route:
        if not rule.method_matches(inputs.method):
            why = f"method {inputs.method} not in [{', '.join(sorted(decl.methods))}]"
        else:
            why = f"path {inputs.path} does not match {where}"
        return RuleTrace(rule, False, (why,), "skipped")
    methods = ", ".join(sorted(decl.methods)) or "any method"
    notes = [f"route matches ({methods}; {where})"]
    result = rule.filters(inputs) if rule.filtered else FilterResult()
    if result.failed_header is not None:
        h = result.failed_header
        want = {"exact": f"= {h.value!r}", "regex": f"~ {h.value!r}", "present": "present",
                "absent": "absent"}[h.kind]
        got = inputs.headers.get(h.name)
        notes.append(f"header {h.name} must be {want}, got {got!r}")
        return RuleTrace(rule, True, tuple(notes), "not applicable")
    notes += [f"header {c.decl.name} matches" for c in rule.headers]
    if result.condition is not None:
        outcome = result.condition if isinstance(result.condition, bool) else (
            f"error ({result.condition}): counts as false for allow, true for deny")
        notes.append(f"when {decl.when!r} -> {outcome}")
    allow_part, deny_part = rule.applies(result)
    allows = allow_part and rule.allow.contains(inputs.identity)
    denies = deny_part and rule.deny.contains(inputs.identity)
    if not (allow_part or deny_part):
        verdict = "not applicable"
    elif denies:
        verdict = "would deny (dry-run)" if rule.dry_run else "denies the caller"
    elif allows:
        verdict = "allows the caller" + (" (dry-run rule)" if rule.dry_run else "")
    else:
        verdict = "does not name the caller"
    return RuleTrace(rule, True, tuple(notes), verdict)


def describe_decision(decision: Decision) -> str:
    verb = "ALLOW" if decision.allowed else "DENY"
    text = f"{verb} {decision.outcome.http_status} {decision.reason.value}"
    if decision.rule:
        text += f" rule={decision.rule}"
    if decision.detail:
        text += f" ({decision.detail})"
    return text


def format_explanation(exp: Explanation, policy: CompiledPolicy) -> str:
    ident = exp.identity
    declared = policy.declared_principal(ident)
    who = f"{ident.principal} ({ident.source.value}"
    who += f", principal {declared.name!r})" if declared is not None else ", undeclared)"
    lines = [f"caller:   {who}", f"policy:   version {policy.version}"]
    lines += [f"note:     {p}" for p in exp.preface]
    if exp.rules:
        lines.append(f"rules for {exp.host}:")
        width = max(len(t.rule.name) for t in exp.rules)
        for t in exp.rules:
            mark = "+" if t.route else "-"
            loc = t.rule.source + (f":{t.rule.decl.line}" if t.rule.decl.line else "")
            mode = " [dry-run]" if t.rule.dry_run else ""
            lines.append(f"  {mark} {t.rule.name:<{width}}  {t.verdict}{mode}  ({loc})")
            lines += [f"      {n}" for n in t.notes]
    lines.append(f"decision: {describe_decision(exp.decision)}")
    return "\n".join(lines)
