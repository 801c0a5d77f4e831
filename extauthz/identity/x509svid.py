"""X509-SVID checks on the peer certificate Envoy forwards (`attributes.source.certificate`).

Envoy has already verified the chain and the handshake; what is left for us is to make sure the
certificate is a *workload* certificate whose single SPIFFE ID is the principal Envoy reported.
The leaf rules of the X509-SVID standard, checked in this order:
- exactly one URI SAN (§2), equal to the principal, a SPIFFE ID with a path (§3.1, §5.2);
- not a CA: BasicConstraints cA false or absent (§4.1);
- a key usage extension is present (§4.3: "MUST be present"); without it the certificate could
  be used for anything, including signing other certificates in lax validators;
- no keyCertSign and no cRLSign (§4.3, §5.2), and digitalSignature set (§4.3);
- the key usage extension is critical (§4.3);
- an extended key usage, when present, has both serverAuth and clientAuth (§4.4);
- an empty subject comes with a critical SAN (§3.1, RFC 5280 §4.1.2.6);
- valid at `now`.
The chain itself (signatures, the trust domain's bundle, intermediates, name constraints) is
Envoy's to verify in the handshake: only the leaf reaches ext_authz.

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
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from extauthz.identity.spiffe import SpiffeId, SpiffeIdError, parse_workload_id
from extauthz.identity.xfcc import TrustedElement

# A leaf PEM is ~1-3 KB; URL-encoding roughly doubles it. Anything far larger is not a leaf.
MAX_ENCODED_CERT_LENGTH = 64 * 1024
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH.dotted_string
_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string


class CertificateError(ValueError):
    """The peer certificate is not an acceptable X509-SVID; the message says why."""


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What a parsed certificate says, independent of any request."""

    uri_sans: tuple[str, ...]
    is_ca: bool
    # None when the certificate has no key usage extension at all.
    key_usage: x509.KeyUsage | None
    not_before: float
    not_after: float
    # Lowercase hex SHA-256 of the DER encoding: what Envoy writes as XFCC `Hash=` and what
    # RFC 8705 `x5t#S256` is the base64url form of.
    sha256: str = ""
    key_usage_critical: bool = True
    # Dotted OIDs; None when the certificate has no extended key usage extension.
    extended_key_usage: tuple[str, ...] | None = None
    subject_empty: bool = False
    san_critical: bool = False


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
        extensions = list(cert.extensions)
    except ValueError as exc:  # a malformed or duplicated extension
        raise CertificateError(f"peer certificate has a malformed extension: {exc}") from None
    uris: tuple[str, ...] = ()
    san_critical = is_ca = ku_critical = False
    ku: x509.KeyUsage | None = None
    eku: tuple[str, ...] | None = None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            uris = tuple(value.get_values_for_type(x509.UniformResourceIdentifier))
            san_critical = ext.critical
        elif isinstance(value, x509.BasicConstraints):
            is_ca = bool(value.ca)
        elif isinstance(value, x509.KeyUsage):
            ku, ku_critical = value, ext.critical
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = tuple(oid.dotted_string for oid in value)
    return CertFacts(
        uri_sans=uris,
        is_ca=is_ca,
        key_usage=ku,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        sha256=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
        key_usage_critical=ku_critical,
        extended_key_usage=eku,
        subject_empty=len(cert.subject) == 0,
        san_critical=san_critical,
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
        sid = parse_workload_id(uri)
    except SpiffeIdError as exc:
        raise CertificateError(
            f"peer certificate URI SAN is not a SPIFFE ID of a workload: {exc}"
        ) from None
    if facts.is_ca:
        raise CertificateError("peer certificate is a CA certificate, not a leaf SVID")
    ku = facts.key_usage
    if ku is None:
        raise CertificateError("peer certificate has no key usage extension: not an X509-SVID")
    if ku.key_cert_sign or ku.crl_sign:
        raise CertificateError(
            "peer certificate may sign certificates or CRLs (keyCertSign/cRLSign): not a leaf SVID"
        )
    if not ku.digital_signature:
        raise CertificateError("peer certificate lacks the digitalSignature key usage")
    if not facts.key_usage_critical:
        raise CertificateError("peer certificate's key usage extension is not critical")
    eku = facts.extended_key_usage
    if eku is not None and not (_SERVER_AUTH in eku and _CLIENT_AUTH in eku):
        raise CertificateError(
            "peer certificate's extended key usage lacks serverAuth or clientAuth"
        )
    if facts.subject_empty and not facts.san_critical:
        raise CertificateError("peer certificate has an empty subject and a non-critical SAN")
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


def check_forwarded_certificate(
    certs: CertCache, element: TrustedElement, now: float
) -> float | None:
    """The certificate an XFCC element forwards (`Cert=` or the leaf of `Chain=`, already
    bound to `Hash=` by `xfcc.check_element`) must be an X509-SVID whose single URI SAN is the
    element's `URI=`; return its notAfter (None when no certificate was forwarded).

    A certificate that disagrees with `URI=` means something between the client and us
    rewrote part of the element (or a SAN injected it), and none of it can be trusted.
    """
    if not element.cert:
        return None
    try:
        facts = certs.facts(element.cert)
    except CertificateError as exc:
        raise CertificateError(f"XFCC certificate: {exc}") from None
    try:
        check_svid(facts, element.uri, now)
    except CertificateError as exc:
        raise CertificateError(f"XFCC certificate does not match URI=: {exc}") from None
    return facts.not_after
