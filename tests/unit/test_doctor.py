"""`extauthz doctor`: one fixture per finding id, each producing exactly that finding.

The fixtures live in tests/cases/doctor/<finding id>.yaml; each is clean.yaml with one unsafe
change, and each is also accepted by the real Envoy (tests/integration/test_doctor_configs.py).
Also here: "errors are not denials" -- extauthz answers its own failures with 503 and
`x-extauthz-reason`, never with a 401/403.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import main as cli
from extauthz.sources.policy_store import load_policy
from extauthz.tools.doctor import (
    CHECKS,
    DoctorError,
    Finding,
    PolicyFacts,
    Severity,
    diagnose,
    domain_matches,
    render_json,
    render_text,
)

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "cases" / "doctor"
POLICY_DIR = CASES / "policy"
DOCS = ROOT / "docs" / "doctor.md"
EXAMPLES = {"clean", "unsafe"}  # fixtures that are not named after one finding id
FIXTURES = sorted(p.stem for p in CASES.glob("*.yaml") if p.stem not in EXAMPLES)
FACTS = PolicyFacts.from_policy(load_policy(POLICY_DIR))


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CASES / f"{name}.yaml").read_text(encoding="utf-8"))
    return data


def ids(findings: list[Finding]) -> list[str]:
    return sorted({f.code for f in findings})


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    return typed


def authz_index(doc: dict[str, Any]) -> int:
    names = [f["name"] for f in hcm(doc)["http_filters"]]
    return names.index("envoy.filters.http.ext_authz")


def authz(doc: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = hcm(doc)["http_filters"][authz_index(doc)]["typed_config"]
    return typed


def routes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    return found


# --- the fixtures -------------------------------------------------------------------------


def test_every_check_has_a_fixture_and_every_fixture_a_check() -> None:
    assert sorted(CHECKS) == FIXTURES


def test_clean_fixture_has_no_findings() -> None:
    assert diagnose(load("clean"), FACTS) == []
    assert diagnose(load("clean")) == []


@pytest.mark.parametrize("finding_id", FIXTURES)
def test_fixture_yields_exactly_its_finding(finding_id: str) -> None:
    findings = diagnose(load(finding_id), FACTS)
    assert ids(findings) == [finding_id], [f.message for f in findings]
    for f in findings:
        assert f.path.startswith("$.")
        assert f.message


def test_paths_point_at_the_offending_field() -> None:
    [f] = diagnose(load("ext_authz.failure_mode_allow"), FACTS)
    assert f.path == ("$.static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
                      ".http_filters[1].typed_config.failure_mode_allow")
    [f] = diagnose(load("route.ext_authz_disabled"), FACTS)
    assert f.path.endswith(
        '.route_config.virtual_hosts[0].routes[1].typed_per_filter_config'
        '["envoy.filters.http.ext_authz"].disabled')
    assert "prefix /v1/admin" in f.message


# --- the catalog and its documentation ---------------------------------------------------


def test_catalog_is_complete_and_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for check in CHECKS.values():
        assert re.fullmatch(r"[a-z_0-9]+\.[a-z_0-9]+", check.id)
        assert check.title and check.why and check.fix
        assert f"### `{check.id}`" in text, f"docs/doctor.md does not document {check.id}"
        assert f"**{check.severity.label}**" in text.split(f"### `{check.id}`")[1][:200]
    documented = set(re.findall(r"^### `([a-z_0-9.]+)`", text, re.M))
    assert documented == set(CHECKS)


def test_docs_show_current_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/doctor.md quotes real output; it must be what the doctor prints today."""
    monkeypatch.chdir(ROOT)
    text = DOCS.read_text(encoding="utf-8")
    for argv in (["tests/cases/doctor/unsafe.yaml"], ["envoy/sidecar.yaml"]):
        if not (ROOT / argv[0]).exists():
            continue
        cli.main(["doctor", *argv])
        out = capsys.readouterr().out
        assert out.strip() in text, f"docs/doctor.md is stale for `extauthz doctor {argv[0]}`"


