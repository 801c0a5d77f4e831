"""The gRPC edge: Envoy's Authorization service, health and reflection.

The servicer is deliberately thin: convert, ask the app, convert back. Deciding, failing closed
and observing happen in `extauthz.app.App.run_check`, shared with the HTTP transport; what is
left here is the protobuf shape of the answer. A response that cannot be built is the
fail-closed 503 `internal_error` too: an exception never reaches grpc (which would make Envoy
apply its own failure mode instead of our decision).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from extauthz.app import App, Stats, strip_headers_of
from extauthz.decide.pipeline import CheckResult
from extauthz.model import Request
from extauthz.settings import Settings, SettingsError, parse_listen_address
from extauthz.transport.answers import Answers
from extauthz.transport.grpc_proto import (
    ResponseOptions,
    is_network_check,
    to_network_response,
    to_request,
    to_response,
)
from extauthz.transport.listeners import BindError, reuse_port
from extauthz.transport.tls import ClientIdentityInterceptor, TlsConfig

log = logging.getLogger("extauthz.server")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


def response_options(settings: Settings) -> ResponseOptions:
    return ResponseOptions(
        principal_header=settings.principal_header,
        rule_header=settings.rule_header,
        strip_headers=strip_headers_of(settings),
        budget_headers=settings.ratelimit_budget_headers,
    )


class AuthorizationServicer(ea_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, app: App, options: ResponseOptions) -> None:
        self._app = app
        self._options = options
        # Responses by the decision fields they are built from (transport/answers.py).
        self._answers: Answers[ea.CheckResponse] = Answers(
            lambda decision, extra: to_response(decision, options, extra),
            budget_headers=options.budget_headers,
        )

    @property
    def stats(self) -> Stats:
        return self._app.stats

    def _respond(self, result: CheckResult) -> ea.CheckResponse:
        return self._answers.answer(result)

    async def Check(self, check: ea.CheckRequest, context: Any) -> ea.CheckResponse:
        app = self._app
        started = app.clock()
        request: Request | None
        try:
            request = to_request(check)
        except Exception:
            log.exception("check request unreadable; denying", extra={"event": "check_error"})
            request = None
        result = await app.run_check(request, started)
        try:
            if request is not None and is_network_check(request):
                # network ext_authz: a status, no HTTP response
                return to_network_response(result.decision)
            return self._respond(result)
        except Exception:
            log.exception("check response failed; denying", extra={"event": "check_error"})
            app.stats.errors += 1
            return to_response(app.internal_error(), self._options)


def _bind(server: grpc.aio.Server, settings: Settings, tls: TlsConfig | None = None) -> list[str]:
    bound = []
    for addr in settings.listen:
        host, where = parse_listen_address(addr)
        if host == "unix":
            path = str(where)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket from a previous run
            previous = os.umask(0o777 & ~settings.socket_mode)
            try:
                server.add_insecure_port(addr)
            except RuntimeError:  # gRPC says only "Failed to bind"; the CLI checked why first
                raise BindError(f"listen: cannot bind {addr}") from None
            finally:
                os.umask(previous)
            bound.append(addr)
        else:
            try:
                if tls is not None:  # mutual TLS on TCP; unix sockets rely on their file mode
                    port = server.add_secure_port(addr, tls.server_credentials())
                else:
                    port = server.add_insecure_port(addr)
            except RuntimeError:
                raise BindError(f"listen: cannot bind {addr}") from None
            if port == 0:
                raise SettingsError(f"listen: cannot bind {addr}")
            bound.append(f"{host}:{port}")
    return bound


class GrpcTransport:
    """`--listen`: Envoy's ext_authz gRPC service plus gRPC health and reflection."""

    name = "grpc"

    def __init__(self, app: App) -> None:
        self.app = app
        self.servicer = AuthorizationServicer(app, response_options(app.settings))
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> list[str]:
        settings = self.app.settings
        tls = TlsConfig.from_settings(settings)
        server = grpc.aio.server(
            interceptors=[ClientIdentityInterceptor(tls)] if tls is not None else None,
            # gRPC's default is SO_REUSEPORT on, which would let a second instance share
            # the port silently; only a supervisor's own workers share it (issue 19).
            options=[("grpc.so_reuseport", 1 if reuse_port() else 0)],
        )
        ea_grpc.add_AuthorizationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                AUTHZ_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        bound = _bind(server, settings, tls)
        await server.start()
        self._server = server
        for addr in settings.listen:
            if addr.startswith("unix:"):
                os.chmod(addr[len("unix:") :], settings.socket_mode)
        return bound

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", AUTHZ_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for addr in self.app.settings.listen:
            if addr.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(addr[len("unix:") :])
