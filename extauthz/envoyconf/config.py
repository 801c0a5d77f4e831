"""Envoy configuration for extauthz, built with the typed classes of `envoy-data-plane`.

The one source of every Envoy setting extauthz depends on: the ext_authz HTTP filter, the
authz cluster, per-route settings, the network (TCP) ext_authz filter, and the complete sidecar
bootstraps that wrap them. Every piece is a typed Envoy v3 message (field names, enums, value
ranges checked when it is built); `to_plain` turns one into a YAML/JSON-ready dict.
`extauthz.envoyconf.bootstrap` (which writes `envoy/sidecar.yaml`) and `extauthz envoy-config` are
both thin wrappers around this module, so the shipped file and the generated variants can never
disagree on a safety setting. This module is for operators and tests; nothing on the request
path imports it.

The safety settings (explained one by one in `envoy/README.md`):

* mTLS listener that *requires* a client certificate chaining to the trust bundle;
* ext_authz fails closed (`failure_mode_allow: false`, 503 on error, 250 ms timeout), gets the
  peer certificate, and never the request body (unless an operator asks for it);
* caller-supplied `x-extauthz-principal` / `x-extauthz-rule` headers (and the principal header
  extauthz was renamed to use, `principal_header`) are removed before ext_authz runs, so the
  only values the upstream can see are the ones extauthz set;
* the authz call never crosses the network in plaintext: a TCP address for extauthz must be
  loopback unless Envoy speaks mTLS to it (`extauthz_tls`);
* paths are normalized (RFC 3986, merged slashes) before authorization and escaped slashes are
  rejected, so the policy and the upstream see one and the same path;
* the XFCC header is sanitized and set from the verified certificate's URI SAN only;
* the admin interface listens on loopback only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import betterproto2
import yaml

from extauthz import headers as names

# envoy-data-plane's generated classes trip pydantic deprecation warnings at import time;
# they are the library's business, not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterDiscoveryType,
    )
    from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
        HeaderMutation as HeaderMutationRule,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        ApiConfigSource,
        ApiConfigSourceApiType,
        ApiVersion,
        ConfigSource,
        DataSource,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HealthCheck,
        HealthCheckGrpcHealthCheck,
        HealthCheckTcpHealthCheck,
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        HttpProtocolOptions,
        HttpProtocolOptionsHeadersWithUnderscoresAction,
        HttpUri,
        Node,
        Pipe,
        SocketAddress,
        SubstitutionFormatString,
        TransportSocket,
        TypedExtensionConfig,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
    from envoy_data_plane.envoy.config.route.v3 import (
        Route,
        RouteAction,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
    from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
        AuthorizationResponse,
        BufferSettings,
        CheckSettings,
        ExtAuthz,
        ExtAuthzPerRoute,
        HttpService,
    )
    from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
        HeaderMutation,
        Mutations,
    )
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.ext_authz.v3 import (
        ExtAuthz as NetworkExtAuthz,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
        HttpConnectionManagerForwardClientCertDetails,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpConnectionManagerSetCurrentClientCertDetails,
        HttpConnectionManagerTracing,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy
    from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
        DownstreamConnectionsConfig,
    )
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
        CertificateValidationContext,
        CommonTlsContext,
        CommonTlsContextCombinedCertificateValidationContext,
        DownstreamTlsContext,
        SdsSecretConfig,
        SubjectAltNameMatcher,
        SubjectAltNameMatcherSanType,
        TlsCertificate,
        TlsParameters,
        TlsParametersTlsProtocol,
        UpstreamTlsContext,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions as UpstreamHttpProtocolOptions,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, StringMatcher
    from envoy_data_plane.envoy.type.metadata.v3 import (
        MetadataKey,
        MetadataKeyPathSegment,
        MetadataKind,
        MetadataKindRequest,
    )
    from envoy_data_plane.envoy.type.tracing.v3 import CustomTag, CustomTagMetadata
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.google.protobuf import Struct

PRINCIPAL_HEADER = names.PRINCIPAL
RULE_HEADER = names.RULE
# Headers only extauthz may set towards the upstream; a caller's copies are dropped.
TRUSTED_HEADERS = names.TRUSTED
REASON_HEADER = names.REASON
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ_NAMESPACE = "envoy.filters.network.ext_authz"
EXTAUTHZ_CLUSTER = "extauthz"
UPSTREAM_CLUSTER = "local_service"
LISTENER_NAME = "ingress_mtls"
TCP_LISTENER_NAME = "ingress_tcp_mtls"
HTTP_STAT_PREFIX = "ingress_http"
TCP_STAT_PREFIX = "ingress_tcp"
# The key under which every route tells extauthz its name (`context_extensions`).
ROUTE_CONTEXT_KEY = "route"
DEFAULT_ROUTE_NAME = "default"

DEFAULT_CERTS_DIR = "/etc/extauthz/certs"



def is_loopback_host(host: str) -> bool:
    """True for names and addresses that never leave the host. Kept in step with
    `extauthz.tools.doctor` (its `authz_cluster.plaintext` check); a test compares the two."""
    host = host.strip("[]").lower()
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Variant = Literal["sidecar", "filter", "cluster", "per-route", "network"]
VARIANTS: tuple[Variant, ...] = ("sidecar", "filter", "cluster", "per-route", "network")
Transport = Literal["grpc", "http"]
TRANSPORTS: tuple[Transport, ...] = ("grpc", "http")

# The HTTP transport (`extauthz serve --http-listen`, extauthz/transport/http.py). Envoy sends
# only the headers `allowed_headers` lets through: the caller's identity (the XFCC this sidecar
# sets), a JWT, the trace context, and the method-override headers extauthz must see to deny
# them. Headers a policy's `headers:`/`when:` read are added with `authz_headers`.
XFCC_HEADER = "x-forwarded-client-cert"
HTTP_AUTHZ_HEADERS = (
    XFCC_HEADER,
    "authorization",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-request-id",
)
# Answer headers: to the client on a denial, to the upstream on an allow, and the ones Envoy
# turns into dynamic metadata (named like the gRPC CheckResponse's metadata keys, so the access
# log and the span tags read the same keys for either transport).
HTTP_CLIENT_HEADERS = (REASON_HEADER, "www-authenticate", "retry-after", "ratelimit-limit",
                       "ratelimit-remaining", "ratelimit-reset")
HTTP_BUDGET_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
HTTP_METADATA_HEADERS = ("principal", "identity_source", "rule", "decision", "reason",
                         "policy_version")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything that varies between deployments of the sidecar.

    `extauthz` is `HOST:PORT` (TCP; a DNS name is resolved with STRICT_DNS) or
    `unix:/path/to.sock`. `access_log_path` None means stdout. Port 0 (listener, admin) lets the
    kernel pick; read the bound ports back from the admin interface (`/listeners`,
    `--admin-address-path`).

    `health_paths` are exact paths (GET/HEAD probes of load balancers that cannot present a
    workload certificate) that bypass ext_authz: each one is a deliberate hole, none by default.
    `extauthz_tls` makes Envoy speak mTLS to extauthz with its own certificate (for an extauthz
    listener with `--tls-*`), checking extauthz's SPIFFE ID when `extauthz_spiffe_id` is set. A
    TCP `extauthz` that is not loopback is refused without it: the check requests (identities,
    paths, certificates) and the allow/deny answers would cross the network in plaintext.

    `principal_header` is the header extauthz sets to the verified principal (its own
    `--principal-header`); the strip filter removes a caller's copy of it, besides
    `x-extauthz-principal` and `x-extauthz-rule`. "" (extauthz sets no principal header) strips
    just those two.
    """

    listen_address: str = "0.0.0.0"
    listen_port: int = 10000
    server_cert: str = f"{DEFAULT_CERTS_DIR}/server.crt"
    server_key: str = f"{DEFAULT_CERTS_DIR}/server.key"
    trust_bundle: str = f"{DEFAULT_CERTS_DIR}/ca.crt"
    upstream_address: str = "127.0.0.1"
    upstream_port: int = 8080
    extauthz: str = "127.0.0.1:9191"
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    access_log_path: str | None = None
    authz_timeout_s: float = 0.25
    upstream_timeout_s: float = 15.0
    health_check_interval_s: float = 5.0
    max_downstream_connections: int = 10_000
    failure_mode_allow: bool = False
    request_body_max_bytes: int = 0  # 0: never send the body (the default and the advice)
    health_paths: tuple[str, ...] = ()
    metadata_namespaces: tuple[str, ...] = ()
    route_name: str = DEFAULT_ROUTE_NAME
    extauthz_tls: bool = False
    extauthz_spiffe_id: str = ""
    # Circuit breaker of the authz cluster: concurrent checks / queued checks beyond these
    # fail (closed: 503) at once instead of piling up behind a slow authorizer.
    authz_max_requests: int = 4096
    authz_max_pending: int = 1024
    authz_max_connections: int = 64
    # SPIRE (or any SDS server) on a unix socket: certificate and trust bundle come from it by
    # name instead of from files, rotated without a restart. "" = files.
    sds_socket: str = ""
    sds_svid_name: str = "default"  # SPIRE agent: "default" or the workload's SPIFFE ID
    sds_bundle_name: str = "ROOTCA"  # SPIRE agent: "ROOTCA" or the trust domain's spiffe://td
    principal_header: str = PRINCIPAL_HEADER
    # How Envoy asks extauthz: "grpc" (the Authorization service, `extauthz serve --listen`)
    # or "http" (the HTTP authorization-service protocol, `extauthz serve --http-listen`).
    transport: Transport = "grpc"
    # HTTP transport: headers the policies read, sent to extauthz besides HTTP_AUTHZ_HEADERS.
    authz_headers: tuple[str, ...] = ()
    # gRPC transport: streams per HTTP/2 connection to extauthz. Envoy sends all checks of a
    # worker thread over one connection; a low limit makes it open more connections under load,
    # so `extauthz serve --workers N` (SO_REUSEPORT) gets a share of them. 0 = Envoy's default.
    authz_max_concurrent_streams: int = 0

    def __post_init__(self) -> None:  # noqa: C901 - its owner (issue 15 splits it); see docs/architecture.md
        for port in (self.listen_port, self.upstream_port, self.admin_port):
            if not 0 <= port <= 65535:
                raise ValueError(f"port out of range: {port}")
        _extauthz_address(self.extauthz)  # validates
        if self.authz_timeout_s <= 0:
            raise ValueError("authz_timeout_s must be positive")
        if self.request_body_max_bytes < 0:
            raise ValueError("request_body_max_bytes must not be negative")
        for path in self.health_paths:
            if not path.startswith("/") or any(c in path for c in "?#%\\ ") or "//" in path:
                raise ValueError(f"health path must be a plain absolute path: {path!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.route_name):
            raise ValueError(
                f"route name must be letters, digits, '.', '_' or '-': {self.route_name!r}"
            )
        if self.sds_socket and not self.sds_socket.startswith("unix:/"):
            raise ValueError(f"sds_socket must be unix:/absolute/path: {self.sds_socket!r}")
        if self.extauthz_spiffe_id and not self.extauthz_spiffe_id.startswith("spiffe://"):
            raise ValueError(f"extauthz_spiffe_id must be a SPIFFE ID: {self.extauthz_spiffe_id!r}")
        if self.extauthz_spiffe_id and not self.extauthz_tls:
            raise ValueError(
                "an extauthz SPIFFE ID is only checked over mTLS: add --extauthz-tls "
                "(extauthz_tls=True)"
            )
        _check_authz_channel(self.extauthz, tls=self.extauthz_tls)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be grpc or http, not {self.transport!r}")
        if self.transport == "http":
            if self.request_body_max_bytes:
                raise ValueError(
                    "the HTTP transport takes no request body (extauthz refuses a check with "
                    "one): drop --with-request-body or use --transport grpc"
                )
            if self.metadata_namespaces:
                raise ValueError(
                    "metadata_context_namespaces reach extauthz only over gRPC: drop "
                    "--metadata-namespace or use --transport grpc"
                )
        for name in self.authz_headers:
            if not names.is_header_name(name):
                raise ValueError(f"authz header must be a lowercase header name: {name!r}")
        if self.authz_max_concurrent_streams < 0:
            raise ValueError("authz_max_concurrent_streams must not be negative")
        header = self.principal_header.strip().lower()
        object.__setattr__(self, "principal_header", header)
        if header and names.settable_problem(header):
            raise ValueError(
                f"principal header must be a plain header name extauthz alone sets "
                f"(not a pseudo-header or one Envoy or extauthz relies on): {header!r}"
            )

    @property
    def trusted_headers(self) -> tuple[str, ...]:
        """The headers only extauthz may set towards the upstream: a caller's copies are
        removed before ext_authz runs."""
        return tuple(dict.fromkeys(h for h in (self.principal_header, *TRUSTED_HEADERS) if h))


def _check_authz_channel(target: str, *, tls: bool) -> None:
    """Refuse an Envoy -> extauthz channel that would cross the network in plaintext."""
    if target.startswith("unix:"):
        if tls:
            raise ValueError(
                f"--extauthz-tls with a unix socket ({target}): extauthz serves unix sockets in "
                "plaintext (their file mode is the access control); drop --extauthz-tls"
            )
        return
    host = target.rpartition(":")[0]
    if not tls and not is_loopback_host(host):
        raise ValueError(
            f"extauthz at {target} is not on this host, and the authz call would cross the "
            "network in plaintext: anyone on the path could read the checks (identities, "
            "paths, certificates) and forge an OK answer, which Envoy obeys. Run extauthz "
            "beside Envoy (127.0.0.1:PORT or unix:/path), or start it with --tls-cert/--tls-key/"
            "--tls-client-ca/--tls-allowed-clients and render with --extauthz-tls "
            "--extauthz-spiffe-id <extauthz's SPIFFE ID>"
        )


def config_with_certs_dir(certs_dir: str, config: SidecarConfig | None = None) -> SidecarConfig:
    """`config` with server.crt/server.key/ca.crt taken from `certs_dir`."""
    d = certs_dir.rstrip("/")
    return replace(
        config or SidecarConfig(),
        server_cert=f"{d}/server.crt",
        server_key=f"{d}/server.key",
        trust_bundle=f"{d}/ca.crt",
    )


# -- small typed helpers ----------------------------------------------------------------------


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _typed(name: str, message: betterproto2.Message) -> TypedExtensionConfig:
    return TypedExtensionConfig(name=name, typed_config=AnyMessage.pack(message))


def _any(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage.pack(message)


def _socket_address(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def _extauthz_address(target: str) -> Address:
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {target!r}")
        return Address(pipe=Pipe(path=path))
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"extauthz address must be HOST:PORT or unix:/path, not {target!r}")
    return _socket_address(host.strip("[]"), int(port))


def _is_ip_or_pipe(address: Address) -> bool:
    if address.socket_address is None:
        return True
    try:
        ipaddress.ip_address(address.socket_address.address)
    except ValueError:
        return False
    return True


def _cluster(name: str, address: Address, connect_timeout_s: float) -> Cluster:
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC
        if _is_ip_or_pipe(address)
        else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_seconds(connect_timeout_s),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])
            ],
        ),
    )


