"""The transport-agnostic application: one core, one lifecycle, any number of listeners.

Everything a check needs that is not about the wire lives here, so the gRPC servicer and the
HTTP authorization-service listener decide with the *same* objects (policy store, identity
resolver, decision cache, limiter, observers) and the same failure rule:

* `App.run_check(request)` asks the pipeline and never raises: an unexpected exception (or a
  request the transport could not convert) becomes a fail-closed 503 `internal_error`, never an
  allow, and the observers (spans, decision log, metrics) see every check exactly once.
* `serve(app, transports)` runs the shared lifecycle once per process: load the policy and the
  revocation list (refusing to start without them), start the JWKS refreshers and the limiter,
  start every transport, reload on SIGHUP / on change, drain every transport on SIGTERM, stop.

A transport only converts bytes to a `Request` and a `CheckResult` back to bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extauthz import headers
from extauthz.backends.redis_limiter import RedisLimiter
from extauthz.decide.cache import DecisionCache
from extauthz.decide.pipeline import Authorizer, CheckResult
from extauthz.decide.ratelimit import InProcessLimiter, Limiter, LocalLimiter
from extauthz.identity.resolver import IdentityConfig, IdentityResolver
from extauthz.model import Decision, Outcome, Reason, Request
from extauthz.settings import Settings, SettingsError
from extauthz.sources.jwks import KeySets
from extauthz.sources.notify import open_notifier
from extauthz.sources.policy_store import PolicyStore
from extauthz.sources.revocation import RevocationError, fingerprint, load_revocations

log = logging.getLogger("extauthz.server")

INTERNAL_ERROR = Decision(
    Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR, "extauthz could not decide; failing closed"
)


class CheckObserver(Protocol):
    """Sees every check after it is decided (spans, decision logs, metrics)."""

    def observe(self, request: Request | None, result: CheckResult, seconds: float) -> None: ...


class Transport(Protocol):
    """A listener that turns wire requests into `App.run_check` calls."""

    name: str

    async def start(self) -> list[str]:
        """Bind and start accepting; return the bound addresses (for logs and `ready`)."""
        ...

    async def set_serving(self, serving: bool) -> None:
        """Tell health probes whether new checks should come here."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight checks finish for up to `grace` seconds, close."""
        ...


