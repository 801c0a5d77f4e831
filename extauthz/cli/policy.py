"""`extauthz validate | check | test`: the policy author's tools.

Exit codes: 0 success (valid / allowed / all tests passed), 1 failure (errors / denied /
a test failed), 2 usage error or a policy that cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import PolicyError
from extauthz.sources.policy_store import PolicyLoadError, load_policy
from extauthz.tools.explain import (
    CallerError,
    Probe,
    check_calls,
    decide_series,
    describe_decision,
    explain,
    format_explanation,
    parse_duration,
    summarize_series,
)

OK, FAILED, USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "validate", help="check a policy directory: errors with file:line, risky-rule warnings",
        description="Load and lint every policy file in DIR. Exit 1 on errors (or on warnings "
        "with --strict).")
    v.add_argument("directory", metavar="DIR", type=Path)
    v.add_argument("--format", choices=("text", "json"), default="text")
    v.add_argument("--strict", action="store_true", help="treat warnings as errors")
    v.set_defaults(run=_validate)

    c = sub.add_parser(
        "check", help="decide one request against a policy directory",
        description="Print the decision for one request. Exit 0 if allowed, 1 if denied.")
    c.add_argument("--policy", metavar="DIR", type=Path, required=True)
    c.add_argument("--principal", metavar="ID", required=True,
                   help="SPIFFE ID, declared principal name, or JWT subject (with --jwt-claims)")
    c.add_argument("--method", metavar="M", required=True)
    c.add_argument("--path", metavar="P", required=True, help="raw :path (query allowed)")
    c.add_argument("--host", metavar="H", help="default: the only host, if the policy has one")
    c.add_argument("--header", metavar="K=V", action="append", default=[],
                   help="request header; repeatable")
    c.add_argument("--jwt-claims", metavar="JSON",
                   help="the caller presents a JWT with these claims (needs 'iss')")
    c.add_argument("--time", metavar="ISO8601", help="evaluate at this time (default: now)")
    c.add_argument("--explain", action="store_true", help="trace every rule of the host")
    c.add_argument("--calls", type=int, default=1, metavar="N",
                   help="send N identical requests to exercise rate limits (default 1); "
                   "the decision shown is the last one's")
    c.add_argument("--over", default="0s", metavar="DURATION",
                   help="spread the calls evenly over this long, e.g. 1s (default: all at once)")
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.set_defaults(run=_check)

    t = sub.add_parser(
        "test", help="run the policy test files (*_test.yaml) in a policy directory",
        description="Run every *_test.yaml case under DIR against the policies in DIR.")
    t.add_argument("directory", metavar="DIR", type=Path)
    t.add_argument("--junit", metavar="FILE", type=Path, help="also write JUnit XML here")
    t.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    t.add_argument("--explain", action="store_true", help="trace the rules for failing cases")
    t.set_defaults(run=_test)


def _load(directory: Path, command: str) -> CompiledPolicy | None:
    try:
        return load_policy(directory)
    except (PolicyLoadError, PolicyError) as exc:
        print(f"extauthz {command}: {exc}", file=sys.stderr)
        print(f"(run `extauthz validate {directory}` for every error)", file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    from extauthz.tools.lint import format_json, format_text, validate_directory

    report = validate_directory(args.directory)
    print(format_json(report) if args.format == "json" else format_text(report))
    if report.errors or (args.strict and report.warnings):
        return FAILED
    return OK


def _check(args: argparse.Namespace) -> int:
    policy = _load(args.policy, "check")
    if policy is None:
        return USAGE
    try:
        probe = _probe(args, policy)
        answers, identity = decide_series(policy, probe)
        decision = answers[-1]
        exp = explain(policy, probe) if args.explain else None
    except (CallerError, ValueError) as exc:
        print(f"extauthz check: {exc}", file=sys.stderr)
        return USAGE
    if args.format == "json":
        out: dict[str, object] = {
            "allowed": decision.allowed, "status": decision.outcome.http_status,
            "reason": decision.reason.value, "rule": decision.rule, "detail": decision.detail,
            "dry_run": decision.dry_run, "policy_version": decision.policy_version,
            "principal": identity.principal,
        }
        if probe.calls > 1:
            out["calls"] = [{"status": d.outcome.http_status, "reason": d.reason.value}
                            for d in answers]
        if exp is not None:
            out["trace"] = [{"rule": t.rule.name, "route_matched": t.route,
                             "verdict": t.verdict, "notes": list(t.notes)} for t in exp.rules]
            out["notes"] = list(exp.preface)
        print(json.dumps(out, indent=2))
    else:
        if probe.calls > 1:
            print(f"{probe.calls} calls over {args.over}: {summarize_series(answers)}")
        print(format_explanation(exp, policy) if exp is not None else describe_decision(decision))
    return OK if decision.allowed else FAILED


def _probe(args: argparse.Namespace, policy: CompiledPolicy) -> Probe:
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--header {item!r}: expected NAME=VALUE")
        headers[key.strip().lower()] = value
    claims = None
    if args.jwt_claims is not None:
        try:
            claims = json.loads(args.jwt_claims)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--jwt-claims is not JSON: {exc}") from None
        if not isinstance(claims, dict):
            raise ValueError("--jwt-claims must be a JSON object")
    host = args.host
    if host is None:
        if len(policy.hosts) != 1:
            raise ValueError(f"--host is required (hosts: {', '.join(policy.hosts)})")
        host = policy.hosts[0]
    now = None
    if args.time:
        from datetime import UTC, datetime

        moment = datetime.fromisoformat(args.time.replace("Z", "+00:00"))
        now = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    over = parse_duration(args.over)
    check_calls(args.calls, over)
    return Probe(args.principal, args.method.upper(), args.path, host, headers, claims, now,
                 calls=args.calls, over=over)


def _test(args: argparse.Namespace) -> int:
    from extauthz.tools.policy_tests import format_results, junit_xml, run_directory

    policy = _load(args.directory, "test")
    if policy is None:
        return USAGE
    files = run_directory(policy, args.directory, with_explanation=args.explain)
    print(format_results(files, verbose=args.verbose))
    if args.junit is not None:
        args.junit.write_bytes(junit_xml(files))
    failed = any(f.error or any(not r.passed for r in f.results) for f in files)
    return FAILED if failed or not files else OK
