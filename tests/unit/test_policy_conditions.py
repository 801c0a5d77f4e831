"""`when:` CEL conditions: what they may read, how errors count, and load-time rejection."""

from datetime import UTC, datetime

import pytest

from extauthz.model import Identity, IdentitySource, Reason
from extauthz.policy.conditions import ConditionError, compile_condition
from extauthz.policy.document import PolicyError

from .policy_fixtures import CHECKOUT, compiled

HOST = "orders.mesh.local"


def jwt(**claims: object) -> Identity:
    return Identity(CHECKOUT, IdentitySource.JWT, "prod.example", issuer="https://spire",
                    subject=CHECKOUT, claims=claims)


@pytest.mark.parametrize(("expr", "message"), [
    ("claims.scope ==", "invalid CEL expression"),
    ("headers[name] == 'x'", "headers may only be read by a literal name"),
    ("size(headers) > 0", "headers may only be read by a literal name"),
    ("headers.exists(k, k == 'x-admin')", "headers may only be read by a literal name"),
    ("claims[request.path] == 'x'", "claims may only be read by a literal name"),
    ("headers['X-Tenant'] == 'a'", "must be a lowercase HTTP header name"),
    ("secret == 1", "unknown variable 'secret'"),
    ("x" * 5000, "longer than 4096 characters"),
])
def test_bad_conditions_are_rejected_at_load(expr: str, message: str) -> None:
    with pytest.raises(ConditionError, match=message):
        compile_condition(expr)


def test_condition_errors_name_file_field_and_rule() -> None:
    with pytest.raises(PolicyError, match=r"test\.yaml: rules\[0\]\.when: headers may only be read"):
        compiled([{"name": "r", "path": "/x", "allow": ["checkout"], "when": "size(headers) > 1"}])


def test_reads_are_found_in_every_literal_form() -> None:
    c = compile_condition('"x-a" in headers && headers["x-b"] == "1" && has(headers.c) '
                          '&& claims.scope == "s" && claims["tier"] == 1 '
                          '&& claims.roles.exists(r, r == "admin")')
    assert (c.headers, c.claims, c.uses_time) == (("c", "x-a", "x-b"), ("roles", "scope", "tier"), False)
    assert compile_condition("now.getHours() > 1").uses_time


def test_a_condition_only_sees_what_it_names() -> None:
    # Even a macro over the claims map sees only the literally named claims: here none,
    # so the decision cannot depend on a claim the cache key does not hold.
    p = compiled([{"name": "r", "path": "/x", "allow": ["checkout"],
                   "when": 'claims.tier == "gold" && request.path == "/x"'}])
    assert p.evaluate(jwt(tier="gold", other=1), HOST, "GET", "/x").decision.allowed
    assert not p.evaluate(jwt(tier="silver"), HOST, "GET", "/x").decision.allowed


def test_evaluation_error_is_false_for_allow_rules() -> None:
    p = compiled([{"name": "r", "path": "/x", "allow": ["checkout"],
                   "when": 'headers["x-tier"] == "gold"'}])  # missing header: a CEL error
    d = p.evaluate(jwt(), HOST, "GET", "/x").decision
    assert (d.allowed, d.reason, d.rule) == (False, Reason.CONDITION_NOT_MET, "r")
    assert d.detail == ("rule r: when 'headers[\"x-tier\"] == \"gold\"' could not be evaluated "
                        "(header x-tier is missing)")
    assert p.evaluate(jwt(), HOST, "GET", "/x", headers={"x-tier": "gold"}).decision.allowed


def test_evaluation_error_is_true_for_deny_rules_fail_closed() -> None:
    p = compiled([
        {"name": "open", "path_prefix": "/", "allow": ["checkout"]},
        {"name": "block-staging", "path_prefix": "/", "deny": ["checkout"],
         "when": 'claims.env != "prod"'},  # claim missing: error -> the deny applies
    ])
    assert p.evaluate(jwt(), HOST, "GET", "/x").decision.reason is Reason.DENIED_BY_RULE
    assert p.evaluate(jwt(env="staging"), HOST, "GET", "/x").decision.reason is Reason.DENIED_BY_RULE
    assert p.evaluate(jwt(env="prod"), HOST, "GET", "/x").decision.reason is Reason.ALLOWED


def test_non_bool_result_is_an_error_not_truthy() -> None:
    p = compiled([{"name": "r", "path": "/x", "allow": ["checkout"], "when": "claims.level"}])
    assert not p.evaluate(jwt(level=5), HOST, "GET", "/x").decision.allowed


def test_time_is_utc_and_truncated_to_the_minute() -> None:
    p = compiled([{"name": "r", "path": "/x", "allow": ["checkout"],
                   "when": "now.getHours() == 9 && now.getMinutes() == 59 && now.getSeconds() == 0"}])
    at = datetime(2025, 1, 6, 9, 59, 59, tzinfo=UTC).timestamp()
    assert p.evaluate(jwt(), HOST, "GET", "/x", now=at).decision.allowed
    assert not p.evaluate(jwt(), HOST, "GET", "/x", now=at + 1).decision.allowed


def test_request_and_identity_variables() -> None:
    p = compiled([{"name": "r", "path_prefix": "/v1", "allow": ["checkout"],
                   "when": 'request.method == "GET" && source == "jwt" && issuer == "https://spire"'
                           ' && principal.startsWith("spiffe://prod.example/")'}])
    assert p.evaluate(jwt(), HOST, "GET", "/v1/a").decision.allowed
    mtls = Identity(CHECKOUT, IdentitySource.MTLS, "prod.example")
    assert not p.evaluate(mtls, HOST, "GET", "/v1/a").decision.allowed
