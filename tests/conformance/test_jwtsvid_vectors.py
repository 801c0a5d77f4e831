"""JWT-SVID vectors (JWT-SVID.md, go-spiffe's jwtsvid tests) through `Check`, as
`authorization: Bearer <token>` from a peer that is only a hop (the token names the caller)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from tests.conformance.envoy_model import url_encoded_pem
from tests.conformance.harness import (
    NOW,
    PROXY,
    PROXY_CERT,
    TD_PATH,
    TRANSPORTS,
    Call,
    Harness,
    build_harness,
    issuer_for,
)
from tests.conformance.vectors import load

VECTORS: list[dict[str, Any]] = load("jwtsvid.json")["vectors"]
HERE = [v for v in VECTORS if v["applies"] == "extauthz"]
TD = "example.org"
SUB = f"spiffe://{TD}/host"
KEYS: dict[str, Any] = {
    "ec256": ec.generate_private_key(ec.SECP256R1()),
    "ec384": ec.generate_private_key(ec.SECP384R1()),
    "ec521": ec.generate_private_key(ec.SECP521R1()),
    "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
    "attacker_ec256": ec.generate_private_key(ec.SECP256R1()),
}
# The kid each published key has in the trust domain's JWT bundle (the attacker's is absent).
KIDS = {"ec256": "authority1", "ec384": "ec384", "ec521": "ec521", "rsa2048": "rsa",
        "ed25519": "ed"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(name: str) -> dict[str, Any]:
    public = KEYS[name].public_key()
    algorithm = {"rsa2048": RSAAlgorithm, "ed25519": OKPAlgorithm}.get(name, ECAlgorithm)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    jwk.update({"kid": KIDS[name], "use": "jwt-svid"})
    return jwk


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    tmp: Path = tmp_path_factory.mktemp(f"jwt-{request.param}")
    bundle = tmp / "bundle.json"
    bundle.write_text(json.dumps({"keys": [_jwk(name) for name in KIDS]}))
    yield from build_harness(
        tmp, request.param, trust_domains=[TD], jwt_trust_domains=[TD, "a.test"],
        issuer_options={"audiences": ["audience"], "jwks_file": str(bundle)},
    )


def token(recipe: dict[str, Any]) -> str:
    """The baseline JWT-SVID with the recipe's changes (see jwtsvid.json `about`)."""
    raw = recipe.get("raw")
    if raw == "json_serialization":
        inner = token({}).split(".")
        return json.dumps({"payload": inner[1], "signatures": [
            {"protected": inner[0], "signature": inner[2]}]})
    if raw == "jwe":
        return ".".join(_b64(b"x" * 16) for _ in range(5))
    if raw is not None:
        return str(raw)
    alg = recipe.get("alg", "ES256")
    key_name = recipe.get("key", "ec256")
    header: dict[str, Any] = {"alg": alg, "kid": KIDS.get(key_name, "authority1"), "typ": "JWT"}
    claims: dict[str, Any] = {"iss": issuer_for(TD), "sub": SUB, "aud": ["audience"],
                              "exp": 60, "iat": 0}
    for target, changes in ((header, recipe.get("header", {})), (claims, recipe.get("claims", {}))):
        for name, value in changes.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    if key_name == "attacker_ec256" and "jwk" in header:
        header["jwk"] = json.loads(ECAlgorithm.to_jwk(KEYS[key_name].public_key()))
        header["kid"] = "authority1"
    if recipe.get("claims", {}).get("sub") == "spiffe://b.test/host":
        claims["iss"] = issuer_for("a.test")  # a.test's issuer asserting a b.test workload
    for name in ("exp", "nbf", "iat"):
        if isinstance(claims.get(name), int) and not isinstance(claims[name], bool):
            claims[name] = NOW + claims[name]
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if key_name == "none":
        return signing_input + "."
    if key_name == "hmac":
        key: Any = b"a-shared-secret-that-no-validator-should-accept"
    else:
        key = KEYS[key_name]
    signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{_b64(signature)}"


def test_every_jwt_svid_vector_is_decided_or_covered() -> None:
    for v in VECTORS:
        assert v["applies"] in ("extauthz", "meta"), v["case"]
        if v["applies"] == "extauthz":
            assert not (v["extauthz"] == "accept" and not v["valid"]), v["case"]
        else:
            assert v["covered_by"], v["case"]
    assert len(HERE) >= 50


@pytest.mark.parametrize("harness", sorted(TRANSPORTS), indirect=True)
def test_jwt_svid_vectors_through_check(harness: Harness) -> None:
    wrong = []
    for v in HERE:
        call = Call(principal=PROXY, certificate=url_encoded_pem(PROXY_CERT), path=TD_PATH,
                    headers={"authorization": f"Bearer {token(v['recipe'])}"})
        answer = harness.check(call)
        if v["extauthz"] == "accept":
            ok = answer.allowed and answer.principal == SUB
        else:
            ok = answer.status == 401
        if not ok:
            wrong.append(f"{v['case']}: {answer}")
    assert wrong == []
