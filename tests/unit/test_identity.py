from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz.identity.jwt import JwkKey, JwtIssuerConfig
from extauthz.identity.resolver import (
    NOTES_CLAIM,
    IdentityConfig,
    IdentityResolver,
    www_authenticate,
)
from extauthz.model import Identity, IdentityFailure, IdentitySource, Reason, Request
from extauthz.sources.jwks import KeySets
from tests.unit.test_x509svid import ID, NOW, make_cert

TD = "prod.example.org"
PROXY = f"spiffe://{TD}/ns/ingress/sa/gateway"
CLIENT = f"spiffe://{TD}/ns/web/sa/frontend"
ISS = "https://oidc.prod.example.org"
KEY = ec.generate_private_key(ec.SECP256R1())
XFCC = "x-forwarded-client-cert"


class Keys:
    ready = True

    def get_key(self, kid: str | None) -> JwkKey | None:
        return JwkKey("k1", "EC", "P-256", "", KEY.public_key()) if kid == "k1" else None


def issuer(**kw: Any) -> JwtIssuerConfig:
    return JwtIssuerConfig(ISS, frozenset({"payments"}), jwt_svid=True, trust_domain=TD, **kw)


def resolver(**kw: Any) -> IdentityResolver:
    kw.setdefault("trust_domains", frozenset({TD}))
    kw.setdefault("trusted_proxies", frozenset({PROXY}))
    kw.setdefault("jwt_issuers", (issuer(),))
    memo = kw.pop("memo_size", 1024)
    return IdentityResolver.from_config(IdentityConfig(**kw), keys={ISS: Keys()}, memo_size=memo)


def token(sub: str = ID, **over: Any) -> str:
    claims = {"iss": ISS, "sub": sub, "aud": "payments", "exp": NOW + 300, **over}
    return jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": "k1"})


def req(principal: str = "", cert: str = "", **headers: str) -> Request:
    return Request(source_principal=principal, peer_certificate=cert, headers=headers)


def resolve(request: Request, r: IdentityResolver | None = None) -> Any:
    return (r or resolver()).resolve(request, NOW)


def failure(
    request: Request, reason: Reason, match: str, r: IdentityResolver | None = None
) -> None:
    found = resolve(request, r)
    assert isinstance(found, IdentityFailure), found
    assert found.reason is reason
    assert match in found.detail


# -- mTLS ------------------------------------------------------------------------------------


def test_mtls_bad_paths() -> None:
    failure(req("api.example.org"), Reason.INVALID_IDENTITY, "not a SPIFFE ID")  # DNS SAN
    failure(req("CN=api,O=corp"), Reason.INVALID_IDENTITY, "not a SPIFFE ID")  # subject DN
    failure(req("spiffe://" + "a" * 3000), Reason.INVALID_IDENTITY, "too long")
    failure(req(ID, make_cert(ca=True)), Reason.INVALID_IDENTITY, "CA certificate")
    failure(req(CLIENT, make_cert()), Reason.INVALID_IDENTITY, "differs")
    failure(req("", make_cert()), Reason.INVALID_IDENTITY, "differs")
    failure(req(ID, make_cert(not_after=NOW - 1)), Reason.INVALID_IDENTITY, "expired")
    r = resolver(require_peer_certificate=True)
    failure(req(ID), Reason.INVALID_IDENTITY, "not forwarded", r)


def test_mtls_identity_with_certificate() -> None:
    found = resolve(req(ID, make_cert()))
    assert found == Identity(ID, IdentitySource.MTLS, TD, expires_at=NOW + 3600)
    assert resolve(req(ID)) == Identity(ID, IdentitySource.MTLS, TD)
    assert resolve(req()) is None


def test_untrusted_trust_domain() -> None:
    failure(req("spiffe://evil.org/ns/a"), Reason.UNTRUSTED_TRUST_DOMAIN, "evil.org")
    assert resolve(req("spiffe://evil.org/ns/a"), resolver(trust_domains=frozenset()))


def test_revoked_principal() -> None:
    r = resolver(revoked_principals=frozenset({ID}))
    failure(req(ID), Reason.REVOKED, "revoked", r)
    failure(req(PROXY, **{XFCC: f"By={PROXY};URI={ID}"}), Reason.REVOKED, "revoked", r)
    r = resolver(revoked_principals=frozenset({PROXY}))
    failure(req(PROXY, **{XFCC: f"By={PROXY};URI={ID}"}), Reason.REVOKED, "proxy is revoked", r)


# -- XFCC ------------------------------------------------------------------------------------


