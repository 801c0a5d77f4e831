"""Path tricks through the whole check (normalize, then match): no variant of a path reaches
a rule its canonical form does not; the only other outcome is an ambiguous-path denial."""

from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.model import Reason
from extauthz.policy.compiled import CompiledPolicy
from extauthz.tools.explain import Probe, decide

from .policy_fixtures import BILLING, CART, CHECKOUT, compiled

HOST = "orders.mesh.local"
POLICY: CompiledPolicy = compiled([
    {"name": "public", "methods": ["GET"], "path_prefix": "/v1/public", "allow": ["shop"]},
    {"name": "admin", "path_prefix": "/v1/admin", "allow": ["checkout"]},
    {"name": "no-cart-admin", "path_prefix": "/v1/admin", "deny": [CART]},
    {"name": "order", "methods": ["GET"], "path": "/v1/orders/{id}", "allow": ["shop"]},
    {"name": "report", "methods": ["GET"], "path_regex": "^/v1/reports/[0-9]+$", "allow": ["shop"]},
])
BASES = ["/v1/public/a", "/v1/admin/users", "/v1/orders/42", "/v1/reports/7", "/v1/other"]


def answer(path: str, principal: str = CART) -> tuple[Reason, str]:
    d, _ = decide(POLICY, Probe(principal, "GET", path, HOST))
    return d.reason, d.rule


def test_classic_traversals_cannot_climb_from_public_into_admin() -> None:
    for raw in ("/v1/public/../admin/users", "/v1/public/%2e%2e/admin/users",
                "/v1/public/.%2E/admin/users", "//v1//public//..//admin//users",
                "/v1/public/./../admin/users"):
        assert answer(raw) == (Reason.DENIED_BY_RULE, "no-cart-admin"), raw
    for raw in ("/v1/public/..%2Fadmin/users", "/v1/public/..%5Cadmin", "/v1/public/..\\admin",
                "/v1/public/..;/admin/users", "/v1/public/%2e%2e;/admin", "/v1/public/%00/../admin"):
        assert answer(raw)[0] is Reason.AMBIGUOUS_PATH, raw


def test_query_cannot_smuggle_a_path_and_a_fragment_is_ambiguous() -> None:
    assert answer("/v1/public/a?/../../admin/users") == (Reason.ALLOWED, "public")
    assert answer("/v1/public/a#/../../admin")[0] is Reason.AMBIGUOUS_PATH
    assert answer("/v1/admin%3F/../public/a")[0] is Reason.ALLOWED  # %3F is a literal char


def test_case_and_trailing_slash_are_significant() -> None:
    assert answer("/V1/ADMIN/users")[0] is Reason.NO_MATCHING_RULE  # not admin, not allowed
    assert answer("/v1/admin/")[1] == "no-cart-admin"  # a prefix covers the trailing slash
    assert answer("/v1/orders/42/")[0] is Reason.NO_MATCHING_RULE  # a template does not


def test_template_and_regex_see_only_the_normalized_path() -> None:
    assert answer("/v1/orders/x/../42") == (Reason.ALLOWED, "order")
    assert answer("/v1/orders/%34%32") == (Reason.ALLOWED, "order")  # %34%32 is "42"
    assert answer("/v1/reports/%37") == (Reason.ALLOWED, "report")
    assert answer("/v1/reports/7%0a")[0] is Reason.AMBIGUOUS_PATH
    assert answer("/v1/orders/42/../../admin/x") == (Reason.DENIED_BY_RULE, "no-cart-admin")


def _encode(seg: str, upper: bool) -> str:
    return "".join(f"%{ord(c):02{'X' if upper else 'x'}}" if c.isalnum() else c for c in seg)


@st.composite
def variants(draw: st.DrawFn) -> tuple[str, str]:
    base = draw(st.sampled_from(BASES))
    segs = base.split("/")[1:]
    out: list[str] = []
    for seg in segs:
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.sampled_from([".", "%2e", "", "junk/..", "x/%2E%2e", "a/b/../.."])))
        out.append(_encode(seg, draw(st.booleans())) if draw(st.booleans()) else seg)
    path = "/" + "/".join(out)
    path += draw(st.sampled_from(["", "?x=/../../admin", "?a=b"]))
    return base, path


_POISON = st.sampled_from(["%2F", "%2f", "%5C", "\\", "..;", ".;x", "%00", "%0A", " ", "%zz", "#x"])


