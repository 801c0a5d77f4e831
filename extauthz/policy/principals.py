"""Who a rule names: SPIFFE IDs, segment-aware SPIFFE patterns, JWT issuer/subject/claims.

Shared by HTTP rules (compiled.py) and connection rules (connections.py), so both answer
"is this caller on the list?" the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import Identity, IdentitySource
from extauthz.policy.decls import JwtMatch


def jwt_matches(match: JwtMatch, identity: Identity) -> bool:
    if identity.source is not IdentitySource.JWT or identity.issuer != match.issuer:
        return False
    if match.subject and identity.subject != match.subject:
        return False
    for name, want in match.claims:
        got = identity.claims.get(name)
        if got == want and type(got) is type(want):
            continue
        if isinstance(got, list) and any(v == want and type(v) is type(want) for v in got):
            continue
        return False
    return True


@dataclass(frozen=True, slots=True)
class PrincipalSet:
    """Who a rule's allow or deny list names, resolved to SPIFFE IDs, patterns and JWTs."""

    exact: frozenset[str] = frozenset()
    patterns: tuple[SpiffePattern, ...] = ()
    anyone: bool = False
    jwt: tuple[JwtMatch, ...] = ()

    def __bool__(self) -> bool:
        return self.anyone or bool(self.exact) or bool(self.patterns) or bool(self.jwt)

    def contains(self, who: Identity | str) -> bool:
        principal = who.principal if isinstance(who, Identity) else who
        if self.anyone or principal in self.exact:
            return True
        if self.jwt and isinstance(who, Identity) and any(jwt_matches(m, who) for m in self.jwt):
            return True
        if not self.patterns:
            return False
        try:
            sid = parse_spiffe_id(principal)
        except SpiffeIdError:
            return False
        return any(p.matches(sid) for p in self.patterns)
