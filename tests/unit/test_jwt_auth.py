from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from extauthz.identity import jwt as jwt_auth
from extauthz.identity.jwt import JwtError, JwtIssuerConfig, JwtVerifier
from extauthz.model import IdentitySource, Reason
from extauthz.sources.jwks import JwkKey

NOW = 1_900_000_000.0
TD = "prod.example.org"
SVID_ISS = "https://oidc.prod.example.org"
PLAIN_ISS = "https://idp.example.com"
SUB = f"spiffe://{TD}/ns/pay/sa/api"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_PUB_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


class Keys:
    def __init__(self, keys: dict[str | None, JwkKey], ready: bool = True) -> None:
        self.keys, self.ready, self.asked = keys, ready, []  # type: list[str | None]

    def get_key(self, kid: str | None) -> JwkKey | None:
        self.asked.append(kid)
        return self.keys.get(kid)


def ec_jwk(kid: str = "ec1", key: Any = EC_KEY) -> JwkKey:
    return JwkKey(kid, "EC", "P-256", "", key.public_key())


def rsa_jwk(kid: str = "rsa1", key: Any = RSA_KEY) -> JwkKey:
    return JwkKey(kid, "RSA", "", "", key.public_key())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: str | dict[str, Any], payload: str | dict[str, Any], key: Any = EC_KEY) -> str:
    """Sign raw JSON text (so malformed-but-signed tokens can be built)."""
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    found = re.search(r'"alg":\s*"([^"]*)"', h)
    alg = found.group(1) if found else "ES256"
    signing_input = f"{b64(h.encode())}.{b64(p.encode())}"
    if alg.lower() == "none":
        return signing_input + "."
    if alg == "HS256":  # raw HMAC: PyJWT itself refuses a PEM as secret when *signing*
        return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), 'sha256').digest())}"
    algo = get_default_algorithms()[alg]
    sig = algo.sign(signing_input.encode(), algo.prepare_key(key))
    return f"{signing_input}.{b64(sig)}"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": SVID_ISS, "sub": SUB, "aud": "payments", "exp": NOW + 300, "iat": NOW - 10,
    }  # fmt: skip
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def svid(header: dict[str, Any] | None = None, key: Any = EC_KEY, **over: Any) -> str:
    return forge(header or {"alg": "ES256", "kid": "ec1", "typ": "JWT"}, claims(**over), key)


def plain(header: dict[str, Any] | None = None, key: Any = RSA_KEY, **over: Any) -> str:
    hdr = header or {"alg": "RS256", "kid": "rsa1"}
    return forge(hdr, claims(iss=PLAIN_ISS, sub="alice@example.com", **over), key)


def verifier(**kw: Any) -> JwtVerifier:
    issuers = (
        JwtIssuerConfig(SVID_ISS, frozenset({"payments"}), jwt_svid=True, trust_domain=TD,
                        max_lifetime=3600),
        JwtIssuerConfig(PLAIN_ISS, frozenset({"payments"}), algorithms=("RS256", "ES256")),
    )  # fmt: skip
    keys = {SVID_ISS: Keys({"ec1": ec_jwk()}), PLAIN_ISS: Keys({"rsa1": rsa_jwk()})}
    return JwtVerifier(issuers=kw.pop("issuers", issuers), keys=kw.pop("keys", keys), **kw)


def rejects(token: str, match: str, now: float = NOW, v: JwtVerifier | None = None) -> JwtError:
    with pytest.raises(JwtError, match=match) as info:
        (v or verifier()).verify(token, now)
    return info.value


# -- algorithm attacks ----------------------------------------------------------------------


def test_alg_none_is_rejected() -> None:
    rejects(svid({"alg": "none", "kid": "ec1"}), "unsigned")
    token = svid({"alg": "none", "kid": "ec1"}) + "c2ln"
    rejects(token, "no usable 'alg'")
    rejects(svid({"alg": "NoNe", "kid": "ec1"}) + "c2ln", "no usable 'alg'")


def test_hs256_signed_with_the_rsa_public_key() -> None:
    token = plain({"alg": "HS256", "kid": "rsa1"}, key=RSA_PUB_PEM)
    rejects(token, "'HS256' is not allowed")


