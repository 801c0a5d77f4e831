"""Access review, grants: unused grants, narrower use, dry-run readiness, policy versions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import PathMatch
from extauthz.tools.review import Report, ReviewConfig, Reviewer, is_variable, shape_of
from tests.unit.test_review_support import (
    BILLING,
    CART,
    CHECKOUT,
    LEGACY,
    ORDERS_YAML,
    policy_at,
    rec,
)


@pytest.fixture
def policy(tmp_path: Path) -> CompiledPolicy:
    return policy_at(tmp_path / "v1")


def traffic(p: CompiledPolicy) -> list[dict[str, Any]]:
    """checkout reads and creates, billing reads (dry-run lockdown would deny), cart admins."""
    return [
        *(rec(p, CHECKOUT, "GET", f"/v1/orders/{n}", n) for n in range(5)),
        rec(p, CHECKOUT, "POST", "/v1/orders", 10),
        *(rec(p, BILLING, "GET", f"/v1/orders/{n}", 20 + n) for n in range(3)),
        rec(p, CART, "DELETE", "/admin/cache", 30),
    ]


def run(p: CompiledPolicy, records: list[dict[str, Any]], *history: CompiledPolicy,
        **cfg: Any) -> Report:
    return Reviewer(p, history, ReviewConfig(**cfg)).feed_all(records).report()


def kinds(report: Report, kind: str) -> dict[str, Any]:
    return {f.subject: f for f in report.findings if f.kind == kind}


# --- bad input first -------------------------------------------------------------------------


def test_records_without_time_or_reason_are_counted_not_fatal(policy: CompiledPolicy) -> None:
    report = run(policy, [{}, {"time": 5, "reason": "allowed"}, {"time": "x"}])
    assert report.summary["invalid_records"] == 3 and report.summary["in_window"] == 0


def test_decisions_of_unknown_versions_are_counted_never_attributed(
        policy: CompiledPolicy) -> None:
    legacy = rec(policy, LEGACY, "POST", "/v1/orders")
    assert legacy["decision"] == "allow"
    legacy["policy_version"] = "0123456789abcdef"
    no_version = dict(legacy, policy_version=None)
    report = run(policy, [legacy, no_version])
    assert report.summary["unknown_versions"] == {"(none)": 1, "0123456789abcdef": 1}
    assert "legacy -> create-order" in kinds(report, "unused_grant")  # not mis-attributed
    assert "(policy versions)" in kinds(report, "unknown_policy_version")


def test_a_rule_whose_route_changed_does_not_inherit_the_old_use(tmp_path: Path) -> None:
    old = policy_at(tmp_path / "v1")
    new = policy_at(tmp_path / "v2", ORDERS_YAML.replace(
        "path_prefix: /v1/orders\n    allow: [checkout, billing]",
        "path_prefix: /v2/orders\n    allow: [checkout, billing]"))
    assert old.version != new.version
    records = [rec(old, CHECKOUT, "GET", "/v1/orders/1"), rec(old, LEGACY, "POST", "/v1/orders")]
    report = run(new, records, old)
    unused = kinds(report, "unused_grant")
    assert "checkout -> read-orders" in unused  # used only as v1 defined it
    assert "legacy -> create-order" not in unused  # same rule in both versions: counts
    assert report.summary["by_version"] == {old.version: 2}
    assert report.summary["unknown_versions"] == {}
    # Without the old version, the same decisions are unknown, not attributed.
    assert "legacy -> create-order" in kinds(run(new, records), "unused_grant")


# --- unused grants ---------------------------------------------------------------------------


def test_a_grant_never_exercised_is_an_unused_grant(policy: CompiledPolicy) -> None:
    report = run(policy, traffic(policy))
    unused = kinds(report, "unused_grant")
    assert sorted(unused) == ["legacy -> create-order"]
    f = unused["legacy -> create-order"]
    assert f.severity == "medium" and f.details["identity"] == LEGACY
    assert report.changes["create-order"].remove_entries == ["legacy"]


def test_dry_run_decisions_count_as_use_of_every_rule_that_allows_the_caller(
        policy: CompiledPolicy) -> None:
    billing = rec(policy, BILLING, "GET", "/v1/orders/1")
    assert (billing["reason"], billing["rule"]) == ("dry_run_would_deny", "lockdown")
    report = run(policy, [billing, *(rec(policy, CHECKOUT, "POST", "/v1/orders"),)])
    assert "billing -> read-orders" not in kinds(report, "unused_grant")


def test_a_grant_on_a_host_absent_from_the_logs_is_low_and_not_patched(
        policy: CompiledPolicy) -> None:
    other = rec(policy, CHECKOUT, "GET", "/x", host="elsewhere.mesh")
    report = run(policy, [other])
    unused = kinds(report, "unused_grant")
    assert unused["legacy -> create-order"].severity == "low"
    assert "are its logs included" in unused["legacy -> create-order"].message
    assert report.changes == {}


def test_an_unused_wildcard_grant_is_high(tmp_path: Path) -> None:
    p = policy_at(tmp_path, ORDERS_YAML.replace("allow: [shop]", "allow: ['*']"))
    report = run(p, traffic(p)[:1])
    assert kinds(report, "unused_grant")["* -> admin"].severity == "high"


def test_the_window_excludes_older_and_newer_decisions(policy: CompiledPolicy) -> None:
    records = traffic(policy)
    report = run(policy, records, window_start="2024-05-01T12:00:15.000000Z",
                 window_end="2024-05-01T12:00:25.000000Z")
    assert report.summary["in_window"] == 3 and report.summary["outside_window"] == 7
    assert "checkout -> read-orders" in kinds(report, "unused_grant")


# --- narrower use ----------------------------------------------------------------------------


def test_a_prefix_grant_used_narrowly_suggests_the_narrow_rule(policy: CompiledPolicy) -> None:
    report = run(policy, traffic(policy))
    f = kinds(report, "narrower_use")["read-orders"]
    assert "GET /v1/orders/{id}" in f.message and f.details["used_methods"] == ["GET"]
    change = report.changes["read-orders"]
    assert [(s.name, s.path, s.methods, s.allow) for s in change.splits] == [
        ("read-orders", "/v1/orders/{id}", ("GET",), ("checkout", "billing"))]


def test_too_many_shapes_narrow_the_methods_only(policy: CompiledPolicy) -> None:
    records = [rec(policy, CHECKOUT, "GET", f"/v1/orders/{n}/{seg}") for n, seg in
               enumerate(["a", "b", "c", "d"])]
    change = run(policy, records, max_split=3).changes["read-orders"]
    assert change.splits == () and change.methods == ("GET",)


def test_shapes_per_rule_are_capped_and_overflow_blocks_path_narrowing(
        policy: CompiledPolicy) -> None:
    records = [rec(policy, CHECKOUT, "GET", f"/v1/orders/{w}") for w in
               ("alpha", "beta", "gamma", "delta", "eps")]
    reviewer = Reviewer(policy, (), ReviewConfig(max_shapes_per_rule=2)).feed_all(records)
    use = next(iter(reviewer.rule_use.values()))
    assert len(use.shapes) == 2 and use.overflow == 3
    assert reviewer.report().changes["read-orders"].splits == ()


def test_any_method_rules_suggest_the_methods_used(policy: CompiledPolicy) -> None:
    records = [rec(policy, CART, "DELETE", "/admin/cache", n) for n in range(2)]
    change = run(policy, records).changes["admin"]
    assert change.splits[0].methods == ("DELETE",) and change.splits[0].path == "/admin/cache"


def test_shapes_keep_the_rules_own_segments_and_unique_names() -> None:
    assert shape_of("/api/2024/x/7", PathMatch("prefix", "/api/2024")) == "/api/2024/x/{id}"
    tpl = PathMatch("template_prefix", "/t/{id}")
    assert shape_of("/t/acme/9/8", tpl) == "/t/{id}/{id_}/{id2}"
    assert shape_of("/v1/orders/550e8400-e29b-41d4-a716-446655440000") == "/v1/orders/{id}"
    assert shape_of("/v1/a//b") is None and shape_of("/v1/%41") is None
    assert shape_of("/" + "/".join("s" * 17)) is None
    assert not is_variable("v2beta1") and is_variable("sku-1") and not is_variable("orders")


# --- dry-run readiness -----------------------------------------------------------------------


def test_a_dry_run_rule_that_would_deny_live_requests_is_not_ready(
        policy: CompiledPolicy) -> None:
    f = kinds(run(policy, traffic(policy)), "dry_run_not_ready")["lockdown"]
    assert f.severity == "medium" and f.details["count"] == 3
    assert f.details["principals"] == {BILLING: 3}
    assert f.details["routes"] == {"GET /v1/orders/{id}": 3}


def test_a_dry_run_rule_that_would_deny_nothing_is_ready(policy: CompiledPolicy) -> None:
    records = [r for r in traffic(policy) if r["principal"] != BILLING]
    report = run(policy, records)
    assert "lockdown" in kinds(report, "dry_run_ready")
    assert not kinds(report, "dry_run_not_ready")


# --- determinism and bounds --------------------------------------------------------------------


def test_the_report_does_not_depend_on_record_order(policy: CompiledPolicy) -> None:
    records = traffic(policy) * 3
    shuffled = list(records)
    random.Random(7).shuffle(shuffled)
    a, b = run(policy, records), run(policy, shuffled)
    assert [f.as_dict() for f in a.findings] == [f.as_dict() for f in b.findings]
    assert a.summary == b.summary


def test_memory_is_bounded_by_caps_not_by_the_log(policy: CompiledPolicy) -> None:
    strangers = [rec(policy, f"spiffe://prod.example/ns/x/sa/s{n}", "GET", f"/nope/{n}/q{n}")
                 for n in range(300)]
    reviewer = Reviewer(policy, (), ReviewConfig(max_denial_keys=50, max_principals=20))
    reviewer.feed_all(strangers)
    assert len(reviewer.denials) == 50
    assert reviewer.counts["denial_keys_overflow"] == 250
    assert reviewer.report().summary["overflow"]["denial_keys_overflow"] == 250


def test_dry_run_records_of_log_1_1_name_the_rule_that_allowed(policy: CompiledPolicy) -> None:
    billing = rec(policy, BILLING, "GET", "/v1/orders/1")
    assert billing["allow_rule"] == "read-orders"
    report = run(policy, [billing])
    assert "billing -> read-orders" not in kinds(report, "unused_grant")
    misattributed = {**billing, "allow_rule": "create-order"}  # billing has no entry there
    report = run(policy, [misattributed])
    assert "billing -> read-orders" in kinds(report, "unused_grant")
