from hypothesis import given
from hypothesis import strategies as st

from extauthz.policy.paths import normalize_path


def test_non_origin_form_paths_are_ambiguous() -> None:
    for raw in ("", "*", "orders", "http://evil/x", "https://a/b"):
        assert normalize_path(raw) is None, raw


def test_encoded_slash_backslash_nul_and_controls_are_ambiguous() -> None:
    for raw in ("/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/a\x00", "/a\tb", "/a b",
                "/a%0d%0a", "/a%7f", "/a%zz", "/a%2", "/a%"):
        assert normalize_path(raw) is None, raw


def test_dot_segments_are_resolved_and_escaping_root_is_ambiguous() -> None:
    assert normalize_path("/v1/public/../admin") == "/v1/admin"
    assert normalize_path("/v1/./orders") == "/v1/orders"
    assert normalize_path("/v1/%2e%2e/admin") == "/admin"
    assert normalize_path("/v1/%2E/orders") == "/v1/orders"
    assert normalize_path("/..") is None
    assert normalize_path("/a/../../b") is None


def test_duplicate_slashes_merge_and_the_query_is_cut() -> None:
    assert normalize_path("//v1///orders") == "/v1/orders"
    assert normalize_path("/v1/orders?x=/../admin") == "/v1/orders"


def test_a_raw_fragment_anywhere_is_ambiguous() -> None:
    # Envoy strips fragments before ext_authz; a raw path that still has one was hand-made.
    for raw in ("/v1/orders#/../admin", "/api/v1/items#/../../admin", "/a#", "/#",
                "/v1/orders?x=1#frag", "/v1/orders?x=#"):
        assert normalize_path(raw) is None, raw


def test_unreserved_escapes_decode_and_others_keep_uppercase_hex() -> None:
    assert normalize_path("/%76%31/orders") == "/v1/orders"
    assert normalize_path("/a/%c3%a9") == "/a/%C3%A9"


def test_case_and_trailing_slash_are_kept() -> None:
    assert normalize_path("/V1/Orders/") == "/V1/Orders/"
    assert normalize_path("/v1/orders/.") == "/v1/orders/"


_segment = st.sampled_from(["a", "b", "v1", ".", "..", "", "%2e", "%2E%2e", "%41", "x%2Fy", "c?d", "#"])


@given(st.lists(_segment, max_size=8))
def test_normalizing_is_idempotent(parts: list[str]) -> None:
    once = normalize_path("/" + "/".join(parts))
    if once is not None:
        assert normalize_path(once) == once


# --- attacks: every variant either normalizes to the canonical form or is denied ----------


def test_path_parameters_on_dot_segments_are_ambiguous() -> None:
    # Tomcat/Jetty strip `;params` and then resolve `..`: /v1/public/..;/admin is /v1/admin there.
    for raw in ("/v1/public/..;/admin", "/v1/public/..;x=1/admin", "/v1/.;/admin",
                "/v1/public/%2e%2e;/admin", "/v1/public/.%2E;/admin", "/a/..;"):
        assert normalize_path(raw) is None, raw
    assert normalize_path("/v1/items;v=2/x") == "/v1/items;v=2/x"  # ordinary params are kept


def test_mixed_case_and_partially_encoded_dot_segments_resolve() -> None:
    for raw in ("/v1/public/%2E%2e/admin", "/v1/public/.%2e/admin", "/v1/public/%2e./admin",
                "/v1/public/%2E/../admin", "/v1//public/..//admin"):
        assert normalize_path(raw) == "/v1/admin", raw


def test_double_encoding_is_not_decoded_twice() -> None:
    # %252F is a literal "%2F" text after one decode: never a slash, never the same as /a/b.
    assert normalize_path("/a%252Fb") == "/a%252Fb"
    assert normalize_path("/a/%252e%252e/b") == "/a/%252e%252e/b"


def test_encoded_query_and_fragment_marks_stay_in_the_path() -> None:
    assert normalize_path("/v1/admin%3F.json") == "/v1/admin%3F.json"
    assert normalize_path("/v1/admin%23x") == "/v1/admin%23x"
    assert normalize_path("/v1/public?x=/../../admin") == "/v1/public"
    assert normalize_path("/v1/public?x=/../../admin#/../admin") is None


def test_non_ascii_escapes_and_overlong_utf8_are_kept_encoded() -> None:
    assert normalize_path("/a/%c0%ae%c0%ae/b") == "/a/%C0%AE%C0%AE/b"  # never decoded to ..
    assert normalize_path("/a/%u002e%u002e/b") is None  # IIS-style %u escapes are malformed


def test_overlong_paths_are_ambiguous() -> None:
    assert normalize_path("/" + "a" * 9000) is None


_ATTACK = st.sampled_from(
    ["a", "b", "v1", "admin", "public", ".", "..", "", "%2e", "%2E%2e", ".%2e", "%41", "%2F",
     "%5C", "\\", "..;", ".;x", "a;b", "%00", " ", "%252e", "~", "A", "%7e", "?", "#", "%3F"]
)


@given(st.lists(_ATTACK, max_size=10))
def test_normalizing_is_idempotent_over_attack_alphabet(parts: list[str]) -> None:
    once = normalize_path("/" + "/".join(parts))
    if once is not None:
        assert normalize_path(once) == once
        assert "//" not in once and "/./" not in once and "/../" not in once
        assert not once.endswith(("/.", "/.."))


def test_without_params_is_what_param_stripping_servers_route() -> None:
    from extauthz.policy.paths import without_params

    assert without_params("/v1/admin;x/users") == "/v1/admin/users"
    assert without_params("/v1/;x/admin") == "/v1/admin"
    assert without_params("/a;b=c;d/e;") == "/a/e"
    assert without_params("/a/b/") == "/a/b/"
    assert without_params("/a%3Bb/c") == "/a%3Bb/c"  # an encoded ';' is not a separator
