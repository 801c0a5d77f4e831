"""What Envoy writes, modelled for tests: the XFCC element, its URL-encoded PEM and the RFC 2253
Subject. Each rule is cited from the Envoy source it was read in (see vectors/README.md); the
model is checked against recorded Envoy/OpenSSL output in test_xfcc_vectors.py, so a test that
builds headers with it builds what a real Envoy would send."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

# ConnectionInfoImplBase::urlEncodedPemEncodedPeerCertificate: exactly these replacements.
_PEM_REPLACEMENTS = (("\n", "%0A"), (" ", "%20"), ("+", "%2B"), ("/", "%2F"), ("=", "%3D"))

# The short names X509_NAME_print_ex prints with XN_FLAG_FN_SN.
_SHORT_NAMES = {
    NameOID.COMMON_NAME: "CN",
    NameOID.COUNTRY_NAME: "C",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.SERIAL_NUMBER: "serialNumber",
}


def url_encoded_pem(cert: x509.Certificate) -> str:
    """`Cert=` / `attributes.source.certificate` as Envoy writes them."""
    text = cert.public_bytes(Encoding.PEM).decode("ascii")
    for raw, encoded in _PEM_REPLACEMENTS:
        text = text.replace(raw, encoded)
    return text


def cert_hash(cert: x509.Certificate) -> str:
    """`Hash=`: lowercase hex SHA-256 of the DER (sha256PeerCertificateDigest)."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _escape_value(value: str) -> str:
    """ASN1_STRFLGS_RFC2253: UTF-8 bytes with the high bit and control bytes as \\XX, the RFC
    2253 specials backslash-escaped, a leading '#' or space and a trailing space escaped."""
    data = value.encode("utf-8")
    out: list[str] = []
    for i, byte in enumerate(data):
        ch = chr(byte)
        if byte >= 0x80 or byte < 0x20 or byte == 0x7F:
            out.append(f"\\{byte:02X}")
        elif ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == len(data) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def printed_entries(name: x509.Name) -> list[list[tuple[str, str]]]:
    """The RDNs as X509_NAME_print_ex prints them with XN_FLAG_DN_REV: the flat list of
    entries in encoded order, reversed — so the attributes *inside* a multi-valued RDN come
    out reversed too (`OU=x+CN=y` for a set encoded CN, OU)."""
    flat = [(index, _SHORT_NAMES.get(attr.oid, attr.oid.dotted_string), attr.value)
            for index, rdn in enumerate(name.rdns) for attr in rdn]
    out: list[list[tuple[str, str]]] = []
    last = None
    for index, short, value in reversed(flat):
        assert isinstance(value, str)
        if index != last:
            out.append([])
            last = index
        out[-1].append((short, value))
    return out


def rfc2253(name: x509.Name) -> str:
    """`Subject=` content: X509_NAME_print_ex(..., XN_FLAG_RFC2253) — entries last-first,
    RDNs joined by ',', the entries of a multi-valued RDN by '+'."""
    return ",".join("+".join(f"{short}={_escape_value(value)}" for short, value in rdn)
                    for rdn in printed_entries(name))


def xfcc_element(
    *,
    by: Sequence[str],
    cert: x509.Certificate | None = None,
    digest: str | None = None,
    include_cert: bool = False,
    chain: Sequence[x509.Certificate] = (),
    subject: bool = False,
    uri: bool = True,
    dns: bool = False,
    uri_sans: Sequence[str] | None = None,
    dns_sans: Sequence[str] | None = None,
) -> str:
    """One element as ConnectionManagerUtility::mutateXfccRequestHeader writes it: By= per URI
    SAN of the local certificate, Hash=, then Cert, Chain, Subject, URI (bare `URI=` when the
    peer has none), DNS — in that order (the order HttpConnectionManagerConfig pushes the
    set_current_client_cert_details), joined by ';', nothing escaped except in Cert/Chain.

    `uri_sans`/`dns_sans` override the certificate's SANs, for SANs a certificate library
    would refuse to encode (Envoy prints whatever the DER holds)."""
    pairs = [f"By={b}" for b in by]
    if digest is None and cert is not None:
        digest = cert_hash(cert)
    if digest:
        pairs.append(f"Hash={digest}")
    if include_cert and cert is not None:
        pairs.append(f'Cert="{url_encoded_pem(cert)}"')
    if chain:
        pairs.append('Chain="' + "".join(url_encoded_pem(c) for c in chain) + '"')
    if subject and cert is not None:
        pairs.append(f'Subject="{rfc2253(cert.subject)}"')
    if uri:
        uris = list(uri_sans) if uri_sans is not None else _sans(cert, x509.UniformResourceIdentifier)
        pairs += [f"URI={u}" for u in uris] if uris else ["URI="]
    if dns:
        names = list(dns_sans) if dns_sans is not None else _sans(cert, x509.DNSName)
        pairs += [f"DNS={d}" for d in names]
    return ";".join(pairs)


def _sans(cert: x509.Certificate | None, kind: type[x509.GeneralName]) -> list[str]:
    if cert is None:
        return []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(kind)]  # type: ignore[call-overload]


def append_forward(existing: str | None, element: str) -> str:
    """APPEND_FORWARD: the proxy's element goes last, after ',' (no space)."""
    return element if not existing else f"{existing},{element}"