def test_key_type_must_match_alg_even_if_allowlisted() -> None:
    hs_issuer = JwtIssuerConfig(PLAIN_ISS, frozenset({"payments"}), algorithms=("HS256",))
    v = verifier(issuers=(hs_issuer,), keys={PLAIN_ISS: Keys({"rsa1": rsa_jwk()})})
    rejects(plain({"alg": "HS256", "kid": "rsa1"}, key=RSA_PUB_PEM), "cannot verify", v=v)
    # An EC key cannot verify RS256, and a P-256 key cannot verify ES384.
    v = verifier(keys={PLAIN_ISS: Keys({"rsa1": ec_jwk("rsa1")})})
    rejects(plain(), "cannot verify", v=v)
    es384 = JwtIssuerConfig(PLAIN_ISS, frozenset({"payments"}), algorithms=("ES384",))
    v = verifier(issuers=(es384,), keys={PLAIN_ISS: Keys({"k": ec_jwk("k")})})
    p384 = ec.generate_private_key(ec.SECP384R1())
    rejects(plain({"alg": "ES384", "kid": "k"}, key=p384), "cannot verify", v=v)


def test_key_pinned_alg_is_enforced() -> None:
    pinned = JwkKey("rsa1", "RSA", "", "PS256", RSA_KEY.public_key())
    v = verifier(keys={PLAIN_ISS: Keys({"rsa1": pinned})})
    rejects(plain(), "cannot verify", v=v)


def test_weak_rsa_key_rejected() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    v = verifier(keys={PLAIN_ISS: Keys({"rsa1": rsa_jwk(key=weak)})})
    rejects(plain(key=weak), "signature verification failed", v=v)


def test_signature_by_another_key_with_the_same_kid() -> None:
    rejects(svid(key=OTHER_EC_KEY), "signature verification failed")


# -- header attacks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c", "crit", "b64"])
def test_key_carrying_headers_rejected(name: str) -> None:
    header = {"alg": "RS256", "kid": "rsa1", name: "https://evil.example/keys"}
    rejects(plain(header), f"header '{name}' is not accepted")


def test_jwt_svid_header_allowlist_and_typ() -> None:
    rejects(svid({"alg": "ES256", "kid": "ec1", "cty": "x"}), "other than alg/kid/typ")
    rejects(svid({"alg": "ES256", "kid": "ec1", "typ": "at+jwt"}), "'typ' must be")
    rejects(svid({"alg": "ES256"}), "has no 'kid'")
    assert verifier().verify(plain({"alg": "RS256", "kid": "rsa1", "cty": "x"}), NOW)


@pytest.mark.parametrize("kid", ["../../etc/passwd", "/dev/zero", "nope"])
def test_unknown_or_malicious_kid(kid: str) -> None:
    keys = Keys({"ec1": ec_jwk()})
    v = verifier(keys={SVID_ISS: keys, PLAIN_ISS: Keys({})})
    rejects(svid({"alg": "ES256", "kid": kid}), "unknown", v=v)
    assert keys.asked == [kid]  # a dictionary lookup, nothing else


@pytest.mark.parametrize("kid", ["", "a b", "x" * 257, "\u00e9"])
def test_malformed_kid(kid: str) -> None:
    rejects(svid({"alg": "ES256", "kid": kid}), "'kid' is malformed")


def test_keys_not_loaded_is_reported_as_such() -> None:
    v = verifier(keys={SVID_ISS: Keys({}, ready=False), PLAIN_ISS: Keys({})})
    rejects(svid(), "not loaded", v=v)


# -- payload attacks -------------------------------------------------------------------------


def test_oversized_token() -> None:
    token = svid(pad="x" * 9000)
    rejects(token, "too large")
    v = verifier(max_token_bytes=len(token))
    assert v.verify(token, NOW).principal == SUB  # the limit, not something else, rejected it


def test_deeply_nested_json() -> None:
    deep = "[" * 40 + "]" * 40
    nested = f'{{"iss":"{SVID_ISS}","sub":"{SUB}","aud":"payments","exp":{NOW + 300},"x":{deep}}}'
    rejects(forge({"alg": "ES256", "kid": "ec1"}, nested), "nested too deeply")
    assert verifier(max_json_depth=50).verify(forge({"alg": "ES256", "kid": "ec1"}, nested), NOW)
    deep_header = '{"alg":"ES256","kid":"ec1","x":%s}' % ("[" * 20 + "]" * 20)
    rejects(forge(deep_header, claims()), "header is nested too deeply")


