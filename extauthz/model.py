"""The vocabulary of the pure core: what a check is about and what it decided.

Everything here is plain data. The gRPC edge (`transport/grpc_proto.py`) turns a CheckRequest into a
`Request`; the pipeline turns a `Request` into a `Decision`; the edges turn a `Decision` into a
CheckResponse, a span, a log line and metrics. Nothing in this module knows about any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType

EMPTY: Mapping[str, str] = MappingProxyType({})


class Reason(StrEnum):
    """Why a decision came out as it did.

    The values are stable: they are metric labels, decision-log fields and the
    `x-extauthz-reason` header, so renaming one breaks dashboards and alerts.
    """

    ALLOWED = "allowed"
    DRY_RUN = "dry_run_would_deny"
    NO_IDENTITY = "no_identity"
    INVALID_IDENTITY = "invalid_identity"
    UNTRUSTED_TRUST_DOMAIN = "untrusted_trust_domain"
    REVOKED = "revoked"
    NO_MATCHING_RULE = "no_matching_rule"
    # A rule of the route names the caller, but its `headers:` or `when:` condition failed
    # for this request; the decision names the rule and the condition.
    CONDITION_NOT_MET = "condition_not_met"
    PRINCIPAL_NOT_ALLOWED = "principal_not_allowed"
    DENIED_BY_RULE = "denied_by_rule"
    MALFORMED_REQUEST = "malformed_request"
    AMBIGUOUS_PATH = "ambiguous_path"
    # A method-override header names another method than the request's (never honoured).
    METHOD_OVERRIDE = "method_override"
    RATE_LIMITED = "rate_limited"
    POLICY_NOT_LOADED = "policy_not_loaded"
    # The rate-limit backend (Redis) failed and the failure mode is `closed`: a 503, not a 429.
    RATELIMIT_UNAVAILABLE = "ratelimit_unavailable"
    INTERNAL_ERROR = "internal_error"


class Outcome(Enum):
    """The four answers a caller can see, each with its HTTP status.

    503 is kept apart from 401/403 on purpose: an outage of extauthz must never look like a
    policy denial to an operator or a client (fail closed, but say why).
    """

    ALLOW = 200
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    RATE_LIMITED = 429
    UNAVAILABLE = 503

    @property
    def http_status(self) -> int:
        return self.value


class IdentitySource(StrEnum):
    MTLS = "mtls"
    XFCC = "xfcc"
    JWT = "jwt"


@dataclass(frozen=True, slots=True)
class Request:
    """The parts of Envoy's CheckRequest that decisions may depend on.

    `path` is the raw `:path` as Envoy sent it (query included); normalization belongs to
    the policy matcher, so that every rule sees one canonical form.
    """

    method: str = ""
    host: str = ""
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    source_principal: str = ""
    peer_certificate: str = ""
    source_address: str = ""
    context_extensions: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    is_http: bool = True
    # Where the connection arrived (the Envoy listener's address): what a network (TCP) check
    # is decided by, with the SNI in `host`. 0 / "" when Envoy did not say.
    destination_port: int = 0
    destination_address: str = ""
    # Which edge asked ("grpc" or "http"): spans name the protocol the check really came in on.
    transport: str = "grpc"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified workload identity. Only ever built after verification succeeded."""

    principal: str
    source: IdentitySource
    trust_domain: str
    issuer: str = ""
    subject: str = ""
    # When the credential stops being valid (cert notAfter / JWT exp), seconds since epoch.
    # Caches never keep a decision past this instant.
    expires_at: float | None = None
    claims: Mapping[str, object] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True, slots=True)
class IdentityFailure:
    """A credential was presented but could not be trusted: a 401, never a guess."""

    reason: Reason
    detail: str
    source: IdentitySource | None = None
    # The identity that was presented and refused (revoked, untrusted trust domain), so the
    # decision log can name who keeps trying. Never a token.
    presented: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: Reason
    detail: str = ""
    rule: str = ""
    identity: Identity | None = None
    policy_version: str = ""
    # Extra response headers for the caller (www-authenticate, retry-after, ratelimit-*).
    headers: tuple[tuple[str, str], ...] = ()
    # True when an enforce-mode evaluation would have denied but a dry-run rule let it pass.
    dry_run: bool = False
    # For a dry-run decision: the rule that actually allowed the request, if any.
    allow_rule: str = ""
    # For a 401: which source's credential failed, and the identity it presented (if any).
    failure_source: IdentitySource | None = None
    presented_principal: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @property
    def principal(self) -> str:
        return self.identity.principal if self.identity is not None else ""