# --- policy-dependent checks -------------------------------------------------------------


def _write_policy(tmp_path: Path, path_line: str) -> PolicyFacts:
    (tmp_path / "p.yaml").write_text(
        "apiVersion: extauthz/v1\nowner: o\nservice: s\n"
        "hosts: [orders.mesh.local, billing.mesh.local]\n"
        f"rules:\n  - name: r\n    {path_line}\n    allow: ['*']\n",
        encoding="utf-8",
    )
    return PolicyFacts.from_policy(load_policy(tmp_path))


def test_path_settings_only_matter_when_rules_match_on_paths(tmp_path: Path) -> None:
    doc = load("clean")
    h = hcm(doc)
    del h["normalize_path"], h["merge_slashes"], h["path_with_escaped_slashes_action"]
    expected = ["hcm.escaped_slashes_kept", "hcm.merge_slashes_off", "hcm.normalize_path_off"]
    assert ids(diagnose(doc)) == expected  # no policy: assume path rules
    assert ids(diagnose(doc, FACTS)) == expected
    (tmp_path / "root").mkdir()
    root_only = _write_policy(tmp_path / "root", "path_prefix: /")
    assert root_only.matches_on_path is False
    assert diagnose(doc, root_only) == []
    (tmp_path / "exact").mkdir()
    assert ids(diagnose(doc, _write_policy(tmp_path / "exact", "path: /"))) == expected


def test_policy_facts() -> None:
    assert FACTS.hosts == ("billing.mesh.local", "orders.mesh.local")
    assert FACTS.matches_on_path is True


@pytest.mark.parametrize(
    ("domain", "host", "matches"),
    [
        ("*", "orders.mesh.local", True),
        ("orders.mesh.local", "ORDERS.mesh.local", True),
        ("orders.mesh.local:10000", "orders.mesh.local", True),
        ("*.mesh.local", "orders.mesh.local", True),
        ("*.mesh.local", "mesh.local", False),
        ("orders.*", "orders.mesh.local", True),
        ("orders.*", "billing.mesh.local", False),
        ("billing.mesh.local", "orders.mesh.local", False),
    ],
)
def test_domain_matching(domain: str, host: str, matches: bool) -> None:
    assert domain_matches(domain, host) is matches


def test_wildcard_domain_covers_every_policy_host() -> None:
    doc = load("clean")
    hcm(doc)["route_config"]["virtual_hosts"][0]["domains"] = ["*"]
    assert diagnose(doc, FACTS) == []


# --- filter order ------------------------------------------------------------------------


def _header_mutation(**mutations: Any) -> dict[str, Any]:
    return {"name": "strip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                 "HeaderMutation",
        "mutations": mutations}}


def test_header_removal_before_ext_authz_is_fine() -> None:
    """The shipped sidecar strips x-extauthz-principal before ext_authz: not a rewrite."""
    doc = load("clean")
    hcm(doc)["http_filters"].insert(0, _header_mutation(
        request_mutations=[{"remove": "x-extauthz-principal"}]))
    assert diagnose(doc, FACTS) == []


@pytest.mark.parametrize(
    "mutations",
    [
        {"query_parameter_mutations": [{"remove": "debug"}]},
        {"request_mutations": [{"append": {"header": {
            "key": "x-forwarded-client-cert", "value": "URI=spiffe://prod.example/admin"}}}]},
    ],
)
def test_header_mutation_that_rewrites_before_ext_authz(mutations: dict[str, Any]) -> None:
    doc = load("clean")
    hcm(doc)["http_filters"].insert(0, _header_mutation(**mutations))
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.after_request_rewriter"]


def test_header_mutation_after_ext_authz_only_matters_for_the_query() -> None:
    doc = load("clean")
    hcm(doc)["http_filters"].insert(authz_index(doc) + 1, _header_mutation(
        request_mutations=[{"append": {"header": {"key": "x-a", "value": "1"}}}]))
    assert diagnose(doc, FACTS) == []
    hcm(doc)["http_filters"].insert(authz_index(doc) + 1, _header_mutation(
        query_parameter_mutations=[{"remove": "debug"}]))
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.reroute_after_check"]


