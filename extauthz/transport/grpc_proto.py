"""The only place that knows Envoy's protobuf shapes: CheckRequest in, CheckResponse out.

Uses the upb-backed `xds-protos` modules: parsing and building stay in C, which matters when
the whole budget per check is a few tens of microseconds above gRPC's own cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauthz import headers as names
from extauthz.model import Decision, Outcome, Request

METADATA_PRINCIPAL = "principal"
REASON_HEADER = names.REASON

_GRPC_CODE = {
    Outcome.ALLOW: code_pb2.OK,
    Outcome.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Outcome.FORBIDDEN: code_pb2.PERMISSION_DENIED,
    Outcome.RATE_LIMITED: code_pb2.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: code_pb2.UNAVAILABLE,
}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    """What the OK response tells the upstream (configurable per deployment)."""

    principal_header: str = names.PRINCIPAL
    rule_header: str = ""
    # Headers a caller must never be able to set itself; removed on every allowed request.
    strip_headers: tuple[str, ...] = names.TRUSTED
    # Tell the upstream how much of the caller's rate-limit budget is left
    # (`ratelimit-limit/-remaining/-reset` on the upstream request) when a limit applied.
    budget_headers: bool = False


def to_request(check: ea.CheckRequest) -> Request:
    """Read the fields decisions use. Header maps are passed through as the protobuf's own
    read-only-by-convention mapping rather than copied: copying 15 headers costs more than
    every later lookup together."""
    attrs = check.attributes
    source = attrs.source
    request = attrs.request
    if not request.HasField("http"):
        return _network_request(attrs)
    http = request.http
    headers: Mapping[str, str] = http.headers
    if not headers and http.header_map.headers:
        headers = _raw_headers(http.header_map.headers)
    return Request(
        method=http.method,
        host=http.host,
        path=http.path,
        headers=headers,
        source_principal=source.principal,
        peer_certificate=source.certificate,
        source_address=source.address.socket_address.address,
        context_extensions=_context(attrs),
    )


# The route metadata namespace and key a route can name itself under, for configs that set
# `route_metadata_context_namespaces: [extauthz]` on the filter instead of per-route
# context_extensions (Envoy sends route metadata only for the namespaces listed there).
ROUTE_METADATA_NAMESPACE = "extauthz"
ROUTE_KEY = "route"


def _context(attrs: attribute_context_pb2.AttributeContext) -> Mapping[str, str]:
    """context_extensions, plus the route's name from the route metadata when Envoy sends it
    and the extensions do not name the route (no copy in the common case)."""
    extensions: Mapping[str, str] = attrs.context_extensions
    if ROUTE_KEY in extensions or not attrs.HasField("route_metadata_context"):
        return extensions
    meta = attrs.route_metadata_context.filter_metadata.get(ROUTE_METADATA_NAMESPACE)
    if meta is None:
        return extensions
    route = meta.fields.get(ROUTE_KEY)
    if route is None or not route.string_value:
        return extensions
    return {**extensions, ROUTE_KEY: route.string_value}


def _raw_headers(entries: Iterable[base_pb2.HeaderValue]) -> dict[str, str]:
    """Envoy's `encode_raw_headers` mode sends values as bytes in a list; repeated names are
    joined with a comma as HTTP allows, so no value is silently dropped."""
    headers: dict[str, str] = {}
    for h in entries:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _network_request(attrs: attribute_context_pb2.AttributeContext) -> Request:
    """A check from Envoy's network (TCP) ext_authz filter: no HTTP attributes, one per
    connection. What identifies the service is where the connection arrived (the listener's
    port) and the TLS SNI the caller asked for; both come from Envoy, and are carried as the
    request's host (SNI) and its `destination_port` / `destination_address`."""
    source = attrs.source
    dest = attrs.destination.address.socket_address
    return Request(
        host=attrs.tls_session.sni if attrs.HasField("tls_session") else "",
        source_principal=source.principal,
        peer_certificate=source.certificate,
        source_address=source.address.socket_address.address,
        is_http=False,
        context_extensions=attrs.context_extensions,
        destination_port=dest.port_value,
        destination_address=dest.address if dest.port_value else "",
    )


def is_network_check(request: Request) -> bool:
    """A check from the network ext_authz filter (no HTTP attributes, a destination port); a
    check that is neither HTTP nor that keeps getting HTTP-shaped denials."""
    return not request.is_http and request.destination_port > 0


def to_network_response(decision: Decision) -> ea.CheckResponse:
    """The answer to a network check: OK or a denial code, no HTTP response. Envoy closes a
    denied connection, so the reason cannot travel in a header: it is in the dynamic metadata
    (`reason`, with principal, rule, ... for the access log as
    %DYNAMIC_METADATA(envoy.filters.network.ext_authz:reason)%) and in the status message
    (`<status> <reason>`, as the HTTP body says it)."""
    message = "" if decision.allowed else (
        f"{decision.outcome.http_status} {decision.reason.value}")
    return ea.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE[decision.outcome], message=message),
        dynamic_metadata=_metadata(decision),
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _metadata(decision: Decision) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    meta.update(
        {
            METADATA_PRINCIPAL: decision.principal,
            "identity_source": decision.identity.source.value if decision.identity else "",
            "rule": decision.rule,
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason.value,
            "policy_version": decision.policy_version,
        }
    )
    return meta


def to_response(
    decision: Decision,
    options: ResponseOptions,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> ea.CheckResponse:
    outcome = decision.outcome
    status = status_pb2.Status(code=_GRPC_CODE[outcome])
    if outcome is Outcome.ALLOW:
        headers = [_header(k, v) for k, v in extra_headers]
        if options.principal_header and decision.principal:
            headers.append(_header(options.principal_header, decision.principal))
        if options.rule_header and decision.rule:
            headers.append(_header(options.rule_header, decision.rule))
        # Headers we set overwrite any copy the caller sent; the rest are removed outright
        # (not both: the order in which Envoy applies set and remove is not part of its API).
        set_keys = {h.header.key for h in headers}
        remove = [h for h in options.strip_headers if h not in set_keys]
        return ea.CheckResponse(
            status=status,
            ok_response=ea.OkHttpResponse(headers=headers, headers_to_remove=remove),
            dynamic_metadata=_metadata(decision),
        )
    denied_headers = [_header(REASON_HEADER, decision.reason.value)]
    denied_headers += [_header(k, v) for k, v in decision.headers]
    denied_headers += [_header(k, v) for k, v in extra_headers]
    return ea.CheckResponse(
        status=status,
        denied_response=ea.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=outcome.http_status),
            headers=denied_headers,
            body=f"{outcome.http_status} {decision.reason.value}\n",
        ),
        dynamic_metadata=_metadata(decision),
    )