@settings(max_examples=200, deadline=None)
@given(variants(), st.sampled_from([CART, CHECKOUT]))
def test_equivalent_variants_get_the_canonical_answer(pair: tuple[str, str], who: str) -> None:
    base, variant = pair
    assert answer(variant, who) == answer(base, who), variant


@settings(max_examples=200, deadline=None)
@given(variants(), _POISON, st.integers(0, 10), st.sampled_from([CART, CHECKOUT]))
def test_poisoned_variants_get_the_canonical_answer_or_are_ambiguous(
        pair: tuple[str, str], poison: str, at: int, who: str) -> None:
    _, variant = pair
    head, sep, tail = variant.partition("?")
    cut = min(at, len(head) - 1) + 1
    poisoned = head[:cut] + poison + head[cut:] + sep + tail
    reason, rule = answer(poisoned, who)
    if reason is not Reason.AMBIGUOUS_PATH:
        # Still a valid path: whatever it reaches, its own canonical form reaches too.
        from extauthz.policy.paths import normalize_path

        canonical = normalize_path(poisoned)
        assert canonical is not None
        assert (reason, rule) == answer(canonical, who), poisoned


# --- path parameters: `;params` must not carry a request past a deny -----------------------
# Tomcat, Jetty and Spring drop `;params` from every segment before routing, so for them
# `/v1/admin;x/users` is `/v1/admin/users`. Such a path is allowed only if its stripped form is.

BROAD: CompiledPolicy = compiled([
    {"name": "all-shop", "path_prefix": "/v1", "allow": ["shop"]},
    {"name": "no-cart-admin", "path_prefix": "/v1/admin", "deny": [CART]},
    {"name": "order", "methods": ["GET"], "path": "/v1/orders/{id}", "allow": ["billing"]},
])


def broad(path: str, principal: str = CART) -> tuple[Reason, str]:
    d, _ = decide(BROAD, Probe(principal, "GET", path, HOST))
    return d.reason, d.rule


def test_path_parameters_cannot_slip_past_a_deny() -> None:
    assert broad("/v1/admin/users") == (Reason.DENIED_BY_RULE, "no-cart-admin")
    for raw in ("/v1/admin;x/users", "/v1/admin;/users", "/v1/;x/admin/users",
                "/v1/admin;jsessionid=1", "/v1/admin;b=c;d/users", "/v1/admin%3B/../admin;x"):
        assert broad(raw)[0] is Reason.AMBIGUOUS_PATH, raw
    assert broad("/v1;a/admin/users")[0] is Reason.NO_MATCHING_RULE  # no allow to undo
    assert broad("/v1/admin%3Bx/users") == (Reason.ALLOWED, "all-shop")  # %3B is no separator
    assert broad("/v1/admin;x/users", CHECKOUT) == (Reason.ALLOWED, "all-shop")  # not denied


def test_harmless_path_parameters_keep_their_answer() -> None:
    assert broad("/v1/items;v=2/x") == (Reason.ALLOWED, "all-shop")
    assert broad("/v1/orders/42;v=2", BILLING) == (Reason.ALLOWED, "order")
    assert broad("/v2/x;y")[0] is Reason.NO_MATCHING_RULE  # denials are not rewritten


@st.composite
def with_params(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(["/v1/admin/users", "/v1/admin", "/v1/orders/42", "/v1/items/x"]))
    out = []
    for seg in base.split("/")[1:]:
        if draw(st.booleans()):
            out.append(draw(st.sampled_from([";p", ";"])))  # a params-only segment
        out.append(seg + draw(st.sampled_from(["", ";", ";x", ";a=b;c", ";jsessionid=1"])))
    return "/" + "/".join(out)


@settings(max_examples=200, deadline=None)
@given(with_params(), st.sampled_from([CART, CHECKOUT, BILLING]))
def test_a_path_with_parameters_is_allowed_only_if_its_stripped_form_is(
        path: str, who: str) -> None:
    from extauthz.policy.paths import normalize_path, without_params

    normalized = normalize_path(path)
    assert normalized is not None
    bare = without_params(normalized)
    assert bare is not None
    reason, _ = broad(path, who)
    if reason in (Reason.ALLOWED, Reason.DRY_RUN):
        assert broad(bare, who)[0] in (Reason.ALLOWED, Reason.DRY_RUN), (path, bare)
