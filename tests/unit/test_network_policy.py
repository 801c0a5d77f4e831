"""Connection rules for Envoy's network (TCP) ext_authz filter: parsing, evaluation, and the
CheckRequest/CheckResponse shapes of a network check."""

from __future__ import annotations

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ea
from google.rpc import code_pb2

from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason
from extauthz.policy.connections import (
    ConnectionPolicyError,
    compile_connections,
    destination_port,
    parse_connections,
)
from extauthz.transport.grpc_proto import is_network_check, to_network_response, to_request

CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"
BATCH = "spiffe://demo.local/ns/batch/sa/exporter"


def _identity(principal: str) -> Identity:
    return Identity(principal, IdentitySource.MTLS, "demo.local")


RULES = parse_connections(
    [
        {"name": "db", "ports": [5432], "allow": ["checkout"]},
        {"name": "db-batch", "ports": 5432, "sni": ["DB.demo.local"],
         "allow": ["spiffe://demo.local/ns/batch/sa/*"]},
        {"name": "cache", "ports": [6379, 6380], "allow": ["*"]},
    ]
)
TABLE = compile_connections(RULES, {"checkout": CHECKOUT})


def test_allowed_by_name() -> None:
    d = TABLE.evaluate(_identity(CHECKOUT), 5432, "", "v1")
    assert (d.outcome, d.reason, d.rule, d.policy_version) == (Outcome.ALLOW, Reason.ALLOWED, "db", "v1")


def test_sni_scoped_pattern() -> None:
    assert TABLE.evaluate(_identity(BATCH), 5432, "db.demo.local", "v").rule == "db-batch"
    denied = TABLE.evaluate(_identity(BATCH), 5432, "other.demo.local", "v")
    assert (denied.outcome, denied.reason) == (Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED)


def test_unknown_port_is_no_matching_rule() -> None:
    d = TABLE.evaluate(_identity(CHECKOUT), 9999, "", "v")
    assert (d.outcome, d.reason) == (Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE)


def test_anyone() -> None:
    assert TABLE.evaluate(_identity(BATCH), 6380, "", "v").allowed


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"connections": "x"}, "connections"),
        ([{"name": "a", "ports": [0], "allow": ["*"]}], "connections[0].ports"),
        ([{"name": "a", "ports": [True], "allow": ["*"]}], "connections[0].ports"),
        ([{"name": "a", "ports": [1]}], "connections[0].allow"),
        ([{"name": "A", "ports": [1], "allow": ["*"]}], "connections[0].name"),
        ([{"name": "a", "ports": [1], "allow": ["*"], "hosts": ["x"]}], "connections[0].hosts"),
        ([{"name": "a", "ports": [1], "allow": ["spiffe://td/a*"]}], "connections[0].allow"),
        ([{"name": "a", "ports": [1], "allow": ["*"]}] * 2, "connections"),
    ],
)
def test_bad_rules_name_the_field(raw: object, field: str) -> None:
    data = raw["connections"] if isinstance(raw, dict) else raw
    with pytest.raises(ConnectionPolicyError) as info:
        parse_connections(data)
    assert info.value.field == field


def test_unknown_principal_name_is_refused_at_compile() -> None:
    rules = parse_connections([{"name": "a", "ports": [1], "allow": ["ghost"]}])
    with pytest.raises(ConnectionPolicyError, match="ghost"):
        compile_connections(rules, {})


def test_network_check_request_and_response() -> None:
    check = ea.CheckRequest()
    attrs = check.attributes
    attrs.source.principal = CHECKOUT
    attrs.source.address.socket_address.address = "10.0.0.7"
    attrs.destination.address.socket_address.address = "10.0.0.9"
    attrs.destination.address.socket_address.port_value = 5432
    attrs.tls_session.sni = "db.demo.local"
    request = to_request(check)
    assert not request.is_http and is_network_check(request)
    assert not is_network_check(to_request(ea.CheckRequest()))  # empty: HTTP-shaped denial
    assert request.host == "db.demo.local"
    assert destination_port(request.context_extensions) == 5432
    assert request.source_principal == CHECKOUT and request.source_address == "10.0.0.7"

    ok = to_network_response(Decision(Outcome.ALLOW, Reason.ALLOWED, rule="db",
                                      identity=_identity(CHECKOUT)))
    assert ok.status.code == code_pb2.OK
    assert not ok.HasField("ok_response") and not ok.HasField("denied_response")
    assert ok.dynamic_metadata["principal"] == CHECKOUT
    denied = to_network_response(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert not denied.HasField("denied_response")
