"""The gRPC edge: Envoy's Authorization service, health, reflection, reload and drain.

The servicer is deliberately thin: convert, ask the pipeline, convert back. Whatever goes
wrong in between becomes a fail-closed 503 with reason `internal_error`; an exception never
reaches grpc (which would make Envoy apply its own failure mode instead of our decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from extauthz import headers
from extauthz.backends.redis_limiter import RedisLimiter
from extauthz.decide.cache import DecisionCache
from extauthz.decide.pipeline import Authorizer, CheckResult
from extauthz.decide.ratelimit import (
    InProcessLimiter,
    Limiter,
    LocalLimiter,
    rate_limit_headers,
)
from extauthz.identity.resolver import IdentityConfig, IdentityResolver
from extauthz.memo import Memo
from extauthz.model import Decision, Outcome, Reason, Request
from extauthz.settings import Settings, SettingsError, parse_listen_address
from extauthz.sources.policy_store import PolicyStore
from extauthz.sources.revocation import RevocationError, fingerprint, load_revocations
from extauthz.transport.grpc_proto import (
    ResponseOptions,
    is_network_check,
    to_network_response,
    to_request,
    to_response,
)
from extauthz.transport.tls import ClientIdentityInterceptor, TlsConfig

log = logging.getLogger("extauthz.server")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
RESPONSE_MEMO_SIZE = 4096
_INTERNAL_ERROR = Decision(
    Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR, "extauthz could not decide; failing closed"
)


class CheckObserver(Protocol):
    """Sees every check after it is decided (spans, decision logs, metrics)."""

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None: ...


@dataclass(slots=True)
class Stats:
    checks: int = 0
    errors: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class AuthorizationServicer(ea_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        authorizer: Authorizer,
        options: ResponseOptions,
        observers: Sequence[CheckObserver] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._authorizer = authorizer
        self._options = options
        self._observers = tuple(observers)
        self._clock = clock
        self.stats = Stats()
        # Responses by the decision fields they are built from (see _respond); bounded.
        self._responses: Memo[tuple[object, ...], ea.CheckResponse] = Memo(RESPONSE_MEMO_SIZE)

    def _respond(self, result: CheckResult) -> ea.CheckResponse:
        """Build (or reuse) the CheckResponse. Responses are memoized by everything
        `to_response` reads from a decision, so a cache miss that decides like an earlier
        check (same outcome, reason, rule, principal, policy version, headers) reuses it
        too; a rate-limited or budget-carrying answer has per-request headers and is built
        fresh."""
        decision = result.decision
        if self._options.budget_headers and result.limit is not None and decision.allowed:
            return to_response(decision, self._options, rate_limit_headers(result.limit))
        if decision.outcome is Outcome.RATE_LIMITED:
            return to_response(decision, self._options)
        identity = decision.identity
        key = (
            decision.outcome,
            decision.reason,
            decision.rule,
            identity.principal if identity is not None else "",
            identity.source if identity is not None else None,
            decision.policy_version,
            decision.headers,
        )
        response = self._responses.get(key)
        if response is None:
            response = self._responses.put(key, to_response(decision, self._options))
        return response

    async def Check(self, check: ea.CheckRequest, context: Any) -> ea.CheckResponse:
        started = self._clock()
        request: Request | None = None
        result: CheckResult
        try:
            request = to_request(check)
            result = await self._authorizer.check(request)
            if is_network_check(request):  # network ext_authz: a status, no HTTP response
                response = to_network_response(result.decision)
            else:
                response = self._respond(result)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Fail closed, loudly. The request content is not logged: it may hold credentials.
            log.exception("check failed; denying", extra={"event": "check_error"})
            self.stats.errors += 1
            current = self._authorizer.policy_version
            failed = dataclasses.replace(_INTERNAL_ERROR, policy_version=current)
            result = CheckResult(failed)
            response = to_response(failed, self._options)
        self.stats.checks += 1
        reason = result.decision.reason.value
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        if self._observers:
            elapsed = self._clock() - started
            for observer in self._observers:
                try:
                    observer.observe(request, result, elapsed)
                except Exception:
                    log.exception("observer failed", extra={"event": "observer_error"})
        return response


@dataclass
class App:
    settings: Settings
    store: PolicyStore
    authorizer: Authorizer
    servicer: AuthorizationServicer
    health: health_aio.HealthServicer
    cache: DecisionCache
    identity_config: IdentityConfig
    # The resolver built at start-up: it owns the JWKS caches and their refresher threads.
    identity_root: IdentityResolver
    revocation_version: str = ""
    revocation_failures: int = 0


def build_app(
    settings: Settings,
    limiter: Limiter | None = None,
    observers: Sequence[CheckObserver] = (),
    clock: Callable[[], float] = time.time,
) -> App:
    if settings.policy is None:
        raise SettingsError("policy: a policy directory is required (--policy DIR)")
    store = PolicyStore(settings.policy)
    identity_config = identity_config_from(settings)
    identity = IdentityResolver.from_config(identity_config)
    cache = DecisionCache(settings.cache_size, settings.cache_ttl, clock)
    if limiter is None:
        limiter = _limiter(settings, clock)
    authorizer = Authorizer(store, identity, cache, clock, limiter)
    servicer = AuthorizationServicer(
        authorizer,
        ResponseOptions(
            principal_header=settings.principal_header,
            rule_header=settings.rule_header,
            # Renamed headers are stripped too, so a caller's copy never gets through on an
            # allowed decision that sets none.
            strip_headers=tuple(
                dict.fromkeys(
                    h
                    for h in (settings.principal_header, settings.rule_header, *headers.TRUSTED)
                    if h
                )
            ),
            budget_headers=settings.ratelimit_budget_headers,
        ),
        observers,
    )
    return App(
        settings,
        store,
        authorizer,
        servicer,
        health_aio.HealthServicer(),
        cache,
        identity_config,
        identity,
    )


def identity_config_from(settings: Settings) -> IdentityConfig:
    try:
        config = IdentityConfig.from_mapping(settings.identity)
        if settings.trust_domains:
            domains = config.trust_domains | frozenset(settings.trust_domains)
            config = dataclasses.replace(config, trust_domains=domains)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"identity: {exc}") from None
    return config


def apply_revocations(app: App) -> bool:
    """Re-read the revocation file and swap in a resolver that enforces it. The JWKS caches
    of the first resolver are shared, so no key set is refetched. A bad file keeps the
    previous list (never an empty one)."""
    path = app.settings.revocation_file
    if path is None:
        return True
    try:
        revoked = load_revocations(path)
    except RevocationError as exc:
        app.revocation_failures += 1
        log.error(
            "revocation reload failed; keeping the previous list",
            extra={"event": "revocation_reload_failed", "error": str(exc)},
        )
        return False
    base = app.identity_config
    config = dataclasses.replace(
        base,
        revoked_principals=base.revoked_principals | revoked.principals,
        revoked_token_ids=base.revoked_token_ids | revoked.token_ids,
    )
    keys = {cache.name: cache for cache in app.identity_root.key_caches}
    app.authorizer.identity = IdentityResolver.from_config(config, keys=keys)
    app.revocation_version = revoked.version
    log.info(
        "revocation list loaded",
        extra={
            "event": "revocations_loaded",
            "version": revoked.version,
            "principals": len(revoked.principals),
            "token_ids": len(revoked.token_ids),
        },
    )
    return True


def _limiter(settings: Settings, clock: Callable[[], float]) -> Limiter:
    if settings.rate_limit_backend == "redis":
        return RedisLimiter.from_url(
            settings.redis_url,
            timeout=settings.redis_timeout,
            failure_mode=settings.redis_failure_mode,
            fallback=LocalLimiter(clock, settings.limiter_max_keys),
        )
    return InProcessLimiter(LocalLimiter(clock, settings.limiter_max_keys))


async def _set_health(app: App, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", AUTHZ_SERVICE):
        await app.health.set(service, status)


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
            finally:
                os.umask(previous)
            bound.append(addr)
        else:
            if tls is not None:  # mutual TLS on TCP; unix sockets rely on their file mode
                port = server.add_secure_port(addr, tls.server_credentials())
            else:
                port = server.add_insecure_port(addr)
            if port == 0:
                raise SettingsError(f"listen: cannot bind {addr}")
            bound.append(f"{host}:{port}")
    return bound


async def serve(app: App, ready: Callable[[list[str]], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; drain in-flight checks for the grace period; return 0."""
    settings = app.settings
    if not app.store.reload():
        raise SettingsError(f"policy: cannot load {settings.policy}: {app.store.last_error}")
    if settings.revocation_file is not None and not apply_revocations(app):
        raise SettingsError(f"revocation_file: cannot load {settings.revocation_file}")
    if not app.identity_config.trust_domains:
        log.warning(
            "no trust domains configured: SPIFFE IDs of any trust domain are accepted",
            extra={"event": "trust_domains_unset"},
        )
    if not await asyncio.to_thread(app.identity_root.start):
        # Checks with tokens from that issuer fail closed until its keys load; mTLS callers
        # keep working, so this is not a reason to stay NOT_SERVING.
        log.warning(
            "some JWT signing keys could not be loaded at start-up",
            extra={"event": "jwks_unavailable"},
        )
    tls = TlsConfig.from_settings(settings)
    server = grpc.aio.server(
        interceptors=[ClientIdentityInterceptor(tls)] if tls is not None else None,
        options=[("grpc.so_reuseport", 1)],
    )
    ea_grpc.add_AuthorizationServicer_to_server(app.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection(
        (
            AUTHZ_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    limiter = app.authorizer.limiter
    if limiter is not None:
        try:
            await asyncio.wait_for(limiter.start(), timeout=2.0)
        except Exception as exc:  # the failure mode covers checks; say so at start-up
            log.warning(
                "rate-limit backend unreachable at start-up",
                extra={"event": "limiter_unavailable", "error": repr(exc)},
            )
    bound = _bind(server, settings, tls)
    await server.start()
    for addr in settings.listen:
        if addr.startswith("unix:"):
            os.chmod(addr[len("unix:") :], settings.socket_mode)
    await _set_health(app, True)
    log.info(
        "serving",
        extra={
            "event": "serving",
            "listen": bound,
            "policy_version": app.store.current.version if app.store.current else None,
        },
    )
    if ready is not None:
        ready(bound)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    watcher = asyncio.create_task(_watch(app, reload_now))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        log.info("draining", extra={"event": "draining", "grace_period": settings.grace_period})
        await _set_health(app, False)
        await server.stop(settings.grace_period)
        app.identity_root.stop()
        if limiter is not None:
            await limiter.aclose()
        for addr in settings.listen:
            if addr.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(addr[len("unix:") :])
        log.info("stopped", extra={"event": "stopped", "checks": app.servicer.stats.checks})
    return 0


async def _watch(app: App, reload_now: asyncio.Event) -> None:
    """Reload on SIGHUP, or when the directory's content changes (polled: works for
    ConfigMap symlink swaps, which inotify-style watchers often miss)."""
    interval = app.settings.watch_interval
    revocation_file = app.settings.revocation_file
    seen_revoked = fingerprint(revocation_file) if revocation_file else ""
    while True:
        try:
            if interval > 0:
                await asyncio.wait_for(reload_now.wait(), timeout=interval)
            else:
                await reload_now.wait()
        except TimeoutError:
            pass
        forced = reload_now.is_set()
        reload_now.clear()
        # Compared with what the last reload actually read (not what was seen before it): a
        # reload that read a half-swapped ConfigMap and failed is retried on the next poll.
        current = await asyncio.to_thread(app.store.fingerprint)
        if forced or current != app.store.attempted:
            await asyncio.to_thread(app.store.reload)
        if revocation_file is not None:
            revoked_now = await asyncio.to_thread(fingerprint, revocation_file)
            if forced or revoked_now != seen_revoked:
                seen_revoked = revoked_now
                await asyncio.to_thread(apply_revocations, app)