SDS_CLUSTER = "sds_server"


def _sds(name: str) -> SdsSecretConfig:
    return SdsSecretConfig(
        name=name,
        sds_config=ConfigSource(
            resource_api_version=ApiVersion.V3,
            api_config_source=ApiConfigSource(
                api_type=ApiConfigSourceApiType.GRPC,
                transport_api_version=ApiVersion.V3,
                grpc_services=[
                    GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SDS_CLUSTER))
                ],
            ),
        ),
    )


def _common_tls(c: SidecarConfig, alpn: Iterable[str]) -> CommonTlsContext:
    if c.sds_socket:
        return CommonTlsContext(
            tls_params=TlsParameters(tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2),
            alpn_protocols=list(alpn),
            tls_certificate_sds_secret_configs=[_sds(c.sds_svid_name)],
            validation_context_sds_secret_config=_sds(c.sds_bundle_name),
        )
    return CommonTlsContext(
        tls_params=TlsParameters(tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2),
        alpn_protocols=list(alpn),
        tls_certificates=[
            TlsCertificate(
                certificate_chain=DataSource(filename=c.server_cert),
                private_key=DataSource(filename=c.server_key),
            )
        ],
        validation_context=CertificateValidationContext(
            trusted_ca=DataSource(filename=c.trust_bundle)
        ),
    )


