"""Envoy's native RBAC filter expressing the same rules as an extauthz policy directory.

The translation, rule by rule (principals are matched on the mTLS peer's URI SAN, which is
what extauthz's mTLS identity is, too):

* host: `:authority` equal to the host, or the host followed by `:port` (case-insensitive);
* methods: `:method` equal to one of them (none listed: any);
* `path: P`: `url_path` exact P; `path_prefix: P`: `url_path` exact P or prefix `P/` (extauthz
  prefixes are segment-aware: `/v1/orders` does not match `/v1/ordersX`); `path_prefix: /`: any;
* `allow` / `deny`: `principal_name` exact for a SPIFFE ID, a safe regex for a pattern (`*` is
  one segment, a trailing `/**` one or more), `authenticated: {}` for `"*"`;
* enforce-mode deny rules go into a first RBAC filter with action DENY, allow rules into a
  second one with action ALLOW (RBAC has no "first matching rule decides", but "any deny wins,
  then any allow" is what extauthz's evaluation order amounts to);
* anything else (header matches, `when` conditions, path templates or regexes, JWT
  principals) raises `Untranslatable`: the benchmark's policy (policies.py) uses none;
* a dry-run rule allows any authenticated caller on its route and its real content is a
  shadow rule (logged, not enforced). Not reproduced: a dry-run rule overlapping an enforce
  rule on the same route (extauthz then enforces the enforce rule), rate limits and the
  decision cache. Neither matters for the benchmark's request.

    python bench/envoy_rbac.py policy/        # print the two filters as YAML
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from extauthz.policy.compiled import CompiledPolicy, CompiledRule
from extauthz.policy.principals import PrincipalSet
from extauthz.sources.policy_store import load_policy

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_SEGMENT = "[a-zA-Z0-9._-]+"


def _any_of(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {"or_rules": {"rules": items}}


def _header(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {"header": {"name": name, "string_match": match}}


class Untranslatable(ValueError):
    """The rule uses a feature this translation does not express."""


def _permission(rule: CompiledRule) -> dict[str, Any]:
    decl = rule.decl
    if getattr(decl, "headers", ()) or getattr(decl, "when", ""):
        raise Untranslatable(f"rule {rule.name}: header matches and conditions are not translated")
    if decl.path.kind not in ("exact", "prefix") or "{" in decl.path.value:
        raise Untranslatable(f"rule {rule.name}: path kind {decl.path.kind!r} is not translated")
    parts: list[dict[str, Any]] = []
    hosts = []
    for host in decl.hosts:
        hosts.append(_header(":authority", {"exact": host, "ignore_case": True}))
        hosts.append(_header(":authority", {"prefix": f"{host}:", "ignore_case": True}))
    parts.append(_any_of(hosts))
    if decl.methods:
        parts.append(_any_of([_header(":method", {"exact": m}) for m in sorted(decl.methods)]))
    value = decl.path.value
    if decl.path.kind == "exact":
        parts.append({"url_path": {"path": {"exact": value}}})
    elif value != "/":
        parts.append(
            _any_of(
                [
                    {"url_path": {"path": {"exact": value}}},
                    {"url_path": {"path": {"prefix": value + "/"}}},
                ]
            )
        )
    return {"and_rules": {"rules": parts}}


def _principals(who: PrincipalSet) -> list[dict[str, Any]]:
    if getattr(who, "jwt", ()):
        raise Untranslatable("JWT principals have no peer certificate to match in RBAC")
    if who.anyone:
        return [{"authenticated": {}}]
    out: list[dict[str, Any]] = [
        {"authenticated": {"principal_name": {"exact": p}}} for p in sorted(who.exact)
    ]
    for pattern in who.patterns:
        regex = re.escape(f"spiffe://{pattern.trust_domain}")
        for seg in pattern.segments:
            regex += "/" + (_SEGMENT if seg == "*" else re.escape(seg))
        if pattern.open_ended:
            regex += f"(/{_SEGMENT})+"
        out.append({"authenticated": {"principal_name": {"safe_regex": {"regex": regex}}}})
    return out


def _filter(name: str, action: str, policies: dict[str, Any], shadow: dict[str, Any]) -> Any:
    config: dict[str, Any] = {"@type": RBAC_TYPE, "rules": {"action": action, "policies": policies}}
    if shadow:
        config["shadow_rules"] = {"action": action, "policies": shadow}
        config["shadow_rules_stat_prefix"] = "dry_run_"
    return {"name": name, "typed_config": config}


def rbac_filters(policy: CompiledPolicy) -> list[dict[str, Any]]:
    """The HTTP filters (DENY first when there are deny rules, then ALLOW)."""
    deny: dict[str, Any] = {}
    allow: dict[str, Any] = {}
    shadow_allow: dict[str, Any] = {}
    for rule in policy.rules:
        permission = _permission(rule)
        if rule.dry_run:
            allow[rule.name] = {"permissions": [permission], "principals": [{"authenticated": {}}]}
            if rule.allow:
                shadow_allow[rule.name] = {
                    "permissions": [permission],
                    "principals": _principals(rule.allow),
                }
            continue
        if rule.deny:
            deny[rule.name] = {"permissions": [permission], "principals": _principals(rule.deny)}
        if rule.allow:
            allow[rule.name] = {"permissions": [permission], "principals": _principals(rule.allow)}
    filters = []
    if deny:
        filters.append(_filter("envoy.filters.http.rbac.deny", "DENY", deny, {}))
    filters.append(_filter("envoy.filters.http.rbac", "ALLOW", allow, shadow_allow))
    return filters


def rbac_filters_for(directory: Path) -> list[dict[str, Any]]:
    return rbac_filters(load_policy(directory))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/envoy_rbac.py POLICY_DIR")
    target = Path(sys.argv[1])
    yaml.safe_dump(rbac_filters_for(target), sys.stdout, sort_keys=False, width=100)
