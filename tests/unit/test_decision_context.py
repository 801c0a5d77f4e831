"""What a decision says about itself (issue 19): the route Envoy matched, the reason of a TCP
denial, the note about XFCC only when it means something."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2 as ea
from google.protobuf import struct_pb2

from extauthz.model import Decision, Outcome, Reason, Request
from extauthz.observe.decision_log import route_of
from extauthz.transport.grpc_proto import to_network_response, to_request


def http_check(**extensions: str) -> ea.CheckRequest:
    req = ea.CheckRequest()
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", "/v1/orders"
    for k, v in extensions.items():
        req.attributes.context_extensions[k] = v
    return req


def with_route_metadata(req: ea.CheckRequest, route: str, namespace: str = "extauthz") -> None:
    meta = struct_pb2.Struct()
    meta.update({"route": route})
    req.attributes.route_metadata_context.filter_metadata[namespace].CopyFrom(meta)


def test_the_route_named_in_envoys_route_metadata_is_logged() -> None:
    req = http_check()
    with_route_metadata(req, "orders-api")
    assert route_of(to_request(req)) == "orders-api"


def test_context_extensions_name_the_route_first_and_other_namespaces_are_ignored() -> None:
    req = http_check(route="from-extensions")
    with_route_metadata(req, "from-metadata")
    assert route_of(to_request(req)) == "from-extensions"
    other = http_check()
    with_route_metadata(other, "elsewhere", namespace="some.other.filter")
    assert route_of(to_request(other)) is None
    assert route_of(Request()) is None


def test_a_tcp_denial_carries_its_reason_in_the_status_and_the_metadata() -> None:
    denied = to_network_response(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE))
    assert denied.status.message == "403 no_matching_rule"
    assert denied.dynamic_metadata.fields["reason"].string_value == "no_matching_rule"
    allowed = to_network_response(Decision(Outcome.ALLOW, Reason.ALLOWED, rule="db"))
    assert allowed.status.code == 0 and allowed.status.message == ""