@pytest.mark.parametrize(
    ("typed_config", "flagged"),
    [
        ({"@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
          "clear_route_cache": True}, True),
        ({"@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config"},
         False),
        ({"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
          "clear_route_cache": False}, True),
        ({"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                   "ExternalProcessor",
          "grpc_service": {"envoy_grpc": {"cluster_name": "extauthz"}}}, True),
        ({"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}, False),
    ],
)
def test_filters_after_ext_authz(typed_config: dict[str, Any], flagged: bool) -> None:
    doc = load("clean")
    hcm(doc)["http_filters"].insert(authz_index(doc) + 1,
                                    {"name": "f", "typed_config": typed_config})
    expected = ["ext_authz.reroute_after_check"] if flagged else []
    assert ids(diagnose(doc, FACTS)) == expected


def test_unknown_filter_type_is_reported_and_judged_by_its_name() -> None:
    doc = load("clean")
    hcm(doc)["http_filters"].insert(0, {"name": "go", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.golang.v3alpha.Config",
        "library_id": "x", "library_path": "/x.so", "plugin_name": "p"}})
    assert ids(diagnose(doc, FACTS)) == ["config.not_analysed", "ext_authz.after_request_rewriter"]


# --- per-route settings ------------------------------------------------------------------

_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
_NAME = "envoy.filters.http.ext_authz"


def test_filter_config_wrapper_can_disable_ext_authz() -> None:
    doc = load("clean")
    routes(doc)[1]["typed_per_filter_config"] = {_NAME: {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    [f] = diagnose(doc, FACTS)
    assert f.code == "route.ext_authz_disabled"
    assert f.path.endswith(f'.routes[1].typed_per_filter_config["{_NAME}"].disabled')


def test_virtual_host_exemption_covers_its_routes_unless_a_route_overrides() -> None:
    doc = load("clean")
    vhost = hcm(doc)["route_config"]["virtual_hosts"][0]
    vhost["typed_per_filter_config"] = {_NAME: {"@type": _PER_ROUTE, "disabled": True}}
    [f] = diagnose(doc, FACTS)
    assert f.code == "route.ext_authz_disabled"
    assert f.path.endswith(f'.virtual_hosts[0].typed_per_filter_config["{_NAME}"].disabled')
    routes(doc)[1]["typed_per_filter_config"] = {_NAME: {
        "@type": _PER_ROUTE, "check_settings": {"context_extensions": {"a": "b"}}}}
    assert diagnose(doc, FACTS) == []


def test_disabled_on_a_direct_response_or_health_route_is_fine() -> None:
    doc = load("clean")
    exempt = {_NAME: {"@type": _PER_ROUTE, "disabled": True}}
    routes(doc).insert(0, {"match": {"prefix": "/robots.txt"},
                           "direct_response": {"status": 200},
                           "typed_per_filter_config": exempt})
    routes(doc).insert(0, {"match": {"path": "/readyz"}, "route": {"cluster": "local_service"},
                           "typed_per_filter_config": exempt})
    assert diagnose(doc, FACTS) == []


def test_disabled_by_default_filter_enabled_by_every_route_is_fine() -> None:
    doc = load("clean")
    hcm(doc)["http_filters"][authz_index(doc)]["disabled"] = True
    routes(doc)[1]["typed_per_filter_config"] = {_NAME: {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
            "@type": _PER_ROUTE, "check_settings": {}}}}
    assert diagnose(doc, FACTS) == []


def test_per_route_service_override_is_checked() -> None:
    doc = load("clean")
    routes(doc)[1]["typed_per_filter_config"] = {_NAME: {
        "@type": _PER_ROUTE, "check_settings": {"grpc_service": {
            "envoy_grpc": {"cluster_name": "other-authz"}, "timeout": "20s"}}}}
    assert ids(diagnose(doc, FACTS)) == ["authz_cluster.missing", "ext_authz.timeout_exceeds_route"]


# --- ext_authz settings details ----------------------------------------------------------


def test_zero_timeout_means_no_deadline() -> None:
    doc = load("clean")
    authz(doc)["grpc_service"]["timeout"] = "0s"
    [f] = diagnose(doc, FACTS)
    assert f.code == "ext_authz.timeout_missing" and "no deadline" in f.message


def test_implicit_timeout_is_compared_with_routes() -> None:
    doc = load("ext_authz.timeout_missing")
    routes(doc)[1]["route"]["timeout"] = "0.1s"  # below Envoy's implicit 200 ms
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.timeout_exceeds_route",
                                         "ext_authz.timeout_missing"]
    routes(doc)[1]["route"]["timeout"] = "0s"  # route timeout disabled: nothing to exceed
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.timeout_missing"]


def test_deny_at_disable_makes_partial_enabling_safe() -> None:
    doc = load("ext_authz.partially_enabled")
    authz(doc)["deny_at_disable"] = {"default_value": True, "runtime_key": "k"}
    assert diagnose(doc, FACTS) == []


def test_full_filter_enabled_with_runtime_key_can_still_be_turned_down() -> None:
    doc = load("clean")
    authz(doc)["filter_enabled"] = {"default_value": {"numerator": 100}, "runtime_key": "k"}
    [f] = diagnose(doc, FACTS)
    assert f.code == "ext_authz.partially_enabled" and "'k'" in f.message


# --- listeners and clusters --------------------------------------------------------------


def test_accept_untrusted_is_unverified() -> None:
    doc = load("clean")
    tls = doc["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    tls["typed_config"]["common_tls_context"]["validation_context"][
        "trust_chain_verification"] = "ACCEPT_UNTRUSTED"
    [f] = diagnose(doc, FACTS)
    assert f.code == "listener.client_cert_unverified"
    assert f.path.endswith("validation_context.trust_chain_verification")


def _endpoint(doc: dict[str, Any]) -> dict[str, Any]:
    ep: dict[str, Any] = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][
        0]["lb_endpoints"][0]["endpoint"]
    return ep