def downstream_tls(c: SidecarConfig, alpn: Iterable[str] = ("h2", "http/1.1")) -> TransportSocket:
    """mTLS on the listener: a client certificate chaining to the trust bundle is required."""
    return TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=_any(
            DownstreamTlsContext(
                require_client_certificate=True, common_tls_context=_common_tls(c, alpn)
            )
        ),
    )


# -- the pieces ---------------------------------------------------------------------------------


def ext_authz_filter(c: SidecarConfig) -> HttpFilter:
    """The ext_authz HTTP filter to the `extauthz` cluster, failing closed: gRPC v3, or
    Envoy's HTTP authorization-service protocol (`c.transport == "http"`)."""
    if c.transport == "http":
        return HttpFilter(name=EXT_AUTHZ_NAMESPACE, typed_config=_any(_http_ext_authz(c)))
    config = ExtAuthz(
        transport_api_version=ApiVersion.V3,
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTHZ_CLUSTER),
            timeout=_seconds(c.authz_timeout_s),
        ),
        failure_mode_allow=c.failure_mode_allow,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        include_peer_certificate=True,
        metadata_context_namespaces=list(c.metadata_namespaces),
    )
    if c.request_body_max_bytes:
        config.with_request_body = BufferSettings(
            max_request_bytes=c.request_body_max_bytes, allow_partial_message=True
        )
    return HttpFilter(name=EXT_AUTHZ_NAMESPACE, typed_config=_any(config))


