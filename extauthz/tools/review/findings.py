"""The findings of a review, computed from a `Tally` once every record is in."""

from __future__ import annotations

import re
from collections import Counter

from extauthz.policy.document import METHODS
from extauthz.tools.review.attribution import IndexedRule
from extauthz.tools.review.results import (
    TOKEN_LIFETIME_FIELD,
    UNRECORDED,
    Finding,
    RuleChange,
    Split,
)
from extauthz.tools.review.shapes import describe_route, ordered
from extauthz.tools.review.tally import Seen, Tally

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")


def grant_findings(t: Tally, changes: dict[str, RuleChange]) -> list[Finding]:
    out: list[Finding] = []
    all_hosts_seen = t.counts["hosts_overflow"] > 0
    names = {r.name for r in t.current.policy.rules}
    for name, r in sorted(t.current.rules.items()):
        rule = r.rule
        route = describe_route(rule)
        seen_host = all_hosts_seen or any(h in t.hosts for h in rule.decl.hosts)
        used: list[str] = []
        for e, _ in r.entries:
            use = t.grant_use.get((name, r.sig, e))
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
            maybe_remove_rule(r, pending)
        if used and not rule.dry_run:
            found = narrowing(t, r, names, changes)
            if found is not None:
                out.append(found)
            out += caller_narrowing(t, r)
    return out


def caller_narrowing(t: Tally, r: IndexedRule) -> list[Finding]:
    """Per caller: an allow entry that used fewer methods than the rule grants it, where the
    rule as a whole used more (otherwise the rule's own narrowing says it). Reported, not
    patched: giving one caller a rule of its own is a design choice for the owner."""
    rule = r.rule
    granted = set(rule.decl.methods) or set(METHODS)
    per_entry = {e: m for e, _ in r.entries
                 if (m := t.grant_methods.get((rule.name, r.sig, e)))}
    used_by = {e: set(m) for e, m in per_entry.items()}
    if any("?" in m for m in used_by.values()):
        return []
    everyone = set().union(*used_by.values()) if used_by else set()
    out = []
    for e, methods in used_by.items():
        if not methods < granted or methods == everyone:
            continue
        calls = sum(per_entry[e].values())
        out.append(Finding(
            "low", "narrower_use_by_caller", f"{e.text} -> {rule.name}",
            f"{e.text} may call {'/'.join(ordered(granted))} via rule {rule.name} "
            f"({describe_route(rule)}) but used only {'/'.join(ordered(methods))} in "
            f"{calls} calls (the rule's other callers used "
            f"{'/'.join(ordered(everyone - methods)) or 'the same'}): suggest a rule of its "
            f"own with methods: [{', '.join(ordered(methods))}]",
            {"rule": rule.name, "file": rule.source, "entry": e.text,
             "granted": ordered(granted), "used": ordered(methods), "calls": calls}))
    return out


def maybe_remove_rule(r: IndexedRule, change: RuleChange) -> None:
    left = [e for e, _ in r.entries if e.text not in change.remove_entries]
    change.remove_rule = not left and not r.rule.decl.deny


def narrowing(t: Tally, r: IndexedRule, names: set[str],
               changes: dict[str, RuleChange]) -> Finding | None:
    rule = r.rule
    d = rule.decl
    use = t.rule_use.get((rule.name, r.sig))
    if use is None or "?" in use.methods:
        return None
    shapes = use.merged_shapes(d.path)
    granted = set(d.methods) or set(METHODS)
    used_methods = set(use.methods)
    narrower_methods = used_methods < granted
    splits: tuple[Split, ...] = ()
    can_split = (d.path.kind in ("prefix", "template_prefix") and not d.deny and
                 d.limit is None and not use.unshaped and not use.overflow and
                 0 < len(shapes) <= t.config.max_split)
    if can_split:
        order = sorted(shapes.items(), key=lambda kv: (-sum(kv[1].methods.values()), kv[0]))
        out = []
        for i, (shape, slot) in enumerate(order):
            nm = rule.name if i == 0 else _fresh_name(rule.name, i + 1, names)
            names.add(nm)
            allow = tuple(e for e in d.allow if e in slot.entries)
            out.append(Split(nm, shape, tuple(ordered(slot.methods)), allow))
        splits = tuple(out)
    if not splits and not narrower_methods:
        return None
    calls = sum(use.methods.values())
    used_desc = ", ".join(
        f"{'/'.join(ordered(s.methods))} {shape} ({sum(s.methods.values())})"
        for shape, s in sorted(shapes.items())
    ) or ", ".join(ordered(used_methods))
    change = changes.setdefault(rule.name, RuleChange(rule.name, rule.source))
    if splits:
        change.splits = splits
        suggestion = "; ".join(f"{s.name}: {'/'.join(s.methods)} path {s.path}"
                               for s in splits)
    else:
        change.methods = tuple(ordered(used_methods))
        suggestion = f"methods: [{', '.join(change.methods)}]"
    return Finding(
        "low", "narrower_use", rule.name,
        f"rule {rule.name} grants {describe_route(rule)}; {calls} calls used only "
        f"{used_desc}: suggest {suggestion}",
        {"rule": rule.name, "file": rule.source, "granted": describe_route(rule),
         "calls": calls, "used_methods": ordered(used_methods),
         "used_shapes": {s: dict(sorted(v.methods.items()))
                         for s, v in sorted(shapes.items())},
         "suggestion": suggestion})


def dry_run_findings(t: Tally) -> list[Finding]:
    out = []
    for name, r in sorted(t.current.rules.items()):
        if not r.rule.dry_run:
            continue
        dry = t.dry.get((name, r.sig))
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


