"""Who is calling: turn a Request into a verified Identity, an IdentityFailure, or nothing.

Sources are tried in the configured order (default: XFCC from a trusted proxy, then JWT, then
the mTLS peer). A source that finds no credential says nothing (None) and the next one is
asked; a source that finds a credential it cannot trust fails the whole resolution — a bad
credential is never silently replaced by another one. See docs/identity.md.

Things worth knowing that are not failures (e.g. "an XFCC header from an untrusted peer was
ignored") are *notes*: `resolve_detailed()` returns them next to the result, and `resolve()`
puts them on the Identity under the reserved claim key `NOTES_CLAIM` ("_notes").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from extauthz.identity.jwt import (
    DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_TOKEN_BYTES,
    JwtError,
    JwtIssuerConfig,
    JwtVerifier,
    KeyProvider,
    check_peer_binding,
)
from extauthz.identity.spiffe import SpiffeIdError, check_trust_domain_name, parse_workload_id
from extauthz.identity.x509svid import (
    CertCache,
    CertificateError,
    check_forwarded_certificate,
    check_svid,
)
from extauthz.identity.xfcc import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_LENGTH,
    ElementCache,
    XfccError,
)
from extauthz.memo import Memo
from extauthz.model import Identity, IdentityFailure, IdentitySource, Reason, Request

MAX_PRINCIPAL_LENGTH = 2048
NOTES_CLAIM = "_notes"
SOURCE_NAMES = ("xfcc", "jwt", "mtls")


def _strings(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    # Empty means "any syntactically valid trust domain"; production configs should list them.
    trust_domains: frozenset[str] = field(default_factory=frozenset)
    # Which sources are consulted, first match wins. A name left out disables that source.
    order: tuple[str, ...] = SOURCE_NAMES
    # mTLS: refuse a principal Envoy reports without the peer certificate to check it against.
    require_peer_certificate: bool = False
    cert_cache_size: int = 1024
    # XFCC: honoured only when the verified mTLS peer is one of these SPIFFE IDs.
    trusted_proxies: frozenset[str] = field(default_factory=frozenset)
    xfcc_header: str = "x-forwarded-client-cert"
    xfcc_max_bytes: int = DEFAULT_MAX_LENGTH
    xfcc_max_elements: int = DEFAULT_MAX_ELEMENTS
    # JWT / JWT-SVID.
    jwt_issuers: tuple[JwtIssuerConfig, ...] = ()
    jwt_header: str = "authorization"
    jwt_scheme: str = "Bearer"
    jwt_max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    jwt_max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    jwt_cache_size: int = 4096
    # Revocation: principals (any source), and token ids (JWT `jti`, or sha256 hex of the token).
    revoked_principals: frozenset[str] = field(default_factory=frozenset)
    revoked_token_ids: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in self.order:
            if name not in SOURCE_NAMES:
                raise ValueError(f"identity.order: unknown source {name!r}")
        if len(set(self.order)) != len(self.order):
            raise ValueError("identity.order: a source is listed twice")
        for td in self.trust_domains:
            check_trust_domain_name(td)
        for proxy in self.trusted_proxies:
            parse_workload_id(proxy)
        for issuer in self.jwt_issuers:
            if (
                issuer.jwt_svid
                and self.trust_domains
                and issuer.trust_domain not in (self.trust_domains)
            ):
                raise ValueError(
                    f"jwt issuer {issuer.issuer!r}: trust domain {issuer.trust_domain!r} "
                    "is not in identity.trust_domains"
                )
        if self.xfcc_header != self.xfcc_header.lower() or not self.xfcc_header:
            raise ValueError("identity.xfcc.header must be a lowercase header name")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> IdentityConfig:
        """Build from the `identity:` section of the server config (see docs/identity.md)."""
        data = dict(data)
        xfcc = dict(data.pop("xfcc", None) or {})
        jwt = dict(data.pop("jwt", None) or {})
        issuers = [_issuer_from_mapping(i) for i in jwt.pop("issuers", None) or ()]
        kwargs: dict[str, Any] = {}
        for key in ("trust_domains", "trusted_proxies", "revoked_principals", "revoked_token_ids"):
            if key in data:
                kwargs[key] = _strings(_str_list(data.pop(key), key))
        if "order" in data:
            kwargs["order"] = tuple(_str_list(data.pop("order"), "order"))
        for key in ("require_peer_certificate", "cert_cache_size"):
            if key in data:
                kwargs[key] = data.pop(key)
        for key in ("header", "max_bytes", "max_elements"):
            if key in xfcc:
                kwargs[f"xfcc_{key}"] = xfcc.pop(key)
        for key in ("header", "scheme", "max_token_bytes", "max_json_depth", "cache_size"):
            if key in jwt:
                kwargs[f"jwt_{key}"] = jwt.pop(key)
        leftover = [*data, *(f"xfcc.{k}" for k in xfcc), *(f"jwt.{k}" for k in jwt)]
        if leftover:
            raise ValueError(f"identity: unknown keys {sorted(leftover)}")
        return cls(jwt_issuers=tuple(issuers), **kwargs)


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"identity.{name} must be a list of strings")
    return list(value)


def _issuer_from_mapping(raw: object) -> JwtIssuerConfig:
    if not isinstance(raw, Mapping):
        raise ValueError("identity.jwt.issuers entries must be mappings")
    item = dict(raw)
    if "audiences" in item:
        item["audiences"] = frozenset(_str_list(item["audiences"], "jwt.issuers.audiences"))
    if "algorithms" in item:
        item["algorithms"] = tuple(_str_list(item["algorithms"], "jwt.issuers.algorithms"))
    try:
        return JwtIssuerConfig(**item)
    except TypeError as exc:
        raise ValueError(f"identity.jwt.issuers: {exc}") from None


@dataclass(frozen=True, slots=True)
class Resolution:
    result: Identity | IdentityFailure | None
    notes: tuple[str, ...] = ()


class Source(Protocol):
    name: str

    def resolve(
        self, request: Request, now: float, notes: list[str]
    ) -> Identity | IdentityFailure | None: ...


def _fail(reason: Reason, detail: str, source: IdentitySource) -> IdentityFailure:
    return IdentityFailure(reason, detail, source)


class MtlsSource:
    """The peer's X509-SVID: Envoy's principal, checked against the forwarded certificate."""

    name = "mtls"

    def __init__(self, config: IdentityConfig, cert_cache: CertCache | None = None) -> None:
        self._require_cert = config.require_peer_certificate
        self._certs = cert_cache if cert_cache is not None else CertCache(config.cert_cache_size)

    @property
    def certs(self) -> CertCache:
        return self._certs

    def resolve(
        self, request: Request, now: float, notes: list[str] | None = None
    ) -> Identity | IdentityFailure | None:
        principal = request.source_principal
        cert = request.peer_certificate
        if not principal and not cert:
            return None
        if len(principal) > MAX_PRINCIPAL_LENGTH:
            return _fail(Reason.INVALID_IDENTITY, "peer principal is too long", IdentitySource.MTLS)
        expires_at: float | None = None
        if cert:
            try:
                facts = self._certs.facts(cert)
                sid = check_svid(facts, principal, now)
            except CertificateError as exc:
                return _fail(Reason.INVALID_IDENTITY, str(exc), IdentitySource.MTLS)
            expires_at = facts.not_after
        else:
            if self._require_cert:
                return _fail(
                    Reason.INVALID_IDENTITY,
                    "peer certificate was not forwarded (include_peer_certificate)",
                    IdentitySource.MTLS,
                )
            try:
                sid = parse_workload_id(principal)
            except SpiffeIdError as exc:
                # Envoy falls back to a DNS SAN or the subject DN when the certificate has no
                # URI SAN: such a principal is not a workload identity.
                return _fail(
                    Reason.INVALID_IDENTITY,
                    f"peer principal is not a SPIFFE ID: {exc}",
                    IdentitySource.MTLS,
                )
        return Identity(
            principal=principal,
            source=IdentitySource.MTLS,
            trust_domain=sid.trust_domain,
            expires_at=expires_at,
        )


class XfccSource:
    """The client identity a trusted proxy forwarded in the rightmost XFCC element."""

    name = "xfcc"

    def __init__(self, config: IdentityConfig, mtls: MtlsSource) -> None:
        self._config = config
        self._mtls = mtls
        self._elements = ElementCache(
            max_length=config.xfcc_max_bytes, max_elements=config.xfcc_max_elements
        )

    def resolve(
        self, request: Request, now: float, notes: list[str]
    ) -> Identity | IdentityFailure | None:
        cfg = self._config
        value = request.headers.get(cfg.xfcc_header)
        if value is None:
            return None
        peer = self._mtls.resolve(request, now)
        # Noted only when proxies are trusted at all: behind a plain sidecar (which sets XFCC
        # on every request) the note would be on every line and mean nothing (issue 19).
        if not isinstance(peer, Identity):
            if cfg.trusted_proxies:
                notes.append(f"{cfg.xfcc_header} ignored: the peer has no verified mTLS identity")
            return None
        if peer.principal not in cfg.trusted_proxies:
            if cfg.trusted_proxies:
                notes.append(f"{cfg.xfcc_header} ignored: the peer is not a trusted proxy")
            return None
        if peer.principal in cfg.revoked_principals:
            return _fail(Reason.REVOKED, "the forwarding proxy is revoked", IdentitySource.XFCC)
        try:
            element = self._elements.element(value, peer.principal)
            cert_expiry = check_forwarded_certificate(self._mtls.certs, element, now)
        except XfccError as exc:
            return _fail(Reason.INVALID_IDENTITY, str(exc), IdentitySource.XFCC)
        except CertificateError as exc:
            return _fail(Reason.INVALID_IDENTITY, f"XFCC binding: {exc}", IdentitySource.XFCC)
        expiry = peer.expires_at
        if cert_expiry is not None:
            expiry = cert_expiry if expiry is None else min(expiry, cert_expiry)
        return Identity(
            principal=element.uri,
            source=IdentitySource.XFCC,
            trust_domain=element.spiffe_id.trust_domain,
            # The forwarded statement is only as good as the proxy's own credential (and the
            # forwarded certificate, when there is one).
            expires_at=expiry,
            claims=MappingProxyType({"proxy": peer.principal}),
        )


class JwtSource:
    name = "jwt"

    def __init__(self, verifier: JwtVerifier, mtls: MtlsSource | None = None) -> None:
        self._verifier = verifier
        # The peer a token may be bound to (issuers with bind_to_peer).
        self._mtls = mtls if mtls is not None else MtlsSource(IdentityConfig())

    @property
    def header(self) -> str:
        return self._verifier.header

    def resolve(
        self, request: Request, now: float, notes: list[str]
    ) -> Identity | IdentityFailure | None:
        try:
            token = self._verifier.extract(request.headers)
            if token is None:
                return None
            identity = self._verifier.verify(token, now)
            cfg = self._verifier.issuer_config(identity.issuer)
            if cfg is not None and cfg.bind_to_peer:
                self._check_bound(identity, request, now)
            return identity
        except JwtError as exc:
            return IdentityFailure(exc.reason, exc.detail, IdentitySource.JWT, exc.presented)

    def _check_bound(self, identity: Identity, request: Request, now: float) -> None:
        """Checked on every request, never cached: the same token from another peer fails."""
        peer = self._mtls.resolve(request, now)
        sha256: str | None = None
        if request.peer_certificate:
            try:
                sha256 = self._mtls.certs.facts(request.peer_certificate).sha256
            except CertificateError as exc:
                raise JwtError(f"token is bound to the mTLS peer: {exc}") from None
        check_peer_binding(
            identity, peer.principal if isinstance(peer, Identity) else None, sha256
        )


# Entries of the per-resolver memo of certificate-less mTLS answers (see IdentityResolver).
PRINCIPAL_MEMO_SIZE = 1024


class IdentityResolver:
    """Runs the sources in order. See the module docstring.

    Hot path: a request with a principal, no peer certificate and none of the headers a
    source reads (XFCC, the JWT header) is answered from the principal alone — the answer then
    depends only on that string and on this resolver's fixed configuration (trust domains,
    revocations, require_peer_certificate), never on time or other request fields. Such answers
    are memoized in a small bounded dict (FIFO eviction). A new revocation list means a new
    resolver, hence a new, empty memo. The memo is only used when every source is one of the
    built-in ones, whose behaviour in that case is known.
    """

    def __init__(
        self,
        sources: Iterable[Source],
        config: IdentityConfig | None = None,
        *,
        memo_size: int = PRINCIPAL_MEMO_SIZE,
    ) -> None:
        self._sources = tuple(sources)
        self._config = config if config is not None else IdentityConfig()
        names = {s.name for s in self._sources}
        self._xfcc_disabled = "xfcc" not in names
        # Token headers: when one is present the answer depends on more than the peer.
        self._xfcc_header = self._config.xfcc_header
        self._jwt_headers = tuple(
            {s.header for s in self._sources if isinstance(s, JwtSource)} - {self._xfcc_header}
        )
        self._trusted_proxies = self._config.trusted_proxies
        builtin = all(isinstance(s, MtlsSource | XfccSource | JwtSource) for s in self._sources)
        self._memo_size = memo_size if builtin else 0
        # (principal, certificate, XFCC present) -> (answer, valid until or None).
        self._memo: Memo[
            tuple[str, str, bool], tuple[Identity | IdentityFailure | None, float | None]
        ] = Memo(self._memo_size)

    @classmethod
    def from_config(
        cls,
        config: IdentityConfig,
        *,
        keys: Mapping[str, KeyProvider] | None = None,
        memo_size: int = PRINCIPAL_MEMO_SIZE,
    ) -> IdentityResolver:
        """Build the sources. `keys` holds each configured JWT issuer's key set: fetching
        keys is edge I/O, so the caller builds and owns them (sources/jwks.py's KeySets) and
        this core only reads them. An issuer without one is a configuration error."""
        providers: Mapping[str, KeyProvider] = keys or {}
        missing = [i.issuer for i in config.jwt_issuers if i.issuer not in providers]
        if missing:
            raise ValueError(f"jwt issuer {missing[0]!r}: no key set was given for it")
        mtls = MtlsSource(config)
        available: dict[str, Source] = {"mtls": mtls, "xfcc": XfccSource(config, mtls)}
        if config.jwt_issuers:
            verifier = JwtVerifier(
                issuers=config.jwt_issuers,
                keys=providers,
                header=config.jwt_header,
                scheme=config.jwt_scheme,
                max_token_bytes=config.jwt_max_token_bytes,
                max_json_depth=config.jwt_max_json_depth,
                cache_size=config.jwt_cache_size,
                revoked_token_ids=config.revoked_token_ids,
            )
            available["jwt"] = JwtSource(verifier, mtls)
        sources = [available[name] for name in config.order if name in available]
        return cls(sources, config, memo_size=memo_size)

    def resolve(self, request: Request, now: float) -> Identity | IdentityFailure | None:
        if self._memo_size:
            headers = request.headers
            for name in self._jwt_headers:
                if name in headers:
                    break
            else:
                xfcc = self._xfcc_header in headers
                if not xfcc or request.source_principal not in self._trusted_proxies:
                    return self._memoized(request, now, xfcc)
        return self._resolve_fully(request, now)

    def _resolve_fully(self, request: Request, now: float) -> Identity | IdentityFailure | None:
        resolution = self.resolve_detailed(request, now)
        result = resolution.result
        if resolution.notes and isinstance(result, Identity):
            claims = {**result.claims, NOTES_CLAIM: resolution.notes}
            return replace(result, claims=MappingProxyType(claims))
        return result

    def _memoized(
        self, request: Request, now: float, xfcc: bool
    ) -> Identity | IdentityFailure | None:
        """`resolve()` when no JWT is presented and any XFCC header cannot be honoured (the
        peer is not a trusted proxy). The answer then depends only on the principal, the
        certificate, whether an XFCC header is present (for the note) and on time only
        through the certificate's validity, so it is memoized until the certificate's
        notAfter. Only successes with a certificate are kept (failures may be time-based);
        without a certificate every answer is time-invariant."""
        key = (request.source_principal, request.peer_certificate, xfcc)
        memo = self._memo
        found = memo.get(key)
        if found is not None:
            answer, until = found
            if until is None or now < until:
                return answer
        answer = self._resolve_fully(request, now)
        if len(key[0]) > MAX_PRINCIPAL_LENGTH:
            return answer
        if key[1]:
            if not isinstance(answer, Identity) or answer.expires_at is None:
                return answer
            entry: tuple[Identity | IdentityFailure | None, float | None] = (
                answer,
                answer.expires_at,
            )
        else:
            entry = (answer, None)
        memo.put(key, entry)
        return answer

    def resolve_detailed(self, request: Request, now: float) -> Resolution:
        notes: list[str] = []
        result = self._run_sources(request, now, notes)
        return Resolution(result, tuple(notes))

    def _run_sources(
        self, request: Request, now: float, notes: list[str]
    ) -> Identity | IdentityFailure | None:
        if self._xfcc_disabled and self._config.xfcc_header in request.headers:
            notes.append(f"{self._config.xfcc_header} ignored: XFCC is not enabled")
        for source in self._sources:
            found = source.resolve(request, now, notes)
            if found is not None:
                return self._admit(found, request) if isinstance(found, Identity) else found
        return None

    def _admit(self, identity: Identity, request: Request) -> Identity | IdentityFailure:
        cfg = self._config
        if (
            identity.source is IdentitySource.JWT
            and cfg.revoked_principals
            and request.source_principal in cfg.revoked_principals
        ):
            # A revoked workload is cut off whatever credential it forwards (as a revoked
            # XFCC proxy is): a stolen or still-valid token does not keep it in.
            return IdentityFailure(
                Reason.REVOKED,
                "the forwarding peer is revoked",
                IdentitySource.JWT,
                presented=request.source_principal,
            )
        if (
            cfg.trust_domains
            and identity.trust_domain
            and identity.trust_domain not in cfg.trust_domains
        ):
            return IdentityFailure(
                Reason.UNTRUSTED_TRUST_DOMAIN,
                f"trust domain {identity.trust_domain!r} is not trusted",
                identity.source,
                presented=identity.principal,
            )
        if identity.principal in cfg.revoked_principals:
            return IdentityFailure(
                Reason.REVOKED, "principal is revoked", identity.source, identity.principal
            )
        return identity


_TOKENISH = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def _quoted(text: str, limit: int = 200) -> str:
    text = _TOKENISH.sub("[token]", text)
    clean = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in text)
    return clean[:limit]


# Certificate failures get their own challenge scheme: RFC 6750's Bearer/invalid_token would
# tell the caller to fix a token it never sent. No registered HTTP authentication scheme covers
# TLS client certificates, so this is a private one (RFC 9110 §11.1 allows any token).
CERTIFICATE_SCHEME = "mTLS"
_CERTIFICATE_SOURCES = frozenset({IdentitySource.MTLS, IdentitySource.XFCC})


def www_authenticate(failure: IdentityFailure | None, realm: str = "extauthz") -> str:
    """The `www-authenticate` value for a 401. Never echoes a token.

    No credential: a bare `Bearer realm="…"` (RFC 6750 §3.1: no error code). A bad token, or a
    failure of unknown source: `Bearer realm="…", error="invalid_token", error_description="…"`.
    A bad peer certificate or forwarded (XFCC) certificate:
    `mTLS realm="…", error="invalid_certificate", error_description="…"`.
    """
    realm_value = f'realm="{_quoted(realm, 100)}"'
    if failure is None or failure.reason is Reason.NO_IDENTITY:
        return f"Bearer {realm_value}"  # no credential presented: no error code
    description = f'error_description="{_quoted(failure.detail)}"'
    if failure.source in _CERTIFICATE_SOURCES:
        return f'{CERTIFICATE_SCHEME} {realm_value}, error="invalid_certificate", {description}'
    return f'Bearer {realm_value}, error="invalid_token", {description}'
