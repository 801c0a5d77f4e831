"""XFCC as Envoy writes it: Envoy's own documented and tested headers, RFC 2253 subjects as
Envoy prints them, and SANs that try to inject pairs or elements — parsed, and sent through
`Check` from a trusted proxy on every transport. Property tests (hypothesis) at the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.identity.resolver import IdentityConfig, IdentityResolver
from extauthz.identity.spiffe import SpiffeIdError, parse_workload_id
from extauthz.identity.xfcc import XfccError, parse_rfc2253, parse_xfcc
from extauthz.model import Identity, IdentityFailure, Request
from tests.conformance.envoy_model import (
    append_forward,
    printed_entries,
    rfc2253,
    url_encoded_pem,
    xfcc_element,
)
from tests.conformance.harness import (
    CHANNELS_OF,
    NOW,
    PROXY,
    PROXY_CERT,
    TD_PATH,
    TRANSPORTS,
    XFCC,
    Call,
    Harness,
    build_harness,
    make_cert,
)
from tests.conformance.vectors import load

VECTORS: list[dict[str, Any]] = load("xfcc.json")["vectors"]
HEADERS = [v for v in VECTORS if v["kind"] == "header"]
SUBJECTS = [v for v in VECTORS if v["kind"] == "subject"]
INJECTIONS = [v for v in VECTORS if v["kind"] == "injection"]
SHORT = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "C": NameOID.COUNTRY_NAME,
         "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "L": NameOID.LOCALITY_NAME,
         "ST": NameOID.STATE_OR_PROVINCE_NAME}
CLIENT = "spiffe://td.test/ns/web/sa/frontend"
ENVOY_PROXIES = sorted({v["proxy"] for v in HEADERS
                        if v.get("proxy", "") and v["proxy"].startswith("spiffe://")})


def name_of(rdns: list[list[list[str]]]) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(SHORT[t], v) for t, v in rdn]) for rdn in rdns])


# -- parsing Envoy's own headers ----------------------------------------------------------------


@pytest.mark.parametrize("vector", HEADERS, ids=[v["name"] for v in HEADERS])
def test_envoy_documented_and_tested_headers_parse_as_envoy_means_them(
        vector: dict[str, Any]) -> None:
    if "error" in vector:
        with pytest.raises(XfccError, match=vector["error"]):
            parse_xfcc(vector["header"])
        return
    parsed = [{k: list(v) for k, v in e.as_dict().items()} for e in parse_xfcc(vector["header"])]
    assert parsed == vector["elements"]


@pytest.mark.parametrize("vector", SUBJECTS, ids=[v["rfc2253"] or "(empty)" for v in SUBJECTS])
def test_rfc2253_subjects_are_printed_and_parsed_as_envoy_prints_them(
        vector: dict[str, Any]) -> None:
    # The recorded text came from a real certificate: compare with the model on one too, since
    # DER sorts the attributes of a multi-valued RDN.
    name = make_cert((CLIENT,), subject=name_of(vector["rdns"]), san_critical=True).subject
    assert rfc2253(name) == vector["rfc2253"]  # the model matches recorded OpenSSL output
    decoded = parse_rfc2253(vector["rfc2253"])
    assert decoded == tuple(tuple(rdn) for rdn in printed_entries(name))
    header = f'By={PROXY};Hash={"ab" * 32};Subject="{vector["rfc2253"]}";URI={CLIENT}'
    (element,) = parse_xfcc(header)
    assert element.get("subject") == vector["rfc2253"]
    assert element.values("uri") == (CLIENT,)


@pytest.mark.parametrize("text", ["CN=a\\", "CN=a\\zz", "CN=a\\C3", "CN=a\"b", "=x", "CN=a,",
                                  "CN=\\FF\\FE", "CN=a;b"])
def test_malformed_rfc2253_is_an_error_not_a_guess(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc2253(text)


# -- through Check, from a trusted proxy ----------------------------------------------------------


ALL = sorted(TRANSPORTS)
FORWARDING = [t for t in ALL if "xfcc" in CHANNELS_OF[t]]


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    yield from build_harness(
        tmp_path_factory.mktemp(f"xfcc-{request.param}"), request.param,
        trust_domains=["td.test", "lyft.com"],
        identity={"trusted_proxies": [PROXY, *ENVOY_PROXIES]},
    )


def _from(proxy: str, header: str) -> Call:
    cert = PROXY_CERT if proxy == PROXY else make_cert((proxy,))
    return Call(principal=proxy, certificate=url_encoded_pem(cert), headers={XFCC: header},
                path=TD_PATH)


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_envoy_headers_from_their_proxy_give_exactly_the_recorded_identity(
        harness: Harness) -> None:
    sent = 0
    for v in HEADERS:
        proxy = v.get("proxy") or ""
        if not proxy.startswith("spiffe://"):
            continue
        sent += 1
        answer = harness.check(_from(proxy, v["header"]))
        if v["identity"] is None:
            assert answer.status == 401, v["name"]
        else:
            assert answer.allowed and answer.principal == v["identity"], (v["name"], answer)
    assert sent >= 4


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_subjects_with_escapes_and_non_ascii_do_not_break_the_element(harness: Harness) -> None:
    for v in SUBJECTS:
        cert = make_cert((CLIENT,), subject=name_of(v["rdns"]),
                         san_critical=not v["rdns"])  # X509-SVID 3.1: no subject, critical SAN
        element = xfcc_element(by=[PROXY], cert=cert, include_cert=True, subject=True)
        assert f'Subject="{v["rfc2253"]}"' in element
        answer = harness.check(_from(PROXY, element))
        assert answer.allowed and answer.principal == CLIENT, (v["rfc2253"], answer)


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_sans_with_separators_never_yield_an_identity(harness: Harness) -> None:
    for v in INJECTIONS:
        san = v["san"].replace("PROXY", PROXY)
        if v["where"] == "uri":
            element = xfcc_element(by=[PROXY], digest="cd" * 32, uri_sans=[san])
        else:
            element = xfcc_element(by=[PROXY], digest="cd" * 32, uri_sans=[CLIENT], dns=True,
                                   dns_sans=[san])
        answer = harness.check(_from(PROXY, element))
        assert answer.status == 401 and answer.reason == "invalid_identity", (v["why"], answer)
        assert answer.challenge.startswith("mTLS "), answer


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_binding_mismatch_is_401_with_a_reason_that_says_which(harness: Harness) -> None:
    cert = make_cert((CLIENT,))
    cases = {
        "Hash= is not the SHA-256": xfcc_element(by=[PROXY], cert=cert, include_cert=True,
                                                 digest="ab" * 32),
        "does not match URI=": xfcc_element(by=[PROXY], cert=cert, include_cert=True,
                                            uri_sans=["spiffe://td.test/ns/admin"]),
        "By= is not the forwarding proxy": xfcc_element(by=["spiffe://td.test/other"],
                                                         cert=cert, include_cert=True),
        "no By=": xfcc_element(by=[], cert=cert, include_cert=True),
    }
    for fragment, element in cases.items():
        answer = harness.check(_from(PROXY, element))
        assert answer.status == 401 and fragment in answer.challenge, (fragment, answer)


@pytest.mark.parametrize("harness", FORWARDING, indirect=True)
def test_repeated_by_within_one_element_is_accepted(harness: Harness) -> None:
    element = xfcc_element(by=["spiffe://td.test/ns/edge/sa/alias", PROXY],
                           cert=make_cert((CLIENT,)), include_cert=True)
    answer = harness.check(_from(PROXY, element))
    assert answer.allowed and answer.principal == CLIENT


@pytest.mark.parametrize("harness", ALL, indirect=True)
def test_a_raw_fragment_is_403_ambiguous_path(harness: Harness) -> None:
    for path in ("/td/x#/../../admin", "/any/x#", "/td/x?a=1#b", "/api/v1/items#/../../admin"):
        answer = harness.check(Call(principal=CLIENT, path=path))
        assert (answer.status, answer.reason) == (403, "ambiguous_path"), (path, answer)
    assert harness.check(Call(principal=CLIENT, path="/td/x?a=1")).allowed


SIDECAR_PEER = [t for t in ALL if "xfcc" not in CHANNELS_OF[t]]


def _sidecar(element: str) -> Call:
    return Call(sidecar_xfcc=element, path=TD_PATH)


@pytest.mark.parametrize("harness", SIDECAR_PEER, indirect=True)
def test_a_sidecars_own_element_follows_the_same_rules(harness: Harness) -> None:
    """Over HTTP the peer is the sidecar's SANITIZE_SET element: subjects with escapes parse,
    SAN injections and unbound certificates are refused, exactly as from a trusted proxy."""
    sidecar = "spiffe://svc.conformance.test/ns/svc/sa/sidecar"
    for v in SUBJECTS:
        cert = make_cert((CLIENT,), subject=name_of(v["rdns"]), san_critical=not v["rdns"])
        element = xfcc_element(by=[sidecar], cert=cert, include_cert=True, subject=True)
        answer = harness.check(_sidecar(element))
        assert answer.allowed and answer.principal == CLIENT, (v["rfc2253"], answer)
    for v in INJECTIONS:
        san = v["san"].replace("PROXY", sidecar)
        if v["where"] == "uri":
            element = xfcc_element(by=[sidecar], digest="cd" * 32, uri_sans=[san])
        else:
            element = xfcc_element(by=[sidecar], digest="cd" * 32, uri_sans=[CLIENT], dns=True,
                                   dns_sans=[san])
        answer = harness.check(_sidecar(element))
        assert answer.status == 401 and answer.reason == "invalid_identity", (v["why"], answer)
    cert = make_cert((CLIENT,))
    for fragment, element in {
        "Hash= is not the SHA-256": xfcc_element(by=[sidecar], cert=cert, include_cert=True,
                                                 digest="ab" * 32),
        "differs from the reported principal": xfcc_element(by=[sidecar], cert=cert,
                                                            include_cert=True,
                                       uri_sans=["spiffe://td.test/ns/admin"]),
        "elements": append_forward(xfcc_element(by=[PROXY], cert=cert),
                                   xfcc_element(by=[sidecar], cert=make_cert((PROXY,)))),
    }.items():
        answer = harness.check(_sidecar(element))
        assert answer.status == 401 and fragment in answer.challenge, (fragment, answer)


# -- properties -------------------------------------------------------------------------------------

RESOLVER = IdentityResolver.from_config(IdentityConfig(trusted_proxies=frozenset({PROXY})))
PROXY_PEM = url_encoded_pem(PROXY_CERT)
_NASTY = [*',;="\\ +<>#\t', "é", "日", "\u2028", "=", "URI=", "By=", ",By=", ";URI="]
_SEGMENT = st.from_regex(r"[A-Za-z0-9._-]{1,8}", fullmatch=True).filter(lambda s: s not in (".", ".."))
_VALID_ID = st.builds(lambda td, segs: f"spiffe://{td}/" + "/".join(segs),
                      st.sampled_from(["td.test", "a.b-c_d", "10.0.0.1"]),
                      st.lists(_SEGMENT, min_size=1, max_size=4))


def _joined(pieces: list[str], min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), min_size=min_size, max_size=max_size).map("".join)


# What an injection appends to a real ID: Envoy's own keys behind a separator ({} is an ID).
_INJECT = [f",By={PROXY};URI={{}}", f",By={PROXY};Hash={'ab' * 32};URI={{}}", ";URI={}",
           ",URI={}", ';Subject="x";URI={}', ';Subject="x"', f";Hash={'ab' * 32}", f";By={PROXY}",
           ";DNS=x.example;URI={}", " ;URI={}", "{}"]
_SAN = st.one_of(
    _VALID_ID,
    st.builds(lambda a, injection, b: a + injection.format(b), _VALID_ID,
              st.sampled_from(_INJECT), _VALID_ID),
    st.builds(lambda a, b: a + b, _VALID_ID, _joined([*_NASTY, "a", "b", "/"], min_size=1)),
    _joined([*_NASTY, *"spiffe:/tdab"], max_size=24),
)
_DNS = st.one_of(st.from_regex(r"[a-z0-9]{1,8}\.example", fullmatch=True),
                 _joined([*_NASTY, "a", "b", "."], min_size=1))
_VALUE = _joined([*_NASTY, *"aZ09 .-"], min_size=1, max_size=10)
_NAMES = st.lists(st.lists(st.tuples(st.sampled_from(["CN", "O", "OU"]), _VALUE), min_size=1,
                           max_size=2, unique_by=lambda pair: pair), min_size=0, max_size=3)


def _resolve(header: str) -> Identity | IdentityFailure | None:
    request = Request(source_principal=PROXY, peer_certificate=PROXY_PEM, headers={XFCC: header})
    return RESOLVER.resolve(request, NOW)


def _is_workload(text: str) -> bool:
    try:
        parse_workload_id(text)
    except SpiffeIdError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uris=st.lists(_SAN, max_size=3), dns=st.lists(_DNS, max_size=2),
       prior=st.one_of(st.none(), _joined([*_NASTY, *"abURI"], max_size=30)))
def test_no_san_list_yields_an_identity_other_than_its_single_valid_uri(
        uris: list[str], dns: list[str], prior: str | None) -> None:
    element = xfcc_element(by=[PROXY], digest="ef" * 32, uri_sans=uris, dns=True, dns_sans=dns)
    found = _resolve(append_forward(prior, element))
    if isinstance(found, Identity):
        # Never a second identity, never a part of a SAN, never a SAN that is not an ID.
        assert len(uris) == 1 and found.principal == uris[0] and _is_workload(uris[0])
    else:
        assert isinstance(found, IdentityFailure)
    clean = all(not set(d) & set(',;"=\\\t\u2028') for d in dns)
    if prior is None and clean and len(uris) == 1 and _is_workload(uris[0]):
        # What Envoy writes for a real SVID always round-trips to that SVID's ID.
        assert isinstance(found, Identity) and found.principal == uris[0], found


@settings(max_examples=200, deadline=None)
@given(rdns=_NAMES, uri=_VALID_ID)
def test_any_subject_round_trips_and_never_moves_a_boundary(
        rdns: list[list[tuple[str, str]]], uri: str) -> None:
    name = x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(SHORT[t], v) for t, v in rdn]) for rdn in rdns])
    text = rfc2253(name)
    header = f'By={PROXY};Hash={"ab" * 32};Subject="{text}";URI={uri}'
    (element,) = parse_xfcc(header)
    assert element.get("subject") == text
    assert element.values("uri") == (uri,)
    assert parse_rfc2253(text) == tuple(tuple(rdn) for rdn in printed_entries(name))
    found = _resolve(header)
    assert isinstance(found, Identity) and found.principal == uri


@settings(max_examples=300, deadline=None)
@given(_joined([*_NASTY, *'abc"/:', "spiffe://td.test/x", f"By={PROXY}", "Hash=" + "ab" * 32],
               max_size=40))
def test_arbitrary_headers_name_at_most_one_identity_present_in_the_rightmost_element(
        header: str) -> None:
    found = _resolve(header)
    if isinstance(found, Identity):
        last = parse_xfcc(header)[-1]
        assert last.values("uri") == (found.principal,)
        assert PROXY in last.values("by")