def test_xfcc_from_trusted_proxy() -> None:
    header = f"URI=spiffe://{TD}/ns/admin,By={PROXY};Hash={'ab' * 32};URI={CLIENT}"
    found = resolve(req(PROXY, **{XFCC: header}))
    assert found.principal == CLIENT and found.source is IdentitySource.XFCC
    assert found.claims == {"proxy": PROXY}
    # The proxy's own certificate is still checked, and bounds the forwarded identity.
    found = resolve(req(PROXY, make_cert((PROXY,)), **{XFCC: f"By={PROXY};URI={CLIENT}"}))
    assert found.principal == CLIENT and found.expires_at == NOW + 3600


def test_xfcc_subject_injection_through_trusted_proxy() -> None:
    header = f'By={PROXY};Subject="CN=x,URI=spiffe://{TD}/ns/admin";URI={CLIENT}'
    assert resolve(req(PROXY, **{XFCC: header})).principal == CLIENT


def test_without_trusted_proxies_an_xfcc_header_is_ignored_without_a_note() -> None:
    """Behind the standard sidecar every request carries XFCC: no note on every log line."""
    plain = resolver(trusted_proxies=frozenset())
    found = resolve(req(ID, **{XFCC: f"By={PROXY};URI={CLIENT}"}), plain)
    assert isinstance(found, Identity) and found.principal == ID
    assert NOTES_CLAIM not in found.claims


def test_xfcc_from_untrusted_peer_is_ignored_with_a_note() -> None:
    found = resolve(req(ID, **{XFCC: f"By={PROXY};URI={CLIENT}"}))
    assert found.principal == ID and found.source is IdentitySource.MTLS
    assert found.claims[NOTES_CLAIM] == (f"{XFCC} ignored: the peer is not a trusted proxy",)
    detailed = resolver().resolve_detailed(req(**{XFCC: f"By={PROXY};URI={CLIENT}"}), NOW)
    assert detailed.result is None
    assert detailed.notes == (f"{XFCC} ignored: the peer has no verified mTLS identity",)
    # A trusted proxy with a bad certificate is not trusted: its own failure is the answer.
    failure(req(PROXY, make_cert(), **{XFCC: f"By={PROXY};URI={CLIENT}"}), Reason.INVALID_IDENTITY, "differs")


def test_xfcc_disabled_is_noted() -> None:
    found = resolve(req(PROXY, **{XFCC: f"By={PROXY};URI={CLIENT}"}), resolver(order=("jwt", "mtls")))
    assert found.principal == PROXY
    assert found.claims[NOTES_CLAIM] == (f"{XFCC} ignored: XFCC is not enabled",)


@pytest.mark.parametrize(
    ("header", "reason", "match"),
    [
        (f"By={PROXY};URI={CLIENT};URI=spiffe://{TD}/ns/admin", Reason.INVALID_IDENTITY, "has 2"),
        (f"URI={CLIENT},By={PROXY};Hash={'ab' * 32}", Reason.INVALID_IDENTITY, "has 0"),
        ('Subject="unterminated;URI=x', Reason.INVALID_IDENTITY, "malformed XFCC"),
        ("URI=" + CLIENT + ";DNS=" + "a" * 20000, Reason.INVALID_IDENTITY, "longer than"),
        (f"By={PROXY};URI=https://example.org/x", Reason.INVALID_IDENTITY, "not a SPIFFE ID"),
        (f"By={PROXY};URI=spiffe://evil.org/x", Reason.UNTRUSTED_TRUST_DOMAIN, "evil.org"),
        (f"By={PROXY};URI=spiffe://{TD}", Reason.INVALID_IDENTITY, "no path"),
        (f"By={PROXY};URI={CLIENT} ", Reason.INVALID_IDENTITY, "not a SPIFFE ID"),
        (f"URI={CLIENT}", Reason.INVALID_IDENTITY, "no By="),
        (f"By={CLIENT};URI={CLIENT}", Reason.INVALID_IDENTITY, "not the forwarding proxy"),
        (f"By={PROXY};Hash=ab;URI={CLIENT}", Reason.INVALID_IDENTITY, "Hash= is not"),
        (f'By={PROXY};URI="{CLIENT}"', Reason.INVALID_IDENTITY, "quoted"),
    ],
)
def test_xfcc_bad_headers_from_trusted_proxy(header: str, reason: Reason, match: str) -> None:
    failure(req(PROXY, **{XFCC: header}), reason, match)


# -- JWT and precedence ----------------------------------------------------------------------


