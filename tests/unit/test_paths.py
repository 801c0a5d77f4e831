from hypothesis import given
from hypothesis import strategies as st

from extauthz.paths import normalize_path


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


def test_duplicate_slashes_query_and_fragment() -> None:
    assert normalize_path("//v1///orders") == "/v1/orders"
    assert normalize_path("/v1/orders?x=/../admin") == "/v1/orders"
    assert normalize_path("/v1/orders#/../admin") == "/v1/orders"


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
