"""`extauthz doctor`: find the unsafe ext_authz settings in the Envoy config an operator runs.

Pure analysis: the input is an already-parsed Envoy bootstrap or admin `/config_dump` (a dict
from YAML or JSON) and, optionally, a few facts about the policy; the output is a sorted list of
findings, each with a stable id, a severity, the JSONPath of the offending field, the thing it
is about by name or position, and (from the catalog) why it matters and the fix. Reading files,
fetching from a live Envoy and printing belong to `extauthz.cli.doctor`.

The jobs, one module each: `catalog` (ids, reasons, fixes), `parsing` (Envoy's spelling rules
into envoy-data-plane's typed classes), `inputs` (bootstrap or config dump → one inventory),
`analysis` / `http_checks` / `route_checks` (the walk), `routes` (what a route match opens),
`render` (text, JSON, SARIF), `admin` (the loopback-only fetch from a running Envoy).

Paths use proto field names (`snake_case`), JSONPath style:
`$.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[1]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extauthz.tools.doctor.analysis import Doctor
from extauthz.tools.doctor.catalog import CHECKS, Check
from extauthz.tools.doctor.envoy import domain_matches
from extauthz.tools.doctor.inputs import Inventory, load
from extauthz.tools.doctor.parsing import DoctorError
from extauthz.tools.doctor.policy_facts import PolicyFacts
from extauthz.tools.doctor.render import at_or_above, render_json, render_sarif, render_text
from extauthz.tools.findings import Finding, Severity

__all__ = [
    "CHECKS",
    "Check",
    "DoctorError",
    "Finding",
    "Inventory",
    "PolicyFacts",
    "Severity",
    "at_or_above",
    "describe_input",
    "diagnose",
    "diagnose_inventory",
    "domain_matches",
    "load",
    "render_json",
    "render_sarif",
    "render_text",
]


def diagnose_inventory(inv: Inventory, policy: PolicyFacts | None = None) -> list[Finding]:
    """All findings for a loaded inventory, sorted (most severe first, then by path)."""
    return Doctor(inv, policy).run()


def diagnose(raw: Mapping[str, Any], policy: PolicyFacts | None = None) -> list[Finding]:
    """All findings for a parsed Envoy bootstrap or `/config_dump`."""
    return diagnose_inventory(load(raw), policy)


def describe_input(inv: Inventory) -> str:
    """One line saying what was read, so an empty report is never mistaken for 'all fine'
    about things that were not there."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    kind = "an admin /config_dump" if inv.source == "config_dump" else "a bootstrap"
    parts = [n(len(inv.listeners), "listener"), n(len(inv.clusters), "cluster")]
    if inv.route_configs:
        parts.append(n(len(inv.route_configs), "route configuration"))
    if inv.ecds:
        parts.append(n(len(inv.ecds), "ECDS filter config"))
    return f"{kind} with {', '.join(parts)}"
