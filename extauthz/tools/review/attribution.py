"""One policy version indexed for attribution: which allow entries of a rule name a caller.

A decision-log record names its caller (principal, issuer, identity source) and the policy
version that decided; the grant it exercised is (rule, allow entry) *as that version defined
it* (`RouteSig`: hosts, methods, path, mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import Identity, IdentitySource
from extauthz.policy.compiled import CompiledPolicy, CompiledRule
from extauthz.policy.principals import PrincipalSet

RouteSig = tuple[tuple[str, ...], tuple[str, ...], str, str, str]
_MATCH_CACHE = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    text: str  # as written in the allow list
    resolved: str  # the identity it names: SPIFFE ID/pattern, jwt issuer|subject|claims, "*"


@dataclass(frozen=True, slots=True)
class IndexedRule:
    rule: CompiledRule
    sig: RouteSig
    entries: tuple[tuple[Entry, PrincipalSet], ...]


def route_sig(rule: CompiledRule) -> RouteSig:
    d = rule.decl
    return (d.hosts, tuple(sorted(d.methods)), d.path.kind, d.path.value, d.mode)


def allow_entries(rule: CompiledRule,
                  policy: CompiledPolicy) -> tuple[tuple[Entry, PrincipalSet], ...]:
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


class Version:
    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self.rules = {r.name: IndexedRule(r, route_sig(r), allow_entries(r, policy))
                      for r in policy.rules}


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


class EntryMatcher:
    """Memoized: the allow entries of a rule that name a record's caller (bounded memo)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[object, ...], tuple[Entry, ...]] = {}

    def entries(self, version: Version, r: IndexedRule,
                    rec: Mapping[str, Any]) -> tuple[Entry, ...] | None:
        """The allow entries of `r` naming the record's caller (None: no caller)."""
        key = (version.policy.version, r.rule.name, rec.get("principal"), rec.get("issuer"),
               rec.get("identity_source"))
        found = self._memo.get(key)
        if found is None:
            ident = identity_of(rec)
            if ident is None:
                return None
            found = tuple(e for e, pset in r.entries if pset.contains(ident))
            if not found and ident.source is IdentitySource.JWT:
                found = tuple(e for e, pset in r.entries
                              if any(m.issuer == ident.issuer and not m.subject
                                     for m in pset.jwt))
            if len(self._memo) >= _MATCH_CACHE:
                self._memo.clear()
            self._memo[key] = found
        return found