@dataclass(slots=True)
class Stats:
    checks: int = 0
    errors: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class App:
    settings: Settings
    store: PolicyStore
    authorizer: Authorizer
    cache: DecisionCache
    identity_config: IdentityConfig
    # The one owner of the JWKS caches and their refresher threads (the identity core only
    # reads them; a revocation reload builds a new resolver over the same key sets).
    keys: KeySets
    observers: tuple[CheckObserver, ...] = ()
    stats: Stats = field(default_factory=Stats)
    clock: Callable[[], float] = time.perf_counter
    revocation_version: str = ""
    revocation_failures: int = 0

    def internal_error(self) -> Decision:
        """The fail-closed answer, stamped with the serving policy version."""
        return dataclasses.replace(INTERNAL_ERROR, policy_version=self.authorizer.policy_version)

    async def run_check(self, request: Request | None, started: float | None = None) -> CheckResult:
        """Decide one check. `request` None means the transport could not read it (it logs
        why); that is a 503 `internal_error` like any other failure here, never an allow.
        `started` is when the transport began (so observed latency includes conversion)."""
        if not started and self.observers:
            started = self.clock()
        result: CheckResult | None = None
        try:
            if request is not None:
                result = await self.authorizer.check(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Fail closed, loudly. The request content is not logged: it may hold credentials.
            log.exception("check failed; denying", extra={"event": "check_error"})
        finally:
            if result is None:
                self.stats.errors += 1
                result = CheckResult(self.internal_error())
            self._count(result)
            if self.observers:
                self._observe(request, result, self.clock() - (started or 0.0))
        return result

    def record(
        self, request: Request | None, decision: Decision, started: float | None = None
    ) -> CheckResult:
        """A denial the transport decided itself, before the pipeline could (a request it
        cannot read or must not trust: malformed HTTP, an ambiguous XFCC). Counted and observed
        like any check, so such refusals show up in the decision log and metrics."""
        result = CheckResult(decision)
        self._count(result)
        if self.observers:
            elapsed = self.clock() - started if started else 0.0
            self._observe(request, result, elapsed)
        return result

    def _count(self, result: CheckResult) -> None:
        stats = self.stats
        stats.checks += 1
        reason = result.decision.reason.value
        stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1

    def _observe(self, request: Request | None, result: CheckResult, seconds: float) -> None:
        for observer in self.observers:
            try:
                observer.observe(request, result, seconds)
            except Exception:
                log.exception("observer failed", extra={"event": "observer_error"})


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
    try:
        keys = KeySets.for_issuers(identity_config.jwt_issuers)
        identity = IdentityResolver.from_config(identity_config, keys=keys.providers)
    except ValueError as exc:
        raise SettingsError(f"identity: {exc}") from None
    cache = DecisionCache(settings.cache_size, settings.cache_ttl, clock)
    if limiter is None:
        limiter = _limiter(settings, clock)
    authorizer = Authorizer(store, identity, cache, clock, limiter)
    return App(settings, store, authorizer, cache, identity_config, keys, tuple(observers))


def strip_headers_of(settings: Settings) -> tuple[str, ...]:
    """Headers removed from every allowed request: the ones extauthz sets, renamed or not, so
    a caller's own copy never reaches the upstream on a decision that sets none."""
    return tuple(
        dict.fromkeys(
            h
            for h in (settings.principal_header, settings.rule_header, *headers.TRUSTED)
            if h
        )
    )


def identity_config_from(settings: Settings) -> IdentityConfig:
    """The typed `identity:` section (validated with the rest of the settings)."""
    return settings.identity_config


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
    # Swapped whole: one attribute write of a new resolver (new revocation sets, new memo).
    app.authorizer.identity = IdentityResolver.from_config(config, keys=app.keys.providers)
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


# -- lifecycle, shared by every transport of the process ------------------------------------


async def start(app: App) -> None:
    """Load what a decision needs before any listener opens: a server that cannot load its
    policy or revocation list refuses to start (SettingsError) rather than deny everything."""
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
    if not await asyncio.to_thread(app.keys.start):
        # Checks with tokens from that issuer fail closed until its keys load; mTLS callers
        # keep working, so this is not a reason to stay NOT_SERVING.
        log.warning(
            "some JWT signing keys could not be loaded at start-up",
            extra={"event": "jwks_unavailable"},
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


async def stop(app: App) -> None:
    """Release what `start` acquired (JWKS refreshers, the limiter's connections)."""
    app.keys.stop()
    limiter = app.authorizer.limiter
    if limiter is not None:
        await limiter.aclose()


async def serve(
    app: App,
    transports: Sequence[Transport],
    ready: Callable[[list[str]], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; drain in-flight checks for the grace period; return 0."""
    settings = app.settings
    await start(app)
    bound: list[str] = []
    started: list[Transport] = []
    try:
        for transport in transports:
            bound += await transport.start()
            started.append(transport)
        for transport in started:
            await transport.set_serving(True)
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
        stop_now = asyncio.Event()
        reload_now = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_now.set)
        loop.add_signal_handler(signal.SIGHUP, reload_now.set)
        watcher = asyncio.create_task(watch(app, reload_now))
        try:
            await stop_now.wait()
        finally:
            watcher.cancel()
            log.info(
                "draining", extra={"event": "draining", "grace_period": settings.grace_period}
            )
    finally:
        for transport in started:
            await transport.set_serving(False)
        await asyncio.gather(*(t.stop(settings.grace_period) for t in started))
        await stop(app)
        log.info("stopped", extra={"event": "stopped", "checks": app.stats.checks})
    return 0


# After a notification, wait this long for the rest of a burst (a ConfigMap swap, an editor's
# write-then-rename) before reading: one reload per change, still far under half a second.
NOTIFY_SETTLE_SECONDS = 0.03


async def watch(app: App, reload_now: asyncio.Event) -> None:
    """Reload on SIGHUP, on a filesystem notification for the policy folder or the
    revocation list's folder (effective in well under a second; see sources/notify.py),
    and by polling every `watch_interval` seconds: the safety net where notifications are
    unavailable or lost (network filesystems, a full inotify watch table)."""
    interval = app.settings.watch_interval
    revocation_file = app.settings.revocation_file
    seen_revoked = fingerprint(revocation_file) if revocation_file else ""
    policy_dir = app.settings.policy
    notifier = None
    if interval > 0:
        notifier = open_notifier(
            [policy_dir] if policy_dir is not None else [],
            [revocation_file.parent] if revocation_file is not None else [],
        )
    changed = asyncio.Event()  # a notification: reload if the content differs
    loop = asyncio.get_running_loop()
    if notifier is not None:

        def notified() -> None:
            with contextlib.suppress(OSError):
                if notifier.drain():
                    changed.set()

        loop.add_reader(notifier.fileno(), notified)
        log.info("watching for changes", extra={"event": "watching",
                                                 "folders": list(notifier.folders),
                                                 "poll_interval": interval})
    try:
        while True:
            waits = {asyncio.ensure_future(reload_now.wait()),
                     asyncio.ensure_future(changed.wait())}
            try:
                await asyncio.wait(waits, timeout=interval if interval > 0 else None,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            if changed.is_set():
                await asyncio.sleep(NOTIFY_SETTLE_SECONDS)  # let the burst finish
                changed.clear()
            forced = reload_now.is_set()  # SIGHUP: reload even if nothing seems changed
            reload_now.clear()
            # Compared with what the last reload actually read (not what was seen before it):
            # a reload that read a half-swapped ConfigMap and failed is retried on the next
            # notification or poll.
            current = await asyncio.to_thread(app.store.fingerprint)
            if forced or current != app.store.attempted:
                await asyncio.to_thread(app.store.reload)
            if revocation_file is not None:
                revoked_now = await asyncio.to_thread(fingerprint, revocation_file)
                if forced or revoked_now != seen_revoked:
                    seen_revoked = revoked_now
                    await asyncio.to_thread(apply_revocations, app)
    finally:
        if notifier is not None:
            loop.remove_reader(notifier.fileno())
            notifier.close()