def test_nesting_inside_strings_is_not_counted() -> None:
    assert jwt_auth.json_depth_ok('{"a":"[[[[[[[[[[[[\\"{{{{{{{{"}', 2)
    assert not jwt_auth.json_depth_ok('{"a":"\\\\",' + '"b":[[[1]]]}', 3)


def test_duplicate_claims_rejected() -> None:
    text = json.dumps(claims(sub=f"spiffe://{TD}/ns/a"))[:-1] + f', "sub": "{SUB}"}}'
    rejects(forge({"alg": "ES256", "kid": "ec1"}, text), "duplicate")


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"exp": None}, "no 'exp'"),
        ({"exp": str(NOW + 300)}, "'exp' must be a number"),
        ({"exp": True}, "'exp' must be a number"),
        ({"exp": 10**400}, "'exp' must be a number"),
        ({"nbf": "0"}, "'nbf' must be a number"),
        ({"iat": [NOW]}, "'iat' must be a number"),
        ({"exp": NOW - 61}, "expired"),
        ({"nbf": NOW + 61}, "not yet valid"),
        ({"iat": NOW + 61}, "issued in the future"),
        ({"iat": NOW - 10, "exp": NOW + 3600}, "max_lifetime"),
        ({"iat": None, "exp": NOW + 3700}, "max_lifetime"),
        ({"aud": None}, "no usable 'aud'"),
        ({"aud": "payments-evil"}, "audience is not accepted"),
        ({"aud": "Payments"}, "audience is not accepted"),
        ({"aud": ["other", 7]}, "must be strings"),
        ({"aud": []}, "no usable 'aud'"),
        ({"iss": None}, "no 'iss'"),
        ({"iss": "https://evil.example"}, "issuer is not trusted"),
        ({"iss": SVID_ISS + "/"}, "issuer is not trusted"),
        ({"sub": None}, "no usable 'sub'"),
        ({"sub": 42}, "no usable 'sub'"),
        ({"sub": "api"}, "not a SPIFFE ID"),
        ({"sub": f"spiffe://{TD}/ns/../admin"}, "not a SPIFFE ID"),
        ({"jti": 7}, "'jti' must be a string"),
    ],
)
def test_bad_claims(over: dict[str, Any], match: str) -> None:
    rejects(svid(**over), match)


def test_inf_exp_rejected() -> None:
    text = json.dumps(claims(exp=None))[:-1] + ', "exp": 1e999}'
    rejects(forge({"alg": "ES256", "kid": "ec1"}, text), "'exp' must be a number")


def test_leeway_is_honoured_but_bounded() -> None:
    assert verifier().verify(svid(exp=NOW - 59), NOW)
    assert verifier().verify(svid(nbf=NOW + 59), NOW)


def test_foreign_trust_domain() -> None:
    err = rejects(svid(sub="spiffe://evil.example.org/ns/pay/sa/api"), "does not belong")
    assert err.reason is Reason.UNTRUSTED_TRUST_DOMAIN


def test_plain_issuer_cannot_mint_spiffe_ids() -> None:
    token = forge({"alg": "RS256", "kid": "rsa1"}, claims(iss=PLAIN_ISS), RSA_KEY)
    rejects(token, "only accepted from a jwt_svid issuer")
    token = forge({"alg": "RS256", "kid": "rsa1"}, claims(iss=PLAIN_ISS, sub="SPIFFE://x"), RSA_KEY)
    rejects(token, "only accepted from a jwt_svid issuer")


# -- extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("Basic dXNlcjpwYXNz", "not a single Bearer"),
        ("Bearer a.b.c, Bearer d.e.f", "several values"),
        ("Bearer a.b.c,Basic x", "several values"),
        ("Bearer", "not a compact JWS"),
        ("Bearer a.b", "not a compact JWS"),
        ("Bearer a.b.c.d", "not a compact JWS"),
        ("Bearer a.b.c extra", "not a compact JWS"),
        ("Bearer a+b.c.d", "not a compact JWS"),
        ("a.b.c", "not a single Bearer"),
        ("Bearer " + "a" * 9000, "too large"),
    ],
)
def test_extract_rejects(value: str, match: str) -> None:
    with pytest.raises(JwtError, match=match):
        verifier().extract({"authorization": value})