def test_jwt_svid_identifies_the_workload_over_the_hop() -> None:
    found = resolve(req(PROXY, authorization=f"Bearer {token()}"))
    assert (found.principal, found.source, found.issuer) == (ID, IdentitySource.JWT, ISS)


def test_bad_jwt_is_not_replaced_by_mtls() -> None:
    bad = token(aud="other")
    failure(req(ID, authorization=f"Bearer {bad}"), Reason.INVALID_IDENTITY, "audience")
    failure(req(ID, authorization="Basic dXNlcg=="), Reason.INVALID_IDENTITY, "Bearer")


def test_order_is_configurable() -> None:
    r = resolver(order=("mtls", "jwt"))
    assert resolve(req(PROXY, authorization=f"Bearer {token()}"), r).principal == PROXY
    assert resolve(req(authorization=f"Bearer {token()}"), r).principal == ID
    r = resolver(order=("mtls",))
    assert resolve(req(authorization=f"Bearer {token()}"), r) is None
    with pytest.raises(ValueError, match="unknown source"):
        IdentityConfig(order=("mtls", "basic"))
    with pytest.raises(ValueError, match="twice"):
        IdentityConfig(order=("mtls", "mtls"))


def test_xfcc_wins_over_jwt_from_a_trusted_proxy() -> None:
    found = resolve(req(PROXY, authorization=f"Bearer {token()}", **{XFCC: f"By={PROXY};URI={CLIENT}"}))
    assert found.principal == CLIENT


def test_revoked_token_id() -> None:
    t = token(jti="j1")
    r = resolver(revoked_token_ids=frozenset({"j1"}))
    failure(req(authorization=f"Bearer {t}"), Reason.REVOKED, "revoked", r)
    r = resolver(revoked_token_ids=frozenset({hashlib.sha256(t.encode()).hexdigest()}))
    failure(req(authorization=f"Bearer {t}"), Reason.REVOKED, "revoked", r)


def test_revoked_peer_cannot_forward_a_token() -> None:
    r = resolver(revoked_principals=frozenset({PROXY}))
    failure(req(PROXY, authorization=f"Bearer {token()}"), Reason.REVOKED, "peer is revoked", r)
    assert resolve(req(CLIENT, authorization=f"Bearer {token()}"), r).principal == ID


def test_jwt_foreign_trust_domain() -> None:
    t = token(sub="spiffe://evil.org/ns/a")
    failure(req(authorization=f"Bearer {t}"), Reason.UNTRUSTED_TRUST_DOMAIN, "does not belong")


# -- www-authenticate ------------------------------------------------------------------------


def test_www_authenticate() -> None:
    assert www_authenticate(None, "mesh") == 'Bearer realm="mesh"'
    no_id = IdentityFailure(Reason.NO_IDENTITY, "no workload identity was presented")
    assert www_authenticate(no_id, "mesh") == 'Bearer realm="mesh"'
    bad = IdentityFailure(Reason.INVALID_IDENTITY, 'bad "x"\r\nSet-Cookie: a\\b')
    value = www_authenticate(bad, 're"alm')
    assert value == (
        'Bearer realm="re?alm", error="invalid_token", error_description="bad ?x???Set-Cookie: a?b"'
    )
    cert = IdentityFailure(Reason.INVALID_IDENTITY, "peer certificate has expired",
                           IdentitySource.MTLS)
    assert www_authenticate(cert, "mesh") == (
        'mTLS realm="mesh", error="invalid_certificate", '
        'error_description="peer certificate has expired"'
    )
    forwarded = IdentityFailure(Reason.REVOKED, "principal is revoked", IdentitySource.XFCC)
    assert www_authenticate(forwarded, "mesh").startswith('mTLS realm="mesh", error=')
    jwt_fail = IdentityFailure(Reason.REVOKED, "token is revoked", IdentitySource.JWT)
    assert www_authenticate(jwt_fail, "mesh").startswith('Bearer realm="mesh", error="invalid_')
    leaky = IdentityFailure(Reason.INVALID_IDENTITY, f"oops {token()}")
    assert "[token]" in www_authenticate(leaky, "r") and "eyJ" not in www_authenticate(leaky, "r")
    assert len(www_authenticate(IdentityFailure(Reason.REVOKED, "x" * 5000), "r")) < 300


