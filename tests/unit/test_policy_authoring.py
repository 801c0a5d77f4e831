"""Policy authoring mistakes get one clean line with file:line; `check` and `test` can
exercise rate limits on an injected clock (issue 19)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.cli.main import main
from extauthz.policy.document import PolicyError, load_yaml, parse_document
from extauthz.sources.policy_store import load_policy
from extauthz.tools.explain import Probe, decide_series, parse_duration
from extauthz.tools.policy_tests import load_cases, run_case

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: checkout
    spiffe: spiffe://prod.example/ns/shop/sa/checkout
rules:
  - name: orders-read
    methods: [GET]
    path_prefix: /v1/orders
    {who}: {value}
"""


@pytest.mark.parametrize("who", ["allow", "deny"])
def test_a_bare_word_instead_of_a_list_is_rejected_with_file_and_line(who: str) -> None:
    text = POLICY.format(who=who, value="checkout")
    with pytest.raises(PolicyError) as caught:
        parse_document(load_yaml(text, "orders.yaml"), "orders.yaml")
    assert caught.value.line == 12
    assert str(caught.value) == (f"orders.yaml: rules[0].{who}: must be a list: write [checkout] "
                                 "(line 12)")


def test_the_list_form_is_accepted() -> None:
    doc = parse_document(load_yaml(POLICY.format(who="allow", value="[checkout]"), "o.yaml"), "o.yaml")
    assert doc.rules[0].allow == ("checkout",)


def test_a_non_re2_regex_is_one_clean_line_without_cpp_logs_or_bytes(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "orders.yaml").write_text(POLICY.format(who="allow", value="[checkout]") +
                                        "    headers:\n      x-tenant: {regex: '(?<=a)b'}\n")
    out = subprocess.run([sys.executable, "-m", "extauthz", "validate", str(policy)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == "", out.stderr  # no re2.cc / absl lines
    errors = [line for line in out.stdout.splitlines() if "error:" in line]
    assert errors == ["orders.yaml:14: error: rules[0].headers.x-tenant.regex: invalid RE2 "
                      "regular expression '(?<=a)b': invalid perl operator: (?<= [schema]"]
    assert ": b'" not in out.stdout


def _probe(calls: int, over: float = 0.0) -> Probe:
    return Probe("checkout", "POST", "/v1/orders", "orders.mesh.local", calls=calls, over=over)


def test_the_eleventh_call_at_once_is_429_and_the_tenth_is_not() -> None:
    policy = load_policy(REPO / "policy")  # orders-create: rate 20/s, burst 10
    answers, _ = decide_series(policy, _probe(11))
    assert [d.outcome.http_status for d in answers] == [200] * 10 + [429]
    assert answers[-1].reason.value == "rate_limited" and answers[-1].rule == "orders-create"


def test_calls_spread_over_a_second_stay_within_the_rate() -> None:
    policy = load_policy(REPO / "policy")
    answers, _ = decide_series(policy, _probe(11, over=1.0))
    assert all(d.allowed for d in answers)
    fast, _ = decide_series(policy, _probe(40, over=1.0))  # 40 in 1 s > 10 burst + 20/s
    assert any(d.outcome.http_status == 429 for d in fast)


def test_a_test_case_can_say_the_eleventh_call_is_429(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy_dir)
    policy = load_policy(policy_dir)
    case_file = policy_dir / "limits_test.yaml"
    case_file.write_text(
        "host: orders.mesh.local\ncases:\n"
        "  - {name: eleventh, principal: checkout, method: POST, path: /v1/orders, calls: 11,\n"
        "     expect: {status: 429, reason: rate_limited}}\n"
        "  - {name: tenth, principal: checkout, method: POST, path: /v1/orders, calls: 10,\n"
        "     expect: {status: 429}}\n")
    cases = load_cases(case_file, "limits_test.yaml", policy)
    results = [run_case(policy, case) for case in cases]
    assert results[0].passed
    assert not results[1].passed  # the tenth is still allowed: the case is wrong


@pytest.mark.parametrize(("field", "message"), [
    ("calls: 0", "calls: must be a whole number"),
    ("calls: many", "calls: must be a whole number"),
    ("over: 1x", "over: '1x' is not a duration"),
])
def test_bad_calls_or_over_name_the_case_line(tmp_path: Path, field: str, message: str) -> None:
    policy = load_policy(REPO / "policy")
    case_file = tmp_path / "x_test.yaml"
    case_file.write_text("host: orders.mesh.local\ncases:\n"
                         "  - name: n\n    principal: checkout\n    method: GET\n"
                         f"    path: /v1/orders\n    {field}\n    expect: allow\n")
    with pytest.raises(PolicyError) as caught:
        load_cases(case_file, "x_test.yaml", policy)
    assert str(caught.value).startswith("x_test.yaml:") and message in str(caught.value)


def test_check_cli_shows_every_answer_of_a_series(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--policy", str(REPO / "policy"), "--principal", "checkout",
                 "--method", "POST", "--path", "/v1/orders", "--host", "orders.mesh.local",
                 "--calls", "11"])
    out = capsys.readouterr().out
    assert code == 1
    assert "11 calls over 0s: calls 1-10: 200 allowed; call 11: 429 rate_limited" in out
    assert main(["check", "--policy", str(REPO / "policy"), "--principal", "checkout",
                 "--method", "POST", "--path", "/v1/orders", "--host", "orders.mesh.local",
                 "--calls", "0"]) == 2


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("3", 3.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_condition_reading_a_missing_header_names_it_instead_of_a_key_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "t.yaml").write_text(POLICY.format(who="allow", value="[checkout]") +
                                   "    when: 'headers[\"x-tenant\"] == \"acme\"'\n")
    code = main(["check", "--policy", str(policy), "--principal", "checkout", "--method", "GET",
                 "--path", "/v1/orders", "--explain"])
    out = capsys.readouterr().out
    assert code == 1
    assert "KeyError" not in out
    assert "-> error (header x-tenant is missing)" in out