def _exact(names: Iterable[str]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(exact=n) for n in dict.fromkeys(names)])


def _http_ext_authz(c: SidecarConfig) -> ExtAuthz:
    """The HTTP transport: Envoy sends method, path, Host and the allowed headers (no body);
    200 allows. The caller's identity is the XFCC header this sidecar's connection manager
    sets from the verified peer (SANITIZE_SET, uri): extauthz trusts it because the channel
    is the sidecar's own (loopback, unix socket or mTLS)."""
    upstream = (*c.trusted_headers, *HTTP_BUDGET_HEADERS)
    return ExtAuthz(
        http_service=HttpService(
            server_uri=HttpUri(
                uri=f"http://{EXTAUTHZ_CLUSTER}",
                cluster=EXTAUTHZ_CLUSTER,
                timeout=_seconds(c.authz_timeout_s),
            ),
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=_exact(upstream),
                allowed_client_headers=_exact(HTTP_CLIENT_HEADERS),
                dynamic_metadata_from_headers=_exact(HTTP_METADATA_HEADERS),
            ),
        ),
        allowed_headers=_exact((*HTTP_AUTHZ_HEADERS, *c.authz_headers)),
        failure_mode_allow=c.failure_mode_allow,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )


def strip_principal_filter(c: SidecarConfig | None = None) -> HttpFilter:
    """Runs before ext_authz: whatever the caller sent in extauthz's headers is dropped, so the
    upstream only ever sees the values extauthz itself set on an allowed request (also on
    routes where ext_authz is off, which extauthz never sees)."""
    headers = (c or SidecarConfig()).trusted_headers
    return HttpFilter(
        name="envoy.filters.http.header_mutation",
        typed_config=_any(
            HeaderMutation(
                mutations=Mutations(
                    request_mutations=[HeaderMutationRule(remove=h) for h in headers]
                )
            )
        ),
    )