@pytest.mark.parametrize(
    ("address", "plaintext"),
    [
        ({"pipe": {"path": "/run/extauthz.sock"}}, False),
        ({"socket_address": {"address": "::1", "port_value": 9191}}, False),
        ({"socket_address": {"address": "localhost", "port_value": 9191}}, False),
        ({"socket_address": {"address": "extauthz.svc", "port_value": 9191}}, True),
    ],
)
def test_authz_cluster_address(address: dict[str, Any], plaintext: bool) -> None:
    doc = load("clean")
    _endpoint(doc)["address"] = address
    assert ids(diagnose(doc, FACTS)) == (["authz_cluster.plaintext"] if plaintext else [])


def test_authz_cluster_with_tls_may_be_remote() -> None:
    doc = load("authz_cluster.plaintext")
    doc["static_resources"]["clusters"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                     "UpstreamTlsContext"}}
    assert diagnose(doc, FACTS) == []


def test_google_grpc_without_credentials_to_a_remote_target() -> None:
    doc = load("clean")
    authz(doc)["grpc_service"] = {"google_grpc": {"target_uri": "extauthz.svc:9191",
                                                  "stat_prefix": "authz"}, "timeout": "0.25s"}
    [f] = diagnose(doc, FACTS)
    assert f.code == "authz_cluster.plaintext"
    authz(doc)["grpc_service"]["google_grpc"]["target_uri"] = "127.0.0.1:9191"
    assert diagnose(doc, FACTS) == []


def test_cds_cluster_is_not_analysed_rather_than_missing() -> None:
    doc = load("authz_cluster.missing")
    doc["dynamic_resources"] = {"cds_config": {"ads": {}, "resource_api_version": "V3"}}
    assert ids(diagnose(doc, FACTS)) == ["config.xds_not_seen"]


# --- parsing -----------------------------------------------------------------------------


