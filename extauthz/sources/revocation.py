"""The revocation list: identities and tokens cut off without a restart.

A small YAML file (`revocation_file` setting) that the server re-reads whenever its content
changes or on SIGHUP, like the policy directory:

    principals: [spiffe://prod.example/ns/shop/sa/compromised]
    token_ids: [3f1c...]      # a JWT's `jti`, or the lowercase sha256 hex of the whole token

A file that cannot be read or parsed keeps the previous list in force (and is logged); it never
empties the list, which would silently re-admit everything that was cut off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

MAX_BYTES = 4 * 1024 * 1024


class RevocationError(ValueError):
    """The revocation file is unusable; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Revocations:
    principals: frozenset[str] = frozenset()
    token_ids: frozenset[str] = frozenset()
    version: str = ""


def fingerprint(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        return f"error:{exc.strerror or exc}"


def load_revocations(path: Path) -> Revocations:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RevocationError(f"{path}: larger than {MAX_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise RevocationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not raw.strip():
        # Fail closed: an empty file is what a reload sees while the file is being rewritten
        # (truncated, not yet written), and taking it as "nothing is revoked" would let every
        # revoked caller back in until the next change. Clearing the list is explicit.
        raise RevocationError(f"{path}: empty (write 'principals: []' to clear the list)")
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise RevocationError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RevocationError(f"{path}: must be a mapping with 'principals' and 'token_ids'")
    unknown = sorted(set(data) - {"principals", "token_ids"})
    if unknown:
        raise RevocationError(f"{path}: unknown field(s) {unknown}")
    out: dict[str, frozenset[str]] = {}
    for key in ("principals", "token_ids"):
        values = data.get(key) or []
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise RevocationError(f"{path}: {key}: must be a list of non-empty strings")
        out[key] = frozenset(values)
    return Revocations(out["principals"], out["token_ids"], hashlib.sha256(raw).hexdigest()[:16])
