from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extauthz.identity.xfcc import XfccElement, XfccError, parse_xfcc

HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"


def uris(header: str) -> list[tuple[str, ...]]:
    return [e.values("uri") for e in parse_xfcc(header)]


# -- injection: quoted separators never split -------------------------------------------


def test_subject_cannot_forge_an_element() -> None:
    # The client chose its certificate's Subject; a naive split(",") would see a last element
    # with URI=spiffe://td/admin.
    header = 'By=spiffe://td/proxy;Subject="CN=x,URI=spiffe://td/admin";URI=spiffe://td/client'
    (element,) = parse_xfcc(header)
    assert element.values("uri") == ("spiffe://td/client",)
    assert element.get("subject") == "CN=x,URI=spiffe://td/admin"


def test_subject_cannot_forge_a_pair() -> None:
    header = 'Subject="CN=x;URI=spiffe://td/admin";URI=spiffe://td/client'
    assert uris(header) == [("spiffe://td/client",)]


def test_escaped_quote_does_not_end_the_value_and_is_kept_verbatim() -> None:
    header = r'Subject="CN=\",URI=spiffe://td/admin,x=\"";URI=spiffe://td/client'
    (element,) = parse_xfcc(header)
    assert element.get("subject") == r'CN=\",URI=spiffe://td/admin,x=\"'
    assert element.values("uri") == ("spiffe://td/client",)


def test_escaped_backslash_then_quote_ends_the_value() -> None:
    header = r'Subject="a\\";URI=spiffe://td/c'
    (element,) = parse_xfcc(header)
    assert element.get("subject") == "a\\\\"
    assert element.values("uri") == ("spiffe://td/c",)


def test_client_supplied_elements_stay_left() -> None:
    header = "URI=spiffe://td/admin,By=spiffe://td/proxy;URI=spiffe://td/client"
    assert uris(header) == [("spiffe://td/admin",), ("spiffe://td/client",)]


# -- malformed input is rejected, not guessed at ------------------------------------------


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "invalid key"),
        ("URI", "without '='"),
        ("=spiffe://td/a", "invalid key"),
        ('Subject="unterminated;URI=spiffe://td/a', "unterminated"),
        ('Subject="a"b;URI=spiffe://td/a', "after quoted value"),
        ('Subject=a"b;URI=spiffe://td/a', "unquoted value contains"),
        ("Subject=CN=x;URI=spiffe://td/a", "unquoted value contains '='"),
        (r"Subject=a\b", "unquoted value contains"),
        ('Subject="a\\', "unterminated"),
        ("URI=spiffe://td/a,,URI=spiffe://td/b", "invalid key"),
        (",URI=spiffe://td/a", "invalid key"),
        ("URI=spiffe://td/a,", "ends with a separator"),
        ("URI=spiffe://td/a;", "ends with a separator"),
        ("URI=spiffe://td/a;;By=x", "invalid key"),
        ("URI=spiffe://td/a\r\nX-Injected: 1", "control character"),
        ("URI=spiffe://td/a\x00", "control character"),
        ('Subject="a\x7f"', "control character"),
        ("Hash=a;hash=b", "repeated"),  # keys are case-insensitive
        ('Subject="a";Subject="b"', "repeated"),
        ('Cert="a";Cert="b"', "repeated"),
        ('Chain="a";Chain="b"', "repeated"),
        ('URI="spiffe://td/a"', "URI value is quoted"),  # Envoy never quotes URI, DNS, By, Hash
        ('DNS="a.example"', "DNS value is quoted"),
        ('By="spiffe://td/p";URI=spiffe://td/a', "BY value is quoted"),
        (f'Hash="{HASH}"', "HASH value is quoted"),
        ("Ur I=spiffe://td/a", "without '='"),
    ],
)
def test_malformed(header: str, message: str) -> None:
    with pytest.raises(XfccError, match=message):
        parse_xfcc(header)


def test_oversized_header() -> None:
    header = "URI=spiffe://td/" + "a" * 100
    with pytest.raises(XfccError, match="longer than 64"):
        parse_xfcc(header, max_length=64)
    assert parse_xfcc(header, max_length=len(header))


def test_too_many_elements() -> None:
    header = ",".join(["URI=spiffe://td/a"] * 5)
    with pytest.raises(XfccError, match="more than 4 elements"):
        parse_xfcc(header, max_elements=4)
    assert len(parse_xfcc(header, max_elements=5)) == 5


# -- Envoy's documented forms --------------------------------------------------------------


def test_envoy_single_element() -> None:
    header = (
        f"By=http://frontend.lyft.com;Hash={HASH};"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com'
    )
    (element,) = parse_xfcc(header)
    assert element.get("by") == "http://frontend.lyft.com"
    assert element.get("HASH") == HASH
    assert element.get("subject") == "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"


def test_envoy_repeated_sans_and_two_elements() -> None:
    header = (
        f"By=http://frontend.lyft.com;Hash={HASH};URI=http://testclient.lyft.com,"
        f'By=http://backend.lyft.com;Hash={HASH};Subject="CN=Test Client,OU=Lyft";'
        "URI=spiffe://td/a;URI=spiffe://td/b;DNS=lyft.com;DNS=www.lyft.com"
    )
    first, last = parse_xfcc(header)
    assert first.values("uri") == ("http://testclient.lyft.com",)
    assert last.values("uri") == ("spiffe://td/a", "spiffe://td/b")
    assert last.as_dict()["dns"] == ("lyft.com", "www.lyft.com")