def denial_findings(t: Tally) -> list[Finding]:
    cfg = t.config
    grouped: dict[tuple[str, str], list[tuple[str, str, str, Seen]]] = {}
    for (principal, host, method, shape, reason), seen in t.denials.items():
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
    for count, minute, host, reasons in sorted(t.bursts, key=lambda b: (b[1], b[2])):
        out.append(Finding(
            "medium", "unauthenticated_burst", host,
            f"{count} unauthenticated (401) requests to {host} in the minute {minute}Z: "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
            {"host": host, "minute": minute, "count": count, "reasons": reasons}))
    for principal, seen in sorted(t.limited.items()):
        if seen.count < cfg.min_rate_limited:
            continue
        rules = t.limited_rules.get(principal, Counter())
        out.append(Finding(
            "low", "rate_limit_offender", principal,
            f"{principal} was rate limited {seen.count} times ("
            + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) + ")",
            {**seen.as_dict(), "rules": dict(sorted(rules.items()))}))
    return out


def hygiene_findings(t: Tally, changes: dict[str, RuleChange]) -> list[Finding]:
    cfg = t.config
    out = []
    for td, seen in sorted(t.foreign.items()):
        who = ", ".join(sorted(t.foreign_principals.get(td, ())))
        out.append(Finding(
            "high", "unexpected_trust_domain", td,
            f"{seen.count} decisions for identities of trust domain {td!r}, which the "
            f"policy never names (expected: {', '.join(sorted(t.expected_tds))}): {who}",
            {**seen.as_dict(), "principals": sorted(t.foreign_principals.get(td, ()))}))
    if t.untrusted.count:
        named = sum(s.count for s in t.untrusted_by.values())
        who = ", ".join(f"{p} ({s.count})" for p, s in sorted(t.untrusted_by.items())[:10])
        tail = f": {who}" if who else ""
        if named < t.untrusted.count:
            missing = t.untrusted.count - named
            tail += f"; {missing} without a recorded identity (pre-1.1 logs)"
        out.append(Finding(
            "medium", "untrusted_trust_domain", "(trust domains)",
            f"{t.untrusted.count} requests were refused for an untrusted trust domain"
            f"{tail}",
            {**t.untrusted.as_dict(),
             "presented": {p: s.count for p, s in sorted(t.untrusted_by.items())}}))
    for principal, seen in sorted(t.revoked.items()):
        allowed = t.revoked_allowed.get(principal)
        if allowed is not None:
            out.append(Finding(
                "critical", "revoked_allowed", principal,
                f"{principal} is on the revocation list but was allowed {allowed.count} "
                f"times (last {allowed.last}); was that before it was revoked?",
                allowed.as_dict()))
        refused = t.revoked_refused.get(principal)
        n_refused = refused.count if refused is not None else 0
        n_allowed = allowed.count if allowed is not None else 0
        split = {"refused": n_refused, "allowed": n_allowed,
                 "denied": seen.count - n_refused - n_allowed}
        what = (f"{seen.count} requests presented revoked credentials (a pre-1.1 log does "
                "not record whose)" if principal == UNRECORDED else
                f"revoked identity {principal} still made {seen.count} requests ("
                + ", ".join(f"{n} {k}" for k, n in split.items() if n) + ")")
        out.append(Finding("high", "revoked_still_trying", principal,
                           f"{what} (last {seen.last})", {**seen.as_dict(), **split}))
    for principal in sorted(cfg.revoked_principals):
        grants = []
        for name, r in sorted(t.current.rules.items()):
            for e, pset in r.entries:
                if e.text != "*" and pset.contains(principal):
                    grants.append(f"{name} ({e.text})")
                    if e.resolved == principal:
                        change = changes.setdefault(name, RuleChange(name, r.rule.source))
                        if e.text not in change.remove_entries:
                            change.remove_entries.append(e.text)
                        maybe_remove_rule(r, change)
        if grants:
            out.append(Finding(
                "medium", "revoked_still_granted", principal,
                f"revoked identity {principal} is still granted by {', '.join(grants)}",
                {"grants": grants}))
    jwt, with_lifetime = t.counts["jwt_records"], t.counts["jwt_lifetime_records"]
    if cfg.max_token_lifetime is not None and jwt and not with_lifetime:
        out.append(Finding(
            "info", "token_lifetime_unknown", TOKEN_LIFETIME_FIELD,
            f"{jwt} JWT decisions, none with a token lifetime ('{TOKEN_LIFETIME_FIELD}' "
            "missing: a log older than the field, or tokens without both 'iat' and "
            "'exp'): --max-token-lifetime cannot be checked", {"jwt_records": jwt}))
    for (issuer, principal), seen in sorted(t.long_tokens.items()):
        longest = t.long_max[(issuer, principal)]
        out.append(Finding(
            "medium", "long_lived_token", principal,
            f"{principal} (issuer {issuer}) presented tokens living up to {longest:.0f}s, "
            f"more than {cfg.max_token_lifetime:.0f}s, {seen.count} times",
            {"issuer": issuer, "max_lifetime_s": longest, **seen.as_dict()}))
    return out


def coverage_findings(t: Tally) -> list[Finding]:
    out = []
    unknown = sum(t.unknown_versions.values())
    if unknown:
        out.append(Finding(
            "low", "unknown_policy_version", "(policy versions)",
            f"{unknown} decisions were made by policy versions not supplied ("
            + ", ".join(f"{v} {n}" for v, n in sorted(t.unknown_versions.items())[:10])
            + "); they are not attributed to any grant: pass those versions with "
            "--policy or --policy-history", {"versions": dict(t.unknown_versions)}))
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
