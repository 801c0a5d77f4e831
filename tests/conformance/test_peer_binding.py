"""JWT-SVIDs bound to the mTLS peer (RFC 8705 `cnf` `x5t#S256`, or `sub` = the peer's SPIFFE ID),
through `Check`: off by default, and when an issuer turns it on a token replayed by any other
peer is a 401."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conformance.envoy_model import url_encoded_pem
from tests.conformance.harness import (
    ANY_PATH,
    PROXY,
    PROXY_CERT,
    TRANSPORTS,
    Call,
    Harness,
    build_harness,
    issuer_for,
    jwt_svid,
    make_cert,
)

TD = "bind.test"
WORKLOAD = f"spiffe://{TD}/ns/pay/sa/api"
WORKLOAD_CERT = make_cert((WORKLOAD,))
OTHER = f"spiffe://{TD}/ns/other/sa/thief"
OTHER_CERT = make_cert((OTHER,))


def thumbprint(cert_der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode()


def call(peer: str, peer_cert: str, token: str) -> Call:
    return Call(principal=peer, certificate=peer_cert, path=ANY_PATH,
                headers={"authorization": f"Bearer {token}"})


ALL = sorted(TRANSPORTS)


@pytest.fixture(scope="module")
def bound(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Harness]:
    yield from build_harness(tmp_path_factory.mktemp(f"bound-{request.param}"), request.param,
                             trust_domains=[TD], jwt_trust_domains=[TD],
                             issuer_options={"bind_to_peer": True})


@pytest.fixture(scope="module")
def unbound(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    yield from build_harness(tmp_path_factory.mktemp(f"unbound-{request.param}"), request.param,
                             trust_domains=[TD], jwt_trust_domains=[TD])


@pytest.mark.parametrize("unbound", ALL, indirect=True)
def test_without_binding_a_token_is_accepted_from_any_peer(unbound: Harness) -> None:
    token = jwt_svid(WORKLOAD, issuer_for(TD))
    answer = unbound.check(call(OTHER, url_encoded_pem(OTHER_CERT), token))
    assert answer.allowed and answer.principal == WORKLOAD


@pytest.mark.parametrize("bound", ALL, indirect=True)
def test_bound_token_from_its_own_workload_is_allowed(bound: Harness) -> None:
    token = jwt_svid(WORKLOAD, issuer_for(TD))
    answer = bound.check(call(WORKLOAD, url_encoded_pem(WORKLOAD_CERT), token))
    assert answer.allowed and answer.principal == WORKLOAD


@pytest.mark.parametrize("bound", ALL, indirect=True)
def test_bound_token_replayed_by_another_peer_is_401(bound: Harness) -> None:
    token = jwt_svid(WORKLOAD, issuer_for(TD))
    assert bound.check(call(WORKLOAD, url_encoded_pem(WORKLOAD_CERT), token)).allowed
    answer = bound.check(call(OTHER, url_encoded_pem(OTHER_CERT), token))
    assert answer.status == 401 and "bound to the mTLS peer" in answer.challenge, answer


@pytest.mark.parametrize("bound", ALL, indirect=True)
def test_cnf_thumbprint_binds_a_token_to_a_hop_certificate(bound: Harness) -> None:
    cnf = {"x5t#S256": thumbprint(PROXY_CERT.public_bytes(Encoding.DER))}
    token = jwt_svid(WORKLOAD, issuer_for(TD), cnf=cnf)
    answer = bound.check(call(PROXY, url_encoded_pem(PROXY_CERT), token))
    assert answer.allowed and answer.principal == WORKLOAD
    # The same token from a peer holding another certificate, even the workload itself.
    answer = bound.check(call(WORKLOAD, url_encoded_pem(WORKLOAD_CERT), token))
    assert answer.status == 401 and "x5t#S256 does not match" in answer.challenge, answer
