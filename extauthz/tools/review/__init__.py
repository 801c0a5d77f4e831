"""Access review: decision-log records in, findings (and a tightened policy) out.

Pure analysis, no I/O: `Reviewer.feed` takes one decision-log record (a dict, schema
`docs/decision-log.schema.json`) at a time and `Reviewer.report` returns the findings. Memory
is bounded whatever the size of the log: everything is aggregated by keys bounded by the
policy (grant = rule x allow entry; route shapes per rule, capped) or by explicit caps
(principals, denial keys, unknown versions), and what does not fit is counted as overflow.

Grants are matched against the policy version that made each decision (`policy_version`):
the reviewer holds the policy under review plus any earlier versions; a decision of version V
exercises the grant (rule, allow entry) *as V defined it*, and it counts for the policy under
review only if that rule still has the same route (hosts, methods, path, mode) and the entry
still names the same identity. Decisions of versions nobody supplied are counted and
reported, never attributed.

Which decisions exercise a grant:
* `allowed` / `rate_limited` (and `internal_error` with a rule): the logged `rule` allowed the
  caller; the allow entries of that rule that match the caller were used.
* `dry_run_would_deny`: the logged rule is the dry-run rule that would deny; the rule that
  actually allowed is `allow_rule` (decision log 1.1). In older logs it is not recorded, so
  every candidate rule of the route whose allow list contains the caller counts as used
  (conservative: never suggest removing a grant that may have been exercised).
JWT principals declared by claims only cannot be matched (the log has no claims); a use by
their issuer is attributed to every such entry of the rule.

The package, by job: `tally` (streaming aggregation), `attribution` (which grant a record
exercised), `shapes` (logged paths as policy templates), `findings` (what the counts mean),
`reviewer` (the two together), `patch` (the suggested policy as a diff of the YAML files).
"""

from extauthz.tools.review.attribution import identity_of, policy_trust_domains, trust_domain_of
from extauthz.tools.review.patch import Patch, PatchError, check_patch, render_patch
from extauthz.tools.review.results import (
    RANK,
    SEVERITIES,
    TOKEN_LIFETIME_FIELD,
    UNRECORDED,
    Finding,
    Report,
    ReviewConfig,
    RuleChange,
    Split,
)
from extauthz.tools.review.reviewer import Reviewer
from extauthz.tools.review.shapes import describe_route, generic_shape, is_variable, shape_of

__all__ = [
    "RANK", "SEVERITIES", "TOKEN_LIFETIME_FIELD", "UNRECORDED", "Finding", "Patch", "PatchError",
    "Report", "ReviewConfig", "Reviewer", "RuleChange", "Split", "check_patch", "describe_route",
    "generic_shape", "identity_of", "is_variable", "policy_trust_domains", "render_patch",
    "shape_of", "trust_domain_of",
]
