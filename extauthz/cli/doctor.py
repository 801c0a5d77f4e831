"""`extauthz doctor ENVOY_CONFIG | --admin URL`: report the unsafe ext_authz settings in an Envoy
config, a saved `/config_dump`, or the config a running Envoy serves.

The analysis lives in `extauthz.tools.doctor`; this module reads the input, renders the report
and picks the exit status (documented in docs/doctor.md and tested):

* 0: no finding at or above --fail-on;
* 1: findings at or above --fail-on (what was not in the input counts: `config.xds_not_seen`
  is a warning, so a bootstrap that only points at ADS never passes as clean);
* 2: the input cannot be read (file, YAML/JSON, a field of the wrong shape, an admin URL
  that is refused or does not answer, a policy that does not load), or the analysis failed on
  a shape it did not expect (a bug, reported as such). One line on stderr names what and why;
  nothing on stdout; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="find unsafe ext_authz settings in an Envoy config or a running Envoy",
        description="Check an Envoy bootstrap or admin /config_dump (YAML or JSON), or with "
        "--admin the config a running Envoy serves, for ext_authz settings that fail open, "
        "routes that skip the check (and which paths they open), hidden outages, and weakened "
        "caller identity. With --policy, also cross-check the policy's hosts and name the rules "
        "an exemption shadows. Exit status: 0 clean, 1 findings at or above --fail-on, "
        "2 unreadable input. Finding ids, reasons and fixes: docs/doctor.md.",
    )
    p.add_argument("config", metavar="ENVOY_CONFIG", type=Path, nargs="?",
                   help="Envoy bootstrap or /config_dump file (YAML or JSON)")
    p.add_argument("--admin", metavar="URL",
                   help="read /config_dump from a running Envoy's admin interface on loopback, "
                   "e.g. http://127.0.0.1:9901")
    p.add_argument("--policy", metavar="DIR", type=Path, help="extauthz policy directory")
    p.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                   help="output format (sarif: SARIF 2.1.0 for CI code scanning)")
    p.add_argument("--fail-on", choices=("info", "warning", "error"), default="warning",
                   help="lowest severity that makes the exit status 1 (default warning)")
    p.add_argument("--ignore", metavar="ID", action="append", default=[],
                   help="drop findings with this id (repeatable), e.g. for an open listener")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"extauthz doctor: {message}", file=sys.stderr)
    return EXIT_ERROR


def load_config(path: Path) -> tuple[object, str]:
    """(parsed document, its text). Envoy accepts YAML and JSON; JSON is YAML, so one loader
    reads both, but `*.json` goes through json for its exact number and string rules."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text), text
    return yaml.safe_load(text), text


def _read(args: argparse.Namespace) -> tuple[object, str, str | None] | int:
    """(document, name shown in the report, its text for line numbers) or an exit status."""
    if (args.config is None) == (args.admin is None):
        return _fail("give either ENVOY_CONFIG or --admin URL (not both)")
    if args.admin is not None:
        from extauthz.tools.doctor.admin import AdminError, fetch_config_dump

        try:
            url, doc = fetch_config_dump(args.admin)
        except AdminError as exc:
            return _fail(str(exc))
        return doc, url, None
    try:
        raw, text = load_config(args.config)
    except OSError as exc:
        return _fail(f"{args.config}: cannot read: {exc.strerror or exc}")
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(f"{args.config}: not YAML or JSON: {first}")
    return raw, str(args.config), text


def run(args: argparse.Namespace) -> int:
    try:
        from extauthz.tools import doctor as d
    except ImportError as exc:  # envoy-data-plane is an optional dependency
        return _fail(f"{exc}; install it with: pip install 'extauthz[envoy]'")
    unknown = [i for i in args.ignore if i not in d.CHECKS]
    if unknown:
        return _fail(f"--ignore: unknown finding id(s) {', '.join(unknown)}")
    got = _read(args)
    if isinstance(got, int):
        return got
    raw, name, text = got
    if not isinstance(raw, dict):
        return _fail(f"{name}: an Envoy bootstrap or /config_dump must be a mapping")
    facts = None
    if args.policy is not None:
        from extauthz.policy.document import PolicyError
        from extauthz.sources.policy_store import PolicyLoadError, load_policy

        try:
            facts = d.PolicyFacts.from_policy(load_policy(args.policy))
        except (PolicyLoadError, PolicyError) as exc:
            return _fail(f"--policy: {exc}")
    try:
        inv = d.load(raw)
        findings = d.diagnose_inventory(inv, facts)
    except d.DoctorError as exc:
        return _fail(f"{name}: {exc}")
    except Exception as exc:  # a config shape the analysis did not expect: a doctor bug
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _fail(f"{name}: could not analyse ({type(exc).__name__}: {first}); this is a "
                     "doctor bug, please report it with the config")
    findings = [f for f in findings if f.code not in set(args.ignore)]
    fail_on = d.Severity.parse(args.fail_on)
    sys.stdout.write(_render(d, args, findings, name=name, text=text, fail_on=fail_on,
                                     read=d.describe_input(inv)))
    return EXIT_FINDINGS if d.at_or_above(findings, fail_on) else EXIT_CLEAN


def _render(d: Any, args: argparse.Namespace, findings: list[Any], *, name: str,
            text: str | None, fail_on: Any, read: str) -> str:
    if args.format == "sarif":
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("extauthz")
        except PackageNotFoundError:
            ours = "0"
        return str(d.render_sarif(findings, config=name, source_text=text, version=ours))
    render = d.render_json if args.format == "json" else d.render_text
    policy = str(args.policy) if args.policy else None
    return str(render(findings, config=name, policy=policy, fail_on=fail_on, read=read))
