"""The README's repository map matches the tree: every module and sub-package under
`extauthz/` is named in its package's row, and every name in a row exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "extauthz"


def map_rows() -> dict[str, set[str]]:
    """Map path (first cell, e.g. `extauthz/policy/`) -> the backticked names of its row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Repository map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`extauthz/"):
            continue
        names = set(re.findall(r"`([^`]+)`", cells[1] + cells[2]))
        for path in re.findall(r"`(extauthz/[^`]*)`", cells[1]):
            rows[path] = names
    return rows


def test_every_package_lists_its_modules_and_nothing_that_is_gone() -> None:
    rows = map_rows()
    missing, stale = [], []
    for package in sorted(p for p in PKG.iterdir() if (p / "__init__.py").exists()):
        row = rows.get(f"extauthz/{package.name}/")
        if row is None:
            missing.append(f"extauthz/{package.name}/ has no row")
            continue
        present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
        present |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
        missing += [f"extauthz/{package.name}/{m}" for m in sorted(present - row)]
        stale += [f"extauthz/{package.name}/{n}" for n in sorted(row)
                  if re.fullmatch(r"[a-z_]+", n) and n not in present]
    assert missing == [] and stale == []


def test_every_top_level_module_is_on_the_map() -> None:
    named = set().union(*map_rows().values())
    modules = {p.name for p in PKG.glob("*.py") if not p.name.startswith("__")}
    assert sorted(m for m in modules if m not in named and f"extauthz/{m}" not in named) == []
