"""Binding rules: an XFCC element to the proxy that sent it and to its own certificate, and a
JWT to the mTLS peer that presents it (issue 16, items 3, 4 and 6)."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extauthz.identity.jwt import JwtIssuerConfig
from extauthz.identity.resolver import IdentityConfig
from extauthz.model import Identity, IdentityFailure, IdentitySource, Reason
from tests.conformance.envoy_model import append_forward, cert_hash, url_encoded_pem, xfcc_element
from tests.conformance.harness import make_cert
from tests.unit.test_identity import (
    CLIENT,
    NOW,
    PROXY,
    TD,
    XFCC,
    failure,
    issuer,
    req,
    resolve,
    resolver,
    token,
)

ADMIN = f"spiffe://{TD}/ns/admin/sa/root"
EXT = f"spiffe://{TD}/ext/a"
PROXY_CERT = make_cert((PROXY,), not_before=NOW - 60, not_after=NOW + 3600)
PROXY_PEM = url_encoded_pem(PROXY_CERT)
CLIENT_CERT = make_cert((CLIENT,), not_before=NOW - 60, not_after=NOW + 600)


def via_proxy(header: str) -> IdentityFailure | Identity | None:
    return resolve(req(PROXY, PROXY_PEM, **{XFCC: header}))


def envoy_writes(san: str, *, dns: tuple[str, ...] = ()) -> str:
    """The element Envoy writes for a client certificate whose URI SAN is `san` (raw)."""
    return xfcc_element(by=[PROXY], digest="cd" * 32, uri_sans=[san] if san else [],
                        dns=bool(dns), dns_sans=dns)


# -- a SAN with ',' or ';' cannot inject an element or a pair ---------------------------------


@pytest.mark.parametrize(
    ("san", "match"),
    [
        (f"{EXT},URI={ADMIN}", "no By="),  # a second element, without By=
        (f"{EXT},By={PROXY};URI={ADMIN}", "also names the forwarding proxy"),
        (f"{EXT},By={PROXY};Hash={'ab' * 32};URI={ADMIN}", "also names the forwarding proxy"),
        (f"{EXT};URI={ADMIN}", "has 2"),  # a second URI pair
        (f"{EXT};Hash={'ab' * 32}", "repeated"),  # a second Hash pair
        (f"{EXT};Subject=\"CN=x\"", "out of Envoy's order"),  # Subject precedes URI
        (f"{EXT};Foo=bar", "Envoy never writes"),
        (f"{EXT} ", "not a SPIFFE ID"),  # not trimmed
        (f"{EXT}=", "unquoted value contains"),
        (f'"{ADMIN}"', "quoted"),  # a SAN that is itself quoted never unquotes to an ID
        (f"{EXT}\"", "unquoted value contains"),
    ],
)
def test_a_san_with_separators_never_becomes_another_identity(san: str, match: str) -> None:
    found = via_proxy(envoy_writes(san))
    assert isinstance(found, IdentityFailure), found
    assert found.reason is Reason.INVALID_IDENTITY and match in found.detail
    assert found.source is IdentitySource.XFCC


def test_a_dns_san_cannot_add_a_uri_or_an_element() -> None:
    # DNS= pairs come after URI=: a DNS SAN with ';URI=' adds a URI pair out of order.
    failure(req(PROXY, PROXY_PEM, **{XFCC: envoy_writes(CLIENT, dns=(f"x;URI={ADMIN}",))}),
            Reason.INVALID_IDENTITY, "out of Envoy's order")
    # A client with no URI SAN at all: Envoy writes a bare URI= and the DNS SAN adds one.
    failure(req(PROXY, PROXY_PEM, **{XFCC: envoy_writes("", dns=(f"x;URI={ADMIN}",))}),
            Reason.INVALID_IDENTITY, "out of Envoy's order")
    # A proxy configured with dns but not uri details: the injected URI= would be the only
    # one — still after DNS=, so refused.
    only_dns = xfcc_element(by=[PROXY], digest="cd" * 32, uri=False, dns=True,
                            dns_sans=[f"x;URI={ADMIN}"])
    failure(req(PROXY, PROXY_PEM, **{XFCC: only_dns}), Reason.INVALID_IDENTITY, "out of Envoy")
    injected = f"x,By={PROXY};Hash={'ab' * 32};URI={ADMIN}"
    failure(req(PROXY, PROXY_PEM, **{XFCC: envoy_writes(CLIENT, dns=(injected,))}),
            Reason.INVALID_IDENTITY, "also names the forwarding proxy")


def test_an_ordinary_san_is_the_identity() -> None:
    found = via_proxy(envoy_writes(CLIENT, dns=("client.example.org",)))
    assert isinstance(found, Identity) and found.principal == CLIENT


# -- By= binds the element to the proxy that sent it -----------------------------------------


def test_rightmost_by_must_be_the_sending_proxy() -> None:
    other = f"spiffe://{TD}/ns/ingress/sa/other-gateway"
    header = xfcc_element(by=[other], digest="cd" * 32, uri_sans=[CLIENT])
    failure(req(PROXY, PROXY_PEM, **{XFCC: header}), Reason.INVALID_IDENTITY,
            "By= is not the forwarding proxy")
    # The proxy's own element on the left, someone else's on the right: not ours.
    header = append_forward(xfcc_element(by=[PROXY], digest="cd" * 32, uri_sans=[CLIENT]),
                            xfcc_element(by=[other], digest="ef" * 32, uri_sans=[ADMIN]))
    failure(req(PROXY, PROXY_PEM, **{XFCC: header}), Reason.INVALID_IDENTITY, "By= is not")


def test_repeated_by_naming_the_proxy_is_accepted() -> None:
    header = xfcc_element(by=[f"spiffe://{TD}/ns/ingress/sa/alias", PROXY], digest="cd" * 32,
                          uri_sans=[CLIENT])
    found = via_proxy(header)
    assert isinstance(found, Identity) and found.principal == CLIENT


def test_append_forward_reads_only_the_rightmost_element() -> None:
    earlier = xfcc_element(by=[f"spiffe://{TD}/ns/edge/sa/outer"], digest="ab" * 32,
                           uri_sans=[ADMIN])
    found = via_proxy(append_forward(earlier, envoy_writes(CLIENT)))
    assert isinstance(found, Identity) and found.principal == CLIENT


# -- Hash=, Cert=, Chain= and URI= must describe one certificate ------------------------------


def test_cert_hash_and_uri_that_agree_are_accepted_and_bound_the_expiry() -> None:
    header = xfcc_element(by=[PROXY], cert=CLIENT_CERT, include_cert=True, subject=True,
                          chain=[CLIENT_CERT])
    found = via_proxy(header)
    assert isinstance(found, Identity) and found.principal == CLIENT
    # The forwarded certificate expires before the proxy's: the identity expires with it.
    assert found.expires_at == NOW + 600


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"digest": "ab" * 32}, "Hash= is not the SHA-256"),
        ({"uri_sans": [ADMIN]}, "does not match URI="),
        ({"chain": [make_cert((CLIENT,))]}, "Chain= does not start with"),
    ],
)
def test_cert_that_disagrees_with_hash_uri_or_chain_is_401_saying_which(
        kwargs: dict[str, object], match: str) -> None:
    header = xfcc_element(by=[PROXY], cert=CLIENT_CERT, include_cert=True, **kwargs)  # type: ignore[arg-type]
    found = via_proxy(header)
    assert isinstance(found, IdentityFailure) and found.reason is Reason.INVALID_IDENTITY
    assert "XFCC binding" in found.detail and match in found.detail, found.detail


def test_chain_alone_binds_its_leaf() -> None:
    header = xfcc_element(by=[PROXY], cert=CLIENT_CERT, chain=[CLIENT_CERT, PROXY_CERT])
    found = via_proxy(header)
    assert isinstance(found, Identity) and found.principal == CLIENT
    wrong = xfcc_element(by=[PROXY], cert=CLIENT_CERT, chain=[make_cert((ADMIN,))])
    failure(req(PROXY, PROXY_PEM, **{XFCC: wrong}), Reason.INVALID_IDENTITY, "Hash= is not")


@pytest.mark.parametrize(
    ("cert", "match"),
    [
        (make_cert((CLIENT,), ku=None), "no key usage"),
        (make_cert((CLIENT,), ca=True), "CA certificate"),
        (make_cert((CLIENT,), not_after=NOW - 1), "expired"),
        (make_cert((CLIENT, ADMIN)), "exactly one URI SAN"),
    ],
)
def test_a_forwarded_certificate_must_itself_be_a_valid_svid(cert: x509.Certificate,
                                                             match: str) -> None:
    header = xfcc_element(by=[PROXY], cert=cert, include_cert=True, uri_sans=[CLIENT])
    failure(req(PROXY, PROXY_PEM, **{XFCC: header}), Reason.INVALID_IDENTITY, match)


def test_malformed_hash_is_refused() -> None:
    for digest in ("123456", "AB" * 32, "ab" * 31, "zz" * 32):
        header = xfcc_element(by=[PROXY], digest=digest, uri_sans=[CLIENT])
        failure(req(PROXY, PROXY_PEM, **{XFCC: header}), Reason.INVALID_IDENTITY, "Hash=")


# -- JWT bound to the mTLS peer ----------------------------------------------------------------


def thumbprint(cert: x509.Certificate) -> str:
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def bound_resolver() -> object:
    return resolver(jwt_issuers=(issuer(bind_to_peer=True),))


def test_peer_binding_is_off_by_default() -> None:
    found = resolve(req(PROXY, PROXY_PEM, authorization=f"Bearer {token(sub=CLIENT)}"))
    assert isinstance(found, Identity) and found.principal == CLIENT
    assert JwtIssuerConfig("https://x", frozenset({"a"})).bind_to_peer is False


def test_bound_token_whose_sub_is_the_peer_is_accepted() -> None:
    r = resolver(jwt_issuers=(issuer(bind_to_peer=True),))
    found = resolve(req(CLIENT, url_encoded_pem(CLIENT_CERT),
                        authorization=f"Bearer {token(sub=CLIENT)}"), r)
    assert isinstance(found, Identity) and found.source is IdentitySource.JWT
    # Without a forwarded certificate, Envoy's principal is the peer's SPIFFE ID.
    found = resolve(req(CLIENT, authorization=f"Bearer {token(sub=CLIENT)}"), r)
    assert isinstance(found, Identity) and found.principal == CLIENT


def test_bound_token_presented_by_another_peer_is_401() -> None:
    r = resolver(jwt_issuers=(issuer(bind_to_peer=True),))
    t = token(sub=CLIENT)
    failure(req(PROXY, PROXY_PEM, authorization=f"Bearer {t}"), Reason.INVALID_IDENTITY,
            "sub is not the peer's SPIFFE ID", r)
    failure(req(authorization=f"Bearer {t}"), Reason.INVALID_IDENTITY, "bound to the mTLS peer", r)
    # The verified token is cached; the binding is still checked for every request.
    assert isinstance(resolve(req(CLIENT, authorization=f"Bearer {t}"), r), Identity)
    failure(req(PROXY, PROXY_PEM, authorization=f"Bearer {t}"), Reason.INVALID_IDENTITY,
            "sub is not", r)


def test_cnf_thumbprint_of_the_peer_certificate_binds_the_token() -> None:
    r = resolver(jwt_issuers=(issuer(bind_to_peer=True),))
    t = token(sub=CLIENT, cnf={"x5t#S256": thumbprint(PROXY_CERT)})
    found = resolve(req(PROXY, PROXY_PEM, authorization=f"Bearer {t}"), r)
    assert isinstance(found, Identity) and found.principal == CLIENT


@pytest.mark.parametrize(
    ("cnf", "peer_cert", "match"),
    [
        ({"x5t#S256": thumbprint(CLIENT_CERT)}, PROXY_PEM, "does not match the mTLS peer"),
        ({"x5t#S256": thumbprint(PROXY_CERT) + "="}, PROXY_PEM, "does not match"),
        ({"x5t#S256": thumbprint(PROXY_CERT)}, "", "no peer certificate was forwarded"),
        ({"jkt": "abc"}, PROXY_PEM, "no x5t#S256"),
        ("not-an-object", PROXY_PEM, "no x5t#S256"),
    ],
)
def test_cnf_that_does_not_match_is_401_even_when_sub_is_the_peer(
        cnf: object, peer_cert: str, match: str) -> None:
    r = resolver(jwt_issuers=(issuer(bind_to_peer=True),))
    t = token(sub=PROXY, cnf=cnf)
    failure(req(PROXY, peer_cert, authorization=f"Bearer {t}"), Reason.INVALID_IDENTITY, match, r)


def test_bound_token_with_an_unparseable_peer_certificate_is_401() -> None:
    r = resolver(jwt_issuers=(issuer(bind_to_peer=True),))
    t = token(sub=PROXY, cnf={"x5t#S256": thumbprint(PROXY_CERT)})
    failure(req(PROXY, quote("-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n"),
                authorization=f"Bearer {t}"), Reason.INVALID_IDENTITY, "peer certificate", r)


def test_bind_to_peer_is_read_from_configuration() -> None:
    cfg = IdentityConfig.from_mapping({"jwt": {"issuers": [
        {"issuer": "https://idp", "audiences": ["a"], "jwks_file": "/x", "bind_to_peer": True}]}})
    assert cfg.jwt_issuers[0].bind_to_peer is True
    with pytest.raises(ValueError, match="'bind_to_peer' must be true or false"):
        IdentityConfig.from_mapping({"jwt": {"issuers": [
            {"issuer": "https://idp", "audiences": ["a"], "jwks_file": "/x",
             "bind_to_peer": "yes"}]}})


def test_a_jwt_svid_without_a_path_is_not_a_workload() -> None:
    failure(req(PROXY, PROXY_PEM, authorization=f"Bearer {token(sub=f'spiffe://{TD}')}"),
            Reason.INVALID_IDENTITY, "no path")


def test_hash_helper_matches_the_parser() -> None:
    from extauthz.identity.x509svid import parse_certificate

    assert parse_certificate(url_encoded_pem(CLIENT_CERT)).sha256 == cert_hash(CLIENT_CERT)
