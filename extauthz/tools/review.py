"""Access review: decision-log records in, findings (and a tightened policy) out.

Pure analysis, no I/O: `Reviewer.feed` takes one decision-log record (a dict, schema
`docs/decision-log.schema.json`) at a time and `Reviewer.report` returns the findings. Memory
is bounded whatever the size of the log: everything is aggregated by keys bounded by the
policy (grant = rule x allow entry; route shapes per rule, capped) or by explicit caps
(principals, denial keys, unknown versions), and what does not fit is counted as overflow.

Grants are matched against the policy version that made each decision (`policy_version`):
the reviewer holds the policy under review plus any earlier versions; a decision of version V
exercises the grant (rule, allow entry) *as V defined it*, and it counts for the policy under
review only if that rule still has the same route (hosts, methods, path, mode) and the entry
still names the same identity. Decisions of versions nobody supplied are counted and
reported, never attributed.

Which decisions exercise a grant:
* `allowed` / `rate_limited` (and `internal_error` with a rule): the logged `rule` allowed the
  caller; the allow entries of that rule that match the caller were used.
* `dry_run_would_deny`: the logged rule is the dry-run rule that would deny; the rule that
  actually allowed is `allow_rule` (decision log 1.1). In older logs it is not recorded, so
  every candidate rule of the route whose allow list contains the caller counts as used
  (conservative: never suggest removing a grant that may have been exercised).
JWT principals declared by claims only cannot be matched (the log has no claims); a use by
their issuer is attributed to every such entry of the rule.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import Identity, IdentitySource, Reason
from extauthz.policy.compiled import CompiledPolicy, CompiledRule, compile_policy
from extauthz.policy.document import (
    METHODS,
    LineMap,
    PathMatch,
    PolicyError,
    load_yaml,
    parse_document,
)
from extauthz.policy.principals import PrincipalSet

SEVERITIES = ("info", "low", "medium", "high", "critical")
RANK = {s: i for i, s in enumerate(SEVERITIES)}
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
# The decision-log field with a JWT's lifetime (exp - iat, seconds; null without both claims).
# Logs written before it existed lack it: then the lifetime check says it cannot run.
TOKEN_LIFETIME_FIELD = "token_lifetime_s"  # noqa: S105 - a field name

_EXERCISE = frozenset({Reason.ALLOWED.value, Reason.RATE_LIMITED.value})
_DENIALS = frozenset({Reason.PRINCIPAL_NOT_ALLOWED.value, Reason.NO_MATCHING_RULE.value,
                      Reason.DENIED_BY_RULE.value, Reason.METHOD_OVERRIDE.value})
_VERSIONED = re.compile(r"^v\d+([a-z]+\d*)?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
_BAD_PATH = re.compile(r"[{}%\\?#]|//|/\.\.?(/|$)")
_DIGIT = re.compile(r"[0-9]")
MAX_SEGMENTS = 16
_MATCH_CACHE = 100_000
UNRECORDED = "(not recorded)"

RouteSig = tuple[tuple[str, ...], tuple[str, ...], str, str, str]


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    kind: str
    subject: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def sort_key(self) -> tuple[int, str, str, str]:
        return (-RANK[self.severity], self.kind, self.subject, self.message)

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "subject": self.subject,
                "message": self.message, "details": dict(self.details)}


@dataclass(frozen=True, slots=True)
class Split:
    """One narrowed rule replacing (part of) a wide one."""

    name: str
    path: str
    methods: tuple[str, ...]
    allow: tuple[str, ...]


@dataclass(slots=True)
class RuleChange:
    rule: str
    source: str
    remove_entries: list[str] = field(default_factory=list)
    methods: tuple[str, ...] | None = None
    splits: tuple[Split, ...] = ()
    remove_rule: bool = False


@dataclass(slots=True)
class Report:
    findings: list[Finding]
    summary: dict[str, Any]
    changes: dict[str, RuleChange]

    def at_least(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if RANK[f.severity] >= RANK[severity]]


@dataclass(frozen=True, slots=True)
class ReviewConfig:
    window_start: str = ""  # RFC 3339 UTC; records before it are skipped
    window_end: str = ""  # records at or after it are skipped
    max_token_lifetime: float | None = None  # seconds
    trust_domains: frozenset[str] = frozenset()  # expected; empty: those the policy names
    revoked_principals: frozenset[str] = frozenset()
    min_denials: int = 5
    burst_per_minute: int = 20
    min_rate_limited: int = 10
    max_principals: int = 10_000
    max_shapes_per_rule: int = 32
    max_denial_keys: int = 20_000
    max_split: int = 3


# --- route shapes --------------------------------------------------------------------------


def is_variable(segment: str) -> bool:
    """An id-like path segment (`42`, `sku-1`, a UUID, a long token); `v1` is not."""
    if len(segment) >= 24:
        return True
    return _DIGIT.search(segment) is not None and _VERSIONED.match(segment) is None


def shape_of(path: str, base: PathMatch | None = None) -> str | None:
    """`path` with id-like segments replaced by `{id}`, `{id2}`...; the segments covered by
    `base` (a prefix or template-prefix rule path) are the rule's own. None when the path
    cannot be written as a policy template (empty segment, `%`, braces, too deep)."""
    if path == "/":
        return "/"
    segs = path.split("/")[1:]
    if len(segs) > MAX_SEGMENTS or _BAD_PATH.search(path) is not None:
        return None
    own: list[str] = []
    if base is not None and base.value != "/":
        own = base.value.split("/")[1:]
    taken = {s[1:-1] for s in own if s.startswith("{")}
    out: list[str] = []
    n = 0
    for i, seg in enumerate(segs):
        if i < len(own):
            out.append(own[i])
            continue
        if not seg:
            return None
        if is_variable(seg):
            n += 1
            name = "id" if n == 1 else f"id{n}"
            while name in taken:
                name += "_"
            taken.add(name)
            out.append("{" + name + "}")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def generic_shape(path: object) -> str:
    if not isinstance(path, str) or not path:
        return "-"
    return shape_of(path) or "(unshaped)"


def describe_route(rule: CompiledRule) -> str:
    d = rule.decl
    methods = ",".join(_ordered(d.methods)) if d.methods else "any method"
    path = {"prefix": f"{d.path.value.rstrip('/')}/**", "template_prefix":
            f"{d.path.value}/**", "regex": f"~{d.path.value}"}.get(d.path.kind, d.path.value)
    return f"{methods} {'|'.join(d.hosts)}{path}"


def _ordered(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


# --- one policy version, indexed for attribution -----------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    text: str  # as written in the allow list
    resolved: str  # the identity it names: SPIFFE ID/pattern, jwt issuer|subject|claims, "*"


@dataclass(frozen=True, slots=True)
class _Rule:
    rule: CompiledRule
    sig: RouteSig
    entries: tuple[tuple[Entry, PrincipalSet], ...]


def route_sig(rule: CompiledRule) -> RouteSig:
    d = rule.decl
    return (d.hosts, tuple(sorted(d.methods)), d.path.kind, d.path.value, d.mode)


def _entries(rule: CompiledRule, policy: CompiledPolicy) -> tuple[tuple[Entry, PrincipalSet], ...]:
    out = []
    for text in rule.decl.allow:
        if text == "*":
            out.append((Entry(text, "*"), PrincipalSet(anyone=True)))
            continue
        value = text
        if not text.startswith("spiffe://"):
            decl = policy.principals[text]
            if decl.jwt is not None:
                j = decl.jwt
                out.append((Entry(text, f"jwt:{j.issuer}|{j.subject}|{j.claims}"),
                            PrincipalSet(jwt=(j,))))
                continue
            value = decl.spiffe
        pattern = SpiffePattern.parse(value)
        pset = (PrincipalSet(exact=frozenset({value})) if pattern.is_exact
                else PrincipalSet(patterns=(pattern,)))
        out.append((Entry(text, value), pset))
    return tuple(out)


class _Version:
    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self.rules = {r.name: _Rule(r, route_sig(r), _entries(r, policy)) for r in policy.rules}


def identity_of(rec: Mapping[str, Any]) -> Identity | None:
    principal = rec.get("principal")
    if not isinstance(principal, str) or not principal:
        return None
    try:
        source = IdentitySource(rec.get("identity_source") or "mtls")
    except ValueError:
        source = IdentitySource.MTLS
    issuer = rec.get("issuer") if isinstance(rec.get("issuer"), str) else ""
    td = rec.get("trust_domain") if isinstance(rec.get("trust_domain"), str) else ""
    return Identity(principal, source, td or "", issuer or "",
                    subject=principal if source is IdentitySource.JWT else "")


def trust_domain_of(rec: Mapping[str, Any]) -> str:
    td = rec.get("trust_domain")
    if isinstance(td, str) and td:
        return td
    principal = rec.get("principal")
    if isinstance(principal, str) and principal.startswith("spiffe://"):
        try:
            return parse_spiffe_id(principal).trust_domain
        except SpiffeIdError:
            return ""
    return ""


def policy_trust_domains(policy: CompiledPolicy) -> frozenset[str]:
    """The trust domains the policy names (declared principals, literal SPIFFE entries)."""
    found = set()
    values = [p.spiffe for p in policy.principals.values() if p.spiffe]
    values += [e for r in policy.rules for e in (*r.decl.allow, *r.decl.deny)
               if e.startswith("spiffe://")]
    for v in values:
        rest = v[len("spiffe://"):]
        td = rest.split("/", 1)[0]
        if td and "*" not in td:
            found.add(td)
    return frozenset(found)


# --- aggregation ---------------------------------------------------------------------------


class _Seen:
    """count / first / last of something."""

    __slots__ = ("count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        self.first = ""
        self.last = ""

    def add(self, t: str, n: int = 1) -> None:
        self.count += n
        if not self.first or t < self.first:
            self.first = t
        self.last = max(self.last, t)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first, "last": self.last}


@dataclass(slots=True)
class _Shape:
    methods: Counter[str] = field(default_factory=Counter)
    entries: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _RuleUse:
    methods: Counter[str] = field(default_factory=Counter)
    shapes: dict[str, _Shape] = field(default_factory=dict)
    unshaped: int = 0  # uses whose path cannot become a template
    overflow: int = 0  # uses on shapes past the cap


@dataclass(slots=True)
class _DryUse:
    would_deny: _Seen = field(default_factory=_Seen)
    principals: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    overflow: int = 0


class Reviewer:
    """Feed records, then `report()`. `policy` is the version under review (and the one a
    patch is made against); `history` holds earlier versions, for attribution only."""

    def __init__(self, policy: CompiledPolicy, history: Sequence[CompiledPolicy] = (),
                 config: ReviewConfig | None = None) -> None:
        self.config = config or ReviewConfig()
        self.current = _Version(policy)
        self.versions: dict[str, _Version] = {policy.version: self.current}
        for old in history:
            self.versions.setdefault(old.version, _Version(old))
        self.expected_tds = self.config.trust_domains or policy_trust_domains(policy)
        self.counts: Counter[str] = Counter()
        self.window = _Seen()
        self.by_version: Counter[str] = Counter()
        self.unknown_versions: Counter[str] = Counter()
        self.hosts: set[str] = set()
        self.grant_use: dict[tuple[str, RouteSig, Entry], _Seen] = {}
        self.rule_use: dict[tuple[str, RouteSig], _RuleUse] = {}
        self.dry: dict[tuple[str, RouteSig], _DryUse] = {}
        self.denials: dict[tuple[str, str, str, str, str], _Seen] = {}
        self.limited: dict[str, _Seen] = {}
        self.limited_rules: dict[str, Counter[str]] = {}
        self.revoked: dict[str, _Seen] = {}
        self.revoked_allowed: dict[str, _Seen] = {}
        self.untrusted = _Seen()
        self.untrusted_by: dict[str, _Seen] = {}
        self.foreign: dict[str, _Seen] = {}
        self.foreign_principals: dict[str, set[str]] = {}
        self.long_tokens: dict[tuple[str, str], _Seen] = {}
        self.long_max: dict[tuple[str, str], float] = {}
        self.bursts: list[tuple[int, str, str, dict[str, int]]] = []
        self._burst: dict[str, tuple[str, int, Counter[str]]] = {}
        self._match: dict[tuple[object, ...], tuple[Entry, ...]] = {}

    # -- streaming ------------------------------------------------------------------------

    def feed_all(self, records: Iterable[Mapping[str, Any]]) -> Reviewer:
        for rec in records:
            self.feed(rec)
        return self

    def feed(self, rec: Mapping[str, Any]) -> None:
        cfg = self.config
        counts = self.counts
        counts["records"] += 1
        t = rec.get("time")
        reason = rec.get("reason")
        if not isinstance(t, str) or not isinstance(reason, str):
            counts["invalid"] += 1
            return
        if (cfg.window_start and t < cfg.window_start) or (cfg.window_end and t >= cfg.window_end):
            counts["outside_window"] += 1
            return
        counts["in_window"] += 1
        self.window.add(t)
        host = rec.get("host") if isinstance(rec.get("host"), str) else None
        if host is not None and host not in self.hosts:
            if len(self.hosts) < cfg.max_principals:
                self.hosts.add(host)
            else:
                counts["hosts_overflow"] += 1
        principal = rec.get("principal")
        if not isinstance(principal, str) or not principal:
            principal = None
        status = rec.get("status")
        if status == 401:
            # Since decision-log 1.1, a revoked or foreign identity that was presented (and
            # refused) is logged as `presented_principal`.
            presented = rec.get("presented_principal")
            if not isinstance(presented, str) or not presented:
                presented = principal
            self._unauthenticated(t, host or "-", reason, presented)
        elif principal is not None:
            self._hygiene(t, rec, principal)
        if reason == Reason.RATE_LIMITED.value and principal is not None:
            self._rate_limited(t, principal, rec.get("rule"))
        if reason in _DENIALS and principal is not None:
            self._denied(t, rec, principal, host, reason)
        version = rec.get("policy_version")
        known = self.versions.get(version) if isinstance(version, str) else None
        if known is None:
            if reason != Reason.POLICY_NOT_LOADED.value:
                key = version if isinstance(version, str) else "(none)"
                if key in self.unknown_versions or len(self.unknown_versions) < 1000:
                    self.unknown_versions[key] += 1
                else:
                    counts["unknown_versions_overflow"] += 1
            return
        self.by_version[known.policy.version] += 1
        if principal is None:
            return
        rule = rec.get("rule")
        if reason in _EXERCISE or (reason == Reason.INTERNAL_ERROR.value and rule):
            self._exercise(t, rec, known, rule)
        elif reason == Reason.DRY_RUN.value:
            self._dry_run(t, rec, known, rule, principal)

    def _identity_entries(self, version: _Version, r: _Rule,
                          rec: Mapping[str, Any]) -> tuple[Entry, ...] | None:
        """The allow entries of `r` naming the record's caller (None: no caller)."""
        key = (version.policy.version, r.rule.name, rec.get("principal"), rec.get("issuer"),
               rec.get("identity_source"))
        found = self._match.get(key)
        if found is None:
            ident = identity_of(rec)
            if ident is None:
                return None
            found = tuple(e for e, pset in r.entries if pset.contains(ident))
            if not found and ident.source is IdentitySource.JWT:
                found = tuple(e for e, pset in r.entries
                              if any(m.issuer == ident.issuer and not m.subject
                                     for m in pset.jwt))
            if len(self._match) >= _MATCH_CACHE:
                self._match.clear()
            self._match[key] = found
        return found

    def _use(self, t: str, rec: Mapping[str, Any], r: _Rule, entries: tuple[Entry, ...]) -> None:
        name, sig = r.rule.name, r.sig
        for e in entries:
            seen = self.grant_use.get((name, sig, e))
            if seen is None:
                seen = self.grant_use[(name, sig, e)] = _Seen()
            seen.add(t)
        use = self.rule_use.get((name, sig))
        if use is None:
            use = self.rule_use[(name, sig)] = _RuleUse()
        method = rec.get("method")
        method = method if isinstance(method, str) and method in METHODS else "?"
        use.methods[method] += 1
        path = r.rule.decl.path
        if path.kind not in ("prefix", "template_prefix"):
            return
        raw = rec.get("path")
        shape = shape_of(raw, path) if isinstance(raw, str) and raw.startswith("/") else None
        if shape is None:
            use.unshaped += 1
            return
        slot = use.shapes.get(shape)
        if slot is None:
            if len(use.shapes) >= self.config.max_shapes_per_rule:
                use.overflow += 1
                return
            slot = use.shapes[shape] = _Shape()
        slot.methods[method] += 1
        slot.entries.update(e.text for e in entries)

    def _exercise(self, t: str, rec: Mapping[str, Any], v: _Version, rule: object) -> None:
        r = v.rules.get(rule) if isinstance(rule, str) else None
        if r is None:
            self.counts["allowed_other_rule"] += 1  # e.g. a connection rule
            return
        entries = self._identity_entries(v, r, rec)
        if not entries:
            self.counts["allowed_unattributed"] += 1
            return
        self._use(t, rec, r, entries)

    def _dry_run(self, t: str, rec: Mapping[str, Any], v: _Version, rule: object,
                 principal: str) -> None:
        host, method, path = rec.get("host"), rec.get("method"), rec.get("path")
        r = v.rules.get(rule) if isinstance(rule, str) else None
        if r is not None:
            key = (r.rule.name, r.sig)
            dry = self.dry.get(key)
            if dry is None:
                dry = self.dry[key] = _DryUse()
            dry.would_deny.add(t)
            route = f"{method} {generic_shape(path)}"
            for counter, item in ((dry.principals, principal), (dry.routes, route)):
                if item in counter or len(counter) < 50:
                    counter[item] += 1
                else:
                    dry.overflow += 1
        if not all(isinstance(x, str) for x in (host, method, path)):
            return
        assert isinstance(host, str) and isinstance(method, str) and isinstance(path, str)
        allow_rule = rec.get("allow_rule")
        exact = v.rules.get(allow_rule) if isinstance(allow_rule, str) else None
        if exact is not None and exact.entries:  # decision-log 1.1 names the allowing rule
            entries = self._identity_entries(v, exact, rec)
            if entries:
                self._use(t, rec, exact, entries)
            return
        for cand in v.policy.candidates(host, method, path):
            cr = v.rules.get(cand.name)
            if cr is not None and cr.entries:
                entries = self._identity_entries(v, cr, rec)
                if entries:
                    self._use(t, rec, cr, entries)

    def _unauthenticated(self, t: str, host: str, reason: str, principal: str | None) -> None:
        self.counts["unauthenticated"] += 1
        if reason == Reason.REVOKED.value:
            self._bounded(self.revoked, principal or UNRECORDED, t)
        elif reason == Reason.UNTRUSTED_TRUST_DOMAIN.value:
            self.untrusted.add(t)
            if principal is not None:
                self._bounded(self.untrusted_by, principal, t)
        minute = t[:16]
        state = self._burst.get(host)
        if state is None or state[0] != minute:
            if state is not None:
                self._close_burst(host, state)
            elif len(self._burst) >= self.config.max_principals:
                self.counts["burst_hosts_overflow"] += 1
                return
            state = (minute, 0, Counter())
        state[2][reason] += 1
        self._burst[host] = (minute, state[1] + 1, state[2])

    def _close_burst(self, host: str, state: tuple[str, int, Counter[str]]) -> None:
        if state[1] >= self.config.burst_per_minute:
            self.bursts.append((state[1], state[0], host, dict(state[2])))
            if len(self.bursts) > 100:
                self.bursts.sort(key=lambda b: (-b[0], b[1], b[2]))
                self.counts["bursts_dropped"] += len(self.bursts) - 50
                del self.bursts[50:]

    def _bounded(self, table: dict[str, _Seen], key: str, t: str) -> _Seen | None:
        seen = table.get(key)
        if seen is None:
            if len(table) >= self.config.max_principals:
                self.counts["principals_overflow"] += 1
                return None
            seen = table[key] = _Seen()
        seen.add(t)
        return seen

    def _hygiene(self, t: str, rec: Mapping[str, Any], principal: str) -> None:
        cfg = self.config
        td = trust_domain_of(rec)
        if td and self.expected_tds and td not in self.expected_tds:
            self._bounded(self.foreign, td, t)
            sample = self.foreign_principals.setdefault(td, set())
            if len(sample) < 5:
                sample.add(principal)
        if principal in cfg.revoked_principals:
            self._bounded(self.revoked, principal, t)
            if rec.get("decision") == "allow":
                self._bounded(self.revoked_allowed, principal, t)
        if rec.get("identity_source") == IdentitySource.JWT.value:
            self.counts["jwt_records"] += 1
            lifetime = rec.get(TOKEN_LIFETIME_FIELD)
            if isinstance(lifetime, int | float) and not isinstance(lifetime, bool):
                self.counts["jwt_lifetime_records"] += 1
                if cfg.max_token_lifetime is not None and lifetime > cfg.max_token_lifetime:
                    issuer = rec.get("issuer") if isinstance(rec.get("issuer"), str) else ""
                    key = (str(issuer), principal)
                    if key in self.long_tokens or len(self.long_tokens) < cfg.max_principals:
                        self.long_tokens.setdefault(key, _Seen()).add(t)
                        self.long_max[key] = max(self.long_max.get(key, 0.0), float(lifetime))

    def _rate_limited(self, t: str, principal: str, rule: object) -> None:
        if self._bounded(self.limited, principal, t) is None:
            return
        rules = self.limited_rules.setdefault(principal, Counter())
        name = rule if isinstance(rule, str) else "(principal limit)"
        if name in rules or len(rules) < 20:
            rules[name] += 1

    def _denied(self, t: str, rec: Mapping[str, Any], principal: str, host: str | None,
                reason: str) -> None:
        method = rec.get("method")
        key = (principal, host or "-", method if isinstance(method, str) else "-",
               generic_shape(rec.get("path")), reason)
        seen = self.denials.get(key)
        if seen is None:
            if len(self.denials) >= self.config.max_denial_keys:
                self.counts["denial_keys_overflow"] += 1
                return
            seen = self.denials[key] = _Seen()
        seen.add(t)

    # -- the report -------------------------------------------------------------------------

    def report(self) -> Report:
        for host, state in sorted(self._burst.items()):
            self._close_burst(host, state)
        self._burst.clear()
        findings: list[Finding] = []
        changes: dict[str, RuleChange] = {}
        findings += self._grant_findings(changes)
        findings += self._dry_run_findings()
        findings += self._denial_findings()
        findings += self._hygiene_findings(changes)
        findings += self._coverage_findings()
        findings.sort(key=Finding.sort_key)
        return Report(findings, self._summary(), changes)

    def _summary(self) -> dict[str, Any]:
        c = self.counts
        return {
            "policy_version": self.current.policy.version,
            "known_versions": sorted(self.versions),
            "window": {"start": self.config.window_start or None,
                       "end": self.config.window_end or None,
                       "first_record": self.window.first or None,
                       "last_record": self.window.last or None},
            "records": c["records"], "in_window": c["in_window"],
            "outside_window": c["outside_window"], "invalid_records": c["invalid"],
            "by_version": dict(sorted(self.by_version.items())),
            "unknown_versions": dict(sorted(self.unknown_versions.items())),
            "unauthenticated": c["unauthenticated"],
            "allowed_unattributed": c["allowed_unattributed"],
            "allowed_other_rule": c["allowed_other_rule"],
            "overflow": {k: c[k] for k in sorted(c) if k.endswith("overflow") or
                         k == "bursts_dropped"},
        }

    def _grant_findings(self, changes: dict[str, RuleChange]) -> list[Finding]:
        out: list[Finding] = []
        all_hosts_seen = self.counts["hosts_overflow"] > 0
        names = {r.name for r in self.current.policy.rules}
        for name, r in sorted(self.current.rules.items()):
            rule = r.rule
            route = describe_route(rule)
            seen_host = all_hosts_seen or any(h in self.hosts for h in rule.decl.hosts)
            used: list[str] = []
            for e, _ in r.entries:
                use = self.grant_use.get((name, r.sig, e))
                if use is not None:
                    used.append(e.text)
                    continue
                details = {"rule": name, "entry": e.text, "identity": e.resolved,
                           "route": route, "file": rule.source, "owner": rule.owner}
                if not seen_host:
                    out.append(Finding("low", "unused_grant", f"{e.text} -> {name}",
                                       f"{e.text} may call {route} but no decision for "
                                       f"{'/'.join(rule.decl.hosts)} is in the logs (are its "
                                       "logs included?)", details))
                    continue
                sev = "high" if e.resolved == "*" or "*" in e.resolved else "medium"
                out.append(Finding(sev, "unused_grant", f"{e.text} -> {name}",
                                   f"{e.text} may call {route} (rule {name}, {rule.source}) "
                                   "but never did in the window", details))
                change = changes.setdefault(name, RuleChange(name, rule.source))
                change.remove_entries.append(e.text)
            pending = changes.get(name)
            if pending is not None:
                self._maybe_remove_rule(r, pending)
            if used and not rule.dry_run:
                found = self._narrowing(r, names, changes)
                if found is not None:
                    out.append(found)
        return out

    @staticmethod
    def _maybe_remove_rule(r: _Rule, change: RuleChange) -> None:
        left = [e for e, _ in r.entries if e.text not in change.remove_entries]
        change.remove_rule = not left and not r.rule.decl.deny

    def _narrowing(self, r: _Rule, names: set[str],
                   changes: dict[str, RuleChange]) -> Finding | None:
        rule = r.rule
        d = rule.decl
        use = self.rule_use.get((rule.name, r.sig))
        if use is None or "?" in use.methods:
            return None
        granted = set(d.methods) or set(METHODS)
        used_methods = set(use.methods)
        narrower_methods = used_methods < granted
        splits: tuple[Split, ...] = ()
        can_split = (d.path.kind in ("prefix", "template_prefix") and not d.deny and
                     d.limit is None and not use.unshaped and not use.overflow and
                     0 < len(use.shapes) <= self.config.max_split)
        if can_split:
            order = sorted(use.shapes.items(), key=lambda kv: (-sum(kv[1].methods.values()), kv[0]))
            out = []
            for i, (shape, slot) in enumerate(order):
                nm = rule.name if i == 0 else _fresh_name(rule.name, i + 1, names)
                names.add(nm)
                allow = tuple(e for e in d.allow if e in slot.entries)
                out.append(Split(nm, shape, tuple(_ordered(slot.methods)), allow))
            splits = tuple(out)
        if not splits and not narrower_methods:
            return None
        calls = sum(use.methods.values())
        used_desc = ", ".join(
            f"{'/'.join(_ordered(s.methods))} {shape} ({sum(s.methods.values())})"
            for shape, s in sorted(use.shapes.items())
        ) or ", ".join(_ordered(used_methods))
        change = changes.setdefault(rule.name, RuleChange(rule.name, rule.source))
        if splits:
            change.splits = splits
            suggestion = "; ".join(f"{s.name}: {'/'.join(s.methods)} path {s.path}"
                                   for s in splits)
        else:
            change.methods = tuple(_ordered(used_methods))
            suggestion = f"methods: [{', '.join(change.methods)}]"
        return Finding(
            "low", "narrower_use", rule.name,
            f"rule {rule.name} grants {describe_route(rule)}; {calls} calls used only "
            f"{used_desc}: suggest {suggestion}",
            {"rule": rule.name, "file": rule.source, "granted": describe_route(rule),
             "calls": calls, "used_methods": _ordered(used_methods),
             "used_shapes": {s: dict(sorted(v.methods.items()))
                             for s, v in sorted(use.shapes.items())},
             "suggestion": suggestion})

    def _dry_run_findings(self) -> list[Finding]:
        out = []
        for name, r in sorted(self.current.rules.items()):
            if not r.rule.dry_run:
                continue
            dry = self.dry.get((name, r.sig))
            if dry is None or not dry.would_deny.count:
                out.append(Finding("info", "dry_run_ready", name,
                                   f"dry-run rule {name} would have denied no request in the "
                                   "window: switching it to enforce changes no observed decision",
                                   {"rule": name, "file": r.rule.source}))
                continue
            top = ", ".join(f"{p} ({n})" for p, n in _top(dry.principals))
            routes = ", ".join(f"{p} ({n})" for p, n in _top(dry.routes))
            out.append(Finding(
                "medium", "dry_run_not_ready", name,
                f"dry-run rule {name} would have denied {dry.would_deny.count} live requests "
                f"from {len(dry.principals)} principal(s): {top}; routes: {routes}",
                {"rule": name, "file": r.rule.source, **dry.would_deny.as_dict(),
                 "principals": dict(_top(dry.principals, 50)),
                 "routes": dict(_top(dry.routes, 50)), "overflow": dry.overflow}))
        return out

    def _denial_findings(self) -> list[Finding]:
        cfg = self.config
        grouped: dict[tuple[str, str], list[tuple[str, str, str, _Seen]]] = {}
        for (principal, host, method, shape, reason), seen in self.denials.items():
            grouped.setdefault((principal, host), []).append((method, shape, reason, seen))
        out = []
        for (principal, host), rows in sorted(grouped.items()):
            total = sum(s.count for *_, s in rows)
            if total < cfg.min_denials:
                continue
            rows.sort(key=lambda x: (-x[3].count, x[0], x[1], x[2]))
            routes = len({(m, s) for m, s, _, _ in rows})
            probing = routes >= 5
            desc = ", ".join(f"{m} {s} {why} x{seen.count}" for m, s, why, seen in rows[:5])
            out.append(Finding(
                "high" if probing else "medium", "repeated_denials", principal,
                f"{principal} was denied {total} times on {host} across {routes} route(s)"
                f"{' (probing?)' if probing else ''}: {desc}",
                {"host": host, "count": total, "routes": routes,
                 "first": min(s.first for *_, s in rows), "last": max(s.last for *_, s in rows),
                 "top": [{"method": m, "path": s, "reason": why, "count": seen.count}
                         for m, s, why, seen in rows[:10]]}))
        for count, minute, host, reasons in sorted(self.bursts, key=lambda b: (b[1], b[2])):
            out.append(Finding(
                "medium", "unauthenticated_burst", host,
                f"{count} unauthenticated (401) requests to {host} in the minute {minute}Z: "
                + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
                {"host": host, "minute": minute, "count": count, "reasons": reasons}))
        for principal, seen in sorted(self.limited.items()):
            if seen.count < cfg.min_rate_limited:
                continue
            rules = self.limited_rules.get(principal, Counter())
            out.append(Finding(
                "low", "rate_limit_offender", principal,
                f"{principal} was rate limited {seen.count} times ("
                + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) + ")",
                {**seen.as_dict(), "rules": dict(sorted(rules.items()))}))
        return out

    def _hygiene_findings(self, changes: dict[str, RuleChange]) -> list[Finding]:
        cfg = self.config
        out = []
        for td, seen in sorted(self.foreign.items()):
            who = ", ".join(sorted(self.foreign_principals.get(td, ())))
            out.append(Finding(
                "high", "unexpected_trust_domain", td,
                f"{seen.count} decisions for identities of trust domain {td!r}, which the "
                f"policy never names (expected: {', '.join(sorted(self.expected_tds))}): {who}",
                {**seen.as_dict(), "principals": sorted(self.foreign_principals.get(td, ()))}))
        if self.untrusted.count:
            named = sum(s.count for s in self.untrusted_by.values())
            who = ", ".join(f"{p} ({s.count})" for p, s in sorted(self.untrusted_by.items())[:10])
            tail = f": {who}" if who else ""
            if named < self.untrusted.count:
                missing = self.untrusted.count - named
                tail += f"; {missing} without a recorded identity (pre-1.1 logs)"
            out.append(Finding(
                "medium", "untrusted_trust_domain", "(trust domains)",
                f"{self.untrusted.count} requests were refused for an untrusted trust domain"
                f"{tail}",
                {**self.untrusted.as_dict(),
                 "presented": {p: s.count for p, s in sorted(self.untrusted_by.items())}}))
        for principal, seen in sorted(self.revoked.items()):
            allowed = self.revoked_allowed.get(principal)
            if allowed is not None:
                out.append(Finding(
                    "critical", "revoked_allowed", principal,
                    f"{principal} is on the revocation list but was allowed {allowed.count} "
                    f"times (last {allowed.last}); was that before it was revoked?",
                    allowed.as_dict()))
            what = (f"{seen.count} requests presented revoked credentials (a pre-1.1 log does "
                    "not record whose)" if principal == UNRECORDED else
                    f"revoked identity {principal} still made {seen.count} requests")
            out.append(Finding("high", "revoked_still_trying", principal,
                               f"{what} (last {seen.last})", seen.as_dict()))
        for principal in sorted(cfg.revoked_principals):
            grants = []
            for name, r in sorted(self.current.rules.items()):
                for e, pset in r.entries:
                    if e.text != "*" and pset.contains(principal):
                        grants.append(f"{name} ({e.text})")
                        if e.resolved == principal:
                            change = changes.setdefault(name, RuleChange(name, r.rule.source))
                            if e.text not in change.remove_entries:
                                change.remove_entries.append(e.text)
                            self._maybe_remove_rule(r, change)
            if grants:
                out.append(Finding(
                    "medium", "revoked_still_granted", principal,
                    f"revoked identity {principal} is still granted by {', '.join(grants)}",
                    {"grants": grants}))
        jwt, with_lifetime = self.counts["jwt_records"], self.counts["jwt_lifetime_records"]
        if cfg.max_token_lifetime is not None and jwt and not with_lifetime:
            out.append(Finding(
                "info", "token_lifetime_unknown", TOKEN_LIFETIME_FIELD,
                f"{jwt} JWT decisions, none with a token lifetime ('{TOKEN_LIFETIME_FIELD}' "
                "missing: a log older than the field, or tokens without both 'iat' and "
                "'exp'): --max-token-lifetime cannot be checked", {"jwt_records": jwt}))
        for (issuer, principal), seen in sorted(self.long_tokens.items()):
            longest = self.long_max[(issuer, principal)]
            out.append(Finding(
                "medium", "long_lived_token", principal,
                f"{principal} (issuer {issuer}) presented tokens living up to {longest:.0f}s, "
                f"more than {cfg.max_token_lifetime:.0f}s, {seen.count} times",
                {"issuer": issuer, "max_lifetime_s": longest, **seen.as_dict()}))
        return out

    def _coverage_findings(self) -> list[Finding]:
        out = []
        unknown = sum(self.unknown_versions.values())
        if unknown:
            out.append(Finding(
                "low", "unknown_policy_version", "(policy versions)",
                f"{unknown} decisions were made by policy versions not supplied ("
                + ", ".join(f"{v} {n}" for v, n in sorted(self.unknown_versions.items())[:10])
                + "); they are not attributed to any grant: pass those versions with "
                "--policy or --policy-history", {"versions": dict(self.unknown_versions)}))
        return out


