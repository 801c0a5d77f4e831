"""The one `Finding` type and severity scale of the offline tools (doctor, policy lint).

Each tool used to have its own finding class and its own words for how bad a finding is; a CI
job that runs several of them then needed one parser per tool, and a severity threshold meant
different things in each. A finding here is the smallest common shape: a stable code, a
severity on one scale, a one-line message, and where it is (a file, optionally a line, and a
path inside the file such as a JSONPath into an Envoy config). Tool-specific explanations
(doctor's why/fix catalog) stay with the tool, keyed by `code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Severity(IntEnum):
    """Ordered, so a threshold (`--fail-on warning`) is a plain comparison."""

    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def sarif_level(self) -> str:
        """SARIF 2.1.0 `level`: code scanning knows error, warning and note."""
        return {Severity.ERROR: "error", Severity.WARNING: "warning"}.get(self, "note")

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r} (info, warning or error)") from None


@dataclass(frozen=True, slots=True)
class Finding:
    code: str  # stable id, e.g. `route.ext_authz_disabled` or `shadowed-rule`
    severity: Severity
    message: str  # one line: what was found, naming the thing
    file: str = ""  # the input it is about ("" when the tool has one input)
    line: int | None = None
    path: str = ""  # where inside the file: a JSONPath for configs
    subject: str = ""  # the named thing: `listener 'ingress' > route 'prefix /health'`, a rule

    def at_or_above(self, threshold: Severity) -> bool:
        return self.severity >= threshold


def count_by_severity(findings: list[Finding]) -> dict[str, int]:
    return {s.label: sum(1 for f in findings if f.severity is s) for s in Severity}
