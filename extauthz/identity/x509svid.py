"""X509-SVID checks on the peer certificate Envoy forwards (`attributes.source.certificate`).

Envoy has already verified the chain and the handshake; what is left for us is to make sure the
certificate is a *workload* certificate whose single SPIFFE ID is the principal Envoy reported:
exactly one URI SAN, equal to the principal, a leaf (not a CA), and valid at `now`.

Parsing costs tens of microseconds, so the immutable facts extracted from a certificate are
kept in a small bounded LRU keyed by the SHA-256 of the encoded certificate string. Checks that
depend on the request (`principal`, `now`) are never cached.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from urllib.parse import unquote

from cachetools import LRUCache
from cryptography import x509

from extauthz.identity.spiffe import SpiffeId, SpiffeIdError, parse_spiffe_id

# A leaf PEM is ~1-3 KB; URL-encoding roughly doubles it. Anything far larger is not a leaf.
MAX_ENCODED_CERT_LENGTH = 64 * 1024
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


class CertificateError(ValueError):
    """The peer certificate is not an acceptable X509-SVID; the message says why."""


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What a parsed certificate says, independent of any request."""

    uri_sans: tuple[str, ...]
    is_ca: bool
    can_sign_certs: bool
    not_before: float
    not_after: float


def parse_certificate(encoded: str) -> CertFacts:
    """URL-decode and parse a PEM leaf certificate; raise CertificateError if unusable."""
    if len(encoded) > MAX_ENCODED_CERT_LENGTH:
        raise CertificateError("peer certificate is too large")
    try:
        pem = unquote(encoded, errors="strict")
    except UnicodeError:
        raise CertificateError("peer certificate is not valid URL-encoded text") from None
    if pem.count(_PEM_BEGIN) != 1:
        raise CertificateError("peer certificate must be exactly one PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise CertificateError(f"peer certificate does not parse: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    except ValueError as exc:  # malformed extension
        raise CertificateError(f"peer certificate has a malformed SAN: {exc}") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bool(bc.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        can_sign = bool(ku.key_cert_sign or ku.crl_sign)
    except x509.ExtensionNotFound:
        can_sign = False
    return CertFacts(
        uri_sans=uris,
        is_ca=is_ca,
        can_sign_certs=can_sign,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def check_svid(facts: CertFacts, principal: str, now: float) -> SpiffeId:
    """Check the facts against the reported principal at `now`; return the SPIFFE ID."""
    if len(facts.uri_sans) != 1:
        raise CertificateError(
            f"peer certificate must have exactly one URI SAN, has {len(facts.uri_sans)}"
        )
    uri = facts.uri_sans[0]
    if uri != principal:
        raise CertificateError("peer certificate URI SAN differs from the reported principal")
    try:
        sid = parse_spiffe_id(uri)
    except SpiffeIdError as exc:
        raise CertificateError(f"peer certificate URI SAN is not a SPIFFE ID: {exc}") from None
    if facts.is_ca or facts.can_sign_certs:
        raise CertificateError("peer certificate is a CA certificate, not a leaf SVID")
    if now < facts.not_before:
        raise CertificateError("peer certificate is not yet valid")
    if now >= facts.not_after:
        raise CertificateError("peer certificate has expired")
    return sid


class CertCache:
    """A bounded, thread-safe LRU of parsed certificates (or of the reason they failed)."""

    def __init__(self, maxsize: int = 1024) -> None:
        self._cache: LRUCache[bytes, CertFacts | CertificateError] = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()

    def facts(self, encoded: str) -> CertFacts:
        if len(encoded) > MAX_ENCODED_CERT_LENGTH:
            raise CertificateError("peer certificate is too large")
        key = hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            found = self._cache.get(key)
        if found is None:
            try:
                found = parse_certificate(encoded)
            except CertificateError as exc:
                found = exc
            with self._lock:
                self._cache[key] = found
        if isinstance(found, CertificateError):
            raise CertificateError(str(found))
        return found

    def __len__(self) -> int:
        return len(self._cache)
