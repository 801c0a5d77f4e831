"""docs/troubleshooting.md's table of answers lists every reason the server can give."""

from __future__ import annotations

import re
from pathlib import Path

from extauthz.model import Reason

DOC = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def test_every_reason_code_is_explained_in_the_troubleshooting_table() -> None:
    text = DOC.read_text()
    table = text[text.index("| status | `x-extauthz-reason` |"):text.index("**No `x-extauthz-reason`")]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    missing = {r.value for r in Reason} - documented
    assert not missing, f"reasons the troubleshooting guide does not explain: {sorted(missing)}"
