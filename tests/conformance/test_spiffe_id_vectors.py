"""Every SPIFFE ID vector through `Check`, on every identity channel and every transport.

A vector the specification (or go-spiffe) rejects, or a valid ID without a path, is never
allowed — not by a rule granting `"*"`, not by a trust-domain pattern `spiffe://<td>/**`. A
valid workload ID that the policy grants is allowed, as exactly that principal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.identity.spiffe import SpiffeIdError, check_trust_domain_name, parse_spiffe_id
from tests.conformance.harness import (
    ANY_PATH,
    CHANNELS,
    CHANNELS_OF,
    TD_PATH,
    TRANSPORTS,
    Call,
    Harness,
    build_harness,
    via_jwt_svid,
    via_peer_certificate,
    via_principal,
    via_xfcc,
)
from tests.conformance.vectors import spiffe_ids, trust_domain_of

IDS = spiffe_ids("id")
WORKLOAD = [v["input"] for v in IDS if v["workload"]]
NOT_WORKLOAD = [v["input"] for v in IDS if not v["workload"]]


def _valid_td(name: str) -> bool:
    try:
        check_trust_domain_name(name)
    except SpiffeIdError:
        return False
    return True


# Trust domains the policy grants with a pattern: every valid one a vector mentions, including
# those of path-less IDs, so a denial is never just "no rule for that domain".
GRANTED_TDS = sorted({td for td in map(trust_domain_of, (*WORKLOAD, *NOT_WORKLOAD))
                      if _valid_td(td)})
DEFAULT_TD = "trustdomain"


PAIRS = [(t, c) for t in sorted(TRANSPORTS) for c in CHANNELS_OF[t]]


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    tmp: Path = tmp_path_factory.mktemp(f"spiffe-{request.param}")
    yield from build_harness(tmp, request.param, trust_domains=GRANTED_TDS,
                             jwt_trust_domains=GRANTED_TDS)


def call_for(channel: str, sid: str, path: str) -> Call | None:
    if channel == "principal":
        return via_principal(sid, path)
    if channel == "peer_certificate":
        return via_peer_certificate(sid, path)
    if channel == "xfcc":
        return via_xfcc(sid, path)
    td = trust_domain_of(sid)
    return via_jwt_svid(sid, td if td in GRANTED_TDS else DEFAULT_TD, path)


def test_the_vectors_cover_both_outcomes_and_path_less_ids() -> None:
    assert len(WORKLOAD) >= 100 and len(NOT_WORKLOAD) >= 400
    pathless = [i for i in NOT_WORKLOAD if _parses(i)]
    assert "spiffe://trustdomain" in pathless and len(pathless) >= 5


def _parses(text: str) -> bool:
    try:
        parse_spiffe_id(text)
    except SpiffeIdError:
        return False
    return True


def test_every_transport_carries_every_channel_it_can_express() -> None:
    assert set(CHANNELS_OF["grpc"]) == set(CHANNELS)
    # Over HTTP the peer is the sidecar's own XFCC element: a gateway's cannot reach it.
    assert set(CHANNELS) - set(CHANNELS_OF["http"]) == {"xfcc"}


@pytest.mark.parametrize(("harness", "channel"), PAIRS, indirect=["harness"])
def test_spec_rejected_and_path_less_ids_are_never_allowed(harness: Harness, channel: str) -> None:
    wrong: list[str] = []
    carried = 0
    for sid in NOT_WORKLOAD:
        for path in (ANY_PATH, TD_PATH):
            call = call_for(channel, sid, path)
            if call is None:
                # Only the certificate channel cannot carry some inputs: a URI SAN is ASCII.
                assert channel == "peer_certificate" and not sid.isascii(), sid
                continue
            why = harness.transport.cannot_carry(call)
            if why:
                # HTTP: a header value never holds control characters (Envoy refuses them).
                assert "control characters" in why and any(
                    ord(ch) < 0x20 or ord(ch) == 0x7F for ch in sid), (sid, why)
                continue
            carried += 1
            answer = harness.check(call)
            if answer.allowed or answer.status != 401:
                wrong.append(f"{sid!r} on {path}: {answer}")
    assert wrong == []
    assert carried >= len(NOT_WORKLOAD) // 2  # every skip above was checked to be uncarriable


@pytest.mark.parametrize(("harness", "channel"), PAIRS, indirect=["harness"])
def test_spec_accepted_workload_ids_granted_by_policy_are_allowed(
        harness: Harness, channel: str) -> None:
    wrong: list[str] = []
    for sid in WORKLOAD:
        for path in (ANY_PATH, TD_PATH):
            call = call_for(channel, sid, path)
            assert call is not None, sid  # valid IDs are ASCII, so every channel carries them
            assert not harness.transport.cannot_carry(call), sid
            answer = harness.check(call)
            if not answer.allowed or answer.principal != sid:
                wrong.append(f"{sid!r} on {path}: {answer}")
    assert wrong == []
