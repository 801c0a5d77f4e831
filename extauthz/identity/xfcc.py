"""A strict, quote-aware parser for Envoy's `x-forwarded-client-cert` header.

Format (Envoy docs): elements separated by `,`, each element a `;`-separated list of
`key=value` pairs; keys are case-insensitive; a value containing `,`, `;` or `=` is double-quoted
and a `"` inside a quoted value is written `\\"`. A client certificate's Subject is chosen by
whoever requested the certificate, so a naive `split(",")` lets a Subject such as
`"CN=x,URI=spiffe://td/admin"` forge an element: this parser never splits inside quotes and
rejects anything ambiguous (unterminated quotes, stray quotes, unquoted `=`, control characters,
empty elements or pairs, repeated single-valued keys) instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_LENGTH = 16 * 1024
DEFAULT_MAX_ELEMENTS = 16
# Keys Envoy may repeat inside one element (one pair per SAN).
_MULTI_VALUED = frozenset({"uri", "dns"})
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_OWS = " \t"


class XfccError(ValueError):
    """The header is malformed; the message says how."""


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One proxy's statement about the client certificate it saw. Keys are lowercase."""

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
    for ch in header:
        if ch != "\t" and (ord(ch) < 0x20 or ord(ch) == 0x7F):
            raise XfccError("header contains a control character")
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(header)
    while True:
        i = _skip_ows(header, i)
        key, i = _read_key(header, i)
        value, i = _read_value(header, i)
        pairs.append((key, value))
        i = _skip_ows(header, i)
        if i >= n or header[i] == ",":
            elements.append(_element(pairs))
            pairs = []
            if len(elements) > max_elements:
                raise XfccError(f"more than {max_elements} elements")
            if i >= n:
                return tuple(elements)
        elif header[i] != ";":  # pragma: no cover - _read_value stops only at , ; or end
            raise XfccError(f"unexpected {header[i]!r} at offset {i}")
        i += 1
        if _skip_ows(header, i) >= n:
            raise XfccError("header ends with a separator")


def _skip_ows(s: str, i: int) -> int:
    while i < len(s) and s[i] in _OWS:
        i += 1
    return i


def _read_key(s: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(s) and s[i] in _KEY_CHARS:
        i += 1
    if i == start:
        raise XfccError(f"empty or invalid key at offset {start}")
    if i >= len(s) or s[i] != "=":
        raise XfccError(f"key without '=' at offset {start}")
    return s[start:i].lower(), i + 1


def _read_value(s: str, i: int) -> tuple[str, int]:
    n = len(s)
    if i < n and s[i] == '"':
        out: list[str] = []
        i += 1
        while True:
            if i >= n:
                raise XfccError("unterminated quoted value")
            ch = s[i]
            if ch == "\\":
                if i + 1 >= n or s[i + 1] not in '"\\':
                    raise XfccError(f"invalid escape in quoted value at offset {i}")
                out.append(s[i + 1])
                i += 2
                continue
            if ch == '"':
                i += 1
                break
            out.append(ch)
            i += 1
        j = _skip_ows(s, i)
        if j < n and s[j] not in ",;":
            raise XfccError(f"unexpected text after quoted value at offset {i}")
        return "".join(out), i
    start = i
    while i < n and s[i] not in ",;":
        if s[i] in '"=\\':
            raise XfccError(f"unquoted value contains {s[i]!r} at offset {i}")
        i += 1
    return s[start:i].rstrip(_OWS), i


def _element(pairs: list[tuple[str, str]]) -> XfccElement:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and key not in _MULTI_VALUED:
            raise XfccError(f"key {key!r} repeated in one element")
        seen.add(key)
    return XfccElement(tuple(pairs))
