from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extauthz.identity.spiffe import (
    SpiffeId,
    SpiffeIdError,
    SpiffePattern,
    check_trust_domain_name,
    parse_spiffe_id,
)

TD_OK = set(string.ascii_lowercase + string.digits + "-._")
PATH_OK = set(string.ascii_letters + string.digits + "-._")


def sid(text: str) -> SpiffeId:
    return parse_spiffe_id(text)


# -- bad paths first ----------------------------------------------------------------------


@pytest.mark.parametrize("code", range(256))
def test_every_char_in_trust_domain_position(code: int) -> None:
    ch = chr(code)
    text = f"spiffe://ex{ch}ample.org/ns/a"
    if ch == "/":  # a separator: the trust domain becomes "ex", which is valid
        assert parse_spiffe_id(text) == SpiffeId("ex", "/ample.org/ns/a")
    elif ch in TD_OK:
        assert parse_spiffe_id(text).trust_domain == f"ex{ch}ample.org"
    else:
        with pytest.raises(SpiffeIdError):
            parse_spiffe_id(text)


@pytest.mark.parametrize("code", range(256))
def test_every_char_in_path_position(code: int) -> None:
    ch = chr(code)
    text = f"spiffe://example.org/ns/a{ch}b"
    if ch == "/":
        assert parse_spiffe_id(text).segments == ("ns", "a", "b")
    elif ch in PATH_OK:
        assert parse_spiffe_id(text).segments == ("ns", f"a{ch}b")
    else:
        with pytest.raises(SpiffeIdError):
            parse_spiffe_id(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "scheme"),
        ("SPIFFE://example.org/a", "scheme"),
        ("spiffe:/example.org/a", "scheme"),
        ("https://example.org/a", "scheme"),
        (" spiffe://example.org/a", "scheme"),
        ("spiffe://", "empty"),
        ("spiffe:///a", "empty"),
        ("spiffe://Example.org/a", "outside"),
        ("spiffe://example.org:8443/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#frag", "query or fragment"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org/a/", "trailing slash"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a/./b", "'.'"),
        ("spiffe://example.org/a/../b", "'..'"),
        ("spiffe://example.org/..", "'..'"),
        ("spiffe://example.org/a%2Fb", "percent"),
        ("spiffe://example.org/a%2e%2e", "percent"),
        ("spiffe://example.org/a b", "outside"),
        ("spiffe://example.org/a\x00", "outside"),
        ("spiffe://example.org/caf\u00e9", "outside"),
        ("spiffe://exa\u0131mple.org/a", "outside"),  # dotless i: no Unicode look-alikes
    ],
)
def test_rejects(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        parse_spiffe_id(text)


def test_length_limits() -> None:
    with pytest.raises(SpiffeIdError, match="trust domain longer"):
        parse_spiffe_id("spiffe://" + "a" * 256)
    assert parse_spiffe_id("spiffe://" + "a" * 255).trust_domain == "a" * 255
    long_path = "spiffe://td/" + "a" * (2048 - len("spiffe://td/"))
    assert parse_spiffe_id(long_path).path == "/" + "a" * (2048 - 12)
    with pytest.raises(SpiffeIdError, match="longer than 2048"):
        parse_spiffe_id(long_path + "a")


def test_check_trust_domain_name() -> None:
    assert check_trust_domain_name("prod.example.org") == "prod.example.org"
    for bad in ("", "Prod", "td:1", "td/x", "spiffe://td"):
        with pytest.raises(SpiffeIdError):
            check_trust_domain_name(bad)


# -- good paths ---------------------------------------------------------------------------


def test_parses_and_round_trips() -> None:
    got = sid("spiffe://prod.example.org/ns/pay-ments/sa/API_v1.2")
    assert got == SpiffeId("prod.example.org", "/ns/pay-ments/sa/API_v1.2")
    assert got.segments == ("ns", "pay-ments", "sa", "API_v1.2")
    assert str(got) == "spiffe://prod.example.org/ns/pay-ments/sa/API_v1.2"
    assert sid("spiffe://example.org").segments == ()


@given(st.text(alphabet="spiffe:/abcAZ09-._%?#@ \x00/", max_size=40))
def test_accepted_ids_are_canonical(text: str) -> None:
    """Whatever parses is printed back unchanged: the parser never 'fixes up' its input."""
    try:
        parsed = parse_spiffe_id(text)
    except SpiffeIdError:
        return
    assert str(parsed) == text


# -- patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "candidate", "expected"),
    [
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/x", True),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/ab/x", False),  # segment-aware, not a prefix
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a", False),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/x/y", False),
        ("spiffe://td/ns/*/sa/api", "spiffe://td/ns/b/sa/api", True),
        ("spiffe://td/ns/*/sa/api", "spiffe://td/ns/b/sa/api2", False),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a/x/y/z", True),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a", False),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/ab/x", False),
        ("spiffe://td/**", "spiffe://td/x", True),
        ("spiffe://td/**", "spiffe://td", False),
        ("spiffe://td/ns/a", "spiffe://td/ns/a", True),
        ("spiffe://td/ns/a", "spiffe://td/ns/A", False),
        ("spiffe://td/ns/a/*", "spiffe://other/ns/a/x", False),
        ("spiffe://td/ns/a/*", "spiffe://td.evil/ns/a/x", False),
    ],
)
def test_pattern_matching(pattern: str, candidate: str, expected: bool) -> None:
    assert SpiffePattern.parse(pattern).matches(sid(candidate)) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "spiffe://td/ns/a*",
        "spiffe://td/ns/*a",
        "spiffe://td/**/x",
        "spiffe://td/ns/***",
        "spiffe://*/ns/a",
        "spiffe://*.td/ns/a",
        "spiffe://td*/ns",
        "spiffe://td/ns/",
        "spiffe://td/ns/../x",
        "spiffe://**",
        "spiffe://TD/ns/*",
    ],
)
def test_pattern_rejects(pattern: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffePattern.parse(pattern)


def test_pattern_str_and_exactness() -> None:
    for text in ("spiffe://td/ns/*/sa/x", "spiffe://td/ns/**", "spiffe://td/a"):
        assert str(SpiffePattern.parse(text)) == text
    assert SpiffePattern.parse("spiffe://td/a").is_exact
    assert not SpiffePattern.parse("spiffe://td/*").is_exact
    assert not SpiffePattern.parse("spiffe://td/a/**").is_exact