def router_filter() -> HttpFilter:
    return HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router()))


def http_filters(c: SidecarConfig) -> list[HttpFilter]:
    """The HTTP filter chain, in order: strip trusted headers, ext_authz, router."""
    return [strip_principal_filter(c), ext_authz_filter(c), router_filter()]


def authz_cluster(c: SidecarConfig) -> Cluster:
    """The `extauthz` cluster, circuit-broken and health-checked: HTTP/2 with gRPC health
    checks for the gRPC transport; HTTP/1.1 with TCP health checks for the HTTP transport
    (its connection pool holds one check per connection, so checks spread over the
    connections, and over `extauthz serve --workers N`)."""
    interval = _seconds(c.health_check_interval_s)
    cluster = _cluster(EXTAUTHZ_CLUSTER, _extauthz_address(c.extauthz), 0.25)
    http = c.transport == "http"
    if http:
        explicit = HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        )
    else:
        h2 = Http2ProtocolOptions()
        if c.authz_max_concurrent_streams:
            h2.max_concurrent_streams = c.authz_max_concurrent_streams
        explicit = HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=h2)
    cluster.typed_extension_protocol_options = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            UpstreamHttpProtocolOptions(
                explicit_http_config=explicit,
                # A stuck connection to extauthz is replaced instead of kept forever.
                common_http_protocol_options=HttpProtocolOptions(idle_timeout=_seconds(300)),
            )
        )
    }
    check = HealthCheck(
        timeout=_seconds(1),
        interval=interval,
        no_traffic_interval=interval,
        unhealthy_threshold=2,
        healthy_threshold=1,
    )
    if http:  # extauthz answers no health request on the check port: it could be a check
        check.tcp_health_check = HealthCheckTcpHealthCheck()
    else:
        check.grpc_health_check = HealthCheckGrpcHealthCheck()
    cluster.health_checks = [check]
    cluster.circuit_breakers = CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=c.authz_max_connections,
                max_pending_requests=c.authz_max_pending,
                max_requests=c.authz_max_requests,
                max_retries=3,
                track_remaining=True,
            )
        ]
    )
    if c.extauthz_tls:
        validation = CertificateValidationContext(trusted_ca=DataSource(filename=c.trust_bundle))
        if c.extauthz_spiffe_id:
            validation.match_typed_subject_alt_names = [
                SubjectAltNameMatcher(
                    san_type=SubjectAltNameMatcherSanType.URI,
                    matcher=StringMatcher(exact=c.extauthz_spiffe_id),
                )
            ]
        common = _common_tls(c, ("http/1.1",) if http else ("h2",))
        if c.sds_socket:  # the bundle comes from SDS; the SAN check is added on top of it
            validation.trusted_ca = None
            common.validation_context_sds_secret_config = None
            common.combined_validation_context = (
                CommonTlsContextCombinedCertificateValidationContext(
                    default_validation_context=validation,
                    validation_context_sds_secret_config=_sds(c.sds_bundle_name),
                )
            )
        else:
            common.validation_context = validation
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls",
            typed_config=_any(UpstreamTlsContext(common_tls_context=common)),
        )
    return cluster


def upstream_cluster(c: SidecarConfig) -> Cluster:
    return _cluster(UPSTREAM_CLUSTER, _socket_address(c.upstream_address, c.upstream_port), 1.0)


def per_route(route_name: str) -> ExtAuthzPerRoute:
    """Per-route ext_authz settings: extauthz learns the route's name (`context_extensions`)."""
    return ExtAuthzPerRoute(
        check_settings=CheckSettings(context_extensions={ROUTE_CONTEXT_KEY: route_name})
    )