def _top(counter: Counter[str], n: int = 5) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _fresh_name(base: str, n: int, names: set[str]) -> str:
    while True:
        suffix = f"-{n}"
        candidate = base[: 64 - len(suffix)].rstrip("-._") + suffix
        if candidate not in names and _NAME.match(candidate):
            return candidate
        n += 1


# --- the suggested patch -------------------------------------------------------------------


class PatchError(ValueError):
    """The suggested policy could not be produced or does not load (a bug: never applied)."""


@dataclass(frozen=True, slots=True)
class Patch:
    diff: str
    files: dict[str, str]  # source -> new text (only the changed files)
    skipped: tuple[str, ...]  # rules that could not be rewritten, with why


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _rule_blocks(text: str, rules: list[LineMap]) -> list[tuple[int, int, int] | None]:
    """(first line index, end index (exclusive), dash column) of each rule item, or None."""
    lines = text.splitlines()
    out: list[tuple[int, int, int] | None] = []
    for i, rule in enumerate(rules):
        start = (rule.line or 0) - 1
        m = re.match(r"^(\s*)-\s", lines[start]) if 0 <= start < len(lines) else None
        if m is None:
            out.append(None)
            continue
        col = len(m.group(1))
        stop = (rules[i + 1].line or 0) - 1 if i + 1 < len(rules) else len(lines)
        end = start + 1
        while end < stop:
            s = lines[end]
            if s.strip() and not s.lstrip().startswith("#") and len(s) - len(s.lstrip()) <= col:
                break
            end += 1
        while end > start + 1 and (not lines[end - 1].strip()
                                   or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        out.append((start, end, col))
    return out


def _rewrite(raw: Mapping[str, Any], change: RuleChange) -> list[dict[str, Any]]:
    base = dict(_plain(raw))  # type: ignore[call-overload]
    if change.remove_rule:
        return []
    allow = [e for e in base.get("allow") or [] if e not in change.remove_entries] \
        if isinstance(base.get("allow"), list) else base.get("allow")
    if isinstance(base.get("allow"), str) and base["allow"] in change.remove_entries:
        allow = []
    if "allow" in base:
        if allow:
            base["allow"] = allow
        else:
            del base["allow"]
    if change.methods is not None:
        base["methods"] = list(change.methods)
    if not change.splits:
        return [base]
    out = []
    kept = set(allow or [])
    for s in change.splits:
        rule: dict[str, Any] = {}
        for key, value in base.items():
            if key in ("path", "path_prefix", "path_regex"):
                rule["path"] = s.path
            elif key == "name":
                rule["name"] = s.name
            elif key == "methods":
                rule["methods"] = list(s.methods)
            elif key == "allow":
                rule["allow"] = [e for e in s.allow if e in kept]
            else:
                rule[key] = value
        if "methods" not in rule:
            rule = {"name": rule.pop("name"), "methods": list(s.methods), **rule}
        if rule.get("allow"):
            out.append(rule)
    return out


def _dump(rules: list[dict[str, Any]], col: int) -> list[str]:
    if not rules:
        return []
    text = yaml.safe_dump(rules, default_flow_style=None, sort_keys=False, width=1000)
    return [" " * col + line for line in text.splitlines()]


def render_patch(report: Report, texts: Mapping[str, str]) -> Patch:
    """A unified diff (`a/<file>` / `b/<file>`, apply with `patch -p1` in the policy directory)
    that makes the changes of `report`. The rewritten rules lose comments inside them."""
    by_source: dict[str, list[RuleChange]] = {}
    for c in report.changes.values():
        by_source.setdefault(c.source, []).append(c)
    files: dict[str, str] = {}
    skipped: list[str] = []
    diffs: list[str] = []
    for source in sorted(by_source):
        text = texts.get(source)
        if text is None:
            skipped += [f"{c.rule}: {source} was not supplied" for c in by_source[source]]
            continue
        data = load_yaml(text, source)
        raw_rules = data.get("rules") if isinstance(data, Mapping) else None
        if not isinstance(raw_rules, list):
            continue
        blocks = _rule_blocks(text, raw_rules)
        wanted = {c.rule: c for c in by_source[source]}
        lines = text.splitlines()
        edits: list[tuple[int, int, list[str]]] = []
        for raw, block in zip(raw_rules, blocks, strict=True):
            change = wanted.get(str(raw.get("name")))
            if change is None:
                continue
            if block is None:
                skipped.append(f"{change.rule}: cannot locate its block in {source}")
                continue
            start, end, col = block
            edits.append((start, end, _dump(_rewrite(raw, change), col)))
        for start, end, new in sorted(edits, reverse=True):
            lines[start:end] = new
        new_text = "\n".join(lines) + ("\n" if text.endswith("\n") or not text else "")
        if new_text == text:
            continue
        files[source] = new_text
        diffs.append("".join(difflib.unified_diff(
            text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            f"a/{source}", f"b/{source}")))
    return Patch("".join(diffs), files, tuple(sorted(skipped)))


def check_patch(texts: Mapping[str, str], patch: Patch, version: str = "suggested") -> \
        CompiledPolicy:
    """Load the patched policy the way `extauthz validate` does; raises PatchError."""
    merged = {**texts, **patch.files}
    try:
        docs = [parse_document(load_yaml(t, s), s) for s, t in sorted(merged.items())]
        return compile_policy(docs, version)
    except PolicyError as exc:
        raise PatchError(f"the suggested policy does not load: {exc}") from exc