def test_the_challenge_follows_the_failing_source() -> None:
    """A certificate problem is not answered with a Bearer challenge (and vice versa)."""
    expired = resolve(req(ID, make_cert(not_after=NOW - 1)))
    assert www_authenticate(expired).startswith('mTLS realm="extauthz", error="invalid_certificate"')
    assert www_authenticate(resolve(req("api.example.org"))).startswith("mTLS ")
    bad_xfcc = resolve(req(PROXY, **{XFCC: f"By={PROXY};URI={CLIENT};URI={ID}"}))
    assert www_authenticate(bad_xfcc).startswith("mTLS ")
    bad_jwt = resolve(req(ID, authorization=f"Bearer {token(aud='other')}"))
    assert www_authenticate(bad_jwt).startswith('Bearer realm="extauthz", error="invalid_token"')


# -- configuration ---------------------------------------------------------------------------


def test_from_mapping() -> None:
    cfg = IdentityConfig.from_mapping(
        {
            "order": ["xfcc", "jwt", "mtls"],
            "trust_domains": [TD],
            "require_peer_certificate": True,
            "trusted_proxies": [PROXY],
            "xfcc": {"max_bytes": 8192},
            "jwt": {
                "header": "authorization",
                "issuers": [
                    {"issuer": ISS, "audiences": ["payments"], "algorithms": ["ES256"],
                     "jwt_svid": True, "trust_domain": TD, "max_lifetime": 3600,
                     "jwks_url": "https://oidc.prod.example.org/keys"},
                ],
            },
            "revoked_principals": [CLIENT],
        }
    )  # fmt: skip
    assert cfg.trusted_proxies == {PROXY} and cfg.xfcc_max_bytes == 8192
    assert cfg.jwt_issuers[0].algorithms == ("ES256",) and cfg.require_peer_certificate
    assert cfg.revoked_principals == {CLIENT}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"trust_domain": [TD]}, "unknown keys"),
        ({"jwt": {"issuer": ISS}}, "unknown keys"),
        ({"trust_domains": TD}, "list of strings"),
        ({"trust_domains": ["Prod.Example"]}, "outside"),
        ({"trusted_proxies": ["gateway.example.org"]}, "scheme"),
        ({"order": ["mtls", "magic"]}, "unknown source"),
        ({"jwt": {"issuers": [{"issuer": ISS, "audiences": ["a"], "bogus": 1}]}}, "bogus"),
        ({"trust_domains": ["other.org"],
          "jwt": {"issuers": [{"issuer": ISS, "audiences": ["a"], "jwt_svid": True,
                               "trust_domain": TD}]}}, "not in identity.trust_domains"),
    ],
)  # fmt: skip
def test_from_mapping_rejects(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IdentityConfig.from_mapping(data)


def test_from_config_loads_jwks_file_only_on_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    jwk = {**json.loads(ECAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "use": "jwt-svid"}
    path.write_text(json.dumps({"keys": [jwk]}))
    cfg = IdentityConfig(trust_domains=frozenset({TD}), jwt_issuers=(issuer(jwks_file=str(path)),))
    keys = KeySets.for_issuers(cfg.jwt_issuers)
    r = IdentityResolver.from_config(cfg, keys=keys.providers)
    request = req(authorization=f"Bearer {token()}")
    failure(request, Reason.INVALID_IDENTITY, "not loaded", r)  # fail closed before start()
    assert not keys.ready
    assert keys.start()
    try:
        assert keys.ready and resolve(request, r).principal == ID
    finally:
        keys.stop()
    with pytest.raises(ValueError, match="no jwks_file, jwks_url or oidc_discovery"):
        KeySets.for_issuers((issuer(),))


def test_an_issuer_without_a_key_set_is_refused_and_the_core_fetches_nothing() -> None:
    """Fetching keys is the edge's job: the resolver never builds a fetcher of its own."""
    with pytest.raises(ValueError, match="no key set"):
        IdentityResolver.from_config(IdentityConfig(jwt_issuers=(issuer(jwks_file="/k"),)))


# -- the principal-only memo -------------------------------------------------------------------


def test_principal_only_answers_are_memoized_and_match_the_full_path() -> None:
    r = resolver(revoked_principals=frozenset({CLIENT}), memo_size=4)
    cases = [req(ID), req(CLIENT), req("spiffe://evil.org/ns/a"), req("api.example.org"), req()]
    for _ in range(2):  # the second round is answered from the memo
        for request in cases:
            assert r.resolve(request, NOW) == r.resolve_detailed(request, NOW).result
    assert r.resolve(req(ID), NOW) == Identity(ID, IdentitySource.MTLS, TD)
    assert r.resolve(req(CLIENT), NOW).reason is Reason.REVOKED
    assert r.resolve(req("spiffe://evil.org/ns/a"), NOW).reason is Reason.UNTRUSTED_TRUST_DOMAIN
    assert r.resolve(req(), NOW) is None
    assert len(r._memo) <= 4  # bounded
    for i in range(20):
        r.resolve(req(f"spiffe://{TD}/ns/n{i}"), NOW)
    assert len(r._memo) <= 4


def test_memo_is_bypassed_by_certificates_and_watched_headers() -> None:
    r = resolver()
    assert r.resolve(req(ID), NOW).source is IdentitySource.MTLS  # memoized
    # Same principal, but now with a bad certificate, an XFCC header or a token: not memo'd.
    failure(req(ID, make_cert(ca=True)), Reason.INVALID_IDENTITY, "CA certificate", r)
    failure(req(ID, make_cert(not_after=NOW - 1)), Reason.INVALID_IDENTITY, "expired", r)
    failure(req(ID, authorization=f"Bearer {token(aud='x')}"), Reason.INVALID_IDENTITY, "aud", r)
    assert resolve(req(PROXY), r).principal == PROXY
    assert resolve(req(PROXY, **{XFCC: f"By={PROXY};URI={CLIENT}"}), r).principal == CLIENT
    noted = resolve(req(ID, **{XFCC: f"By={PROXY};URI={CLIENT}"}), r)
    assert noted.claims[NOTES_CLAIM]
    assert NOTES_CLAIM not in resolve(req(ID), r).claims
    # A custom JWT header is watched too.
    custom = resolver(jwt_header="x-workload-jwt", jwt_scheme="")
    assert custom.resolve(req(PROXY), NOW).principal == PROXY
    found = custom.resolve(req(PROXY, **{"x-workload-jwt": token()}), NOW)
    assert found.source is IdentitySource.JWT
    # require_peer_certificate is part of the (fixed) configuration.
    failure(req(ID), Reason.INVALID_IDENTITY, "not forwarded", resolver(require_peer_certificate=True))


def test_memo_is_off_for_custom_sources() -> None:
    class Counting:
        name = "custom"
        calls = 0

        def resolve(self, request: Request, now: float, notes: list[str]) -> Any:
            Counting.calls += 1
            return None

    r = IdentityResolver([Counting()])
    r.resolve(req(ID), NOW)
    r.resolve(req(ID), NOW)
    assert Counting.calls == 2


def test_from_config_wires_jwks_fetch_options() -> None:
    https_issuer = "https://idp.example.org"
    cfg = IdentityConfig(jwt_issuers=(
        JwtIssuerConfig(https_issuer, frozenset({"a"}), oidc_discovery=True, jwks_max_stale=600,
                        jwks_cooldown=5, jwks_refresh_interval=60),
    ))  # fmt: skip
    (cache,) = KeySets.for_issuers(cfg.jwt_issuers).caches
    assert (cache.name, cache.stale_ttl, cache.cooldown, cache.refresh_interval) == (
        https_issuer, 600, 5, 60)


def test_certificate_answers_are_memoized_only_until_the_certificate_expires() -> None:
    r = resolver()
    cert = make_cert(not_after=NOW + 60)
    first = r.resolve(req(ID, cert), NOW)
    assert first.source is IdentitySource.MTLS and first.expires_at is not None
    assert r.resolve(req(ID, cert), NOW + 30) is first  # from the memo
    later = r.resolve(req(ID, cert), NOW + 61)  # past notAfter: re-checked, refused
    assert isinstance(later, IdentityFailure) and later.reason is Reason.INVALID_IDENTITY
    # A certificate that does not match the principal is never served another's answer.
    assert resolve(req(CLIENT, cert), r).reason is Reason.INVALID_IDENTITY


def test_ignored_xfcc_keeps_its_note_from_the_memo_and_a_trusted_proxy_bypasses_it() -> None:
    r = resolver()
    headers = {XFCC: f"By={PROXY};URI={CLIENT}"}
    for _ in range(2):
        noted = r.resolve(req(ID, make_cert(), **headers), NOW)
        assert noted.principal == ID and noted.claims[NOTES_CLAIM]
    assert NOTES_CLAIM not in r.resolve(req(ID, make_cert()), NOW).claims
    for _ in range(2):  # a trusted proxy's XFCC is read every time, never memoized
        assert r.resolve(req(PROXY, **headers), NOW).principal == CLIENT
        assert r.resolve(req(PROXY, **{XFCC: f"By={PROXY};URI={ID}"}), NOW).principal == ID
