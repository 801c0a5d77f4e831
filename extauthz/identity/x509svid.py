"""X509-SVID checks on the peer certificate Envoy forwards (`attributes.source.certificate`).

Envoy has already verified the chain and the handshake; what is left for us is to make sure the
certificate is a *workload* certificate whose single SPIFFE ID is the principal Envoy reported.
The leaf rules of the X509-SVID standard, checked in this order:
- exactly one URI SAN (§2), equal to the principal, a SPIFFE ID with a path (§3.1, §5.2);
- not a CA: BasicConstraints cA false or absent (§4.1);
- a key usage extension is present (§4.3: "MUST be present"); without it the certificate could
  be used for anything, including signing other certificates in lax validators;
- no keyCertSign and no cRLSign (§4.3, §5.2), and digitalSignature set (§4.3);
- valid at `now`.

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

from extauthz.identity.spiffe import SpiffeId, SpiffeIdError, parse_workload_id
from extauthz.identity.xfcc import TrustedElement

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
    # None when the certificate has no key usage extension at all.
    key_usage: x509.KeyUsage | None
    not_before: float
    not_after: float
    # Lowercase hex SHA-256 of the DER encoding: what Envoy writes as XFCC `Hash=` and what
    # RFC 8705 `x5t#S256` is the base64url form of.
    sha256: str = ""


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
    except ValueError as exc:
        raise CertificateError(f"peer certificate has malformed basic constraints: {exc}") from None
    try:
        ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    except ValueError as exc:
        raise CertificateError(f"peer certificate has a malformed key usage: {exc}") from None
    return CertFacts(
        uri_sans=uris,
        is_ca=is_ca,
        key_usage=ku,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        sha256=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
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


_PEM_END_ENCODED = "-----END%20CERTIFICATE-----"


def check_forwarded_certificate(
    certs: CertCache, element: TrustedElement, now: float
) -> float | None:
    """Bind an XFCC element's `Cert=`/`Chain=`/`Hash=` to its `URI=`; return the forwarded
    certificate's notAfter (None when only a hash was forwarded).

    Envoy writes `Hash=` as the lowercase hex SHA-256 of the peer leaf's DER, `Cert=` as that
    leaf URL-encoded, and `Chain=` as the whole chain, leaf first. When they are present they
    must all describe one certificate, and that certificate must be an X509-SVID whose single
    URI SAN is the element's `URI=`: otherwise something between the client and us rewrote
    part of the element (or a SAN injected it), and none of it can be trusted.
    """
    cert = element.cert
    if element.chain:
        chain = element.chain
        if cert:
            if not chain.startswith(cert):
                raise CertificateError("XFCC Chain= does not start with the Cert= certificate")
        else:
            end = chain.find(_PEM_END_ENCODED)
            if end < 0:
                raise CertificateError("XFCC Chain= holds no complete certificate")
            end += len(_PEM_END_ENCODED)
            cert = chain[: end + 3] if chain[end : end + 3].upper() == "%0A" else chain[:end]
    if not cert:
        return None
    try:
        facts = certs.facts(cert)
    except CertificateError as exc:
        raise CertificateError(f"XFCC certificate: {exc}") from None
    if element.hash and facts.sha256 != element.hash:
        raise CertificateError("XFCC Hash= is not the SHA-256 of the forwarded certificate")
    try:
        check_svid(facts, element.uri, now)
    except CertificateError as exc:
        raise CertificateError(f"XFCC certificate does not match URI=: {exc}") from None
    return facts.not_after
