"""Load the recorded vectors (JSON data files next to this module; see vectors/README.md)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

DIR = Path(__file__).parent / "vectors"


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DIR / name).read_text(encoding="utf-8"))
    for entry in data.get("vectors", []):
        assert entry.get("source"), f"{name}: a vector without its upstream source: {entry}"
    return data


def spiffe_ids(kind: str = "id") -> list[dict[str, Any]]:
    return [v for v in load("spiffe_ids.json")["vectors"] if v["kind"] == kind]


def trust_domain_of(text: str) -> str:
    """The would-be trust domain of an ID-shaped string ("" if there is none)."""
    if not text.startswith("spiffe://"):
        return ""
    return text[len("spiffe://"):].split("/", 1)[0]
