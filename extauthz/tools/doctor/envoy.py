"""What the doctor knows about Envoy: type names, defaults, which filters can rewrite a request
or re-select its route, and Envoy's host matching. Kept apart from the analysis so that adding
a filter to the tables never touches the walk over the config."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
EXT_AUTHZ = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
NETWORK_EXT_AUTHZ = "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz"
EXT_AUTHZ_PER_ROUTE = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
ROUTER = "envoy.extensions.filters.http.router.v3.Router"
FILTER_CONFIG = "envoy.config.route.v3.FilterConfig"
DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
QUIC_DOWNSTREAM = "envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

DEFAULT_CHECK_TIMEOUT = timedelta(milliseconds=200)  # Envoy's default for grpc_service.timeout
DEFAULT_ROUTE_TIMEOUT = timedelta(seconds=15)  # Envoy's default for route.timeout
HEALTH_PATHS = frozenset(
    {"/health", "/healthz", "/healthcheck", "/livez", "/readyz", "/ready", "/live", "/ping"}
)
# Headers that carry identity to extauthz or the upstream; a filter that sets them before
# ext_authz decides who the caller is.
IDENTITY_HEADERS = frozenset({"x-forwarded-client-cert", "authorization"})

# Filters that run code or an external service able to rewrite any header and clear the
# route cache. Golang is a contrib extension (not in envoy-data-plane): known by name only.
_ARBITRARY = {
    "envoy.extensions.filters.http.lua.v3.Lua": "Lua scripts",
    "envoy.extensions.filters.http.wasm.v3.Wasm": "Wasm plugins",
    "envoy.extensions.filters.http.golang.v3alpha.Config": "Go plugins",
    "envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter": "dynamic modules",
    "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor": "the external processor",
    "envoy.extensions.filters.http.composite.v3.Composite": "the delegated filters",
    "envoy.extensions.common.matching.v3.ExtensionWithMatcher": "the matched filters",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder":
        "the transcoder (it rewrites :path to the gRPC method)",
    "envoy.extensions.filters.http.transform.v3.TransformConfig": "the transformation",
}
_ROUTE_CACHE_FLAG = {
    "envoy.extensions.filters.http.set_filter_state.v3.Config",
    "envoy.extensions.filters.http.mcp.v3.Mcp",
    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
}
_LUA = "envoy.extensions.filters.http.lua.v3.Lua"
_HEADER_MUTATION = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_JWT_AUTHN = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_MCP_BRIDGE = "envoy.extensions.filters.http.mcp_json_rest_bridge.v3.McpJsonRestBridge"


def describe(name: str, type_name: str, index: int) -> str:
    short = type_name.rsplit(".", 1)[-1]
    return f"{name!r} ({short}, http_filters[{index}])"


def rewrites_request(type_name: str, msg: Any) -> str | None:
    """Why a filter placed before ext_authz changes what extauthz is asked about, or None."""
    if type_name in _ARBITRARY:
        return f"{_ARBITRARY[type_name]} can rewrite request headers, :path and :authority"
    if type_name == _HEADER_MUTATION and msg is not None and msg.mutations is not None:
        if msg.mutations.query_parameter_mutations:
            return "its query_parameter_mutations rewrite :path"
        for mutation in msg.mutations.request_mutations:
            option = mutation.append
            header = option.header if option is not None else None
            key = str(header.key).lower() if header is not None else ""
            if key in IDENTITY_HEADERS:
                return f"it sets {key}, which carries the caller's identity"
    return None


def reroutes(type_name: str, msg: Any) -> str | None:
    """Why a filter placed after ext_authz can send the request somewhere else, or None."""
    if type_name in _ARBITRARY:
        if type_name == _LUA and msg is not None and msg.clear_route_cache is False:
            return "Lua scripts can still rewrite :path and :authority after the check"
        return (f"{_ARBITRARY[type_name]} can rewrite :path and :authority and clear the "
                "route cache")
    if msg is None:
        return None
    if type_name == _HEADER_MUTATION and msg.mutations is not None:
        if msg.mutations.query_parameter_mutations:
            return "its query_parameter_mutations rewrite :path after the check"
        return None
    if type_name in _ROUTE_CACHE_FLAG and msg.clear_route_cache:
        return "clear_route_cache: true re-selects the route"
    if type_name == _JWT_AUTHN and any(p.clear_route_cache for p in msg.providers.values()):
        return "a provider's clear_route_cache: true re-selects the route"
    if type_name == _MCP_BRIDGE and not msg.disable_clear_route_cache:
        return "it clears the route cache after rewriting the request"
    return None


def seconds(d: timedelta) -> str:
    text = f"{d.total_seconds():.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def domain_host(domain: str) -> str:
    d = domain.lower()
    if d.startswith("["):
        end = d.find("]")
        return d[: end + 1] if end > 0 else d
    if d.count(":") == 1:
        name, port = d.rsplit(":", 1)
        if port.isdigit() or port == "*":
            return name
    return d


def domain_matches(domain: str, host: str) -> bool:
    """Envoy's virtual-host domain matching: exact, `*`, `*suffix` or `prefix*`."""
    d = domain_host(domain)
    h = host.lower()
    if d == "*":
        return True
    if d.startswith("*"):
        return h.endswith(d[1:]) and len(h) > len(d) - 1
    if d.endswith("*"):
        return h.startswith(d[:-1]) and len(h) > len(d) - 1
    return d == h



# Filters Envoy also finds by their (legacy) name when a filter has no typed_config at all.
ROUTER_NAMES = frozenset({"envoy.filters.http.router", "envoy.router"})
EXTAUTHZ_HEADER_PREFIX = "x-extauthz-"
# The headers extauthz sets towards the upstream; a caller's copy must be removed first.
TRUSTED_HEADERS = ("x-extauthz-principal", "x-extauthz-rule")
XFCC = "x-forwarded-client-cert"
HEADER_MUTATION = _HEADER_MUTATION


def removed_headers(msg: Any) -> tuple[set[str], set[str]]:
    """(exact names, name prefixes) a header_mutation filter removes from the request."""
    names: set[str] = set()
    prefixes: set[str] = set()
    mutations = msg.mutations if msg is not None else None
    for m in mutations.request_mutations if mutations is not None else ():
        if m.remove:
            names.add(str(m.remove).lower())
        rom = m.remove_on_match
        km = rom.key_matcher if rom is not None else None
        if km is not None:
            if km.exact:
                names.add(str(km.exact).lower())
            elif km.prefix:
                prefixes.add(str(km.prefix).lower())
    return names, prefixes
