"""`extauthz envoy-config`: render the Envoy pieces an operator needs, as YAML.

    extauthz envoy-config                                   # the complete sidecar bootstrap
    extauthz envoy-config --variant filter                  # just the HTTP filters
    extauthz envoy-config --variant network --upstream 127.0.0.1:5432 --listen-port 15432
    extauthz envoy-config --extauthz unix:/run/extauthz/authz.sock --health-path /healthz \
        --certs-dir /run/secrets/svid -o envoy.yaml

Everything is built by `extauthz.envoyconf.config` from typed Envoy v3 messages; validate the
complete bootstraps (sidecar, network) with `envoy --mode validate -c FILE`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from extauthz import headers as names

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")


def _duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 0.25s or 250ms, not {text!r}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


# Mirrors of extauthz.envoyconf.config's defaults: registering the subcommand must not import
# envoy-data-plane (an optional dependency), or every `extauthz` command would need it.
# tests/unit/test_envoy_config.py checks they agree.
VARIANTS = ("sidecar", "filter", "cluster", "per-route", "network")
TRANSPORTS = ("grpc", "http")
DEFAULT_CERTS_DIR = "/etc/extauthz/certs"


@dataclass(frozen=True)
class _Defaults:
    extauthz: str = "127.0.0.1:9191"
    upstream_address: str = "127.0.0.1"
    upstream_port: int = 8080
    listen_address: str = "0.0.0.0"
    listen_port: int = 10000
    admin_port: int = 9901
    authz_timeout_s: float = 0.25
    route_name: str = "default"
    sds_svid_name: str = "default"
    sds_bundle_name: str = "ROOTCA"
    principal_header: str = names.PRINCIPAL


DEFAULTS = _Defaults()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = DEFAULTS
    p = sub.add_parser(
        "envoy-config",
        help="render Envoy configuration for extauthz (sidecar bootstrap, filter, cluster, ...)",
        description="Render the Envoy v3 configuration that puts extauthz in front of a service, "
        "as YAML: a complete mTLS sidecar bootstrap (default), the HTTP filters, the extauthz "
        "cluster, per-route settings, or a TCP sidecar with the network ext_authz filter. "
        "Built from typed Envoy messages; the safety settings (fail closed, mTLS required, "
        "path normalization, trusted-header stripping) are explained in envoy/README.md.",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="sidecar",
        help="what to render (default %(default)s)",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="grpc",
        help="how Envoy asks extauthz: grpc (extauthz serve --listen) or http (Envoy's "
        "http_service; extauthz serve --http-listen, cheaper per check: see "
        "docs/operations.md). Default %(default)s",
    )
    p.add_argument(
        "--authz-header",
        action="append",
        default=[],
        metavar="NAME",
        help="with --transport http: a header your policies read (headers:/when:), sent to "
        "extauthz besides identity, JWT, trace and method-override headers (repeatable)",
    )
    p.add_argument(
        "--authz-max-concurrent-streams",
        type=int,
        default=0,
        metavar="N",
        help="with --transport grpc: HTTP/2 streams per connection to extauthz, so that Envoy "
        "opens several connections under load and extauthz serve --workers N shares them "
        "(default: Envoy's)",
    )
    p.add_argument(
        "--extauthz",
        default=d.extauthz,
        metavar="ADDR",
        help="where extauthz listens: HOST:PORT or unix:/path (default %(default)s); a "
        "HOST:PORT that is not loopback needs --extauthz-tls (no plaintext authz calls across "
        "the network)",
    )
    p.add_argument(
        "--upstream",
        type=_host_port,
        default=(d.upstream_address, d.upstream_port),
        metavar="HOST:PORT",
        help=f"the local service (default {d.upstream_address}:{d.upstream_port})",
    )
    p.add_argument("--listen-address", default=d.listen_address, metavar="IP")
    p.add_argument(
        "--listen-port", type=int, default=d.listen_port, metavar="N", help="default %(default)s"
    )
    p.add_argument("--admin-port", type=int, default=d.admin_port, metavar="N")
    p.add_argument(
        "--certs-dir",
        default=DEFAULT_CERTS_DIR,
        metavar="DIR",
        help="server.crt, server.key and ca.crt (default %(default)s)",
    )
    p.add_argument(
        "--failure-mode-allow",
        type=_bool,
        default=False,
        metavar="BOOL",
        help="let requests through when extauthz cannot answer (default false; true is a "
        "security decision and is warned about)",
    )
    p.add_argument(
        "--timeout",
        type=_duration,
        default=d.authz_timeout_s,
        metavar="DURATION",
        help="per-check deadline, e.g. 0.25s or 250ms (default 0.25s); a timeout is a 503",
    )
    p.add_argument(
        "--health-path",
        action="append",
        default=[],
        metavar="PATH",
        help="exact path that bypasses ext_authz (repeatable; none by default)",
    )
    p.add_argument(
        "--metadata-namespace",
        action="append",
        default=[],
        metavar="NS",
        help="dynamic-metadata namespace sent to extauthz (metadata_context_namespaces)",
    )
    p.add_argument(
        "--with-request-body",
        type=int,
        default=0,
        metavar="BYTES",
        help="send up to BYTES of the body to extauthz (default 0: never)",
    )
    p.add_argument(
        "--route-name",
        default=d.route_name,
        metavar="NAME",
        help="the catch-all route's name, sent as context_extensions.route",
    )
    p.add_argument(
        "--extauthz-tls",
        action="store_true",
        help="mTLS from Envoy to extauthz (for an extauthz started with --tls-*)",
    )
    p.add_argument(
        "--extauthz-spiffe-id",
        default="",
        metavar="ID",
        help="with --extauthz-tls: the SPIFFE ID extauthz's certificate must carry",
    )
    p.add_argument(
        "--principal-header",
        default=d.principal_header,
        metavar="NAME",
        help="the header extauthz sets to the caller's principal: the same value as extauthz "
        "serve --principal-header (default %(default)s). The rendered filter strips a caller's "
        "copy of it (and of x-extauthz-principal / x-extauthz-rule) before ext_authz runs",
    )
    p.add_argument(
        "--access-log", default=None, metavar="FILE", help="access log file (default stdout)"
    )
    p.add_argument(
        "--sds",
        default="",
        metavar="unix:/PATH",
        help="take certificate and trust bundle from this SDS server (e.g. the SPIRE agent "
        "socket) instead of --certs-dir",
    )
    p.add_argument(
        "--sds-svid", default=d.sds_svid_name, metavar="NAME", help="SDS secret of the SVID"
    )
    p.add_argument(
        "--sds-bundle",
        default=d.sds_bundle_name,
        metavar="NAME",
        help="SDS secret of the trust bundle",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from extauthz.envoyconf.config import SidecarConfig, config_with_certs_dir, render_variant
    except ImportError as exc:
        print(
            f"extauthz envoy-config: needs the envoy-data-plane package ({exc}); "
            "pip install 'extauthz[envoy]'",
            file=sys.stderr,
        )
        return 2

    host, port = args.upstream
    try:
        config = config_with_certs_dir(
            args.certs_dir,
            SidecarConfig(
                listen_address=args.listen_address,
                listen_port=args.listen_port,
                admin_port=args.admin_port,
                upstream_address=host,
                upstream_port=port,
                extauthz=args.extauthz,
                access_log_path=args.access_log,
                authz_timeout_s=args.timeout,
                failure_mode_allow=args.failure_mode_allow,
                request_body_max_bytes=args.with_request_body,
                health_paths=tuple(args.health_path),
                metadata_namespaces=tuple(args.metadata_namespace),
                route_name=args.route_name,
                extauthz_tls=args.extauthz_tls,
                extauthz_spiffe_id=args.extauthz_spiffe_id,
                sds_socket=args.sds,
                sds_svid_name=args.sds_svid,
                sds_bundle_name=args.sds_bundle,
                principal_header=args.principal_header,
                transport=args.transport,
                authz_headers=tuple(h.strip().lower() for h in args.authz_header),
                authz_max_concurrent_streams=args.authz_max_concurrent_streams,
            ),
        )
    except ValueError as exc:
        print(f"extauthz envoy-config: {exc}", file=sys.stderr)
        return 2
    if config.failure_mode_allow:
        print(
            "extauthz envoy-config: WARNING: failure_mode_allow: true lets every request "
            "through while extauthz is down or slow",
            file=sys.stderr,
        )
    if config.extauthz_tls and not config.extauthz_spiffe_id:
        print(
            "extauthz envoy-config: WARNING: --extauthz-tls without --extauthz-spiffe-id "
            "accepts any certificate from the trust bundle as extauthz's",
            file=sys.stderr,
        )
    try:
        text = render_variant(args.variant, config).yaml()
    except ValueError as exc:
        print(f"extauthz envoy-config: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