def per_route_disabled() -> ExtAuthzPerRoute:
    return ExtAuthzPerRoute(disabled=True)


def routes(c: SidecarConfig) -> list[Route]:
    """Health routes first (exact paths, ext_authz off), then everything else (ext_authz on)."""
    action = RouteAction(cluster=UPSTREAM_CLUSTER, timeout=_seconds(c.upstream_timeout_s))
    out = [
        Route(
            name=f"health{path.replace('/', '-')}",
            match=RouteMatch(path=path),
            route=action,
            typed_per_filter_config={EXT_AUTHZ_NAMESPACE: _any(per_route_disabled())},
        )
        for path in c.health_paths
    ]
    main = Route(name=c.route_name, match=RouteMatch(prefix="/"), route=action)
    if c.transport == "grpc":  # context_extensions reach extauthz only over gRPC
        main.typed_per_filter_config = {EXT_AUTHZ_NAMESPACE: _any(per_route(c.route_name))}
    out.append(main)
    return out


def _metadata_key(namespace: str, key: str) -> MetadataKey:
    return MetadataKey(key=namespace, path=[MetadataKeyPathSegment(key=key)])


def access_log_fields(namespace: str = EXT_AUTHZ_NAMESPACE, *, http: bool = True) -> dict[str, str]:
    """The JSON access-log line: who called, what extauthz decided and why."""
    meta = f"%DYNAMIC_METADATA({namespace}:{{}})%"
    if http:
        fields = {
            "time": "%START_TIME%",
            "method": "%REQ(:METHOD)%",
            "authority": "%REQ(:AUTHORITY)%",
            "path": "%REQ(:PATH)%",
            "protocol": "%PROTOCOL%",
            "status": "%RESPONSE_CODE%",
            "flags": "%RESPONSE_FLAGS%",
            "duration_ms": "%DURATION%",
            "peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
            "principal": meta.format("principal"),
            "rule": meta.format("rule"),
            "policy_version": meta.format("policy_version"),
            "authz_reason": f"%RESP({REASON_HEADER})%",
            "route": "%ROUTE_NAME%",
            "request_id": "%REQ(X-REQUEST-ID)%",
            "upstream_host": "%UPSTREAM_HOST%",
        }
    else:
        fields = {
            "time": "%START_TIME%",
            "flags": "%RESPONSE_FLAGS%",
            "duration_ms": "%DURATION%",
            "bytes_received": "%BYTES_RECEIVED%",
            "bytes_sent": "%BYTES_SENT%",
            "downstream": "%DOWNSTREAM_REMOTE_ADDRESS%",
            "peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
            "principal": meta.format("principal"),
            "rule": meta.format("rule"),
            "policy_version": meta.format("policy_version"),
            # A closed connection has no x-extauthz-reason: the reason is in the metadata.
            "authz_reason": meta.format("reason"),
            "upstream_host": "%UPSTREAM_HOST%",
        }
    return fields


def access_log(c: SidecarConfig, *, http: bool = True) -> AccessLog:
    namespace = EXT_AUTHZ_NAMESPACE if http else NETWORK_EXT_AUTHZ_NAMESPACE
    log_format = SubstitutionFormatString(
        json_format=Struct.from_dict(access_log_fields(namespace, http=http))
    )
    if c.access_log_path is None:
        return AccessLog(
            name="envoy.access_loggers.stdout",
            typed_config=_any(StdoutAccessLog(log_format=log_format)),
        )
    return AccessLog(
        name="envoy.access_loggers.file",
        typed_config=_any(FileAccessLog(path=c.access_log_path, log_format=log_format)),
    )


def tracing() -> HttpConnectionManagerTracing:
    """Span tags for the principal, rule and decision extauthz returned as dynamic metadata
    (spans exist only when a tracer is configured in the bootstrap; the tags cost nothing
    otherwise)."""
    tags = [
        CustomTag(
            tag=f"extauthz.{key}",
            metadata=CustomTagMetadata(
                kind=MetadataKind(request=MetadataKindRequest()),
                metadata_key=_metadata_key(EXT_AUTHZ_NAMESPACE, key),
            ),
        )
        for key in ("principal", "rule", "decision", "reason")
    ]
    return HttpConnectionManagerTracing(custom_tags=tags)


def http_connection_manager(c: SidecarConfig) -> HttpConnectionManager:
    return HttpConnectionManager(
        stat_prefix=HTTP_STAT_PREFIX,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        # Callers are outside this sidecar: trust no x-forwarded-for or x-envoy-* from them.
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        common_http_protocol_options=HttpProtocolOptions(
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST
        ),
        forward_client_cert_details=HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET,
        set_current_client_cert_details=HttpConnectionManagerSetCurrentClientCertDetails(uri=True),
        access_log=[access_log(c)],
        tracing=tracing(),
        route_config=RouteConfiguration(
            name="local_route",
            virtual_hosts=[VirtualHost(name="local_service", domains=["*"], routes=routes(c))],
        ),
        http_filters=http_filters(c),
    )