def test_url_encoded_cert_and_unquoted_values_are_not_trimmed() -> None:
    header = 'Cert="-----BEGIN%20CERTIFICATE-----%0AMIIB";URI=spiffe://td/a , URI=spiffe://td/b'
    first, last = parse_xfcc(header)
    assert first.get("cert") == "-----BEGIN%20CERTIFICATE-----%0AMIIB"
    assert first.values("uri") == ("spiffe://td/a ",)  # the space is part of the SAN as sent
    assert last.values("uri") == ("spiffe://td/b",)
    (element,) = parse_xfcc("URI= spiffe://td/a")
    assert element.values("uri") == (" spiffe://td/a",)


def test_repeated_by_in_one_element_is_envoys_shape() -> None:
    (element,) = parse_xfcc("By=spiffe://td/p1;By=spiffe://td/p2;Hash=" + HASH + ";URI=spiffe://td/a")
    assert element.values("by") == ("spiffe://td/p1", "spiffe://td/p2")


def test_empty_values_are_kept_as_empty() -> None:
    (element,) = parse_xfcc('Subject="";URI=')
    assert element == XfccElement((("subject", ""), ("uri", "")))


_VALUE = st.text(alphabet='ab,;="\\ ', max_size=12)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@given(st.lists(st.lists(_VALUE, min_size=1, max_size=3), min_size=1, max_size=3))
def test_round_trip_of_quoted_values(elements: list[list[str]]) -> None:
    """Any value, correctly escaped and quoted, comes back verbatim (escapes kept): no content
    can move a boundary."""
    header = ",".join(
        ";".join(f'Subject{i}="{_quote(v)}"' for i, v in enumerate(e)) for e in elements
    )
    parsed = parse_xfcc(header)
    assert [[v for _, v in p.pairs] for p in parsed] == [[_quote(v) for v in e] for e in elements]


# -- element rules, the memo and certificate hashing ------------------------------------------

PROXY_ID = "spiffe://td.test/ns/edge/sa/gw"
CLIENT_ID = "spiffe://td.test/ns/web/sa/fe"


def test_element_cache_parses_each_header_once_and_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from extauthz.identity import xfcc

    calls: list[str] = []
    real = xfcc.parse_xfcc

    def counting(value: str, **kw: int) -> tuple[XfccElement, ...]:
        calls.append(value)
        return real(value, **kw)

    monkeypatch.setattr(xfcc, "parse_xfcc", counting)
    cache = xfcc.ElementCache(size=2)
    good = f"By={PROXY_ID};URI={CLIENT_ID}"
    assert cache.element(good, PROXY_ID) is cache.element(good, PROXY_ID)
    assert len(calls) == 1
    for _ in range(2):  # a failure is remembered as its message
        with pytest.raises(XfccError, match="XFCC binding: .*not the forwarding proxy"):
            cache.element(good, "spiffe://td.test/other")
    assert len(calls) == 2
    with pytest.raises(XfccError, match="malformed XFCC: unterminated"):
        cache.element('Subject="x', PROXY_ID)  # a third key: the memo (size 2) starts over
    cache.element(good, PROXY_ID)
    assert len(calls) == 4


@pytest.mark.parametrize(("element", "match"), [
    (f"By={PROXY_ID};SAN={CLIENT_ID}", "SAN=, which Envoy never writes"),
    (f"By={PROXY_ID};URI=", "no URI SAN"),
    (f"By={PROXY_ID};URI={CLIENT_ID};By={PROXY_ID}", "out of Envoy's order"),
    (f'By={PROXY_ID};Hash={HASH};Cert="x";URI={CLIENT_ID}', "not one PEM certificate"),
    (f'By={PROXY_ID};Chain="x";URI={CLIENT_ID}', "Chain= does not start with a complete"),
])
def test_check_element_refuses_what_envoy_never_writes(element: str, match: str) -> None:
    from extauthz.identity.xfcc import check_element

    (parsed,) = parse_xfcc(element)
    with pytest.raises(XfccError, match=match):
        check_element(parsed)


def test_sidecar_element_is_exactly_one_element() -> None:
    from extauthz.identity.xfcc import sidecar_element

    one = parse_xfcc(f"By={PROXY_ID};URI={CLIENT_ID}")
    assert sidecar_element(one).uri == CLIENT_ID
    two = parse_xfcc(f"By={PROXY_ID};URI={CLIENT_ID},URI=spiffe://td.test/admin")
    with pytest.raises(XfccError, match="2 elements"):
        sidecar_element(two)


@pytest.mark.parametrize("encoded", [
    "-----BEGIN%20CERTIFICATE-----%0A%zz%0A-----END%20CERTIFICATE-----%0A",
    "-----BEGIN%20CERTIFICATE-----%0A!!!!%0A-----END%20CERTIFICATE-----%0A",
    "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A",
    "MIIB",
])
def test_certificate_sha256_refuses_anything_but_one_pem_block(encoded: str) -> None:
    from extauthz.identity.xfcc import certificate_sha256

    with pytest.raises(XfccError):
        certificate_sha256(encoded)


def test_a_path_less_trusted_proxy_is_a_configuration_error() -> None:
    from extauthz.identity.resolver import IdentityConfig

    with pytest.raises(ValueError, match="no path"):
        IdentityConfig(trusted_proxies=frozenset({"spiffe://td.test"}))
