"""The three Envoy bootstraps of the "through Envoy" benchmark: a two-sidecar mTLS mesh.

    wrk ─HTTP/1.1─▶ client sidecar ═mTLS, HTTP/2, SVID═▶ server sidecar ─▶ upstream
                    (egress, plain)                      (ext_authz,      (direct_response)
                                                          RBAC or none)
                                                               │ gRPC
                                                               ▼
                                                        extauthz | floor

* The **server sidecar** is extauthz's own bootstrap (`extauthz.envoyconf.bootstrap.render`):
  mTLS listener requiring a client certificate, header sanitizing, ext_authz failing closed
  with the peer certificate included. Variants swap only the ext_authz filter: removed
  (`none`), replaced by native RBAC (`rbac`, see envoy_rbac.py), or pointed at the floor.
* The **client sidecar** is what a caller's pod runs: a plain-HTTP egress listener for wrk
  that originates mTLS to the server sidecar with the caller's X.509-SVID (so the principal
  extauthz sees is a real, handshake-verified URI SAN), and rewrites the host to the service's.
* The **upstream** is a third Envoy answering `200 ok` by `direct_response`: a fast, constant
  service, so the application is never what limits the numbers.

Every Envoy runs with `--concurrency 1` (one worker, like a sidecar with a CPU limit of 1).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from extauthz.envoyconf.bootstrap import SidecarConfig, render

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    },
}
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
VARIANTS = ("none", "rbac", "floor", "extauthz")


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _static_cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(port)}}]}],
        },
        **extra,
    }


def _hcm(stat_prefix: str, route: dict[str, Any], filters: list[Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": stat_prefix,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                    }
                ],
            },
            "http_filters": [*filters, ROUTER],
        },
    }


def server_sidecar(
    variant: str,
    *,
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    authz_target: str,
    server_cert: str,
    server_key: str,
    trust_bundle: str,
    rbac_filters: list[dict[str, Any]] | None = None,
    transport: str = "grpc",
    max_concurrent_streams: int = 0,
) -> dict[str, Any]:
    """`transport` is how ext_authz asks the authorizer (`extauthz envoy-config --transport`);
    `max_concurrent_streams` limits gRPC streams per connection to it (0: Envoy's default)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    config = SidecarConfig(
        listen_address="127.0.0.1",
        listen_port=listen_port,
        server_cert=server_cert,
        server_key=server_key,
        trust_bundle=trust_bundle,
        upstream_port=upstream_port,
        extauthz=authz_target,
        admin_address="127.0.0.1",
        admin_port=admin_port,
        access_log_path="/dev/null",
        transport=transport,  # type: ignore[arg-type]
        authz_max_concurrent_streams=max_concurrent_streams,
    )
    boot = render(replace(config))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    index = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.ext_authz")
    if variant == "none":
        del filters[index]
    elif variant == "rbac":
        if not rbac_filters:
            raise ValueError("the rbac variant needs rbac_filters")
        filters[index : index + 1] = rbac_filters
    return boot


def client_sidecar(
    *,
    listen_port: int,
    admin_port: int,
    server_port: int,
    host: str,
    svid_cert: str,
    svid_key: str,
    trust_bundle: str,
) -> dict[str, Any]:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": svid_cert},
                        "private_key": {"filename": svid_key},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": trust_bundle},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": host}}
                    ],
                },
            },
        },
    }
    route = {"route": {"cluster": "server_sidecar", "host_rewrite_literal": host, "timeout": "15s"}}
    return {
        "node": {"id": "bench-client-sidecar", "cluster": "bench"},
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "egress",
                    "address": _addr(listen_port),
                    "filter_chains": [{"filters": [_hcm("egress", route, [])]}],
                }
            ],
            "clusters": [
                _static_cluster(
                    "server_sidecar",
                    server_port,
                    transport_socket=tls,
                    typed_extension_protocol_options=HTTP2,
                )
            ],
        },
    }


def upstream(*, listen_port: int, admin_port: int) -> dict[str, Any]:
    route = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    return {
        "node": {"id": "bench-upstream", "cluster": "bench"},
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": _addr(listen_port),
                    "filter_chains": [{"filters": [_hcm("upstream", route, [])]}],
                }
            ]
        },
    }