def test_camel_case_json_names_and_typed_struct_are_understood() -> None:
    doc = load("clean")
    cfg = authz(doc)
    cfg["failureModeAllow"] = cfg.pop("failure_mode_allow") or True
    url = cfg.pop("@type")
    hcm(doc)["http_filters"][authz_index(doc)]["typed_config"] = {
        "@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": url, "value": cfg}
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.failure_mode_allow"]


def test_deprecated_fields_do_not_warn() -> None:
    doc = load("clean")
    hcm(doc)["http_filters"].insert(authz_index(doc) + 1, {"name": "lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "inline_code": "function envoy_on_request(h) end"}})
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.reroute_after_check"]  # no warning raised


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: authz(d).update(status_on_error={"code": "Nope"}), "status_on_error.code: "
         "unknown value 'Nope'"),
        (lambda d: authz(d).update(failure_mode_allow=1), "failure_mode_allow: expected true or "
         "false"),
        (lambda d: hcm(d).update(http_filters={"a": 1}), "http_filters: expected a list"),
        (lambda d: hcm(d).update(codec_type="HTTP7"), "codec_type: unknown value 'HTTP7'"),
    ],
)
def test_invalid_config_is_an_error(mutate: Any, message: str) -> None:
    doc = load("clean")
    mutate(doc)
    with pytest.raises(DoctorError, match=message):
        diagnose(doc)


# --- output and exit status --------------------------------------------------------------


def test_json_output_is_stable_and_sorted() -> None:
    findings = diagnose(load("unsafe"), FACTS)
    out = render_json(findings, config="c.yaml", policy=None, fail_on=Severity.WARNING)
    assert out == render_json(diagnose(load("unsafe"), FACTS), config="c.yaml", policy=None,
                              fail_on=Severity.WARNING)
    doc = json.loads(out)
    assert list(doc) == sorted(doc)
    sev = [Severity.parse(f["severity"]) for f in doc["findings"]]
    assert sev == sorted(sev, reverse=True)
    assert doc["summary"] == {s.label: sev.count(s) for s in Severity}
    assert set(doc["findings"][0]) == {"id", "severity", "title", "path", "subject", "detail",
                                       "why", "fix"}


