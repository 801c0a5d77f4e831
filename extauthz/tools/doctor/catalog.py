"""The catalog of `extauthz doctor` checks: the single source of ids, severities, reasons
and fixes (docs/doctor.md mirrors it, and a test keeps the two in step). Analysis code refers
to checks by id only, so wording changes never touch it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extauthz.tools.findings import Severity


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
        "route.ext_authz_disabled", _E, "a route skips ext_authz for more than a health path",
        "ExtAuthzPerRoute {disabled: true} (or a FilterConfig {disabled: true} for the "
        "ext_authz filter) serves every request the route matches without any authorization, "
        "and a route matches more than it reads: `prefix: /health` is a plain string prefix, so "
        "it also matches /healthcare/patients/42 and /health-admin/drop-db; a regex matches "
        "every path it fully matches; case_sensitive: false adds every spelling; without "
        "normalize_path `/health/../admin` is routed here and resolved to /admin upstream. On a "
        "virtual host it covers every route that does not override it, including routes added "
        "later. The finding lists the request paths the route opens and, with --policy, the "
        "rules it shadows. Only an exact-path health route (`path: /healthz`) is quiet.",
        "Exempt only exact health paths (`path: /healthz`, or path_separated_prefix when the "
        "health endpoint has sub-paths). To open a route to every workload, allow '*' in the "
        "extauthz policy instead, which still requires a verified identity and is logged.",
    ),
    Check(
        "hcm.unprotected_upstream", _E, "a listener without ext_authz reaches a protected upstream",
        "An HTTP connection manager without the ext_authz filter routes to a cluster that "
        "another listener only reaches through ext_authz. Any caller who can connect to the "
        "unprotected listener reaches the same service with no check at all, whatever the "
        "policy says.",
        "Add the ext_authz filter to that HTTP connection manager (see envoy/sidecar.yaml), or "
        "route it to a different cluster; bind listeners that must stay open to loopback.",
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
        "Extension types unknown to envoy-data-plane, routes selected by matcher trees, "
        "transport sockets other than TLS and rejected xDS updates are not judged: their "
        "settings were not checked.",
        "Review those parts by hand; the finding names each one.",
    ),
    Check(
        "config.xds_not_seen", _W, "configuration delivered by xDS is not in the input",
        "Listeners (LDS), clusters (CDS), routes (RDS, scoped RDS) or filter configs (ECDS) "
        "come from a management server (Istio, Envoy Gateway, a control plane of your own) and "
        "are not in this file, so whatever they say about ext_authz was not checked. A bootstrap "
        "that only points at ADS is the usual case in a mesh.",
        "Check what the proxy really runs: `extauthz doctor --admin http://127.0.0.1:15000` "
        "(the Envoy admin port; `kubectl port-forward POD 15000` first in Kubernetes) or "
        "`istioctl proxy-config all POD -o json > dump.json && extauthz doctor dump.json`, or "
        "save `curl -s 127.0.0.1:PORT/config_dump?include_eds` and pass that file.",
    ),
    Check(
        "config.unknown_field", _W, "a field the doctor does not know",
        "The field is not part of Envoy's API as envoy-data-plane describes it. Envoy refuses "
        "unknown fields, so either this config does not load (a typo: `envoy --mode validate` "
        "says so) or it uses a field newer than the doctor's copy of the API, which was skipped "
        "and not checked.",
        "Fix the spelling, or upgrade envoy-data-plane (pip install -U 'extauthz[envoy]') and "
        "review the field by hand meanwhile.",
    ),
    # --- transports: gRPC or HTTP authorization service
    Check(
        "ext_authz.protocol_mismatch", _E, "the authz service speaks the other protocol",
        "The ext_authz filter talks to its cluster with one protocol (grpc_service: gRPC; "
        "http_service: Envoy's HTTP authorization protocol) but the cluster is the other kind of "
        "server: it is health-checked with the other protocol, or another ext_authz filter "
        "reaches the same cluster with the other protocol. extauthz serves gRPC on --listen and "
        "HTTP on --http-listen, on different ports. Every check fails, so every request gets "
        "status_on_error (or is let through with failure_mode_allow).",
        "Point grpc_service at extauthz's --listen port and http_service at its --http-listen "
        "port, each through its own cluster (gRPC needs HTTP/2; HTTP works over HTTP/1.1).",
    ),
    Check(
        "ext_authz.http_service_xfcc", _E, "HTTP authz without a trustworthy caller identity",
        "Over http_service Envoy sends neither the peer certificate nor source.principal; "
        "extauthz's HTTP transport takes the caller's identity from x-forwarded-client-cert, "
        "which must be set by this Envoy from the verified mTLS peer. With FORWARD_ONLY, "
        "APPEND_FORWARD or ALWAYS_FORWARD_ONLY the caller writes (part of) that header and "
        "chooses whom extauthz authorizes: a bypass. With SANITIZE, without uri: true, or when "
        "allowed_headers does not pass x-forwarded-client-cert, extauthz gets no identity and "
        "denies every request (401).",
        "Set forward_client_cert_details: SANITIZE_SET and set_current_client_cert_details: "
        "{uri: true} on the HTTP connection manager, and list x-forwarded-client-cert in the "
        "filter's allowed_headers (`extauthz envoy-config --transport http` renders this).",
    ),
    Check(
        "ext_authz.grpc_only_setting", _W, "a gRPC-only setting on an HTTP authz filter",
        "include_peer_certificate, include_tls_session, metadata_context_namespaces, "
        "pack_as_bytes and per-route context_extensions only reach a grpc_service. On an "
        "http_service filter they do nothing, so whoever set them believes extauthz sees "
        "something (the certificate, the route name) that it never receives.",
        "Remove them, or switch the filter to grpc_service. Over HTTP, identity comes from "
        "x-forwarded-client-cert and the route from the path.",
    ),
    Check(
        "hcm.extauthz_headers_not_stripped", _W, "caller-supplied x-extauthz-* headers reach the "
        "upstream",
        "extauthz tells the upstream who called with x-extauthz-principal (and the rule with "
        "x-extauthz-rule). Envoy forwards a copy the caller sent unless a filter before "
        "ext_authz removes it: on every route that skips ext_authz (health checks, exemptions), "
        "and for x-extauthz-rule whenever extauthz runs without --rule-header, the upstream "
        "reads an identity the caller chose.",
        "Put a header_mutation filter before ext_authz with request_mutations "
        "`remove: x-extauthz-principal` and `remove: x-extauthz-rule` (and any "
        "--principal-header name), as envoy/sidecar.yaml does.",
    ),
    Check(
        "ext_authz.request_body_buffered", _W, "request bodies buffered for a server that never "
        "reads them",
        "with_request_body makes Envoy hold every request body (up to max_request_bytes) in "
        "memory before the check and send it to extauthz, which decides on identity, host, "
        "method, path and headers and never reads a body. It costs memory per request and "
        "latency, and larger bodies get 413 (or are truncated with allow_partial_message).",
        "Remove with_request_body (or disable_request_body_buffering per route).",
    ),
    Check(
        "admin.not_loopback", _E, "the Envoy admin interface listens beyond loopback",
        "The admin interface has no authentication. Anyone who reaches it can read the whole "
        "config (/config_dump), change runtime values (/runtime_modify, e.g. turn ext_authz "
        "filter_enabled to 0%), drain listeners or shut Envoy down (/quitquitquit).",
        "Bind admin to 127.0.0.1 (or a unix socket, `pipe`), and use `kubectl port-forward` or "
        "an SSH tunnel to reach it.",
    ),
)

CHECKS: Mapping[str, Check] = {c.id: c for c in _CATALOG}