def network_ext_authz_filter(c: SidecarConfig) -> Filter:
    """The network (TCP) ext_authz filter: one check per connection, identity only."""
    return Filter(
        name=NETWORK_EXT_AUTHZ_NAMESPACE,
        typed_config=_any(
            NetworkExtAuthz(
                stat_prefix="tcp_authz",
                transport_api_version=ApiVersion.V3,
                grpc_service=GrpcService(
                    envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTHZ_CLUSTER),
                    timeout=_seconds(c.authz_timeout_s),
                ),
                failure_mode_allow=c.failure_mode_allow,
                include_peer_certificate=True,
                # The SNI the client asked for reaches extauthz (tls_session.sni).
                include_tls_session=True,
            )
        ),
    )


def tcp_proxy_filter(c: SidecarConfig) -> Filter:
    return Filter(
        name="envoy.filters.network.tcp_proxy",
        typed_config=_any(
            TcpProxy(
                stat_prefix=TCP_STAT_PREFIX,
                cluster=UPSTREAM_CLUSTER,
                idle_timeout=_seconds(3600),
                access_log=[access_log(c, http=False)],
            )
        ),
    )


def _overload(c: SidecarConfig) -> OverloadManager:
    return OverloadManager(
        resource_monitors=[
            ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=_any(
                    DownstreamConnectionsConfig(
                        max_active_downstream_connections=c.max_downstream_connections
                    )
                ),
            )
        ]
    )


def sds_cluster(c: SidecarConfig) -> Cluster:
    """The SDS server (e.g. the SPIRE agent's Workload API socket), gRPC over HTTP/2."""
    cluster = _cluster(SDS_CLUSTER, _extauthz_address(c.sds_socket), 1.0)
    cluster.typed_extension_protocol_options = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            UpstreamHttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions()
                )
            )
        )
    }
    return cluster


def _bootstrap(c: SidecarConfig, listener: Listener, node: str) -> Bootstrap:
    clusters = [authz_cluster(c), upstream_cluster(c)]
    if c.sds_socket:
        clusters.append(sds_cluster(c))
    return Bootstrap(
        node=Node(id=node, cluster=node),
        admin=Admin(address=_socket_address(c.admin_address, c.admin_port)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
        overload_manager=_overload(c),
    )


def sidecar_bootstrap(c: SidecarConfig | None = None) -> Bootstrap:
    """mTLS HTTP listener -> ext_authz -> local service: the complete sidecar bootstrap."""
    c = c or SidecarConfig()
    listener = Listener(
        name=LISTENER_NAME,
        address=_socket_address(c.listen_address, c.listen_port),
        filter_chains=[
            FilterChain(
                transport_socket=downstream_tls(c),
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(http_connection_manager(c)),
                    )
                ],
            )
        ],
    )
    return _bootstrap(c, listener, "extauthz-sidecar")


def network_bootstrap(c: SidecarConfig | None = None) -> Bootstrap:
    """mTLS TCP listener -> network ext_authz -> tcp_proxy to the local service."""
    c = c or SidecarConfig()
    listener = Listener(
        name=TCP_LISTENER_NAME,
        address=_socket_address(c.listen_address, c.listen_port),
        filter_chains=[
            FilterChain(
                transport_socket=downstream_tls(c, alpn=()),
                filters=[network_ext_authz_filter(c), tcp_proxy_filter(c)],
            )
        ],
    )
    return _bootstrap(c, listener, "extauthz-tcp-sidecar")


# -- plain data and YAML ------------------------------------------------------------------------

_FRACTIONAL_DURATION = re.compile(r"^(\d+)\.(\d+?)0*s$")
# Fields Envoy's JSON form would omit as default values but that a reader must see.
_EXPLICIT: Mapping[str, Mapping[str, object]] = {
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz": {
        "failure_mode_allow": False
    },
    "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz": {
        "failure_mode_allow": False
    },
}


def _tidy(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _tidy(v) for k, v in value.items()}
        explicit = _EXPLICIT.get(str(out.get("@type", "")))
        if explicit:
            for key, default in explicit.items():
                out.setdefault(key, default)
        status = out.get("status_on_error")
        if isinstance(status, dict) and isinstance(status.get("code"), str):
            # HTTP statuses read best as numbers: 503, not "ServiceUnavailable".
            out["status_on_error"] = {"code": StatusCode[status["code"]].value}
        return out
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    if isinstance(value, str):
        match = _FRACTIONAL_DURATION.match(value)
        if match:  # "0.250s" -> "0.25s"
            return f"{match.group(1)}.{match.group(2)}s"
    return value


