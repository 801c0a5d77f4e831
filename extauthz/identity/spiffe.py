"""SPIFFE IDs and segment-aware SPIFFE ID patterns.

Parsing follows the SPIFFE-ID standard strictly: anything a lenient parser would "fix up"
(case, percent-encoding, dot segments, a trailing slash) is a different string to some other
component in the mesh, and therefore a way to make one identity look like another.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class SpiffeIdError(ValueError):
    """The string is not a valid SPIFFE ID; the message says which rule it broke."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse `value` or raise SpiffeIdError naming the first rule it breaks."""
    if len(value) > MAX_ID_LENGTH:
        raise SpiffeIdError(f"longer than {MAX_ID_LENGTH} bytes")
    if not value.startswith(SCHEME):
        raise SpiffeIdError("scheme must be 'spiffe://' (lowercase)")
    rest = value[len(SCHEME) :]
    slash = rest.find("/")
    trust_domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    _check_trust_domain(trust_domain)
    if path:
        _check_path(path)
    return SpiffeId(trust_domain, path)


def parse_workload_id(value: str) -> SpiffeId:
    """Parse a SPIFFE ID that names a *workload*: one with a non-empty path.

    `spiffe://td` is a valid SPIFFE ID, but it names the trust domain itself (signing
    authorities carry it), never a workload: X509-SVID §3.1/§5.2 require validators to reject
    a leaf whose ID has no path. Every channel that yields a caller identity (peer certificate,
    source principal, XFCC `URI=`, JWT-SVID `sub`) parses with this, so a policy granting
    `"*"` or a trust-domain pattern can never be satisfied by a trust domain posing as a caller.
    """
    sid = parse_spiffe_id(value)
    if not sid.path:
        raise SpiffeIdError("SPIFFE ID has no path: it names a trust domain, not a workload")
    return sid


def check_trust_domain_name(name: str) -> str:
    """Validate a bare trust domain name (as written in configuration); return it."""
    _check_trust_domain(name)
    return name


def _check_trust_domain(td: str) -> None:
    if not td:
        raise SpiffeIdError("trust domain is empty")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"trust domain longer than {MAX_TRUST_DOMAIN_LENGTH} bytes")
    for ch in td:
        if ch not in _TRUST_DOMAIN_CHARS:
            if ch == ":":
                raise SpiffeIdError("trust domain must not contain a port")
            if ch == "@":
                raise SpiffeIdError("trust domain must not contain userinfo")
            if ch in "?#":
                raise SpiffeIdError("SPIFFE ID must not contain a query or fragment")
            raise SpiffeIdError(f"trust domain has a character outside [a-z0-9-._]: {ch!r}")


def _check_path(path: str) -> None:
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError("path has an empty segment or a trailing slash")
        if segment in (".", ".."):
            raise SpiffeIdError("path has a '.' or '..' segment")
        for ch in segment:
            if ch not in _PATH_CHARS:
                if ch == "%":
                    raise SpiffeIdError("path must not be percent-encoded")
                if ch in "?#":
                    raise SpiffeIdError("SPIFFE ID must not contain a query or fragment")
                raise SpiffeIdError(f"path has a character outside [a-zA-Z0-9-._]: {ch!r}")


@dataclass(frozen=True, slots=True)
class SpiffePattern:
    """A SPIFFE ID with `*` standing for exactly one whole path segment.

    A trailing `/**` stands for one or more further segments. Matching is on parsed segments,
    so `spiffe://td/ns/a/*` never matches `spiffe://td/ns/ab/x` nor `spiffe://td/ns/a`.
    """

    trust_domain: str
    segments: tuple[str, ...]
    open_ended: bool

    @classmethod
    def parse(cls, pattern: str) -> SpiffePattern:
        open_ended = pattern.endswith("/**")
        body = pattern[:-3] if open_ended else pattern
        probe = body.replace("*", "x")
        sid = parse_spiffe_id(probe)
        segments = tuple(body[len(SCHEME) + len(sid.trust_domain) :].split("/")[1:])
        for seg in segments:
            if "*" in seg and seg != "*":
                raise SpiffeIdError("'*' must stand for a whole path segment")
        if "*" in sid.trust_domain or "*" in body[: len(SCHEME) + len(sid.trust_domain)]:
            raise SpiffeIdError("the trust domain of a pattern cannot be a wildcard")
        return cls(sid.trust_domain, segments, open_ended)

    @property
    def is_exact(self) -> bool:
        return not self.open_ended and "*" not in self.segments

    def matches(self, sid: SpiffeId) -> bool:
        if sid.trust_domain != self.trust_domain:
            return False
        got = sid.segments
        want = self.segments
        if self.open_ended:
            if len(got) <= len(want):
                return False
        elif len(got) != len(want):
            return False
        return all(w in ("*", g) for w, g in zip(want, got[: len(want)], strict=True))

    def __str__(self) -> str:
        text = SCHEME + self.trust_domain + "".join("/" + s for s in self.segments)
        return text + "/**" if self.open_ended else text