def test_text_output() -> None:
    text = render_text([], config="c.yaml", policy="p", fail_on=Severity.WARNING)
    assert text == "extauthz doctor: c.yaml (policy: p)\nno findings\n"
    findings = diagnose(load("ext_authz.failure_mode_allow"))
    text = render_text(findings, config="c.yaml", policy=None, fail_on=Severity.ERROR)
    assert "ERROR   ext_authz.failure_mode_allow: ext_authz fails open" in text
    assert text.endswith("1 finding: 1 error; 1 at or above error\n")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("fixture", "fail_on", "code"),
    [
        ("clean", "info", 0),
        ("ext_authz.status_on_error_not_503", "warning", 0),  # an info finding
        ("ext_authz.status_on_error_not_503", "info", 1),
        ("ext_authz.timeout_missing", "error", 0),  # a warning
        ("ext_authz.timeout_missing", "warning", 1),
        ("ext_authz.failure_mode_allow", "error", 1),
    ],
)
def test_exit_status_follows_fail_on(
    fixture: str, fail_on: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, _ = _run([str(CASES / f"{fixture}.yaml"), "--fail-on", fail_on], capsys)
    assert got == code, out


def test_default_fail_on_is_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([str(CASES / "ext_authz.timeout_missing.yaml")], capsys)[0] == 1


def test_cli_json_with_policy_and_ignore(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([str(CASES / "policy.host_not_served.yaml"), "--policy", str(POLICY_DIR),
                         "--format", "json", "--fail-on", "info"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert [f["id"] for f in doc["findings"]] == ["policy.host_not_served"]
    assert doc["policy"] == str(POLICY_DIR)
    code, out, _ = _run([str(CASES / "policy.host_not_served.yaml"), "--policy", str(POLICY_DIR),
                         "--format", "json", "--fail-on", "info",
                         "--ignore", "policy.host_not_served"], capsys)
    assert code == 0 and json.loads(out)["findings"] == []


def test_json_config_files_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(load("ext_authz.failure_mode_allow")), encoding="utf-8")
    code, out, _ = _run([str(path), "--format", "json"], capsys)
    assert code == 1
    assert [f["id"] for f in json.loads(out)["findings"]] == ["ext_authz.failure_mode_allow"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("a: [", "not YAML or JSON"),
        ("- 1\n", "must be a mapping"),
        ("static_resources: {listeners: 5}\n", "$.static_resources.listeners: expected a list"),
    ],
)
def test_unreadable_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "envoy.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = _run([str(path)], capsys)
    assert code == 2 and out == ""
    assert message in err


def test_bad_policy_or_ignore_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = str(CASES / "clean.yaml")
    code, _, err = _run([clean, "--policy", str(tmp_path / "missing")], capsys)
    assert code == 2 and "--policy" in err
    code, _, err = _run([clean, "--ignore", "no.such_id"], capsys)
    assert code == 2 and "no.such_id" in err


# --- errors are not denials --------------------------------------------------------------


def _check_request() -> Any:
    from envoy.service.auth.v3 import external_auth_pb2 as ea

    req = ea.CheckRequest()
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", "/v1/orders/1"
    req.attributes.source.principal = "spiffe://prod.example/ns/shop/sa/checkout"
    return req


def _servicer(policy_source: Any) -> Any:
    from extauthz.app import App
    from extauthz.decide.cache import DecisionCache
    from extauthz.decide.pipeline import Authorizer
    from extauthz.identity.resolver import IdentityConfig, IdentityResolver
    from extauthz.settings import Settings
    from extauthz.transport.grpc_proto import ResponseOptions
    from extauthz.transport.grpc_server import AuthorizationServicer

    clock = lambda: 1_000_000.0  # noqa: E731
    resolver = IdentityResolver.from_config(IdentityConfig())
    cache = DecisionCache(10, 60, clock)
    authorizer = Authorizer(policy_source, resolver, cache, clock)
    app = App(Settings(), policy_source, authorizer, cache, IdentityConfig(), resolver)
    return AuthorizationServicer(app, ResponseOptions())


def _denial(response: Any) -> tuple[int, int, dict[str, str]]:
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    return response.status.code, denied.status.code, headers


class _BrokenPolicySource:
    @property
    def current(self) -> Any:
        raise RuntimeError("policy store exploded")


class _NoPolicy:
    current = None


def test_internal_error_is_503_with_reason_not_a_denial(caplog: pytest.LogCaptureFixture) -> None:
    servicer = _servicer(_BrokenPolicySource())
    with caplog.at_level("ERROR", logger="extauthz.server"):
        response = asyncio.run(servicer.Check(_check_request(), None))
    grpc_code, http_status, headers = _denial(response)
    assert (grpc_code, http_status) == (14, 503)  # UNAVAILABLE, ServiceUnavailable
    assert headers["x-extauthz-reason"] == "internal_error"
    assert response.denied_response.body == "503 internal_error\n"
    assert servicer.stats.errors == 1
    assert "policy store exploded" in caplog.text


def test_policy_not_loaded_is_503_with_reason() -> None:
    response = asyncio.run(_servicer(_NoPolicy()).Check(_check_request(), None))
    grpc_code, http_status, headers = _denial(response)
    assert (grpc_code, http_status) == (14, 503)
    assert headers["x-extauthz-reason"] == "policy_not_loaded"


def test_doctor_wants_envoy_to_say_503_too() -> None:
    """The other half: the filter's own status_on_error must match extauthz's 503."""
    doc = load("clean")
    assert authz(doc)["status_on_error"] == {"code": 503}
    for code, finding in ((403, "ext_authz.status_on_error_denial"),
                          (401, "ext_authz.status_on_error_denial")):
        authz(doc)["status_on_error"] = {"code": code}
        assert ids(diagnose(doc)) == [finding]


def test_severity_parse() -> None:
    assert Severity.parse("Warning") is Severity.WARNING
    with pytest.raises(ValueError, match="unknown severity"):
        Severity.parse("fatal")
    assert copy.copy(Severity.ERROR) > Severity.WARNING > Severity.INFO
