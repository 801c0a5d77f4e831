"""`Reviewer`: a `Tally` that turns what it counted into a `Report`."""

from __future__ import annotations

from extauthz.tools.review.findings import (
    coverage_findings,
    denial_findings,
    dry_run_findings,
    grant_findings,
    hygiene_findings,
)
from extauthz.tools.review.results import Finding, Report, RuleChange
from extauthz.tools.review.tally import Tally


class Reviewer(Tally):
    """Feed records (`feed`, `feed_all`), then `report()`. `policy` is the version under
    review (and the one a patch is made against); `history` holds earlier versions, for
    attribution only."""

    def report(self) -> Report:
        self.close()
        findings: list[Finding] = []
        changes: dict[str, RuleChange] = {}
        findings += grant_findings(self, changes)
        findings += dry_run_findings(self)
        findings += denial_findings(self)
        findings += hygiene_findings(self, changes)
        findings += coverage_findings(self)
        findings.sort(key=Finding.sort_key)
        return Report(findings, self.summary(), changes)
