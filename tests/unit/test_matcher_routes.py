"""Templates, RE2 regexes, header matches, method overrides and deny precedence."""

from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.model import Identity, IdentitySource, Reason
from extauthz.policy.compiled import CompiledPolicy, regex_bucket
from extauthz.policy.paths import normalize_path

from .policy_fixtures import BILLING, CART, CHECKOUT, compiled

HOST = "orders.mesh.local"


def ident(principal: str = CHECKOUT) -> Identity:
    return Identity(principal, IdentitySource.MTLS, "prod.example")


def decide(p: CompiledPolicy, method: str, path: str, headers: dict[str, str] | None = None,
           principal: str = CHECKOUT) -> tuple[Reason, str]:
    d = p.evaluate(ident(principal), HOST, method, path, headers=headers or {}).decision
    return d.reason, d.rule


def test_template_variable_is_exactly_one_non_empty_segment() -> None:
    p = compiled([{"name": "one", "methods": ["GET"], "path": "/v1/orders/{id}", "allow": ["checkout"]}])
    assert decide(p, "GET", "/v1/orders/42") == (Reason.ALLOWED, "one")
    for path in ("/v1/orders/", "/v1/orders", "/v1/orders/42/", "/v1/orders/42/items",
                 "/v1/ordersx/42", "/v2/orders/42"):
        assert decide(p, "GET", path)[0] is Reason.NO_MATCHING_RULE, path


def test_template_prefix_matches_on_segment_boundaries() -> None:
    p = compiled([{"name": "items", "path_prefix": "/v1/orders/{id}/items", "allow": ["checkout"]}])
    for path in ("/v1/orders/1/items", "/v1/orders/1/items/", "/v1/orders/1/items/2/x"):
        assert decide(p, "DELETE", path)[0] is Reason.ALLOWED, path
    for path in ("/v1/orders/1/itemsx", "/v1/orders//items", "/v1/orders/1", "/v1/orders/items"):
        assert decide(p, "DELETE", path)[0] is Reason.NO_MATCHING_RULE, path


def test_literal_and_variable_siblings_are_both_followed() -> None:
    p = compiled([
        {"name": "lit", "methods": ["GET"], "path": "/v1/orders/export", "allow": ["billing"]},
        {"name": "var", "methods": ["GET"], "path": "/v1/orders/{id}", "allow": ["checkout"]},
        {"name": "deep", "methods": ["GET"], "path": "/v1/{svc}/export", "allow": ["checkout"]},
    ])
    assert {r.name for r in p.candidates(HOST, "GET", "/v1/orders/export")} == {"lit", "var", "deep"}


def test_regex_must_match_the_whole_path() -> None:
    p = compiled([{"name": "rx", "methods": ["GET"], "path_regex": "/v1/report/[0-9]{4}",
                   "allow": ["checkout"]}])
    assert decide(p, "GET", "/v1/report/2024") == (Reason.ALLOWED, "rx")
    for path in ("/v1/report/20245", "/x/v1/report/2024", "/v1/report/2024/extra"):
        assert decide(p, "GET", path)[0] is Reason.NO_MATCHING_RULE, path


def test_regex_literal_buckets_are_conservative() -> None:
    assert regex_bucket("^/v1/orders/[0-9]+$") == "/v1/orders/"
    assert regex_bucket("/v1/orders") == "/v1/"
    assert regex_bucket("^/v1/?x") == "/"  # the quantifier makes the last '/' optional
    assert regex_bucket("/v1/a|/v2/b") == ""
    assert regex_bucket("(?i)/v1/admin") == ""
    assert regex_bucket("/v1\\/x") == "/"


