"""Streaming aggregation of decision-log records: counts keyed by what the policy bounds.

Memory is bounded whatever the size of the log: everything is aggregated by keys bounded by
the policy (grant = rule x allow entry; route shapes per rule and caller, capped) or by
explicit caps (principals, denial keys, unknown versions); what does not fit is counted as
overflow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from extauthz.model import IdentitySource, Reason
from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import METHODS, PathMatch
from extauthz.tools.review.attribution import (
    Entry,
    EntryMatcher,
    IndexedRule,
    RouteSig,
    Version,
    policy_trust_domains,
    trust_domain_of,
)
from extauthz.tools.review.results import TOKEN_LIFETIME_FIELD, UNRECORDED, ReviewConfig
from extauthz.tools.review.shapes import SlugLearner, generic_shape

EXERCISE = frozenset({Reason.ALLOWED.value, Reason.RATE_LIMITED.value})
DENIALS = frozenset({Reason.PRINCIPAL_NOT_ALLOWED.value, Reason.NO_MATCHING_RULE.value,
                     Reason.CONDITION_NOT_MET.value,
                     Reason.DENIED_BY_RULE.value, Reason.METHOD_OVERRIDE.value})


class Seen:
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
class RuleUse:
    methods: Counter[str] = field(default_factory=Counter)
    shapes: dict[str, _Shape] = field(default_factory=dict)
    unshaped: int = 0  # uses whose path cannot become a template
    overflow: int = 0  # uses on shapes past the cap
    learner: SlugLearner = field(default_factory=SlugLearner)

    def merged_shapes(self, base: PathMatch) -> dict[str, _Shape]:
        """The recorded shapes with every position learned since generalised, merged."""
        out: dict[str, _Shape] = {}
        for shape, slot in self.shapes.items():
            merged = out.setdefault(self.learner.reshape(shape, base), _Shape())
            merged.methods.update(slot.methods)
            merged.entries.update(slot.entries)
        return out


@dataclass(slots=True)
class _DryUse:
    would_deny: Seen = field(default_factory=Seen)
    principals: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    overflow: int = 0


class Tally:
    """Feed records one at a time; the findings are computed from what it holds."""

    def __init__(self, policy: CompiledPolicy, history: Sequence[CompiledPolicy] = (),
                 config: ReviewConfig | None = None) -> None:
        self.config = config or ReviewConfig()
        self.current = Version(policy)
        self.versions: dict[str, Version] = {policy.version: self.current}
        for old in history:
            self.versions.setdefault(old.version, Version(old))
        self.expected_tds = self.config.trust_domains or policy_trust_domains(policy)
        self.counts: Counter[str] = Counter()
        self.window = Seen()
        self.by_version: Counter[str] = Counter()
        self.unknown_versions: Counter[str] = Counter()
        self.hosts: set[str] = set()
        self.grant_use: dict[tuple[str, RouteSig, Entry], Seen] = {}
        self.grant_methods: dict[tuple[str, RouteSig, Entry], Counter[str]] = {}
        self.rule_use: dict[tuple[str, RouteSig], RuleUse] = {}
        self.dry: dict[tuple[str, RouteSig], _DryUse] = {}
        self.denials: dict[tuple[str, str, str, str, str], Seen] = {}
        self.limited: dict[str, Seen] = {}
        self.limited_rules: dict[str, Counter[str]] = {}
        self.revoked: dict[str, Seen] = {}
        self.revoked_allowed: dict[str, Seen] = {}
        self.revoked_refused: dict[str, Seen] = {}  # 401 revoked: refused before any rule
        self.untrusted = Seen()
        self.untrusted_by: dict[str, Seen] = {}
        self.foreign: dict[str, Seen] = {}
        self.foreign_principals: dict[str, set[str]] = {}
        self.long_tokens: dict[tuple[str, str], Seen] = {}
        self.long_max: dict[tuple[str, str], float] = {}
        self.bursts: list[tuple[int, str, str, dict[str, int]]] = []
        self._burst: dict[str, tuple[str, int, Counter[str]]] = {}
        self._matcher = EntryMatcher()

    def feed_all(self, records: Iterable[Mapping[str, Any]]) -> Self:
        for rec in records:
            self.feed(rec)
        return self

    def feed(self, rec: Mapping[str, Any]) -> None:
        """One record: who it was about (identity hygiene, refusals, denials, limits), then
        which grant it exercised, judged by the policy version that decided it."""
        admitted = self._admit(rec)
        if admitted is None:
            return
        t, reason = admitted
        host = self._host(rec)
        principal = rec.get("principal")
        if not isinstance(principal, str) or not principal:
            principal = None
        self._caller(t, rec, reason, host, principal)
        known = self._version(rec, reason)
        if known is None or principal is None:
            return
        rule = rec.get("rule")
        if reason in EXERCISE or (reason == Reason.INTERNAL_ERROR.value and rule):
            self._exercise(t, rec, known, rule)
        elif reason == Reason.DRY_RUN.value:
            self._dry_run(t, rec, known, rule, principal)

    def _admit(self, rec: Mapping[str, Any]) -> tuple[str, str] | None:
        """(time, reason) of a well-formed record inside the window; None otherwise."""
        cfg, counts = self.config, self.counts
        counts["records"] += 1
        t = rec.get("time")
        reason = rec.get("reason")
        if not isinstance(t, str) or not isinstance(reason, str):
            counts["invalid"] += 1
            return None
        if (cfg.window_start and t < cfg.window_start) or (cfg.window_end and t >= cfg.window_end):
            counts["outside_window"] += 1
            return None
        counts["in_window"] += 1
        self.window.add(t)
        return t, reason

    def _host(self, rec: Mapping[str, Any]) -> str | None:
        host = rec.get("host") if isinstance(rec.get("host"), str) else None
        if host is not None and host not in self.hosts:
            if len(self.hosts) < self.config.max_principals:
                self.hosts.add(host)
            else:
                self.counts["hosts_overflow"] += 1
        return host

    def _caller(self, t: str, rec: Mapping[str, Any], reason: str, host: str | None,
                principal: str | None) -> None:
        if rec.get("status") == 401:
            # Since decision-log 1.1, a revoked or foreign identity that was presented (and
            # refused) is logged as `presented_principal`.
            presented = rec.get("presented_principal")
            if not isinstance(presented, str) or not presented:
                presented = principal
            self._unauthenticated(t, host or "-", reason, presented)
        elif principal is not None:
            self._hygiene(t, rec, principal)
        if principal is None:
            return
        if reason == Reason.RATE_LIMITED.value:
            self._rate_limited(t, principal, rec.get("rule"))
        if reason in DENIALS:
            self._denied(t, rec, principal, host, reason)

    def _version(self, rec: Mapping[str, Any], reason: str) -> Version | None:
        """The supplied policy version that decided the record; unknown ones are counted."""
        version = rec.get("policy_version")
        known = self.versions.get(version) if isinstance(version, str) else None
        if known is None:
            if reason != Reason.POLICY_NOT_LOADED.value:
                key = version if isinstance(version, str) else "(none)"
                if key in self.unknown_versions or len(self.unknown_versions) < 1000:
                    self.unknown_versions[key] += 1
                else:
                    self.counts["unknown_versions_overflow"] += 1
            return None
        self.by_version[known.policy.version] += 1
        return known

    def _use(self, t: str, rec: Mapping[str, Any], r: IndexedRule,
             entries: tuple[Entry, ...]) -> None:
        name, sig = r.rule.name, r.sig
        method = rec.get("method")
        method = method if isinstance(method, str) and method in METHODS else "?"
        for e in entries:
            seen = self.grant_use.get((name, sig, e))
            if seen is None:
                seen = self.grant_use[(name, sig, e)] = Seen()
                self.grant_methods[(name, sig, e)] = Counter()
            seen.add(t)
            self.grant_methods[(name, sig, e)][method] += 1  # per caller: bounded by METHODS
        use = self.rule_use.get((name, sig))
        if use is None:
            use = self.rule_use[(name, sig)] = RuleUse()
        use.methods[method] += 1
        path = r.rule.decl.path
        if path.kind not in ("prefix", "template_prefix"):
            return
        raw = rec.get("path")
        shape = (use.learner.shape(raw, path) if isinstance(raw, str) and raw.startswith("/")
                 else None)
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

    def _exercise(self, t: str, rec: Mapping[str, Any], v: Version, rule: object) -> None:
        r = v.rules.get(rule) if isinstance(rule, str) else None
        if r is None:
            self.counts["allowed_other_rule"] += 1  # e.g. a connection rule
            return
        entries = self._matcher.entries(v, r, rec)
        if not entries:
            self.counts["allowed_unattributed"] += 1
            return
        self._use(t, rec, r, entries)

    def _dry_run(self, t: str, rec: Mapping[str, Any], v: Version, rule: object,
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
            entries = self._matcher.entries(v, exact, rec)
            if entries:
                self._use(t, rec, exact, entries)
            return
        for cand in v.policy.candidates(host, method, path):
            cr = v.rules.get(cand.name)
            if cr is not None and cr.entries:
                entries = self._matcher.entries(v, cr, rec)
                if entries:
                    self._use(t, rec, cr, entries)

    def _unauthenticated(self, t: str, host: str, reason: str, principal: str | None) -> None:
        self.counts["unauthenticated"] += 1
        if reason == Reason.REVOKED.value:
            self._bounded(self.revoked, principal or UNRECORDED, t)
            self._bounded(self.revoked_refused, principal or UNRECORDED, t)
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

    def close(self) -> None:
        """End of input: close the per-host minute windows still open."""
        for host, state in sorted(self._burst.items()):
            self._close_burst(host, state)
        self._burst.clear()

    def _close_burst(self, host: str, state: tuple[str, int, Counter[str]]) -> None:
        if state[1] >= self.config.burst_per_minute:
            self.bursts.append((state[1], state[0], host, dict(state[2])))
            if len(self.bursts) > 100:
                self.bursts.sort(key=lambda b: (-b[0], b[1], b[2]))
                self.counts["bursts_dropped"] += len(self.bursts) - 50
                del self.bursts[50:]

    def _bounded(self, table: dict[str, Seen], key: str, t: str) -> Seen | None:
        seen = table.get(key)
        if seen is None:
            if len(table) >= self.config.max_principals:
                self.counts["principals_overflow"] += 1
                return None
            seen = table[key] = Seen()
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
                        self.long_tokens.setdefault(key, Seen()).add(t)
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
            seen = self.denials[key] = Seen()
        seen.add(t)

    def summary(self) -> dict[str, Any]:
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
