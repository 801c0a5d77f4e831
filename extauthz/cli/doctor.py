"""`extauthz doctor ENVOY_CONFIG`: report the unsafe ext_authz settings in an Envoy config.

The analysis lives in `doctor.py`; this module reads the files, renders the report and picks
the exit status: 0 when no finding is at or above --fail-on, 1 when some are, 2 when the
input cannot be read (bad YAML/JSON, not an Envoy bootstrap, policy that does not load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from extauthz.tools.doctor import (
    CHECKS,
    DoctorError,
    PolicyFacts,
    Severity,
    at_or_above,
    diagnose,
    render_json,
    render_text,
)

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="find unsafe ext_authz settings in an Envoy config",
        description="Check an Envoy bootstrap (YAML or JSON) for ext_authz settings that fail "
        "open, hide outages as denials, let requests bypass the check, or weaken the caller's "
        "identity. With --policy, also cross-check the policy's hosts against the virtual "
        "hosts. Exit status: 0 clean, 1 findings at or above --fail-on, 2 unreadable input. "
        "Finding ids, reasons and fixes: docs/doctor.md.",
    )
    p.add_argument("config", metavar="ENVOY_CONFIG", type=Path, help="Envoy bootstrap file")
    p.add_argument("--policy", metavar="DIR", type=Path, help="extauthz policy directory")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--fail-on", choices=("info", "warning", "error"), default="warning",
                   help="lowest severity that makes the exit status 1 (default warning)")
    p.add_argument("--ignore", metavar="ID", action="append", default=[],
                   help="drop findings with this id (repeatable), e.g. for an open listener")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"extauthz doctor: {message}", file=sys.stderr)
    return EXIT_ERROR


def load_config(path: Path) -> object:
    """Envoy accepts YAML and JSON bootstraps; JSON is YAML, so one loader reads both."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def run(args: argparse.Namespace) -> int:
    unknown = [i for i in args.ignore if i not in CHECKS]
    if unknown:
        return _fail(f"--ignore: unknown finding id(s) {', '.join(unknown)}")
    try:
        raw = load_config(args.config)
    except OSError as exc:
        return _fail(f"{args.config}: cannot read: {exc.strerror or exc}")
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _fail(f"{args.config}: not YAML or JSON: {exc}")
    if not isinstance(raw, dict):
        return _fail(f"{args.config}: an Envoy bootstrap must be a mapping")
    facts = None
    if args.policy is not None:
        from extauthz.policy.document import PolicyError
        from extauthz.sources.policy_store import PolicyLoadError, load_policy

        try:
            facts = PolicyFacts.from_policy(load_policy(args.policy))
        except (PolicyLoadError, PolicyError) as exc:
            return _fail(f"--policy: {exc}")
    try:
        findings = diagnose(raw, facts)
    except DoctorError as exc:
        return _fail(f"{args.config}: {exc}")
    except ImportError as exc:  # envoy-data-plane is an optional dependency
        return _fail(f"{exc}; install it with: pip install 'extauthz[envoy]'")
    findings = [f for f in findings if f.id not in set(args.ignore)]
    fail_on = Severity.parse(args.fail_on)
    render = render_json if args.format == "json" else render_text
    sys.stdout.write(render(findings, config=str(args.config),
                            policy=str(args.policy) if args.policy else None, fail_on=fail_on))
    return EXIT_FINDINGS if at_or_above(findings, fail_on) else EXIT_CLEAN