_RULES = [
    {"name": "exact", "methods": ["GET"], "path": "/a/b", "allow": ["checkout"]},
    {"name": "prefix", "path_prefix": "/a", "allow": ["billing"]},
    {"name": "root", "methods": ["POST"], "path_prefix": "/", "deny": ["shop"]},
    {"name": "tpl", "path": "/a/{x}/c", "allow": ["checkout"]},
    {"name": "tpl-prefix", "methods": ["PUT"], "path_prefix": "/{x}/b", "allow": ["checkout"]},
    {"name": "rx", "path_regex": "^/a/[bc]+/d$", "allow": ["checkout"]},
    {"name": "rx-any", "methods": ["GET"], "path_regex": "(/[ab])+/?", "allow": ["checkout"]},
    {"name": "rx-case", "path_regex": "(?i)/A/B", "allow": ["checkout"]},
]
_SEG = st.sampled_from(["a", "b", "c", "d", "A", "B", "bc", "x", ""])


@settings(max_examples=300)
@given(st.lists(_SEG, min_size=0, max_size=5), st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
def test_lookup_tables_agree_with_each_rule_matched_on_its_own(segs: list[str], method: str) -> None:
    p = compiled(_RULES)
    path = normalize_path("/" + "/".join(segs))  # matching always runs on normalized paths
    assert path is not None
    indexed = sorted(r.name for r in p.candidates(HOST, method, path))
    brute = sorted(r.name for r in p.rules if r.method_matches(method) and r.path_matches(path))
    assert indexed == brute, path


def test_regex_that_python_re_accepts_but_re2_rejects_is_a_load_error() -> None:
    import pytest

    from extauthz.policy.document import PolicyError

    for bad in ("^/(a)\\1$", "^/(?=admin)", "^/(?<!x)y"):  # backreference, lookaround
        with pytest.raises(PolicyError, match="invalid RE2 regular expression"):
            compiled([{"name": "r", "path_regex": bad, "allow": ["checkout"]}])


def test_header_matches_exact_present_absent_and_regex() -> None:
    p = compiled([{"name": "h", "path_prefix": "/v1", "allow": ["checkout"], "headers": {
        "x-tenant": "acme", "x-trace": {"present": True}, "x-debug": {"present": False},
        "x-version": {"regex": "v[12]"}}}])
    good = {"x-tenant": "acme", "x-trace": "", "x-version": "v2"}
    assert decide(p, "GET", "/v1/x", good)[0] is Reason.ALLOWED
    for bad in ({**good, "x-tenant": "acme2"}, {**good, "x-tenant": "ACME"},
                {k: v for k, v in good.items() if k != "x-trace"}, {**good, "x-debug": "1"},
                {**good, "x-version": "v12"}, {**good, "x-version": "xv1"}):
        assert decide(p, "GET", "/v1/x", bad)[0] is Reason.CONDITION_NOT_MET, bad


def test_method_override_headers_never_change_the_method() -> None:
    from extauthz.decide.pipeline import decide as decide_request
    from extauthz.model import Request

    p = compiled([{"name": "read", "methods": ["GET"], "path_prefix": "/v1", "allow": ["checkout"]}])
    for name in ("x-http-method-override", "x-method-override", "x-http-method"):
        request = Request(method="GET", host=HOST, path="/v1/x", headers={name: "DELETE"})
        d = decide_request(p, ident(), request, 0.0)
        assert (d.reason, d.allowed) == (Reason.METHOD_OVERRIDE, False), name
        assert name in d.detail
    same = Request(method="GET", host=HOST, path="/v1/x", headers={"x-http-method-override": "get"})
    assert decide_request(p, ident(), same, 0.0).reason is Reason.ALLOWED


def test_deny_by_template_wins_over_allow_by_prefix_and_regex() -> None:
    p = compiled([
        {"name": "all", "path_prefix": "/v1", "allow": ["shop"]},
        {"name": "rx", "path_regex": "^/v1/orders/[0-9]+/admin$", "allow": ["shop"]},
        {"name": "no-admin", "path": "/v1/orders/{id}/admin", "deny": [CART]},
    ])
    assert decide(p, "GET", "/v1/orders/7/admin", principal=CART) == (Reason.DENIED_BY_RULE, "no-admin")
    assert decide(p, "GET", "/v1/orders/7/admin")[0] is Reason.ALLOWED  # checkout is not denied


def test_dry_run_deny_marks_would_deny_but_does_not_block() -> None:
    p = compiled([
        {"name": "read", "path_prefix": "/v1", "allow": ["shop"]},
        {"name": "lockdown", "path_prefix": "/v1/export", "deny": ["checkout"], "mode": "dry-run"},
    ])
    d = p.evaluate(ident(), HOST, "GET", "/v1/export/x").decision
    assert (d.allowed, d.dry_run, d.reason, d.rule) == (True, True, Reason.DRY_RUN, "lockdown")
    d = p.evaluate(ident(CART), HOST, "GET", "/v1/export/x").decision
    assert (d.allowed, d.dry_run, d.reason) == (True, False, Reason.ALLOWED)


def test_jwt_principals_match_issuer_subject_and_claims_exactly() -> None:
    principals = [
        {"name": "ops", "jwt": {"issuer": "https://idp", "claims": {"groups": "ops", "mfa": True}}},
        {"name": "robot", "jwt": {"issuer": "https://idp", "subject": "robot-1"}},
    ]
    p = compiled([{"name": "r", "path_prefix": "/", "allow": ["ops", "robot"]}], principals=principals)

    def jwt(sub: str, iss: str = "https://idp", **claims: object) -> Reason:
        who = Identity(sub, IdentitySource.JWT, "", issuer=iss, subject=sub, claims=claims)
        return p.evaluate(who, HOST, "GET", "/x").decision.reason

    assert jwt("u", groups=["a", "ops"], mfa=True) is Reason.ALLOWED
    assert jwt("robot-1") is Reason.ALLOWED
    assert jwt("robot-1", iss="https://evil") is Reason.PRINCIPAL_NOT_ALLOWED
    assert jwt("u", iss="https://evil", groups="ops", mfa=True) is Reason.PRINCIPAL_NOT_ALLOWED
    assert jwt("u", groups="ops", mfa="true") is Reason.PRINCIPAL_NOT_ALLOWED  # type matters
    assert jwt("u", groups="ops") is Reason.PRINCIPAL_NOT_ALLOWED
    mtls_same_name = Identity("robot-1", IdentitySource.MTLS, "")
    assert p.evaluate(mtls_same_name, HOST, "GET", "/x").decision.reason is Reason.PRINCIPAL_NOT_ALLOWED


def test_ten_thousand_template_and_regex_rules_are_not_scanned() -> None:
    rules = []
    for i in range(5_000):
        rules.append({"name": f"t{i}", "methods": ["GET"], "path": f"/svc{i}/{{id}}/items",
                      "allow": ["checkout"]})
        rules.append({"name": f"x{i}", "methods": ["GET"], "path_regex": f"^/rx{i}/[0-9]+$",
                      "allow": ["billing"]})
    p = compiled(rules)
    assert [r.name for r in p.candidates(HOST, "GET", "/svc4999/7/items")] == ["t4999"]
    assert [r.name for r in p.candidates(HOST, "GET", "/rx4999/12")] == ["x4999"]
    assert decide(p, "GET", "/rx4999/12", principal=BILLING)[0] is Reason.ALLOWED
    assert decide(p, "GET", "/rx5000/12")[0] is Reason.NO_MATCHING_RULE


def test_a_method_override_query_parameter_is_reported() -> None:
    from extauthz.decide.guards import query_method_override

    for raw in ("/v1/x?_method=DELETE", "/v1/x?a=1&_method=delete", "/v1/x?%5Fmethod=DELETE",
                "/v1/x?_METHOD=PUT", "/v1/x?_method=%44ELETE", "/v1/x?_method=", "/v1/x?_method"):
        assert query_method_override("POST", raw), raw
    for raw in ("/v1/x", "/v1/x?method=DELETE", "/v1/x?_method=POST", "/v1/x?_method=+post+",
                "/v1/x#?_method=DELETE", "/v1/_method=DELETE"):
        assert query_method_override("POST", raw) == "", raw