def to_plain(message: betterproto2.Message) -> dict[str, Any]:
    """The message as Envoy's proto3 JSON mapping, snake_case, ready for YAML or JSON."""
    plain: dict[str, Any] = _tidy(message.to_dict(casing=betterproto2.Casing.SNAKE))
    return plain


def dump_yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


@dataclass(frozen=True, slots=True)
class Rendered:
    """One rendered variant: what it is for, and the YAML body."""

    variant: Variant
    data: Any
    comment: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def yaml(self) -> str:
        head = "".join(f"# {line}\n".replace("# \n", "#\n") for line in self.comment.splitlines())
        return head + dump_yaml(self.data)


_COMMENTS: Mapping[Variant, str] = {
    "sidecar": "Sidecar Envoy bootstrap: mTLS ingress -> ext_authz (gRPC v3) -> local service.\n"
    "Generated by `extauthz envoy-config --variant sidecar`; check it with\n"
    "`envoy --mode validate -c FILE`.",
    "filter": "HTTP filters for an existing HttpConnectionManager, in this order (the router\n"
    "must stay last). The header_mutation filter has to run before ext_authz.",
    "cluster": "The `extauthz` cluster for static_resources.clusters (HTTP/2, gRPC health\n"
    "checks, circuit breakers).",
    "per-route": "Routes for a virtual host: health paths bypass ext_authz; every other route\n"
    "tells extauthz its name in context_extensions.route.",
    "network": "TCP sidecar bootstrap: mTLS listener -> network ext_authz (one check per\n"
    "connection) -> tcp_proxy to the local service. Policy: `connections:` rules.",
}


_HTTP_COMMENTS: Mapping[Variant, str] = {
    "sidecar": "Sidecar Envoy bootstrap: mTLS ingress -> ext_authz (HTTP, http_service) -> local\n"
    "service. extauthz serves it with `extauthz serve --http-listen ADDR`; the caller's identity\n"
    "is the x-forwarded-client-cert this listener sets (SANITIZE_SET, uri). Generated by\n"
    "`extauthz envoy-config --transport http`; check it with `envoy --mode validate -c FILE`.",
    "filter": "HTTP filters for an existing HttpConnectionManager, in this order (the router\n"
    "must stay last). The header_mutation filter has to run before ext_authz. The connection\n"
    "manager MUST set forward_client_cert_details: SANITIZE_SET and\n"
    "set_current_client_cert_details: {uri: true}: extauthz reads the caller from that header.",
    "cluster": "The `extauthz` cluster for static_resources.clusters (HTTP/1.1, TCP health\n"
    "checks, circuit breakers).",
    "per-route": "Routes for a virtual host: health paths bypass ext_authz. (Route names reach\n"
    "extauthz only over gRPC, as context_extensions.)",
}


def render_variant(variant: Variant, c: SidecarConfig | None = None) -> Rendered:
    c = c or SidecarConfig()
    if c.transport == "http" and variant == "network":
        raise ValueError(
            "the network (TCP) ext_authz filter speaks gRPC only: render it with "
            "--transport grpc (and serve it with extauthz serve --listen)"
        )
    comments = _HTTP_COMMENTS if c.transport == "http" else _COMMENTS
    data: Any
    if variant == "sidecar":
        data = to_plain(sidecar_bootstrap(c))
    elif variant == "filter":
        data = {"http_filters": [to_plain(f) for f in http_filters(c)]}
    elif variant == "cluster":
        data = {"clusters": [to_plain(authz_cluster(c))]}
    elif variant == "per-route":
        data = {"routes": [to_plain(r) for r in routes(c)]}
    elif variant == "network":
        data = to_plain(network_bootstrap(c))
    else:
        raise ValueError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    return Rendered(variant, data, comments[variant])


__all__ = [
    "DEFAULT_CERTS_DIR",
    "EXTAUTHZ_CLUSTER",
    "EXT_AUTHZ_NAMESPACE",
    "LISTENER_NAME",
    "NETWORK_EXT_AUTHZ_NAMESPACE",
    "PRINCIPAL_HEADER",
    "TCP_LISTENER_NAME",
    "TRANSPORTS",
    "VARIANTS",
    "Rendered",
    "SidecarConfig",
    "Transport",
    "Variant",
    "authz_cluster",
    "config_with_certs_dir",
    "ext_authz_filter",
    "http_filters",
    "is_loopback_host",
    "network_bootstrap",
    "network_ext_authz_filter",
    "render_variant",
    "routes",
    "sidecar_bootstrap",
    "to_plain",
]
