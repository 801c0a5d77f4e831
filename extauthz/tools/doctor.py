"""`extauthz doctor`: find the unsafe ext_authz settings in an operator's own Envoy config.

Pure analysis: the input is an already-parsed Envoy bootstrap (a dict from YAML or JSON) and,
optionally, a few facts about the policy; the output is a sorted list of findings, each with
a stable id, a severity, the JSON path of the offending field, why it matters and the fix.
Reading files and printing belong to `cli_doctor.py`. The catalog of checks below is the
single source of the ids, severities, reasons and fixes (docs/doctor.md mirrors it, and a test
keeps the two in step).

The config is parsed with the typed classes of `envoy-data-plane` (betterproto2 dataclasses of
Envoy's API). betterproto2 unpacks a `google.protobuf.Any` from its `@type` only when the
message class is registered in the message pool, which happens when its module is imported.
So before parsing, every `@type` in the document is resolved to its module and imported;
`TypedStruct` wrappers are unwrapped; a type the library does not know (a contrib or private
extension) is swapped for a marker so the rest of the config still parses, and is reported as
`config.not_analysed` where it matters.

Paths use proto field names (`snake_case`), JSONPath style:
`$.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[1]`.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extauthz.policy.compiled import CompiledPolicy

# ---------------------------------------------------------------------------------------------
# The catalog


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r} (info, warning or error)") from None


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    severity: Severity
    title: str
    why: str
    fix: str


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO

_CATALOG = (
    # --- the ext_authz HTTP filter itself
    Check(
        "ext_authz.failure_mode_allow", _E, "ext_authz fails open",
        "With failure_mode_allow: true every request is let through unchecked whenever "
        "extauthz cannot answer in time (down, overloaded, network partition, bad deploy). "
        "An attacker who can slow extauthz down turns authorization off.",
        "Set failure_mode_allow: false (the default). Keep extauthz available instead: "
        "replicas, a health check on the authz cluster, and status_on_error: {code: 503}.",
    ),
    Check(
        "ext_authz.shadow_mode", _E, "ext_authz never denies (shadow mode)",
        "In shadow_mode the filter asks extauthz but never terminates a request: denials are "
        "only written to filter state. Unless a later filter enforces that decision, every "
        "request reaches the upstream.",
        "Remove shadow_mode. To try a policy without enforcing it, use extauthz's own "
        "`mode: dry-run` rules, which log would-be denials while the filter stays enforcing.",
    ),
    Check(
        "ext_authz.partially_enabled", _E, "ext_authz skips some requests",
        "filter_enabled below 100%, a filter_enabled runtime key, or filter_enabled_metadata "
        "make the filter skip requests; a skipped request is forwarded without any check "
        "unless deny_at_disable is on.",
        "Remove filter_enabled / filter_enabled_metadata, or set deny_at_disable: "
        "{default_value: true} so a skipped request is denied rather than allowed.",
    ),
    Check(
        "ext_authz.disabled_by_default", _E, "ext_authz disabled unless a route enables it",
        "The http_filters entry has disabled: true, so the filter only runs on routes whose "
        "typed_per_filter_config names it. Every other route is served without a check, and a "
        "new route is unprotected by default.",
        "Drop disabled: true from the filter and exempt the few routes that must be open "
        "(health checks) with ExtAuthzPerRoute {disabled: true} instead.",
    ),
    Check(
        "ext_authz.timeout_missing", _W, "no explicit timeout on the check",
        "Without grpc_service.timeout Envoy silently applies 200 ms. With 0s current Envoy "
        "gives the check no deadline at all, so a hung extauthz holds every request (and its "
        "connection) open; releases before early 2026 instead failed every check at once "
        "(envoyproxy/envoy#43020). Either way nobody has compared the budget with extauthz's "
        "latency and the routes' own timeouts.",
        "Set grpc_service.timeout explicitly (extauthz answers in well under 10 ms; 0.25s is "
        "a sound default) and keep it below every route's timeout.",
    ),
    Check(
        "ext_authz.timeout_exceeds_route", _W, "check timeout longer than the route's timeout",
        "The authorization call may take longer than the whole request is allowed to take. "
        "When extauthz is slow, callers time out and retry before the check even fails, "
        "multiplying the load on an already struggling extauthz.",
        "Lower grpc_service.timeout below the shortest timeout of the routes the filter "
        "guards (route.timeout, 15s when unset), or raise those route timeouts.",
    ),
    Check(
        "ext_authz.status_on_error_unset", _W, "errors look like denials (status_on_error unset)",
        "When the check fails (extauthz unreachable, timeout, gRPC error) Envoy answers "
        "status_on_error, which defaults to 403. An outage then looks exactly like a policy "
        "denial to callers, dashboards and on-call. extauthz itself answers 503 with "
        "x-extauthz-reason for its own errors, so only the filter's default hides them.",
        "Set status_on_error: {code: 503} (ServiceUnavailable).",
    ),
    Check(
        "ext_authz.status_on_error_denial", _W, "errors look like denials (401/403)",
        "status_on_error is the status of a denial (401 or 403): an extauthz outage is "
        "indistinguishable from 'you are not allowed', so clients do not retry and operators "
        "chase policy bugs during an outage.",
        "Set status_on_error: {code: 503}, the status extauthz uses for its own errors.",
    ),
    Check(
        "ext_authz.status_on_error_not_503", _I, "status_on_error differs from extauthz's 503",
        "extauthz answers 503 for its own failures; a different status when Envoy cannot reach "
        "it splits one condition ('authorization unavailable') across two status codes in "
        "alerts and client retry logic. A non-error status (2xx/3xx) misreports an outage as "
        "success.",
        "Set status_on_error: {code: 503}.",
    ),
    Check(
        "ext_authz.peer_certificate_not_included", _W, "peer certificate not sent to extauthz",
        "Without include_peer_certificate extauthz only sees the principal string Envoy "
        "derived from the client certificate. It cannot check the certificate itself (SVID "
        "shape, single URI SAN, validity) and cannot expire cached decisions with the "
        "certificate, so a principal is trusted for the whole cache TTL.",
        "Set include_peer_certificate: true.",
    ),
    Check(
        "ext_authz.after_request_rewriter", _W, "a request-rewriting filter runs before ext_authz",
        "A filter before ext_authz that can rewrite the request (Lua, Wasm, ext_proc, "
        "dynamic modules, transcoders, query or identity-header mutations) makes extauthz "
        "authorize a request the caller did not send. If that filter does not clear the route "
        "cache, the per-route ext_authz settings (and the upstream) still come from the route "
        "chosen before the rewrite: a request for an exempt health route can be rewritten into "
        "an unchecked request for another path. Envoy recommends ext_authz as the first filter.",
        "Move ext_authz before the rewriting filter (filters that only remove or add ordinary "
        "headers, like the shipped header_mutation that strips x-extauthz-principal, may stay "
        "first).",
    ),
    Check(
        "ext_authz.reroute_after_check", _W, "the route can change after the check",
        "A filter between ext_authz and the router that can rewrite :path/:authority or clear "
        "the route cache (Lua, Wasm, ext_proc, dynamic modules, composite, gRPC-JSON "
        "transcoder, transform, set_filter_state/jwt_authn/mcp with clear_route_cache, "
        "header_mutation with query_parameter_mutations) can send an already authorized request "
        "to a different route, path or upstream than the one extauthz allowed.",
        "Place such filters before ext_authz (so extauthz sees the final request), or turn "
        "their route-cache clearing off (lua clear_route_cache: false, ext_proc "
        "route_cache_action: RETAIN, ...) and make sure they never rewrite :path or :authority.",
    ),
    Check(
        "ext_authz.after_router", _E, "ext_authz after the router",
        "The router is terminal: filters after it never run, so no request is authorized. "
        "Envoy refuses such a chain at load time; the doctor reports it anyway so the cause is "
        "clear when reviewing a config before it is pushed (e.g. over xDS).",
        "Put ext_authz before envoy.filters.http.router, which must be last.",
    ),
    # --- the HTTP connection manager
    Check(
        "hcm.no_router", _E, "no router in the HTTP filter chain",
        "Without envoy.filters.http.router the chain cannot forward requests, and Envoy refuses "
        "it at load time (a non-terminal filter is last).",
        "Add envoy.filters.http.router as the last http_filter.",
    ),
    Check(
        "hcm.no_ext_authz", _I, "an HTTP connection manager without ext_authz",
        "Requests on this filter chain are not authorized by extauthz at all. That is right "
        "for an egress or admin-only listener and wrong for any listener that serves a "
        "protected service.",
        "Add the ext_authz filter (see envoy/sidecar.yaml), or ignore this finding for "
        "listeners that are meant to be open.",
    ),
    Check(
        "hcm.normalize_path_off", _W, "paths are not normalized",
        "Without normalize_path Envoy routes and authorizes `/healthz/../admin` as it was "
        "sent while the upstream resolves it to `/admin`. Route matching, per-route ext_authz "
        "exemptions and the upstream then disagree about which path a request is for. "
        "Reported when a policy rule matches on a path (or no --policy was given).",
        "Set normalize_path: true on the HTTP connection manager.",
    ),
    Check(
        "hcm.merge_slashes_off", _W, "repeated slashes are not merged",
        "Without merge_slashes `//admin` and `/admin` are different paths to Envoy's route "
        "table but often the same path to the upstream, so routes and per-route exemptions can "
        "be sidestepped. Reported when a policy rule matches on a path (or no --policy).",
        "Set merge_slashes: true.",
    ),
    Check(
        "hcm.escaped_slashes_kept", _W, "escaped slashes (%2F) are passed through",
        "With path_with_escaped_slashes_action unset or KEEP_UNCHANGED, `/a%2F..%2Fadmin` "
        "reaches the upstream unchanged; many servers decode %2F into `/`, so the upstream "
        "may serve a different path than the one Envoy routed. extauthz denies such paths as "
        "ambiguous, but routes where ext_authz is disabled do not get that protection. "
        "Reported when a policy rule matches on a path (or no --policy).",
        "Set path_with_escaped_slashes_action: REJECT_REQUEST (or UNESCAPE_AND_REDIRECT).",
    ),
    Check(
        "hcm.xfcc_forwarded", _W, "callers' x-forwarded-client-cert is forwarded",
        "forward_client_cert_details FORWARD_ONLY or APPEND_FORWARD passes on the XFCC header "
        "a caller sent. Any mTLS caller can then claim another workload's identity to the "
        "upstream and to anything that reads XFCC. extauthz itself only honours XFCC from "
        "peers listed as trusted proxies, and takes the rightmost element.",
        "Use SANITIZE_SET (with set_current_client_cert_details: {uri: true}) or SANITIZE. "
        "Forwarding is only right when every direct peer is a trusted front proxy that "
        "sanitizes XFCC itself, and that proxy is listed in extauthz's trusted_proxies.",
    ),
    Check(
        "hcm.xfcc_always_forwarded", _E, "XFCC forwarded even from plaintext callers",
        "ALWAYS_FORWARD_ONLY forwards the caller's x-forwarded-client-cert header even on "
        "connections without a client certificate: anyone who can reach the listener can "
        "inject an identity statement for the upstream.",
        "Use SANITIZE_SET (with set_current_client_cert_details: {uri: true}) or SANITIZE.",
    ),
    # --- routes
    Check(
        "route.ext_authz_disabled", _E, "ext_authz disabled on a non-health route",
        "ExtAuthzPerRoute {disabled: true} (or a FilterConfig {disabled: true} for the "
        "ext_authz filter) on a virtual host or a route that is not a health check serves "
        "those requests without any authorization. On a virtual host it covers every route "
        "that does not override it, including routes added later.",
        "Remove the exemption; exempt only exact health paths (e.g. path: /healthz). To "
        "open a route to every workload, allow '*' in the extauthz policy instead, which "
        "still requires a verified identity and is logged.",
    ),
    # --- listeners
    Check(
        "listener.plaintext", _E, "a listener with ext_authz accepts plaintext",
        "The filter chain has no TLS transport socket, so there is no client certificate and "
        "no mTLS principal: identity can only come from headers, which any caller can set. "
        "extauthz fails closed (401), but the listener is either unusable or relying on "
        "forgeable identity.",
        "Add a DownstreamTlsContext transport socket with require_client_certificate: true and "
        "a validation_context that trusts your workload CA (see envoy/sidecar.yaml).",
    ),
    Check(
        "listener.client_cert_optional", _W, "client certificates not required",
        "require_client_certificate is not true, so callers without a certificate complete "
        "the TLS handshake. extauthz then sees no mTLS principal and answers 401, but the "
        "listener no longer filters anonymous callers at the handshake, and any route where "
        "ext_authz is off is open to them.",
        "Set require_client_certificate: true on the DownstreamTlsContext.",
    ),
    Check(
        "listener.client_cert_unverified", _E, "client certificates are not verified",
        "The DownstreamTlsContext has no validation context with a trusted CA (or sets "
        "trust_chain_verification: ACCEPT_UNTRUSTED). Envoy then accepts any self-signed "
        "certificate and reports its URI SAN as the caller's principal: anyone can mint a "
        "certificate for spiffe://your-domain/any/workload.",
        "Configure common_tls_context.validation_context.trusted_ca (or an SDS validation "
        "context / SPIFFE certificate validator) with your workload CA and keep "
        "trust_chain_verification at VERIFY_TRUST_CHAIN.",
    ),
    # --- the authz cluster
    Check(
        "authz_cluster.missing", _E, "the authz cluster does not exist",
        "The ext_authz filter names a cluster that is not among static_resources.clusters and "
        "the bootstrap has no CDS. Every check fails, so every request gets status_on_error "
        "(or is let through with failure_mode_allow).",
        "Define the cluster (see the `extauthz` cluster in envoy/sidecar.yaml) or fix the "
        "cluster_name.",
    ),
    Check(
        "authz_cluster.not_http2", _E, "the authz cluster does not speak HTTP/2",
        "extauthz is a gRPC service and gRPC needs HTTP/2. An HTTP/1.1 cluster makes every "
        "check fail.",
        "Add typed_extension_protocol_options: envoy.extensions.upstreams.http.v3."
        "HttpProtocolOptions with explicit_http_config: {http2_protocol_options: {}}.",
    ),
    Check(
        "authz_cluster.no_health_check", _W, "the authz cluster is not health-checked",
        "Without an active health check Envoy keeps sending checks to a dead or draining "
        "extauthz instance until requests time out, turning one bad replica into a wave of "
        "503s (or, with failure_mode_allow, of unchecked requests).",
        "Add health_checks with grpc_health_check: {} (extauthz serves the standard gRPC "
        "health service).",
    ),
    Check(
        "authz_cluster.plaintext", _E, "the authz call crosses the network in plaintext",
        "The authz cluster reaches a non-loopback address without TLS. Anyone on the path "
        "can read the check requests (identities, paths, certificates) and forge an OK answer, "
        "which Envoy would obey.",
        "Run extauthz next to Envoy on 127.0.0.1 or a unix socket, or add an "
        "UpstreamTlsContext transport socket (mTLS) to the cluster.",
    ),
    # --- policy cross-checks (with --policy)
    Check(
        "policy.host_not_served", _I, "a policy host no virtual host serves",
        "The policy has rules for a host that no virtual host's domains match, so those rules "
        "never apply through this Envoy: a typo in the policy or in the route config, or a "
        "policy directory shared by several services.",
        "Fix the host name, or ignore this finding when the policy directory also covers "
        "services behind other Envoys.",
    ),
    Check(
        "vhost.domain_without_policy", _W, "a served domain no policy covers",
        "Requests for this domain reach ext_authz but no policy document names the host, so "
        "extauthz denies every one of them (no_matching_rule). Fail closed, but an outage "
        "waiting for the first caller.",
        "Add the host to the service's policy document (`hosts:`), or remove the domain.",
    ),
    # --- the config as a whole
    Check(
        "config.no_ext_authz", _E, "no ext_authz filter anywhere",
        "No HTTP connection manager in the config has an ext_authz filter: nothing this Envoy "
        "serves is authorized by extauthz.",
        "Add the ext_authz filter to the listener that serves your service (see "
        "envoy/sidecar.yaml), or check that this is the right config file.",
    ),
    Check(
        "config.not_analysed", _I, "part of the config could not be analysed",
        "Routes from RDS, filters from ECDS, clusters from CDS and extension types unknown to "
        "envoy-data-plane are not in the file, so their settings were not checked.",
        "Run the doctor on a config dump that inlines them (`/config_dump` from the admin "
        "interface, converted to a bootstrap), or review those parts by hand.",
    ),
)

CHECKS: Mapping[str, Check] = {c.id: c for c in _CATALOG}


@dataclass(frozen=True, slots=True)
class Finding:
    id: str
    path: str
    detail: str

    @property
    def check(self) -> Check:
        return CHECKS[self.id]

    @property
    def severity(self) -> Severity:
        return self.check.severity

    def as_dict(self) -> dict[str, str]:
        c = self.check
        return {
            "id": self.id,
            "severity": c.severity.label,
            "title": c.title,
            "path": self.path,
            "detail": self.detail,
            "why": c.why,
            "fix": c.fix,
        }


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """The two things the doctor needs from a policy: its hosts, and whether any rule matches
    on a path narrower than prefix `/` (only then do path-normalization settings matter)."""

    hosts: tuple[str, ...]
    matches_on_path: bool

    @classmethod
    def from_policy(cls, policy: CompiledPolicy) -> PolicyFacts:
        hosts: set[str] = set()
        for doc in policy.documents:
            hosts.update(h.lower() for h in doc.hosts)
        on_path = False
        for rule in policy.rules:
            path = rule.decl.path
            if not (path.kind == "prefix" and path.value == "/"):
                on_path = True
        return cls(tuple(sorted(hosts)), on_path)


class DoctorError(ValueError):
    """The input is not an Envoy bootstrap the doctor can read."""


# ---------------------------------------------------------------------------------------------
# Parsing with envoy-data-plane

_PKG = "envoy_data_plane"
_URL_PREFIX = "type.googleapis.com/"
_TYPED_STRUCTS = ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct")
_UNKNOWN_MARK = "extauthz-doctor-unknown-type:"
_STRING_VALUE = _URL_PREFIX + "google.protobuf.StringValue"
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _message_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def _import(module: str) -> Any:
    """Import a generated module quietly: envoy-data-plane's classes trip pydantic's
    deprecation warnings at import time, which are no concern of an operator (or a test run
    with warnings as errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def _pool() -> Any:
    return _import(f"{_PKG}.message_pool").default_message_pool


def _register(type_url: str) -> bool:
    """Import the module that defines `type_url`'s message; True if the pool now knows it."""
    pool = _pool()
    if type_url in pool.url_to_type:
        return True
    name = _message_name(type_url)
    if not _SAFE_NAME.match(name):
        return False
    package = name.rsplit(".", 1)[0]
    try:
        _import(f"{_PKG}.{package}")
    except ImportError:
        return False
    return type_url in pool.url_to_type


def _prepare(node: object) -> object:
    """Copy the document, making every `@type` parseable (see the module docstring)."""
    if isinstance(node, list):
        return [_prepare(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {str(k): v for k, v in node.items()}
    url = out.get("@type")
    if isinstance(url, str):
        if _message_name(url) in _TYPED_STRUCTS:
            inner = out.get("type_url", out.get("typeUrl"))
            value = out.get("value") or {}
            if isinstance(inner, str) and isinstance(value, Mapping):
                out = {"@type": inner, **{str(k): v for k, v in value.items()}}
                url = inner
        # Envoy only reads the name after the last '/'; the pool knows type.googleapis.com.
        canonical = _URL_PREFIX + _message_name(url)
        if not _register(canonical):
            return {"@type": _STRING_VALUE, "value": _UNKNOWN_MARK + url}
        out["@type"] = canonical
    return {k: _prepare(v) for k, v in out.items()}


def parse_bootstrap(raw: Mapping[str, Any]) -> Any:
    """The typed `envoy.config.bootstrap.v3.Bootstrap` for a parsed YAML/JSON document."""
    if not isinstance(raw, Mapping):
        raise DoctorError("an Envoy bootstrap must be a mapping at the top level")
    module = _import(f"{_PKG}.envoy.config.bootstrap.v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated fields warn on construction
        try:
            return module.Bootstrap.from_dict(_prepare(raw))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise DoctorError(
                f"not a valid Envoy bootstrap: {message} "
                "(`envoy --mode validate -c FILE` shows where)"
            ) from None


def type_of(any_msg: Any) -> str:
    """The message name inside an Any (the original one for types the library lacks)."""
    if any_msg is None:
        return ""
    url = str(any_msg.type_url)
    if url == _STRING_VALUE:
        inner = _unpack_raw(any_msg)
        if inner is not None and str(inner.value).startswith(_UNKNOWN_MARK):
            return _message_name(str(inner.value)[len(_UNKNOWN_MARK) :])
    return _message_name(url)


def _unpack_raw(any_msg: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return any_msg.unpack()


def unpack(any_msg: Any) -> Any:
    """The typed message inside an Any, or None when it is absent or of an unknown type."""
    if any_msg is None or not any_msg.type_url:
        return None
    msg = _unpack_raw(any_msg)
    if str(any_msg.type_url) == _STRING_VALUE and str(msg.value).startswith(_UNKNOWN_MARK):
        return None
    return msg


# ---------------------------------------------------------------------------------------------
# Envoy knowledge

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


def _describe(name: str, type_name: str, index: int) -> str:
    short = type_name.rsplit(".", 1)[-1]
    return f"{name!r} ({short}, http_filters[{index}])"


def _rewrites_request(type_name: str, msg: Any) -> str | None:
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


def _reroutes(type_name: str, msg: Any) -> str | None:
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


def _seconds(d: timedelta) -> str:
    text = f"{d.total_seconds():.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _domain_host(domain: str) -> str:
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
    d = _domain_host(domain)
    h = host.lower()
    if d == "*":
        return True
    if d.startswith("*"):
        return h.endswith(d[1:]) and len(h) > len(d) - 1
    if d.endswith("*"):
        return h.startswith(d[:-1]) and len(h) > len(d) - 1
    return d == h


def _natural(path: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    unique = {(f.id, f.path, f.detail): f for f in findings}
    return sorted(unique.values(), key=lambda f: (-f.severity, _natural(f.path), f.id, f.detail))


# ---------------------------------------------------------------------------------------------
# The analysis


@dataclass(slots=True)
class _AuthzFilter:
    index: int
    name: str
    path: str  # of the http_filters entry
    config: Any  # ExtAuthz
    timeout: timedelta  # effective check timeout
    disabled: bool  # `disabled: true` on the http_filters entry: off unless a route enables it


@dataclass(slots=True)
class _Doctor:
    bootstrap: Any
    policy: PolicyFacts | None
    findings: list[Finding] = field(default_factory=list)
    # cluster name -> (path of the reference, True when gRPC) for every ext_authz service
    authz_clusters: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    domains: list[tuple[str, str]] = field(default_factory=list)  # (domain, path)
    routes_known: bool = True
    ext_authz_seen: bool = False
    http_ext_authz_seen: bool = False  # policy hosts only matter to HTTP virtual hosts

    def add(self, check_id: str, path: str, detail: str) -> None:
        assert check_id in CHECKS, check_id
        self.findings.append(Finding(check_id, path, detail))

    # --- listeners

    def run(self) -> list[Finding]:
        static = self.bootstrap.static_resources
        listeners = static.listeners if static is not None else []
        for li, listener in enumerate(listeners):
            self.listener(listener, f"$.static_resources.listeners[{li}]")
        if not self.ext_authz_seen and listeners:
            self.findings = [f for f in self.findings if f.id != "hcm.no_ext_authz"]
            self.add("config.no_ext_authz", "$.static_resources.listeners",
                     "no http_filters entry of type ExtAuthz in any listener")
        self.clusters()
        if self.policy is not None and self.routes_known and self.http_ext_authz_seen:
            self.policy_hosts()
        return sort_findings(self.findings)

    def listener(self, listener: Any, path: str) -> None:
        label = f"listener {listener.name!r}" if listener.name else "the listener"
        chains = [
            (f"{path}.filter_chains[{ci}]", fc) for ci, fc in enumerate(listener.filter_chains)
        ]
        if listener.default_filter_chain is not None:
            chains.append((f"{path}.default_filter_chain", listener.default_filter_chain))
        for cpath, chain in chains:
            for fi, flt in enumerate(chain.filters):
                fpath = f"{cpath}.filters[{fi}]"
                if flt.config_discovery is not None:
                    self.add("config.not_analysed", f"{fpath}.config_discovery",
                             f"{label}: network filter {flt.name!r} comes from ECDS")
                    continue
                kind = type_of(flt.typed_config)
                if kind == NETWORK_EXT_AUTHZ:
                    cfg = unpack(flt.typed_config)
                    if cfg is not None:
                        self.network_ext_authz(cfg, f"{fpath}.typed_config", label)
                        self.downstream_tls(chain, cpath, label)
                    continue
                if kind != HCM:
                    continue
                hcm = unpack(flt.typed_config)
                if hcm is None:
                    continue
                if self.hcm(hcm, f"{fpath}.typed_config", label):
                    self.downstream_tls(chain, cpath, label)

    def network_ext_authz(self, cfg: Any, path: str, label: str) -> None:
        """The network (TCP) ext_authz filter: one check per connection. It has no
        status_on_error (a failed check closes the connection), so only the settings it shares
        with the HTTP filter are checked, under the same ids."""
        self.ext_authz_seen = True
        if cfg.failure_mode_allow:
            self.add("ext_authz.failure_mode_allow", f"{path}.failure_mode_allow",
                     f"{label}: network ext_authz failure_mode_allow is true")
        if cfg.filter_enabled_metadata is not None:
            self.add("ext_authz.partially_enabled", f"{path}.filter_enabled_metadata",
                     f"{label}: connections whose metadata does not match are not checked")
        if not cfg.include_peer_certificate:
            self.add("ext_authz.peer_certificate_not_included",
                     f"{path}.include_peer_certificate",
                     f"{label}: include_peer_certificate is not true")
        grpc = cfg.grpc_service
        if grpc is None:
            return
        if grpc.timeout is None:
            self.add("ext_authz.timeout_missing", f"{path}.grpc_service.timeout",
                     f"{label}: grpc_service.timeout is unset (Envoy applies 200ms)")
        elif grpc.timeout <= timedelta(0):
            self.add("ext_authz.timeout_missing", f"{path}.grpc_service.timeout",
                     f"{label}: grpc_service.timeout is 0s (no deadline)")
        self.service(grpc, f"{path}.grpc_service")

    def downstream_tls(self, chain: Any, cpath: str, label: str) -> None:
        socket = chain.transport_socket
        base = f"{cpath}.transport_socket"
        kind = type_of(socket.typed_config) if socket is not None else ""
        tls = unpack(socket.typed_config) if socket is not None else None
        tpath = f"{base}.typed_config"
        if kind == QUIC_DOWNSTREAM and tls is not None:
            tls, kind = tls.downstream_tls_context, DOWNSTREAM_TLS
            tpath = f"{tpath}.downstream_tls_context"
        if kind in ("", RAW_BUFFER):
            self.add("listener.plaintext", base,
                     f"{label}: the filter chain with ext_authz has "
                     f"{'a raw_buffer' if kind else 'no'} transport socket (plaintext)")
            return
        if kind != DOWNSTREAM_TLS or tls is None:
            self.add("config.not_analysed", base,
                     f"{label}: transport socket {kind} was not analysed")
            return
        if tls.require_client_certificate is not True:
            self.add("listener.client_cert_optional", f"{tpath}.require_client_certificate",
                     f"{label}: require_client_certificate is "
                     f"{'false' if tls.require_client_certificate is False else 'unset'}")
        problem = _validation_problem(tls.common_tls_context)
        if problem is not None:
            where, text = problem
            self.add("listener.client_cert_unverified", f"{tpath}.common_tls_context{where}",
                     f"{label}: {text}")

    # --- the HTTP connection manager

    def hcm(self, hcm: Any, path: str, label: str) -> bool:
        """Check one HCM; True when it has an ext_authz filter."""
        filters = list(enumerate(hcm.http_filters))
        authz: list[_AuthzFilter] = []
        router: int | None = None
        kinds: list[tuple[int, str, Any, str]] = []  # index, type, message, path
        for i, f in filters:
            fpath = f"{path}.http_filters[{i}]"
            if f.config_discovery is not None:
                self.add("config.not_analysed", f"{fpath}.config_discovery",
                         f"{label}: http filter {f.name!r} comes from ECDS")
                kinds.append((i, "", None, fpath))  # never matched: no type
                continue
            kind = type_of(f.typed_config)
            msg = unpack(f.typed_config)
            if kind and msg is None:
                self.add("config.not_analysed", f"{fpath}.typed_config",
                         f"{label}: http filter {f.name!r} has type {kind}, unknown to "
                         "envoy-data-plane")
            kinds.append((i, kind, msg, fpath))
            if kind == EXT_AUTHZ and msg is not None:
                timeout = msg.grpc_service.timeout if msg.grpc_service is not None else None
                authz.append(_AuthzFilter(i, f.name, fpath, msg,
                                          DEFAULT_CHECK_TIMEOUT if timeout is None else timeout,
                                          bool(f.disabled)))
            elif kind == ROUTER and router is None:
                router = i
        if router is None:
            self.add("hcm.no_router", f"{path}.http_filters",
                     f"{label}: no envoy.filters.http.router among {len(filters)} http_filters")
        if not authz:
            self.add("hcm.no_ext_authz", f"{path}.http_filters",
                     f"{label}: this HTTP connection manager has no ext_authz filter")
            return False
        self.ext_authz_seen = True
        self.http_ext_authz_seen = True
        for a in authz:
            self.ext_authz(a, label)
            if router is not None and a.index > router:
                self.add("ext_authz.after_router", a.path,
                         f"{label}: ext_authz is http_filters[{a.index}], the router is "
                         f"http_filters[{router}]")
            end = router if router is not None else len(filters)
            for i, kind, msg, fpath in kinds:
                what = _describe(filters[i][1].name, kind, i)
                if i < a.index:
                    why = _rewrites_request(kind, msg)
                    if why is not None:
                        self.add("ext_authz.after_request_rewriter", fpath,
                                 f"{label}: {what} runs before ext_authz "
                                 f"(http_filters[{a.index}]): {why}")
                elif a.index < i < end:
                    why = _reroutes(kind, msg)
                    if why is not None:
                        self.add("ext_authz.reroute_after_check", fpath,
                                 f"{label}: {what} runs after ext_authz "
                                 f"(http_filters[{a.index}]): {why}")
        self.path_settings(hcm, path, label)
        self.xfcc(hcm, path, label)
        if hcm.route_config is not None:
            self.routes(hcm.route_config, f"{path}.route_config", authz, label)
        else:
            self.routes_known = False
            source = "rds" if hcm.rds is not None else "scoped_routes"
            for a in authz:
                if a.disabled:
                    self.add("ext_authz.disabled_by_default", f"{a.path}.disabled",
                             f"{label}: unchecked on every {source.upper()} route that does "
                             "not enable it")
            self.add("config.not_analysed", f"{path}.{source}",
                     f"{label}: routes come from {source.upper()}; per-route ext_authz "
                     "settings, route timeouts and domains were not checked")
        return True

    def ext_authz(self, a: _AuthzFilter, label: str) -> None:
        cfg, path = a.config, f"{a.path}.typed_config"
        if cfg.failure_mode_allow:
            self.add("ext_authz.failure_mode_allow", f"{path}.failure_mode_allow",
                     f"{label}: failure_mode_allow is true")
        if cfg.shadow_mode:
            self.add("ext_authz.shadow_mode", f"{path}.shadow_mode",
                     f"{label}: shadow_mode is true")
        self.enabled(cfg, path, label)
        if cfg.grpc_service is not None:
            timeout = cfg.grpc_service.timeout
            if timeout is None:
                self.add("ext_authz.timeout_missing", f"{path}.grpc_service.timeout",
                         f"{label}: grpc_service.timeout is unset (Envoy applies 200ms)")
            elif timeout <= timedelta(0):
                self.add("ext_authz.timeout_missing", f"{path}.grpc_service.timeout",
                         f"{label}: grpc_service.timeout is 0s (no deadline)")
            self.service(cfg.grpc_service, f"{path}.grpc_service")
        elif cfg.http_service is not None and cfg.http_service.server_uri is not None:
            uri = cfg.http_service.server_uri
            self.authz_clusters.setdefault(uri.cluster, []).append(
                (f"{path}.http_service.server_uri.cluster", False))
        status = cfg.status_on_error
        code = int(status.code.value) if status is not None else 0
        if code == 0:
            self.add("ext_authz.status_on_error_unset", f"{path}.status_on_error",
                     f"{label}: status_on_error is unset (Envoy answers 403 on errors)")
        elif code in (401, 403):
            self.add("ext_authz.status_on_error_denial", f"{path}.status_on_error.code",
                     f"{label}: status_on_error is {code}, the status of a denial")
        elif code != 503:
            self.add("ext_authz.status_on_error_not_503", f"{path}.status_on_error.code",
                     f"{label}: status_on_error is {code}; extauthz answers 503 for errors")
        if not cfg.include_peer_certificate:
            self.add("ext_authz.peer_certificate_not_included",
                     f"{path}.include_peer_certificate",
                     f"{label}: include_peer_certificate is not true")

    def enabled(self, cfg: Any, path: str, label: str) -> None:
        deny = cfg.deny_at_disable
        if deny is not None and deny.default_value is True:
            return
        fe = cfg.filter_enabled
        if fe is not None:
            pct = fe.default_value
            share = 0.0
            if pct is not None:
                denominators = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}
                share = pct.numerator / denominators.get(pct.denominator.name, 100)
            if share < 1.0:
                self.add("ext_authz.partially_enabled", f"{path}.filter_enabled",
                         f"{label}: filter_enabled lets {100 * (1 - share):g}% of requests "
                         "through unchecked")
            elif fe.runtime_key:
                self.add("ext_authz.partially_enabled", f"{path}.filter_enabled.runtime_key",
                         f"{label}: runtime key {fe.runtime_key!r} can turn checks off")
        if cfg.filter_enabled_metadata is not None:
            self.add("ext_authz.partially_enabled", f"{path}.filter_enabled_metadata",
                     f"{label}: requests whose metadata does not match are not checked")

    def service(self, grpc: Any, path: str) -> None:
        if grpc.envoy_grpc is not None:
            self.authz_clusters.setdefault(grpc.envoy_grpc.cluster_name, []).append(
                (f"{path}.envoy_grpc.cluster_name", True))
        elif grpc.google_grpc is not None:
            g = grpc.google_grpc
            creds = g.channel_credentials
            secure = creds is not None and (
                creds.ssl_credentials is not None or creds.google_default is not None
            )
            target = str(g.target_uri)
            host = target.split("://", 1)[-1]
            local = target.startswith(("unix:", "unix-abstract:")) or _is_loopback(
                _domain_host(host.rsplit("/", 1)[-1] if "/" in host else host)
            )
            if not secure and not local:
                self.add("authz_cluster.plaintext", f"{path}.google_grpc",
                         f"google_grpc target {target!r} has no TLS channel credentials")

    def path_settings(self, hcm: Any, path: str, label: str) -> None:
        if self.policy is not None and not self.policy.matches_on_path:
            return
        why = ("policy rules match on paths" if self.policy is not None
               else "no --policy given: assuming rules match on paths")
        if hcm.normalize_path is not True:
            self.add("hcm.normalize_path_off", f"{path}.normalize_path",
                     f"{label}: normalize_path is "
                     f"{'false' if hcm.normalize_path is False else 'unset'} ({why})")
        if not hcm.merge_slashes:
            self.add("hcm.merge_slashes_off", f"{path}.merge_slashes",
                     f"{label}: merge_slashes is off ({why})")
        action = hcm.path_with_escaped_slashes_action.name
        if action in ("IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED"):
            shown = "unset" if action == "IMPLEMENTATION_SPECIFIC_DEFAULT" else action
            self.add("hcm.escaped_slashes_kept", f"{path}.path_with_escaped_slashes_action",
                     f"{label}: path_with_escaped_slashes_action is {shown} ({why})")

    def xfcc(self, hcm: Any, path: str, label: str) -> None:
        mode = hcm.forward_client_cert_details.name
        if mode in ("FORWARD_ONLY", "APPEND_FORWARD"):
            self.add("hcm.xfcc_forwarded", f"{path}.forward_client_cert_details",
                     f"{label}: forward_client_cert_details is {mode}")
        elif mode == "ALWAYS_FORWARD_ONLY":
            self.add("hcm.xfcc_always_forwarded", f"{path}.forward_client_cert_details",
                     f"{label}: forward_client_cert_details is {mode}")

    # --- routes

    def routes(self, rc: Any, path: str, authz: Sequence[_AuthzFilter], label: str) -> None:
        for vi, vhost in enumerate(rc.virtual_hosts):
            vpath = f"{path}.virtual_hosts[{vi}]"
            for di, domain in enumerate(vhost.domains):
                self.domains.append((str(domain), f"{vpath}.domains[{di}]"))
            if vhost.matcher is not None:
                self.add("config.not_analysed", f"{vpath}.matcher",
                         f"{label}: routes selected by a matcher tree were not checked")
            for a in authz:
                self.vhost_routes(vhost, vpath, a, rc=rc, rc_path=path, label=label)

    def vhost_routes(
        self, vhost: Any, vpath: str, a: _AuthzFilter, *, rc: Any, rc_path: str, label: str
    ) -> None:
        off_by_default: list[str] = []
        disabled: dict[str, list[str]] = {}  # path of the disabling field -> routes
        longer: list[tuple[str, timedelta]] = []
        for ri, route in enumerate(vhost.routes):
            rpath = f"{vpath}.routes[{ri}]"
            rname = _route_label(route, vhost)
            levels = ((route, rpath), (vhost, vpath), (rc, rc_path))
            state, where, override = _per_route(levels, a)
            forwards = route.route is not None
            if state == "default_off" and forwards and not _is_health(route):
                off_by_default.append(rname)
            elif state == "disabled" and forwards and not _is_health(route):
                disabled.setdefault(where, []).append(rname)
            if override is not None:
                self.service(override, f"{where}.check_settings.grpc_service")
            if state == "on" and forwards:
                check_timeout = a.timeout
                if override is not None and override.timeout is not None:
                    check_timeout = override.timeout
                rt = route.route.timeout
                route_timeout = DEFAULT_ROUTE_TIMEOUT if rt is None else rt
                if route_timeout > timedelta(0) and check_timeout > route_timeout:
                    longer.append((f"{rname} ({_seconds(route_timeout)})", check_timeout))
        if off_by_default:
            self.add("ext_authz.disabled_by_default", f"{a.path}.disabled",
                     f"{label}: unchecked in virtual host {vhost.name!r}: "
                     + _few(off_by_default))
        for where, names in disabled.items():
            self.add("route.ext_authz_disabled", where,
                     f"{label}: ext_authz is disabled for {_few(names)}")
        if longer:
            timeout = longer[0][1]
            self.add("ext_authz.timeout_exceeds_route",
                     f"{a.path}.typed_config.grpc_service.timeout",
                     f"{label}: the check may take {_seconds(timeout)}, longer than "
                     f"virtual host {vhost.name!r} route {_few([n for n, _ in longer])}")

    # --- clusters

    def clusters(self) -> None:
        static = self.bootstrap.static_resources
        by_name = {c.name: (i, c) for i, c in enumerate(static.clusters)} if static else {}
        dynamic = self.bootstrap.dynamic_resources
        has_cds = dynamic is not None and (
            dynamic.cds_config is not None or bool(dynamic.cds_resources_locator)
        )
        for name, referrers in sorted(self.authz_clusters.items()):
            ref = referrers[0][0]
            grpc = any(is_grpc for _, is_grpc in referrers)
            if name not in by_name:
                if has_cds:
                    self.add("config.not_analysed", ref,
                             f"authz cluster {name!r} comes from CDS")
                else:
                    self.add("authz_cluster.missing", ref,
                             f"cluster {name!r} is not defined and there is no CDS")
                continue
            index, cluster = by_name[name]
            self.cluster(cluster, f"$.static_resources.clusters[{index}]", grpc=grpc)

    def cluster(self, c: Any, path: str, *, grpc: bool) -> None:
        label = f"authz cluster {c.name!r}"
        # transport_socket_matches may pick TLS per endpoint: not second-guessed here.
        tls = bool(c.transport_socket_matches) or (
            c.transport_socket is not None
            and type_of(c.transport_socket.typed_config) == UPSTREAM_TLS
        )
        if grpc and not _speaks_h2(c, tls):
            self.add("authz_cluster.not_http2", f"{path}.typed_extension_protocol_options",
                     f"{label} has no HTTP/2 protocol options")
        if not c.health_checks:
            self.add("authz_cluster.no_health_check", f"{path}.health_checks",
                     f"{label} has no health_checks")
        if not tls:
            remote = [a for a in _endpoint_hosts(c) if not _is_loopback(a)]
            if remote:
                self.add("authz_cluster.plaintext", f"{path}.transport_socket",
                         f"{label} reaches {', '.join(sorted(set(remote)))} without TLS")
            elif c.load_assignment is None:
                self.add("config.not_analysed", f"{path}.load_assignment",
                         f"{label}: endpoints come from EDS or another discovery")

    # --- policy

    def policy_hosts(self) -> None:
        assert self.policy is not None
        for host in self.policy.hosts:
            if not any(domain_matches(d, host) for d, _ in self.domains):
                self.add("policy.host_not_served", "$.static_resources.listeners",
                         f"policy host {host!r} matches no virtual host domain")
        for domain, path in self.domains:
            if not any(domain_matches(domain, h) for h in self.policy.hosts):
                self.add("vhost.domain_without_policy", path,
                         f"domain {domain!r} matches no policy host")


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _route_label(route: Any, vhost: Any) -> str:
    m = route.match
    for kind in ("path", "prefix", "path_separated_prefix"):
        value = getattr(m, kind, None) if m is not None else None
        if value is not None:
            return f"{kind} {value}" + (f" ({route.name})" if route.name else "")
    if m is not None and m.safe_regex is not None:
        return f"regex {m.safe_regex.regex}"
    return route.name or f"a route of {vhost.name!r}"


def _is_health(route: Any) -> bool:
    m = route.match
    if m is None or m.headers or m.query_parameters:
        return False
    for kind in ("path", "path_separated_prefix", "prefix"):
        value = getattr(m, kind, None)
        if value is not None:
            return str(value).rstrip("/") in HEALTH_PATHS if value != "/" else False
    return False


def _per_route(
    levels: Sequence[tuple[Any, str]], a: _AuthzFilter
) -> tuple[str, str, Any]:
    """The effective state of filter `a` on a route: ('on' | 'disabled' | 'default_off', the
    path of the deciding field, a per-route grpc_service override or None). The most specific
    typed_per_filter_config (route, then virtual host, then route configuration) wins."""
    for obj, path in levels:
        entry = obj.typed_per_filter_config.get(a.name) if obj.typed_per_filter_config else None
        if entry is None:
            continue
        epath = f'{path}.typed_per_filter_config["{a.name}"]'
        kind = type_of(entry)
        msg = unpack(entry)
        if kind == FILTER_CONFIG and msg is not None:
            if msg.disabled:
                return "disabled", f"{epath}.disabled", None
            kind, msg, epath = type_of(msg.config), unpack(msg.config), f"{epath}.config"
        if kind == EXT_AUTHZ_PER_ROUTE and msg is not None:
            if msg.disabled:
                return "disabled", f"{epath}.disabled", None
            settings = msg.check_settings
            override = settings.grpc_service if settings is not None else None
            return "on", epath, override
        return "on", epath, None
    # No per-route config: the filter's own default.
    return ("default_off" if a.disabled else "on"), a.path, None


def _validation_problem(common: Any) -> tuple[str, str] | None:
    if common is None:
        return "", "no common_tls_context, so no client certificate validation"
    vc = common.validation_context
    path = ".validation_context"
    if vc is None and common.combined_validation_context is not None:
        vc = common.combined_validation_context.default_validation_context
        path = ".combined_validation_context.default_validation_context"
        if vc is None:
            return None  # SDS-provided validation context: cannot see it, assume configured
    if vc is None:
        if (
            common.validation_context_sds_secret_config is not None
            or common.validation_context_certificate_provider is not None
            or common.validation_context_certificate_provider_instance is not None
        ):
            return None
        return path, "no validation_context: client certificates are not checked against a CA"
    if vc.trust_chain_verification.name == "ACCEPT_UNTRUSTED":
        return f"{path}.trust_chain_verification", "trust_chain_verification is ACCEPT_UNTRUSTED"
    if (
        vc.trusted_ca is None
        and vc.custom_validator_config is None
        and vc.ca_certificate_provider_instance is None
        and common.combined_validation_context is None
    ):
        return f"{path}.trusted_ca", "the validation_context has no trusted_ca"
    return None


def _speaks_h2(c: Any, tls: bool) -> bool:
    if c.http2_protocol_options is not None:
        return True
    options = c.typed_extension_protocol_options or {}
    any_msg = options.get(HTTP_PROTOCOL_OPTIONS)
    if any_msg is None:
        return False
    opts = unpack(any_msg)
    if opts is None:
        return True  # unknown shape: do not guess
    explicit = opts.explicit_http_config
    if explicit is not None:
        return explicit.http2_protocol_options is not None
    if opts.auto_config is not None:
        return tls  # ALPN picks h2 only over TLS
    return False


def _endpoint_hosts(c: Any) -> Iterator[str]:
    la = c.load_assignment
    if la is None:
        return
    for locality in la.endpoints:
        for lb in locality.lb_endpoints:
            ep = lb.endpoint
            if ep is None or ep.address is None:
                continue
            sa = ep.address.socket_address
            if sa is not None:
                yield str(sa.address)
            # pipe and envoy_internal_address never leave the host


# ---------------------------------------------------------------------------------------------
# Entry points


def diagnose(raw: Mapping[str, Any], policy: PolicyFacts | None = None) -> list[Finding]:
    """All findings for a parsed Envoy bootstrap, sorted (most severe first, then by path)."""
    return _Doctor(parse_bootstrap(raw), policy).run()


def at_or_above(findings: Iterable[Finding], threshold: Severity) -> list[Finding]:
    return [f for f in findings if f.severity >= threshold]


def render_json(
    findings: Sequence[Finding], *, config: str, policy: str | None, fail_on: Severity
) -> str:
    counts = {s.label: sum(1 for f in findings if f.severity is s) for s in Severity}
    doc = {
        "config": config,
        "policy": policy,
        "fail_on": fail_on.label,
        "summary": counts,
        "findings": [f.as_dict() for f in findings],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def render_text(
    findings: Sequence[Finding], *, config: str, policy: str | None, fail_on: Severity
) -> str:
    lines = [f"extauthz doctor: {config}" + (f" (policy: {policy})" if policy else "")]
    if not findings:
        lines.append("no findings")
        return "\n".join(lines) + "\n"
    for f in findings:
        c = f.check
        lines += [
            "",
            f"{c.severity.label.upper():<8}{f.id}: {c.title}",
            f"  at:   {f.path}",
            f"  what: {f.detail}",
            f"  why:  {c.why}",
            f"  fix:  {c.fix}",
        ]
    counts = [
        f"{n} {s.label}{'s' if n != 1 else ''}"
        for s in sorted(Severity, reverse=True)
        if (n := sum(1 for f in findings if f.severity is s))
    ]
    failing = len(at_or_above(findings, fail_on))
    lines += ["", f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: "
              f"{', '.join(counts)}; {failing} at or above {fail_on.label}"]
    return "\n".join(lines) + "\n"
