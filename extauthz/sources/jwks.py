"""JSON Web Key Sets, kept fresh in the background and read synchronously on the request path.

`JwksCache.get_key(kid)` never does I/O: it returns a key already in memory or None. Fetching
is done by `refresh()`, which a daemon thread (`start()` / `stop()`) calls on a schedule, and
early (rate-limited by a cooldown) when a request asked for a kid we did not have. A kid that is
still unknown after a refetch is remembered for `negative_ttl`, so a stream of tokens with made-up
kids causes at most one fetch per cooldown. When the endpoint fails, the last good keys are kept
for `stale_ttl` after the last successful fetch, then dropped (fail closed).

The clock and the fetch function are injected, so all of this is testable without sleeping.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWTError

from extauthz.identity.jwt import JwkKey, JwtIssuerConfig, KeyProvider

log = logging.getLogger(__name__)

__all__ = [
    "JwkKey", "JwksCache", "JwksError", "KeyProvider", "discovery_fetcher", "file_fetcher",
    "https_fetcher", "parse_jwks",
]  # fmt: skip

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 64
MAX_KID_LENGTH = 256
_MAX_TRACKED_KIDS = 4096
# Values of the JWK "use" member that mean "verifies JWT signatures". SPIFFE trust bundles use
# "jwt-svid"; "x509-svid" and "enc" keys are skipped.
_SIGNING_USES = frozenset({"sig", "jwt-svid"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi"})

Fetch = Callable[[], bytes]
Clock = Callable[[], float]


class JwksError(ValueError):
    """A JWKS document could not be fetched or is unusable."""


def parse_jwks(document: bytes, *, max_keys: int = MAX_KEYS) -> dict[str | None, JwkKey]:
    """Parse a JWKS document into {kid: key}; raise JwksError if it is unusable.

    Keys with an ambiguous (duplicated) kid, private members, or a non-signing `use` are
    dropped. A key without kid is indexed under None, only when it is the only signing key.
    """
    if len(document) > MAX_JWKS_BYTES:
        raise JwksError("JWKS document is too large")
    try:
        data = json.loads(document)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"JWKS is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("JWKS must be an object with a 'keys' list")
    raw: list[Any] = data["keys"]
    if len(raw) > max_keys:
        raise JwksError(f"JWKS has more than {max_keys} keys")
    keys: list[JwkKey] = []
    for entry in raw:
        key = _parse_jwk(entry)
        if key is not None:
            keys.append(key)
    out: dict[str | None, JwkKey] = {}
    dup: set[str | None] = set()
    for key in keys:
        if key.kid in out:
            dup.add(key.kid)
        out[key.kid] = key
    for kid in dup:
        log.warning("JWKS: dropping keys with duplicated kid %r", kid)
        del out[kid]
    if None in out and len(keys) > 1:
        del out[None]
    return out


def _parse_jwk(entry: Any) -> JwkKey | None:
    if not isinstance(entry, dict):
        return None
    use = entry.get("use")
    if use is not None and use not in _SIGNING_USES:
        return None
    if _PRIVATE_MEMBERS & entry.keys() and entry.get("kty") != "oct":
        log.warning("JWKS: skipping a key that carries private key material")
        return None
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
        return None
    alg = entry.get("alg", "")
    if not isinstance(alg, str):
        return None
    try:
        jwk = PyJWK(entry)
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        log.warning("JWKS: skipping unusable key %r: %s", kid, exc)
        return None
    crv = entry.get("crv", "")
    return JwkKey(kid=kid, kty=str(entry["kty"]), crv=str(crv), alg=alg, key=jwk.key)


def file_fetcher(path: str | Path) -> Fetch:
    def fetch() -> bytes:
        with open(path, "rb") as fh:
            data = fh.read(MAX_JWKS_BYTES + 1)
        if len(data) > MAX_JWKS_BYTES:
            raise JwksError("JWKS file is too large")
        return data

    return fetch


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect becomes an HTTPError: keys only from the configured URL


DEFAULT_FETCH_TIMEOUT = 5.0
DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DISCOVERY_BYTES = 64 * 1024


def _https_getter(
    timeout: float, ssl_context: ssl.SSLContext | None
) -> Callable[[str, int], bytes]:
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _NoRedirect()
    )

    def get(url: str, limit: int) -> bytes:
        if not url.startswith("https://"):
            raise JwksError("JWKS URL must use https://")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        with opener.open(request, timeout=timeout) as resp:
            data: bytes = resp.read(limit + 1)
        if len(data) > limit:
            raise JwksError(f"response from {url} is too large")
        return data

    return get


def https_fetcher(
    url: str,
    *,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetch:
    """Fetch over HTTPS only, with certificate verification, no redirects, bounded size."""
    if not url.startswith("https://"):
        raise JwksError("JWKS URL must use https://")
    get = _https_getter(timeout, ssl_context)
    return lambda: get(url, MAX_JWKS_BYTES)


def discovery_fetcher(
    issuer: str,
    *,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetch:
    """OIDC discovery: read `jwks_uri` from `<issuer>/.well-known/openid-configuration`, then
    fetch that JWKS. Both over HTTPS with the same rules as `https_fetcher`. The document's
    `issuer` must equal the configured issuer exactly (OpenID Connect Discovery 1.0 §4.3) and
    `jwks_uri` must be https://. Discovery is redone on every refresh, so a moved `jwks_uri`
    is followed; nothing a token names is ever fetched."""
    if not issuer.startswith("https://"):
        raise JwksError("OIDC discovery needs an https:// issuer")
    url = issuer.rstrip("/") + DISCOVERY_PATH
    get = _https_getter(timeout, ssl_context)

    def fetch() -> bytes:
        try:
            meta = json.loads(get(url, MAX_DISCOVERY_BYTES))
        except (ValueError, RecursionError) as exc:
            raise JwksError(f"OIDC discovery document is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise JwksError("OIDC discovery document is not a JSON object")
        if meta.get("issuer") != issuer:
            raise JwksError("OIDC discovery document names another issuer")
        jwks_uri = meta.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise JwksError("OIDC discovery document has no https:// jwks_uri")
        return get(jwks_uri, MAX_JWKS_BYTES)

    return fetch


class JwksCache:
    """Keys of one issuer. Thread-safe; `get_key` is O(1) and never blocks on I/O."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str = "jwks",
        clock: Clock = time.monotonic,
        refresh_interval: float = 300.0,
        retry_interval: float = 10.0,
        cooldown: float = 30.0,
        negative_ttl: float = 300.0,
        stale_ttl: float = 24 * 3600.0,
    ) -> None:
        self._fetch = fetch
        self.name = name
        self._clock = clock
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self.cooldown = cooldown
        self.negative_ttl = negative_ttl
        self.stale_ttl = stale_ttl
        self._lock = threading.Lock()
        self._keys: Mapping[str | None, JwkKey] = {}
        self._last_success: float | None = None
        self._last_attempt: float | None = None
        self._next_refresh = clock()  # first refresh is due immediately
        self._unknown: dict[str, float] = {}  # kid -> negative-cached until
        self._pending: set[str] = set()  # kids asked for since the last fetch
        self._wanted = False  # a request asked for an unknown kid
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters for metrics (written by the refresher only): attempts, and failed attempts.
        self.fetch_count = 0
        self.fetch_failures = 0
        self.last_error = ""

    # -- request path ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while usable keys are held (loaded at least once and not past stale_ttl)."""
        with self._lock:
            return self._fresh_keys(self._clock()) is not None

    def get_key(self, kid: str | None) -> JwkKey | None:
        now = self._clock()
        with self._lock:
            keys = self._fresh_keys(now)
            if keys is not None and kid in keys:
                return keys[kid]
            if kid is None or len(kid) > MAX_KID_LENGTH:
                return None
            until = self._unknown.get(kid)
            if until is not None and now < until:
                return None  # known to be unknown: no refetch
            if kid in self._pending or len(self._pending) >= _MAX_TRACKED_KIDS:
                return None
            self._pending.add(kid)
            self._wanted = True
        self._wake.set()
        return None

    def _fresh_keys(self, now: float) -> Mapping[str | None, JwkKey] | None:
        if self._last_success is None or now - self._last_success > self.stale_ttl:
            return None
        return self._keys

    # -- refresh --------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether a fetch should happen now (schedule reached, or a wanted kid past cooldown)."""
        now = self._clock()
        with self._lock:
            if now >= self._next_refresh:
                return True
            cooled = self._last_attempt is None or now - self._last_attempt >= self.cooldown
            return self._wanted and cooled

    def run_pending(self) -> bool:
        """Refresh if due; return whether a refresh was attempted. The thread's loop body."""
        if not self.due():
            return False
        self.refresh()
        return True

    def refresh(self) -> bool:
        """Fetch and install keys now; on failure keep the old ones. Returns success."""
        started = self._clock()
        with self._lock:
            self._last_attempt = started
            self._wanted = False
        self.fetch_count += 1
        try:
            keys = parse_jwks(self._fetch())
        except Exception as exc:  # any fetch/parse failure keeps the last good keys
            now = self._clock()
            with self._lock:
                self.fetch_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._next_refresh = now + self.retry_interval
            log.warning("JWKS %s: refresh failed: %s", self.name, self.last_error)
            return False
        now = self._clock()
        with self._lock:
            self._keys = keys
            self._last_success = now
            self._next_refresh = now + self.refresh_interval
            self.last_error = ""
            # Kids asked for and still unknown after this fetch are negative-cached.
            for kid in [k for k, until in self._unknown.items() if until <= now or k in keys]:
                del self._unknown[kid]
            for kid in self._pending:
                if kid not in keys and len(self._unknown) < _MAX_TRACKED_KIDS:
                    self._unknown[kid] = now + self.negative_ttl
            self._pending.clear()
        return True

    def seconds_until_due(self) -> float:
        now = self._clock()
        with self._lock:
            wait = self._next_refresh - now
            if self._wanted and self._last_attempt is not None:
                wait = min(wait, self._last_attempt + self.cooldown - now)
            return max(0.0, wait)

    # -- background thread ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"jwks-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception:  # pragma: no cover - refresh() already catches fetch errors
                log.exception("JWKS %s: refresher error", self.name)
            self._wake.wait(timeout=max(0.05, min(self.seconds_until_due(), self.refresh_interval)))
            self._wake.clear()