def test_extract() -> None:
    assert verifier().extract({}) is None
    assert verifier().extract({"authorization": "bearer  a.b.c"}) == "a.b.c"
    v = verifier(header="X-Workload-JWT", scheme="")
    assert v.extract({"x-workload-jwt": "a.b.c"}) == "a.b.c"
    assert v.extract({"authorization": "Basic x"}) is None


# -- success, cache and revocation ----------------------------------------------------------


def test_valid_jwt_svid_and_plain_jwt() -> None:
    ident = verifier().verify(svid(jti="t1"), NOW)
    assert (ident.principal, ident.source, ident.trust_domain) == (SUB, IdentitySource.JWT, TD)
    assert (ident.issuer, ident.subject, ident.expires_at) == (SVID_ISS, SUB, NOW + 300)
    assert ident.claims["jti"] == "t1"
    ident = verifier().verify(plain(aud=["other", "payments"]), NOW)
    assert (ident.principal, ident.trust_domain) == ("alice@example.com", "")


def test_cache_hit_skips_signature_but_never_past_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = jwt_auth.PyJWS.decode_complete

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jwt_auth.PyJWS, "decode_complete", counting)
    v, token = verifier(), svid()
    for _ in range(3):
        assert v.verify(token, NOW).principal == SUB
    assert len(calls) == 1
    v.verify(token, NOW + 300)  # at exp: within leeway, but verified afresh
    assert len(calls) == 2
    with pytest.raises(JwtError, match="expired"):
        v.verify(token, NOW + 361)


def test_cache_dropped_when_key_rotates_out() -> None:
    keys = Keys({"ec1": ec_jwk()})
    v, token = verifier(keys={SVID_ISS: keys, PLAIN_ISS: Keys({})}), svid()
    assert v.verify(token, NOW)
    keys.keys = {}
    rejects(token, "unknown", v=v)


def test_cache_is_bounded() -> None:
    v = verifier(cache_size=2)
    for i in range(5):
        v.verify(svid(jti=str(i)), NOW)
    assert len(v._cache) == 2


def test_revoked_token_ids_even_when_cached() -> None:
    token = svid(jti="abc")
    v = verifier(revoked_token_ids=frozenset({"abc"}))
    assert rejects(token, "revoked", v=v).reason is Reason.REVOKED
    v = verifier()
    assert v.verify(token, NOW)
    v.revoked_token_ids = frozenset({hashlib.sha256(token.encode()).hexdigest()})
    assert rejects(token, "revoked", v=v).reason is Reason.REVOKED


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithms": ("HS256", "RS256")}, "cannot be mixed"),
        ({"algorithms": ("none",)}, "unsupported"),
        ({"audiences": frozenset()}, "non-empty"),
        ({"jwt_svid": True}, "needs 'trust_domain'"),
        ({"jwt_svid": True, "trust_domain": TD, "algorithms": ("HS256",)}, "not allowed"),
        ({"jwt_svid": True, "trust_domain": TD, "algorithms": ("EdDSA",)}, "not allowed"),
        ({"leeway": 3600}, "leeway"),
        ({"jwks_url": "http://idp/keys"}, "https"),
        ({"jwks_url": "https://a", "jwks_file": "/k"}, "set one of"),
        ({"jwks_url": "https://a", "oidc_discovery": True}, "set one of"),
        ({"issuer": "http://idp", "oidc_discovery": True}, "needs an https issuer"),
        ({"jwks_max_stale": 0}, "jwks_max_stale"),
        ({"jwks_timeout": 120}, "jwks_timeout"),
    ],
)
def test_issuer_config_validation(kwargs: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {"issuer": PLAIN_ISS, "audiences": frozenset({"a"})}
    with pytest.raises(ValueError, match=match):
        JwtIssuerConfig(**{**base, **kwargs})


def test_default_algorithms_are_asymmetric_only() -> None:
    cfg = JwtIssuerConfig(PLAIN_ISS, frozenset({"a"}))
    assert not set(cfg.algorithms) & {"HS256", "HS384", "HS512", "none"}
    svid_cfg = JwtIssuerConfig(SVID_ISS, frozenset({"a"}), jwt_svid=True, trust_domain=TD)
    assert "EdDSA" not in svid_cfg.algorithms and "ES256" in svid_cfg.algorithms
    with pytest.raises(ValueError, match="twice"):
        JwtVerifier(issuers=(cfg, cfg), keys={})
