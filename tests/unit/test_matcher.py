from extauthz.model import Identity, IdentitySource, Reason

from .policy_fixtures import BILLING, CART, CHECKOUT, INTRUDER, compiled

HOST = "orders.mesh.local"


def ident(principal: str) -> Identity:
    return Identity(principal, IdentitySource.MTLS, "prod.example")


def reason(policy, principal: str, method: str, path: str, host: str = HOST) -> Reason:  # type: ignore[no-untyped-def]
    return policy.evaluate(ident(principal), host, method, path).decision.reason


def test_no_rule_for_route_is_denied() -> None:
    p = compiled([{"name": "r", "methods": ["GET"], "path": "/v1/orders", "allow": ["checkout"]}])
    assert reason(p, CHECKOUT, "GET", "/v1/other") is Reason.NO_MATCHING_RULE
    assert reason(p, CHECKOUT, "POST", "/v1/orders") is Reason.NO_MATCHING_RULE
    assert reason(p, CHECKOUT, "GET", "/v1/orders", host="billing.mesh.local") is Reason.NO_MATCHING_RULE


def test_exact_path_does_not_match_trailing_slash_or_child() -> None:
    p = compiled([{"name": "r", "methods": ["GET"], "path": "/v1/orders", "allow": ["checkout"]}])
    assert reason(p, CHECKOUT, "GET", "/v1/orders") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/v1/orders/") is Reason.NO_MATCHING_RULE
    assert reason(p, CHECKOUT, "GET", "/v1/orders/1") is Reason.NO_MATCHING_RULE


def test_prefix_matches_on_segment_boundaries_only() -> None:
    p = compiled([{"name": "r", "methods": ["GET"], "path_prefix": "/v1/orders", "allow": ["checkout"]}])
    assert reason(p, CHECKOUT, "GET", "/v1/orders") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/v1/orders/") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/v1/orders/42/items") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/v1/ordersx") is Reason.NO_MATCHING_RULE
    assert reason(p, CHECKOUT, "GET", "/v1/order") is Reason.NO_MATCHING_RULE


def test_root_prefix_matches_everything_on_the_host() -> None:
    p = compiled([{"name": "r", "path_prefix": "/", "allow": ["billing"]}])
    assert reason(p, BILLING, "DELETE", "/anything/at/all") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/") is Reason.PRINCIPAL_NOT_ALLOWED


def test_known_principal_without_grant_is_forbidden() -> None:
    p = compiled([{"name": "r", "methods": ["GET"], "path": "/v1/orders", "allow": ["checkout"]}])
    d = p.evaluate(ident(BILLING), HOST, "GET", "/v1/orders").decision
    assert (d.reason, d.outcome.http_status, d.allowed) == (Reason.PRINCIPAL_NOT_ALLOWED, 403, False)


def test_spiffe_wildcards_are_segment_aware() -> None:
    p = compiled([{"name": "r", "path_prefix": "/", "allow": ["shop"]}])
    assert reason(p, CART, "GET", "/x") is Reason.ALLOWED
    assert reason(p, INTRUDER, "GET", "/x") is Reason.PRINCIPAL_NOT_ALLOWED  # /ns/shopping
    assert reason(p, "spiffe://prod.example/ns/shop/sa/cart/extra", "GET", "/x") is Reason.PRINCIPAL_NOT_ALLOWED
    assert reason(p, "spiffe://other.example/ns/shop/sa/cart", "GET", "/x") is Reason.PRINCIPAL_NOT_ALLOWED


def test_deny_wins_over_allow() -> None:
    p = compiled([
        {"name": "all-shop", "path_prefix": "/v1", "allow": ["shop"]},
        {"name": "no-cart-admin", "path_prefix": "/v1/admin", "deny": [CART]},
    ])
    d = p.evaluate(ident(CART), HOST, "GET", "/v1/admin/x").decision
    assert (d.reason, d.rule) == (Reason.DENIED_BY_RULE, "no-cart-admin")
    assert reason(p, CHECKOUT, "GET", "/v1/admin/x") is Reason.ALLOWED


def test_dry_run_rule_allows_but_marks_would_deny() -> None:
    p = compiled([{"name": "new", "methods": ["GET"], "path": "/v1/audit", "allow": ["billing"], "mode": "dry-run"}])
    d = p.evaluate(ident(CHECKOUT), HOST, "GET", "/v1/audit").decision
    assert (d.allowed, d.dry_run, d.reason, d.rule) == (True, True, Reason.DRY_RUN, "new")
    ok = p.evaluate(ident(BILLING), HOST, "GET", "/v1/audit").decision
    assert (ok.allowed, ok.dry_run, ok.reason) == (True, False, Reason.ALLOWED)


def test_dry_run_does_not_weaken_an_enforced_rule_on_the_same_route() -> None:
    p = compiled([
        {"name": "enforced", "methods": ["GET"], "path": "/v1/x", "allow": ["billing"]},
        {"name": "trial", "methods": ["GET"], "path": "/v1/x", "allow": ["billing"], "mode": "dry-run"},
    ])
    assert reason(p, CHECKOUT, "GET", "/v1/x") is Reason.PRINCIPAL_NOT_ALLOWED


def test_lookup_cost_does_not_scan_rules() -> None:
    rules = [{"name": f"r{i}", "methods": ["GET"], "path": f"/svc/{i}/items", "allow": ["checkout"]}
             for i in range(10_000)]
    p = compiled(rules)
    assert len(p.candidates(HOST, "GET", "/svc/9999/items")) == 1
    assert reason(p, CHECKOUT, "GET", "/svc/9999/items") is Reason.ALLOWED
    assert reason(p, CHECKOUT, "GET", "/svc/10000/items") is Reason.NO_MATCHING_RULE


def test_hosts_are_case_insensitive_ports_ignored_and_a_trailing_dot_kept() -> None:
    from extauthz.tools.explain import Probe, decide

    p = compiled([{"name": "r", "methods": ["GET"], "path": "/v1/orders", "allow": ["checkout"]}])
    for host in ("orders.mesh.local", "Orders.Mesh.Local", "ORDERS.mesh.local:8443", "orders.mesh.local:1"):
        assert decide(p, Probe(CHECKOUT, "GET", "/v1/orders", host))[0].reason is Reason.ALLOWED, host
    assert decide(p, Probe(CHECKOUT, "GET", "/v1/orders", "orders.mesh.local."))[0].reason \
        is Reason.NO_MATCHING_RULE
    for host in ("orders.mesh.local:http", "orders/x", "user@orders.mesh.local", ""):
        assert decide(p, Probe(CHECKOUT, "GET", "/v1/orders", host))[0].reason \
            is Reason.MALFORMED_REQUEST, host
