"""Bearer JWTs and JWT-SVIDs: extraction, verification and a bounded cache of verified tokens.

Everything an attacker controls is checked before it is trusted, cheapest first: size, shape,
JSON depth and duplicate members, forbidden headers (`jku`, `x5u`, `jwk`, `x5c`, `crit`, `b64`
— keys come only from configuration), `alg` against the issuer's allowlist, the key's type
against `alg` (so an HS256 token can never be checked with an RSA public key as HMAC secret),
then the signature (PyJWT), then the claims against an injected `now`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from cachetools import LRUCache
from jwt import PyJWS
from jwt.exceptions import PyJWTError

from extauthz.identity.spiffe import SpiffeIdError, check_trust_domain_name, parse_workload_id
from extauthz.model import Identity, IdentitySource, Reason

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
SYMMETRIC_ALGORITHMS = ("HS256", "HS384", "HS512")
# The JWT-SVID standard allows only these.
JWT_SVID_ALGORITHMS = ASYMMETRIC_ALGORITHMS[:9]
_KEY_TYPES = {
    **{a: ("RSA", "") for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    **{a: ("oct", "") for a in SYMMETRIC_ALGORITHMS},
}
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
JWT_SVID_HEADERS = frozenset({"alg", "kid", "typ"})
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_MAX_JSON_DEPTH = 8
MAX_SUBJECT_LENGTH = 2048
MAX_AUDIENCES = 32
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KID_RE = re.compile(r"[\x21-\x7e]{1,256}")


@dataclass(frozen=True, slots=True)
class JwkKey:
    """One verification key: the key object plus what it may be used with."""

    kid: str | None
    kty: str  # "RSA" | "EC" | "OKP" | "oct"
    crv: str  # "" unless EC/OKP
    alg: str  # "" when the JWK does not pin an algorithm
    key: Any  # a cryptography public key, or bytes for "oct"


class KeyProvider(Protocol):
    """What the JWT verifier needs: a key by kid, synchronously, without I/O."""

    def get_key(self, kid: str | None) -> JwkKey | None: ...

    @property
    def ready(self) -> bool: ...


class JwtError(Exception):
    """The token cannot be trusted. `reason` is the model Reason; `detail` never holds the token."""

    def __init__(
        self, detail: str, reason: Reason = Reason.INVALID_IDENTITY, presented: str = ""
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason
        self.presented = presented


@dataclass(frozen=True, slots=True)
class JwtIssuerConfig:
    issuer: str
    audiences: frozenset[str]
    # Empty: every asymmetric algorithm (for JWT-SVIDs, those the JWT-SVID standard allows).
    algorithms: tuple[str, ...] = ()
    leeway: float = 60.0
    # Longest accepted exp - iat (or exp - now when there is no iat), in seconds.
    max_lifetime: float = 24 * 3600.0
    jwt_svid: bool = False
    # For JWT-SVID issuers: the trust domain every `sub` must belong to (required).
    trust_domain: str = ""
    # Where the keys come from (one of them), unless a KeyProvider is injected for the issuer.
    jwks_file: str = ""
    jwks_url: str = ""
    # OIDC discovery: the JWKS URL is read from `<issuer>/.well-known/openid-configuration`.
    oidc_discovery: bool = False
    jwks_refresh_interval: float = 300.0
    # Least time between two fetches caused by tokens with a kid we do not have yet.
    jwks_cooldown: float = 30.0
    # How long the last good keys keep serving after the last successful fetch when the
    # endpoint fails; then every token of this issuer fails (closed) until a fetch succeeds.
    jwks_max_stale: float = 24 * 3600.0
    # Per-request timeout of an HTTPS fetch (the refresher thread's, never a request's).
    jwks_timeout: float = 5.0
    # Accept a token only from the mTLS peer it belongs to: its `cnf` `x5t#S256` (RFC 8705
    # §3.1) must be the peer certificate's thumbprint, or (without `cnf`) its `sub` must be the
    # peer's SPIFFE ID. A token copied off one workload is then useless from another.
    bind_to_peer: bool = False

    def __post_init__(self) -> None:  # noqa: C901 - its owner (issue 16 splits it); see docs/architecture.md
        if not self.issuer:
            raise ValueError("jwt issuer: 'issuer' is required")
        if not self.audiences or not all(isinstance(a, str) and a for a in self.audiences):
            raise ValueError(f"jwt issuer {self.issuer!r}: 'audiences' must be non-empty")
        if not self.algorithms:
            default = JWT_SVID_ALGORITHMS if self.jwt_svid else ASYMMETRIC_ALGORITHMS
            object.__setattr__(self, "algorithms", default)
        unknown = [a for a in self.algorithms if a not in _KEY_TYPES]
        if unknown:
            raise ValueError(f"jwt issuer {self.issuer!r}: unsupported algorithms {unknown}")
        symmetric = {a for a in self.algorithms if a in SYMMETRIC_ALGORITHMS}
        if symmetric and len(symmetric) != len(set(self.algorithms)):
            raise ValueError(
                f"jwt issuer {self.issuer!r}: HS* algorithms cannot be mixed with RS/ES/PS/EdDSA"
            )
        if self.leeway < 0 or self.leeway > 300:
            raise ValueError(f"jwt issuer {self.issuer!r}: 'leeway' must be within 0..300 s")
        if self.max_lifetime <= 0:
            raise ValueError(f"jwt issuer {self.issuer!r}: 'max_lifetime' must be positive")
        if self.jwks_cooldown < 0 or self.jwks_refresh_interval <= 0:
            raise ValueError(
                f"jwt issuer {self.issuer!r}: jwks_cooldown must be >= 0 and "
                "jwks_refresh_interval > 0"
            )
        if sum(map(bool, (self.jwks_file, self.jwks_url, self.oidc_discovery))) > 1:
            raise ValueError(
                f"jwt issuer {self.issuer!r}: set one of jwks_file, jwks_url, oidc_discovery"
            )
        if self.oidc_discovery and not self.issuer.startswith("https://"):
            raise ValueError(f"jwt issuer {self.issuer!r}: oidc_discovery needs an https issuer")
        if self.jwks_max_stale <= 0 or not 0 < self.jwks_timeout <= 30:
            raise ValueError(
                f"jwt issuer {self.issuer!r}: jwks_max_stale must be > 0 and jwks_timeout "
                "within (0, 30] s"
            )
        if self.jwks_url and not self.jwks_url.startswith("https://"):
            raise ValueError(f"jwt issuer {self.issuer!r}: jwks_url must be https://")
        if not isinstance(self.bind_to_peer, bool):
            raise ValueError(f"jwt issuer {self.issuer!r}: 'bind_to_peer' must be true or false")
        if self.jwt_svid:
            if not self.trust_domain:
                raise ValueError(f"jwt issuer {self.issuer!r}: jwt_svid needs 'trust_domain'")
            check_trust_domain_name(self.trust_domain)
            bad = [a for a in self.algorithms if a not in JWT_SVID_ALGORITHMS]
            if bad:
                raise ValueError(f"jwt issuer {self.issuer!r}: {bad} not allowed for JWT-SVIDs")


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    key: JwkKey
    kid: str | None
    jti: str
    token_hash: str
    exp: float


@dataclass(slots=True)
class JwtVerifier:
    issuers: Sequence[JwtIssuerConfig]
    keys: Mapping[str, KeyProvider]  # issuer -> keys
    header: str = "authorization"
    scheme: str = "Bearer"  # "" = the header holds the bare token
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    cache_size: int = 4096
    revoked_token_ids: frozenset[str] = frozenset()
    _by_issuer: dict[str, JwtIssuerConfig] = field(init=False)
    _cache: LRUCache[bytes, _Cached] = field(init=False)
    _lock: threading.Lock = field(init=False)

    def __post_init__(self) -> None:
        self.header = self.header.lower()
        self._by_issuer = {}
        for cfg in self.issuers:
            if cfg.issuer in self._by_issuer:
                raise ValueError(f"jwt issuer {cfg.issuer!r} configured twice")
            self._by_issuer[cfg.issuer] = cfg
        self._cache = LRUCache(maxsize=max(1, self.cache_size))
        self._lock = threading.Lock()

    def issuer_config(self, issuer: str) -> JwtIssuerConfig | None:
        return self._by_issuer.get(issuer)

    # -- extraction -----------------------------------------------------------------------

    def extract(self, headers: Mapping[str, str]) -> str | None:
        """The token in the configured header, None when absent; JwtError when ambiguous."""
        value = headers.get(self.header)
        if value is None:
            return None
        if len(value) > self.max_token_bytes + len(self.scheme) + 8:
            raise JwtError("token is too large")
        if "," in value:
            raise JwtError(f"{self.header} holds several values")
        token = value.strip(" \t")
        if self.scheme:
            scheme, _, token = token.partition(" ")
            if scheme.lower() != self.scheme.lower():
                raise JwtError(f"{self.header} is not a single {self.scheme} token")
            token = token.lstrip(" ")
        if not _TOKEN_RE.fullmatch(token):
            raise JwtError("token is not a compact JWS")
        return token

    # -- verification ---------------------------------------------------------------------

    def verify(self, token: str, now: float) -> Identity:
        if len(token) > self.max_token_bytes:
            raise JwtError("token is too large")
        # Exact bytes: a lossy encoding could make two different strings share a cache key.
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None:
            cfg = self._by_issuer.get(hit.identity.issuer)
            provider = self.keys.get(hit.identity.issuer)
            if (
                cfg is not None
                and provider is not None
                and now < hit.exp
                and provider.get_key(hit.kid) == hit.key
            ):
                self._check_revoked(hit.jti, hit.token_hash)
                return hit.identity
            with self._lock:
                self._cache.pop(digest, None)
        entry = self._verify(token, digest.hex(), now)
        self._check_revoked(entry.jti, entry.token_hash)
        if now < entry.exp:
            with self._lock:
                self._cache[digest] = entry
        return entry.identity

    def _check_revoked(self, jti: str, token_hash: str) -> None:
        if self.revoked_token_ids and (
            (jti and jti in self.revoked_token_ids) or token_hash in self.revoked_token_ids
        ):
            raise JwtError("token is revoked", Reason.REVOKED)

    def _verify(self, token: str, token_hash: str, now: float) -> _Cached:  # noqa: C901 - its owner (issue 16 splits it); see docs/architecture.md
        parts = token.split(".")
        if len(parts) != 3 or not _TOKEN_RE.fullmatch(token):
            raise JwtError("token is not a compact JWS")
        if not parts[2]:
            raise JwtError("token is unsigned")
        header = self._json_segment(parts[0], "header")
        for name in FORBIDDEN_HEADERS & header.keys():
            raise JwtError(f"token header {name!r} is not accepted")
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg or alg.lower() == "none":
            raise JwtError("token has no usable 'alg'")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not _KID_RE.fullmatch(kid)):
            raise JwtError("token 'kid' is malformed")
        claims = self._json_segment(parts[1], "payload")
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise JwtError("token has no 'iss'")
        cfg = self._by_issuer.get(iss)
        provider = self.keys.get(iss)
        if cfg is None or provider is None:
            raise JwtError("token issuer is not trusted")
        if alg not in cfg.algorithms:
            raise JwtError(f"alg {alg!r} is not allowed for this issuer")
        if cfg.jwt_svid:
            extra = header.keys() - JWT_SVID_HEADERS
            if extra:
                raise JwtError(
                    f"JWT-SVID header has fields other than alg/kid/typ: {sorted(extra)}"
                )
            if header.get("typ", "JWT") not in ("JWT", "JOSE"):
                raise JwtError("JWT-SVID 'typ' must be JWT or JOSE")
            if kid is None:
                raise JwtError("JWT-SVID has no 'kid'")
        key = provider.get_key(kid)
        if key is None:
            if not provider.ready:
                raise JwtError("signing keys of this issuer are not loaded")
            raise JwtError("token 'kid' is unknown to this issuer")
        kty, crv = _KEY_TYPES[alg]
        if key.kty != kty or (crv and key.crv != crv) or (key.alg and key.alg != alg):
            raise JwtError(f"key {kid!r} cannot verify alg {alg!r}")
        try:
            PyJWS().decode_complete(
                token, key.key, algorithms=[alg], options={"enforce_minimum_key_length": True}
            )
        except PyJWTError as exc:
            raise JwtError(f"signature verification failed: {type(exc).__name__}") from None
        exp = self._check_times(claims, cfg, now)
        self._check_audience(claims, cfg)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_LENGTH:
            raise JwtError("token has no usable 'sub'")
        if not (sub.isascii() and sub.isprintable()) or sub != sub.strip():
            # The subject becomes a header value and a log field: a validly signed CR/LF,
            # NUL or non-ASCII subject must never reach either.
            raise JwtError("token 'sub' must be printable ASCII without surrounding space")
        trust_domain = cfg.trust_domain
        if cfg.jwt_svid:
            try:
                sid = parse_workload_id(sub)
            except SpiffeIdError as exc:
                raise JwtError(f"JWT-SVID 'sub' is not a SPIFFE ID of a workload: {exc}") from None
            if sid.trust_domain != cfg.trust_domain:
                raise JwtError(
                    f"JWT-SVID trust domain {sid.trust_domain!r} does not belong to this issuer",
                    Reason.UNTRUSTED_TRUST_DOMAIN,
                    presented=sub,
                )
        elif sub[:7].lower() == "spiffe:":
            # Only JWT-SVID issuers may assert SPIFFE IDs; a plain IdP must not mint workloads.
            raise JwtError("a SPIFFE ID 'sub' is only accepted from a jwt_svid issuer")
        jti = claims.get("jti", "")
        if not isinstance(jti, str):
            raise JwtError("token 'jti' must be a string")
        identity = Identity(
            principal=sub,
            source=IdentitySource.JWT,
            trust_domain=trust_domain,
            issuer=iss,
            subject=sub,
            expires_at=exp,
            claims=MappingProxyType(claims),
        )
        return _Cached(identity, key, kid, jti, token_hash, exp)

    def _json_segment(self, segment: str, what: str) -> dict[str, Any]:
        try:
            raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise JwtError(f"token {what} is not base64url JSON") from None
        if not json_depth_ok(text, self.max_json_depth):
            raise JwtError(f"token {what} is nested too deeply")
        try:
            value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise JwtError(f"token {what} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise JwtError(f"token {what} is not a JSON object")
        return value

    @staticmethod
    def _check_times(claims: Mapping[str, Any], cfg: JwtIssuerConfig, now: float) -> float:
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise JwtError(f"token {name!r} must be a number")
        if "exp" not in claims:
            raise JwtError("token has no 'exp'")
        exp = float(claims["exp"])
        if now > exp + cfg.leeway:
            raise JwtError("token has expired")
        if "nbf" in claims and now + cfg.leeway < float(claims["nbf"]):
            raise JwtError("token is not yet valid (nbf)")
        start = now
        if "iat" in claims:
            iat = float(claims["iat"])
            if iat > now + cfg.leeway:
                raise JwtError("token is issued in the future (iat)")
            start = iat
        if exp - start > cfg.max_lifetime:
            raise JwtError("token lifetime exceeds the issuer's max_lifetime")
        return exp

    @staticmethod
    def _check_audience(claims: Mapping[str, Any], cfg: JwtIssuerConfig) -> None:
        aud = claims.get("aud")
        if isinstance(aud, str):
            auds: Iterable[Any] = (aud,)
        elif isinstance(aud, list) and 0 < len(aud) <= MAX_AUDIENCES:
            auds = aud
        else:
            raise JwtError("token has no usable 'aud'")
        if not all(isinstance(a, str) for a in auds):
            raise JwtError("token 'aud' must be strings")
        if not any(a in cfg.audiences for a in auds):
            raise JwtError("token audience is not accepted")


def _is_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) < 1e15
    except OverflowError:  # an int too large for a float
        return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_depth_ok(text: str, max_depth: int) -> bool:
    """Whether `text`'s arrays/objects nest at most `max_depth` deep (strings are skipped)."""
    if text.count("[") + text.count("{") <= max_depth:
        return True
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def check_peer_binding(
    identity: Identity, peer_principal: str | None, peer_cert_sha256: str | None
) -> None:
    """Raise JwtError unless the token belongs to the mTLS peer that presented it.

    `peer_principal` is the peer's verified SPIFFE ID (None when the peer has none);
    `peer_cert_sha256` the lowercase hex SHA-256 of its certificate's DER (None when Envoy did
    not forward it). A `cnf` `x5t#S256` is an explicit binding (RFC 8705 §3): when present it
    must match, whatever the `sub`. Without `cnf`, the `sub` must be the peer itself.
    """
    cnf = identity.claims.get("cnf")
    if cnf is not None:
        thumbprint = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
        if not isinstance(thumbprint, str):
            raise JwtError("token 'cnf' has no x5t#S256 certificate thumbprint")
        if peer_cert_sha256 is None:
            raise JwtError(
                "token is bound to a certificate (cnf x5t#S256) but no peer certificate was "
                "forwarded to compare it with"
            )
        want = base64.urlsafe_b64encode(bytes.fromhex(peer_cert_sha256)).rstrip(b"=").decode()
        if thumbprint != want:
            raise JwtError("token cnf x5t#S256 does not match the mTLS peer certificate")
        return
    if peer_principal is None or identity.subject != peer_principal:
        raise JwtError(
            "token is bound to the mTLS peer: it has no cnf x5t#S256 and its sub is not the "
            "peer's SPIFFE ID"
        )
