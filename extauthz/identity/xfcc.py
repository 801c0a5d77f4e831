"""A strict parser for Envoy's `x-forwarded-client-cert` header, and the rules that decide
which element (if any) a trusted proxy vouches for.

Format as Envoy writes it (docs: http_conn_man/headers.rst; writer:
`ConnectionManagerUtility::mutateXfccRequestHeader`): elements separated by `,`, each element a
`;`-separated list of `key=value` pairs, keys case-insensitive. `Subject`, `Cert` and `Chain` are
written double-quoted; `By`, `Hash`, `URI` and `DNS` are written *raw and unescaped* (Envoy has
a TODO about it). So:

* a quoted value can hold anything; its closing quote is the first `"` preceded by an even
  number of backslashes. The text between the quotes is kept verbatim: a Subject is an RFC 2253
  string with its own escapes (`\\,` `\\+` `\\"` `\\\\` `\\C3\\AB`), decoded by `parse_rfc2253`;
* a raw value ends at the next `,` or `;` and is *not trimmed*: `URI=spiffe://td/a ` is not
  `spiffe://td/a`. A raw value holding `"`, `=` or `\\` is ambiguous (no SPIFFE ID, DNS name or
  hex hash contains one) and the header is rejected;
* `By`, `Hash`, `URI` and `DNS` must be raw: a quoted `URI="spiffe://td/a"` could only come from
  a certificate whose SAN itself contains quotes, so unquoting it would forge an identity.

A client chooses its certificate's Subject and (with a lax CA) its SANs, so this parser never
splits inside quotes and rejects anything ambiguous (unterminated quotes, unquoted `=`, control
characters, empty elements or pairs, repeated single-valued keys) instead of guessing.
`trusted_element` then applies the binding rules to the rightmost element.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from extauthz.identity.spiffe import SpiffeId, SpiffeIdError, parse_workload_id
from extauthz.memo import Memo

DEFAULT_MAX_LENGTH = 16 * 1024
DEFAULT_MAX_ELEMENTS = 16
# Keys Envoy repeats inside one element: one pair per SAN (URI, DNS) or per URI SAN of its
# own certificate (By).
_MULTI_VALUED = frozenset({"uri", "dns", "by"})
# Keys Envoy writes raw; a quoted one did not come from Envoy's writer.
_RAW_ONLY = frozenset({"by", "hash", "uri", "dns"})
# Fixed internal patterns (no policy author writes these), linear by construction.
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_QUOTED = re.compile(r'((?:[^"\\]|\\.)*)"', re.DOTALL)
_RAW = re.compile(r"[^,;]*")
_RAW_AMBIGUOUS = re.compile(r'["=\\]')
_OWS = " \t"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The order in which Envoy writes the pairs of its own element (mutateXfccRequestHeader, with
# the details in the order HttpConnectionManagerConfig lists them). URI and DNS come last and
# are the only unescaped values a client controls, so a pair out of this order, or a key
# Envoy never writes, can only have been injected through a SAN.
_ENVOY_ORDER = {"by": 0, "hash": 1, "cert": 2, "chain": 3, "subject": 4, "uri": 5, "dns": 6}


class XfccError(ValueError):
    """The header is malformed, or its binding does not hold; the message says how."""


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One proxy's statement about the client certificate it saw. Keys are lowercase; values
    are exactly as written (quoted values without their quotes, escapes kept)."""

    pairs: tuple[tuple[str, str], ...]

    def values(self, key: str) -> tuple[str, ...]:
        key = key.lower()
        return tuple(v for k, v in self.pairs if k == key)

    def get(self, key: str) -> str | None:
        found = self.values(key)
        return found[0] if found else None

    def as_dict(self) -> Mapping[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for k, v in self.pairs:
            out[k] = (*out.get(k, ()), v)
        return out


def parse_xfcc(
    header: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[XfccElement, ...]:
    """Parse the whole header into elements (left to right) or raise XfccError."""
    if len(header) > max_length:
        raise XfccError(f"header longer than {max_length} characters")
    if _CONTROL.search(header):
        raise XfccError("header contains a control character")
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(header)
    while True:
        i = _skip_ows(header, i)
        key, i = _read_key(header, i)
        value, quoted, i = _read_value(header, i)
        if quoted and key in _RAW_ONLY:
            raise XfccError(f"{key.upper()} value is quoted; Envoy writes it raw")
        pairs.append((key, value))
        if i >= n or header[i] == ",":
            elements.append(_element(pairs))
            pairs = []
            if len(elements) > max_elements:
                raise XfccError(f"more than {max_elements} elements")
            if i >= n:
                return tuple(elements)
        i += 1  # past the , or ;
        if _skip_ows(header, i) >= n:
            raise XfccError("header ends with a separator")


def _skip_ows(s: str, i: int) -> int:
    while i < len(s) and s[i] in _OWS:
        i += 1
    return i


def _read_key(s: str, i: int) -> tuple[str, int]:
    found = _KEY.match(s, i)
    if found is None:
        raise XfccError(f"empty or invalid key at offset {i}")
    end = found.end()
    if end >= len(s) or s[end] != "=":
        raise XfccError(f"key without '=' at offset {i}")
    return found.group().lower(), end + 1


def _read_value(s: str, i: int) -> tuple[str, bool, int]:
    """(value, was it quoted, offset of the following `,` `;` or end)."""
    n = len(s)
    if i < n and s[i] == '"':
        # Up to the first quote not escaped by a backslash: an escaped character (RFC 2253
        # `\,`, `\"`, `\\`, `\C3`) never ends the value.
        found = _QUOTED.match(s, i + 1)
        if found is None:
            raise XfccError("unterminated quoted value")
        value = found.group(1)
        i = _skip_ows(s, found.end())
        if i < n and s[i] not in ",;":
            raise XfccError(f"unexpected text after quoted value at offset {i}")
        return value, True, i
    found = _RAW.match(s, i)
    assert found is not None  # [^,;]* always matches
    value = found.group()
    bad = _RAW_AMBIGUOUS.search(value)
    if bad is not None:
        raise XfccError(f"unquoted value contains {bad.group()!r} at offset {i + bad.start()}")
    return value, False, found.end()


def _element(pairs: list[tuple[str, str]]) -> XfccElement:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and key not in _MULTI_VALUED:
            raise XfccError(f"key {key!r} repeated in one element")
        seen.add(key)
    return XfccElement(tuple(pairs))


# -- which element a trusted proxy vouches for ------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedElement:
    """An element whose structure binds it to one certificate.

    `cert` is the forwarded leaf, URL-encoded as Envoy writes it (`Cert=`, or the first
    certificate of `Chain=`), "" when neither was forwarded; `hash` is `Hash=` ("" when
    absent). Whether that certificate is an X509-SVID for `uri` is checked by
    `x509svid.check_forwarded_certificate`."""

    spiffe_id: SpiffeId
    uri: str
    hash: str
    cert: str
    subject: str | None


def check_element(element: XfccElement) -> TrustedElement:
    """The rules every element Envoy writes satisfies, or XfccError naming the one broken.

    Envoy writes its element's pairs in a fixed order — `By`, `Hash`, `Cert`, `Chain`,
    `Subject`, `URI`, `DNS` — with URI and DNS last and unescaped. A client whose SAN holds
    `;` can append pairs, which then repeat a single-valued key or `URI=`, come out of that
    order (`Subject=` after `URI=`, `URI=` after `DNS=`), or use a key Envoy never writes.
    Then: exactly one `URI=`, a SPIFFE ID with a path; `Hash=` a lowercase hex SHA-256; and
    `Hash=`, `Cert=` and `Chain=` (leaf first) describing one certificate.
    """
    rank = 0
    for key, _ in element.pairs:
        at = _ENVOY_ORDER.get(key)
        if at is None:
            raise XfccError(f"the element has {key.upper()}=, which Envoy never writes")
        if at < rank:
            raise XfccError(
                f"the element has {key.upper()}= after URI/DNS or out of Envoy's order "
                "(a SAN with ';' may have injected it)"
            )
        rank = at
    uris = element.values("uri")
    if len(uris) != 1:
        raise XfccError(f"XFCC element must carry exactly one URI, has {len(uris)}")
    if not uris[0]:  # Envoy writes `URI=` for a verified certificate without a URI SAN
        raise XfccError("the certificate has no URI SAN: not a workload identity")
    try:
        sid = parse_workload_id(uris[0])
    except SpiffeIdError as exc:
        raise XfccError(f"XFCC URI is not a SPIFFE ID of a workload: {exc}") from None
    digest = element.get("hash")
    if digest is not None and not _SHA256_HEX.fullmatch(digest):
        raise XfccError("XFCC Hash= is not a lowercase hex SHA-256")
    cert = element.get("cert") or ""
    chain = element.get("chain") or ""
    if chain:
        leaf = _first_certificate(chain)
        if cert and leaf != cert:
            raise XfccError("XFCC Chain= does not start with the Cert= certificate")
        cert = leaf
    if cert and digest is not None and certificate_sha256(cert) != digest:
        raise XfccError("XFCC Hash= is not the SHA-256 of the forwarded certificate")
    return TrustedElement(sid, uris[0], digest or "", cert, element.get("subject"))


def trusted_element(elements: tuple[XfccElement, ...], proxy: str) -> TrustedElement:
    """The client identity the proxy `proxy` (the verified peer that sent the header) vouches
    for, or XfccError saying which rule failed.

    Envoy appends its element on the right, with `By=` naming its own certificate's URI SAN.
    Text a client appends through a SAN with `,` either lacks `By=<proxy>` in the rightmost
    element or makes an element to the left also claim `By=<proxy>`; both are refused, and the
    rightmost element must pass `check_element`. Only the rightmost element is read; elements
    to its left came from further away and are not trusted.
    """
    last = elements[-1]
    by = last.values("by")
    if not by:
        raise XfccError("the rightmost element has no By= naming the forwarding proxy")
    if proxy not in by:
        raise XfccError("the rightmost element's By= is not the forwarding proxy's identity")
    for earlier in elements[:-1]:
        if proxy in earlier.values("by"):
            raise XfccError(
                "an element left of the rightmost also names the forwarding proxy in By= "
                "(a SAN with ',' may have injected an element)"
            )
    return check_element(last)


def sidecar_element(elements: tuple[XfccElement, ...]) -> TrustedElement:
    """The peer a sidecar states with `forward_client_cert_details: SANITIZE_SET`: exactly one
    element (a second one can only come from a SAN with ','), passing `check_element`."""
    if len(elements) != 1:
        raise XfccError(
            f"XFCC has {len(elements)} elements; the sidecar sets exactly one "
            "(forward_client_cert_details: SANITIZE_SET)"
        )
    return check_element(elements[0])


class ElementCache:
    """`parse_xfcc` + `trusted_element` memoized by (header value, proxy): both depend on
    nothing else, and a gateway repeats the same few headers, so the per-request cost is a
    lookup. Bounded; a flood of distinct headers only clears it. Failures are kept too, as
    their message."""

    def __init__(
        self,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        size: int = 1024,
    ) -> None:
        self._max_length = max_length
        self._max_elements = max_elements
        self._memo: Memo[tuple[str, str], TrustedElement | str] = Memo(size)

    def element(self, value: str, proxy: str) -> TrustedElement:
        """The element `proxy` vouches for, or XfccError ("malformed XFCC: ..." when the
        header does not parse, "XFCC binding: ..." when a binding rule fails)."""
        key = (value, proxy)
        found = self._memo.get(key)
        if found is None:
            found = self._compute(value, proxy)
            if len(value) <= self._max_length:  # an oversized header is never kept
                self._memo.put(key, found)
        if isinstance(found, str):
            raise XfccError(found)
        return found

    def _compute(self, value: str, proxy: str) -> TrustedElement | str:
        try:
            elements = parse_xfcc(
                value, max_length=self._max_length, max_elements=self._max_elements
            )
        except XfccError as exc:
            return f"malformed XFCC: {exc}"
        try:
            return trusted_element(elements, proxy)
        except XfccError as exc:
            return f"XFCC binding: {exc}"


_PEM_BEGIN_ENCODED = "-----BEGIN%20CERTIFICATE-----"
_PEM_END_ENCODED = "-----END%20CERTIFICATE-----"


def _first_certificate(chain: str) -> str:
    """The leaf of an URL-encoded PEM chain, encoded exactly as it appears there."""
    end = chain.find(_PEM_END_ENCODED)
    if not chain.startswith(_PEM_BEGIN_ENCODED) or end < 0:
        raise XfccError("XFCC Chain= does not start with a complete certificate")
    end += len(_PEM_END_ENCODED)
    return chain[: end + 3] if chain[end : end + 3].upper() == "%0A" else chain[:end]


def certificate_sha256(encoded: str) -> str:
    """Lowercase hex SHA-256 of the DER of one URL-encoded PEM certificate (what Envoy writes as
    `Hash=`), without parsing the certificate. XfccError if it is not one PEM block."""
    text = _percent_decode(encoded)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if not text.startswith(begin) or text.count(begin) != 1 or not text.rstrip().endswith(end):
        raise XfccError("XFCC Cert= is not one PEM certificate")
    body = text[len(begin) : text.rindex(end)]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise XfccError("XFCC Cert= is not base64 PEM") from None
    return hashlib.sha256(der).hexdigest()


def _percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEXDIGITS or part[1] not in _HEXDIGITS:
            raise XfccError("XFCC certificate has a malformed %-escape")
        out.append(chr(int(part[:2], 16)) + part[2:])
    return "".join(out)


# -- RFC 2253 subjects, as Envoy prints them --------------------------------------------------

_RFC2253_SPECIAL = frozenset(',+"\\<>;=# ')
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def parse_rfc2253(text: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Decode a distinguished name in RFC 2253 string form into RDNs of (type, value), in the
    order written. `\\X` for a special character and `\\HH` hex pairs (UTF-8 bytes) are
    decoded; anything else is an error (ValueError) rather than a guess."""
    rdns: list[tuple[tuple[str, str], ...]] = []
    if text == "":
        return ()
    i, n = 0, len(text)
    rdn: list[tuple[str, str]] = []
    while True:
        eq = text.find("=", i)
        if eq <= i:
            raise ValueError(f"attribute without a type at offset {i}")
        attr = text[i:eq]
        if any(ch in ',+"\\;<>' for ch in attr):
            raise ValueError(f"malformed attribute type at offset {i}")
        value, i = _rfc2253_value(text, eq + 1)
        rdn.append((attr, value))
        if i >= n:
            rdns.append(tuple(rdn))
            return tuple(rdns)
        if text[i] == ",":
            rdns.append(tuple(rdn))
            rdn = []
        i += 1  # past , or +
        if i >= n:
            raise ValueError("distinguished name ends with a separator")


def _rfc2253_value(text: str, i: int) -> tuple[str, int]:
    out = bytearray()
    n = len(text)
    while i < n and text[i] not in ",+":
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                raise ValueError("dangling backslash")
            nxt = text[i + 1]
            if nxt in _HEXDIGITS:
                if i + 2 >= n or text[i + 2] not in _HEXDIGITS:
                    raise ValueError(f"bad hex escape at offset {i}")
                out.append(int(text[i + 1 : i + 3], 16))
                i += 3
                continue
            if nxt not in _RFC2253_SPECIAL:
                raise ValueError(f"bad escape at offset {i}")
            out += nxt.encode()
            i += 2
            continue
        if ch in '"<>;':
            raise ValueError(f"unescaped {ch!r} at offset {i}")
        out += ch.encode("utf-8")
        i += 1
    try:
        return out.decode("utf-8"), i
    except UnicodeDecodeError:
        raise ValueError("escaped bytes are not UTF-8") from None
