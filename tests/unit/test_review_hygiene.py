"""Access review: suspicious denials and credential hygiene."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extauthz.model import IdentitySource, Reason
from extauthz.policy.compiled import CompiledPolicy
from extauthz.tools.review import TOKEN_LIFETIME_FIELD, Report, ReviewConfig, Reviewer
from tests.unit.test_review_support import BILLING, CHECKOUT, LEGACY, policy_at, rec

EVIL = "spiffe://evil.example/ns/shop/sa/checkout"
ISSUER = "https://idp.example"


@pytest.fixture
def policy(tmp_path: Path) -> CompiledPolicy:
    return policy_at(tmp_path / "p")


def run(p: CompiledPolicy, records: list[dict[str, Any]], **cfg: Any) -> Report:
    return Reviewer(p, (), ReviewConfig(**cfg)).feed_all(records).report()


def kinds(report: Report, kind: str) -> dict[str, Any]:
    return {f.subject: f for f in report.findings if f.kind == kind}


# --- suspicious denials ----------------------------------------------------------------------


def test_denials_below_the_threshold_are_not_reported(policy: CompiledPolicy) -> None:
    records = [rec(policy, BILLING, "DELETE", f"/v1/orders/{n}", n) for n in range(4)]
    assert not kinds(run(policy, records), "repeated_denials")


def test_repeated_denials_on_one_route_are_medium(policy: CompiledPolicy) -> None:
    records = [rec(policy, BILLING, "DELETE", f"/v1/orders/{n}", n) for n in range(5)]
    f = kinds(run(policy, records), "repeated_denials")[BILLING]
    assert f.severity == "medium" and f.details["count"] == 5 and f.details["routes"] == 1
    assert f.details["top"] == [{"method": "DELETE", "path": "/v1/orders/{id}",
                                 "reason": "no_matching_rule", "count": 5}]


def test_denials_across_many_routes_look_like_probing(policy: CompiledPolicy) -> None:
    paths = ["/etc/passwd", "/admin/x", "/v2/orders", "/debug/vars", "/metrics"]
    records = [rec(policy, BILLING, "GET", p, n) for n, p in enumerate(paths)]
    f = kinds(run(policy, records), "repeated_denials")[BILLING]
    assert f.severity == "high" and "probing" in f.message


def test_a_burst_of_401s_within_a_minute_is_reported(policy: CompiledPolicy) -> None:
    burst = [rec(policy, None, "GET", "/v1/orders", n, reason=Reason.NO_IDENTITY)
             for n in range(20)]
    f = kinds(run(policy, burst), "unauthenticated_burst")["orders.mesh"]
    assert f.details == {"host": "orders.mesh", "minute": "2024-05-01T12:00", "count": 20,
                         "reasons": {"no_identity": 20}}


def test_401s_spread_over_minutes_are_no_burst(policy: CompiledPolicy) -> None:
    spread = [rec(policy, None, "GET", "/v1/orders", n * 30, reason=Reason.NO_IDENTITY)
              for n in range(20)]
    assert not kinds(run(policy, spread), "unauthenticated_burst")


def test_rate_limit_offenders(policy: CompiledPolicy) -> None:
    limited = [rec(policy, CHECKOUT, "GET", "/v1/orders/1", n, reason=Reason.RATE_LIMITED)
               for n in range(10)]
    f = kinds(run(policy, limited), "rate_limit_offender")[CHECKOUT]
    assert f.details["count"] == 10 and f.details["rules"] == {"read-orders": 10}
    assert not kinds(run(policy, limited[:9]), "rate_limit_offender")


def test_rate_limited_calls_still_count_as_grant_use(policy: CompiledPolicy) -> None:
    limited = [rec(policy, LEGACY, "POST", "/v1/orders", reason=Reason.RATE_LIMITED)]
    assert "legacy -> create-order" not in kinds(run(policy, limited), "unused_grant")


# --- credential hygiene ----------------------------------------------------------------------


def test_identities_of_trust_domains_the_policy_never_names(policy: CompiledPolicy) -> None:
    records = [rec(policy, EVIL, "GET", "/v1/orders/1")]
    f = kinds(run(policy, records), "unexpected_trust_domain")["evil.example"]
    assert f.severity == "high" and f.details["principals"] == [EVIL]
    assert "prod.example" in f.message
    configured = run(policy, records, trust_domains=frozenset({"prod.example", "evil.example"}))
    assert not kinds(configured, "unexpected_trust_domain")


def test_refusals_for_untrusted_trust_domains_are_counted(policy: CompiledPolicy) -> None:
    records = [rec(policy, None, "GET", "/", n, reason=Reason.UNTRUSTED_TRUST_DOMAIN)
               for n in range(3)]
    f = kinds(run(policy, records), "untrusted_trust_domain")["(trust domains)"]
    assert f.details["count"] == 3


def test_revoked_credentials_still_presented_are_high(policy: CompiledPolicy) -> None:
    records = [rec(policy, None, "GET", "/", n, reason=Reason.REVOKED) for n in range(2)]
    f = kinds(run(policy, records), "revoked_still_trying")["(not recorded)"]
    assert f.severity == "high" and f.details["count"] == 2
    assert "does not record whose" in f.message


def test_a_listed_principal_allowed_is_critical_and_its_grant_is_cut(
        policy: CompiledPolicy) -> None:
    records = [rec(policy, LEGACY, "POST", "/v1/orders")]
    report = run(policy, records, revoked_principals=frozenset({LEGACY}))
    assert kinds(report, "revoked_allowed")[LEGACY].severity == "critical"
    assert kinds(report, "revoked_still_trying")[LEGACY].details["count"] == 1
    granted = kinds(report, "revoked_still_granted")[LEGACY]
    assert granted.details["grants"] == ["create-order (legacy)"]
    assert "legacy" in report.changes["create-order"].remove_entries
    assert report.at_least("critical")


def test_token_lifetime_cannot_be_checked_without_the_field(policy: CompiledPolicy) -> None:
    no_iat = rec(policy, "svc-a", "GET", "/v1/orders/1", source=IdentitySource.JWT,
                 issuer=ISSUER, claims={"exp": 2_000_000_000})
    assert no_iat[TOKEN_LIFETIME_FIELD] is None  # the server logs null without iat
    older = dict(no_iat)
    del older[TOKEN_LIFETIME_FIELD]  # a log written before the field existed
    f = kinds(run(policy, [no_iat, older], max_token_lifetime=3600), "token_lifetime_unknown")
    assert "2 JWT decisions" in f[TOKEN_LIFETIME_FIELD].message
    assert not kinds(run(policy, [older]), "token_lifetime_unknown")  # not asked for


def test_long_lived_tokens_are_flagged(policy: CompiledPolicy) -> None:
    def jwt(lifetime: int, i: int) -> dict[str, Any]:
        return rec(policy, "svc-a", "GET", "/v1/orders/1", i, source=IdentitySource.JWT,
                   issuer=ISSUER, claims={"iat": 1_700_000_000, "exp": 1_700_000_000 + lifetime})

    records = [jwt(86400, 0), jwt(600, 1), jwt(90000, 2)]
    assert records[0][TOKEN_LIFETIME_FIELD] == 86400
    records += [dict(records[1], **{TOKEN_LIFETIME_FIELD: v}) for v in ("long", True)]
    report = run(policy, records, max_token_lifetime=3600)
    f = kinds(report, "long_lived_token")["svc-a"]
    assert f.details["count"] == 2 and f.details["max_lifetime_s"] == 90000
    assert f.details["issuer"] == ISSUER
    assert not kinds(report, "token_lifetime_unknown")


def test_since_log_1_1_the_presented_identity_is_named(policy: CompiledPolicy) -> None:
    revoked = [rec(policy, None, "GET", "/", n, reason=Reason.REVOKED, presented_principal=LEGACY)
               for n in range(2)]
    foreign = [rec(policy, None, "GET", "/", n, reason=Reason.UNTRUSTED_TRUST_DOMAIN,
                   presented_principal=EVIL) for n in range(3)]
    report = run(policy, revoked + foreign)
    assert kinds(report, "revoked_still_trying")[LEGACY].details["count"] == 2
    assert "(not recorded)" not in kinds(report, "revoked_still_trying")
    untrusted = kinds(report, "untrusted_trust_domain")["(trust domains)"]
    assert untrusted.details["presented"] == {EVIL: 3} and EVIL in untrusted.message