class KeySets:
    """The one owner of every JWKS cache: one per configured JWT issuer, built from its
    `jwks_file`, `jwks_url` or `oidc_discovery` setting. The server's edge builds it, hands
    `providers` to the identity core (which never fetches anything itself), starts it before
    serving and stops it at shutdown. A revocation reload builds a new resolver over the same
    providers, so no key set is ever refetched or orphaned."""

    def __init__(self, caches: Iterable[JwksCache] = ()) -> None:
        self.caches = tuple(caches)

    @classmethod
    def for_issuers(cls, issuers: Iterable[JwtIssuerConfig]) -> KeySets:
        """Unloaded caches (JWTs of an issuer fail closed until `start` loads its keys)."""
        caches = []
        for issuer in issuers:
            if issuer.jwks_file:
                fetch = file_fetcher(issuer.jwks_file)
            elif issuer.jwks_url:
                fetch = https_fetcher(issuer.jwks_url, timeout=issuer.jwks_timeout)
            elif issuer.oidc_discovery:
                fetch = discovery_fetcher(issuer.issuer, timeout=issuer.jwks_timeout)
            else:
                raise ValueError(
                    f"jwt issuer {issuer.issuer!r}: no jwks_file, jwks_url or oidc_discovery"
                )
            caches.append(JwksCache(
                fetch,
                name=issuer.issuer,
                refresh_interval=issuer.jwks_refresh_interval,
                cooldown=issuer.jwks_cooldown,
                stale_ttl=issuer.jwks_max_stale,
            ))
        return cls(caches)

    @property
    def providers(self) -> dict[str, KeyProvider]:
        """Issuer -> its key set, for `IdentityResolver.from_config(keys=...)`."""
        return {cache.name: cache for cache in self.caches}

    def start(self) -> bool:
        """Load every key set once (blocking, bounded by the fetch timeout), then start the
        background refreshers. Returns whether every key set loaded."""
        loaded = all([cache.refresh() for cache in self.caches])
        for cache in self.caches:
            cache.start()
        return loaded

    def stop(self) -> None:
        for cache in self.caches:
            cache.stop()

    @property
    def ready(self) -> bool:
        return all(cache.ready for cache in self.caches)
