"""`extauthz doctor`: what a route that skips ext_authz opens, and the checks added for issue 17.

Route matching follows Envoy's semantics (a `prefix` is a string prefix, `safe_regex` a full
RE2 match, case sensitivity, normalization); the same facts were observed with the real binary
(tests/cases/doctor/real-world/README.md). Each check is exercised on the condition that
triggers it and on the nearest condition that must not.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from extauthz.sources.policy_store import load_policy
from extauthz.tools.doctor import PolicyFacts, diagnose
from extauthz.tools.doctor.routes import Normalization, exposure
from extauthz.tools.findings import Finding
from tests.unit.test_doctor import FACTS, authz, authz_index, hcm, ids, load, routes

SAFE = Normalization(normalize_path=True, merge_slashes=True, escaped_slashes_kept=False)
RAW = Normalization(normalize_path=False, merge_slashes=False, escaped_slashes_kept=True)
_NAME = "envoy.filters.http.ext_authz"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
EXEMPT = {_NAME: {"@type": _PER_ROUTE, "disabled": True}}


class _Match:
    """A RouteMatch-shaped object (the typed class needs envoy-data-plane to build)."""

    def __init__(self, **fields: Any) -> None:
        self.path = fields.get("path")
        self.prefix = fields.get("prefix")
        self.path_separated_prefix = fields.get("path_separated_prefix")
        regex = fields.get("safe_regex")
        self.safe_regex = type("R", (), {"regex": regex})() if regex is not None else None
        self.case_sensitive = fields.get("case_sensitive")


# --- match semantics ---------------------------------------------------------------------


def test_prefix_is_a_string_prefix_not_a_path_segment() -> None:
    exp = exposure(_Match(prefix="/health"), SAFE)
    assert exp.matches("/healthcare/patients/42") and exp.matches("/health-admin/drop-db")
    assert not exp.matches("/HEALTH") and not exp.matches("/api/health")
    assert {"/healthcare/x", "/health-admin/x"} <= set(exp.examples)
    assert not exp.quiet and not exp.everything


def test_path_separated_prefix_stops_at_the_segment() -> None:
    exp = exposure(_Match(path_separated_prefix="/status"), SAFE)
    assert exp.matches("/status") and exp.matches("/status/x")
    assert not exp.matches("/statusx")


@pytest.mark.parametrize(("path", "quiet"), [("/healthz", True), ("/readyz", True),
                                             ("/admin", False), ("/healthz/x", False)])
def test_only_an_exact_health_path_is_quiet(path: str, quiet: bool) -> None:
    exp = exposure(_Match(path=path), RAW)  # exact paths do not widen without normalization
    assert exp.quiet is quiet
    assert exp.examples == (path,) and not exp.everything


def test_case_insensitive_match_opens_every_spelling() -> None:
    exp = exposure(_Match(prefix="/health", case_sensitive=False), SAFE)
    assert exp.matches("/HEALTHcare") and "any letter case" in exp.summary


def test_regex_is_a_full_re2_match() -> None:
    exp = exposure(_Match(safe_regex="/api/v[0-9]+/public/.*"), SAFE)
    assert exp.matches("/api/v2/public/x") and not exp.matches("/x/api/v2/public/y")
    assert "fully matches" in exp.summary
    everything = exposure(_Match(safe_regex="/.*"), SAFE)
    assert everything.everything and everything.summary.startswith("every path")


def test_uncompilable_regex_is_not_analysed_rather_than_guessed() -> None:
    exp = exposure(_Match(safe_regex="(?<=x)y"), SAFE)  # lookbehind: not RE2
    assert not exp.analysed and "not analysed" in exp.summary


def test_without_normalization_a_prefix_exemption_opens_every_path() -> None:
    exp = exposure(_Match(prefix="/health"), RAW)
    assert exp.everything
    assert "/health/../admin" in exp.examples and "/health%2F..%2Fadmin" in exp.examples
    assert not exposure(_Match(prefix="/health"), SAFE).everything


# --- route findings ----------------------------------------------------------------------


def _exempt(doc: dict[str, Any], match: dict[str, Any], index: int = 0) -> None:
    routes(doc).insert(index, {"match": match, "route": {"cluster": "local_service"},
                               "typed_per_filter_config": copy.deepcopy(EXEMPT)})


def _only(findings: list[Finding], code: str) -> Finding:
    [f] = [f for f in findings if f.code == code]
    return f


def test_health_prefix_exemption_is_reported_with_the_paths_it_opens() -> None:
    doc = load("clean")
    _exempt(doc, {"prefix": "/health"})
    f = _only(diagnose(doc, FACTS), "route.ext_authz_disabled")
    assert ids(diagnose(doc, FACTS)) == ["route.ext_authz_disabled"]
    assert "virtual host 'services' > route #1 'prefix /health'" in f.message
    assert "/healthcare/x" in f.message and "/health-admin/x" in f.message


def test_exact_health_path_exemption_is_quiet_but_its_separated_prefix_is_not() -> None:
    doc = load("clean")
    _exempt(doc, {"path": "/livez"})
    assert diagnose(doc, FACTS) == []
    doc = load("clean")
    _exempt(doc, {"path_separated_prefix": "/livez"})
    assert "/livez/anything" in _only(diagnose(doc, FACTS), "route.ext_authz_disabled").message


def _policy(tmp_path: Path, rules: str) -> PolicyFacts:
    (tmp_path / "p.yaml").write_text(
        "apiVersion: extauthz/v1\nowner: o\nservice: s\nhosts: [orders.mesh.local]\n"
        f"rules:\n{rules}", encoding="utf-8")
    return PolicyFacts.from_policy(load_policy(tmp_path))


def test_policy_rules_the_exemption_shadows_are_named(tmp_path: Path) -> None:
    facts = _policy(tmp_path, "  - name: patients\n    path_prefix: /healthcare\n"
                              "    allow: ['*']\n  - name: orders\n    path_prefix: /v1/orders\n"
                              "    allow: ['*']\n")
    doc = load("clean")
    hcm(doc)["route_config"]["virtual_hosts"][0]["domains"] = ["orders.mesh.local"]
    _exempt(doc, {"prefix": "/health"})
    f = _only(diagnose(doc, facts), "route.ext_authz_disabled")
    assert "shadows policy rules patients (p.yaml:6)" in f.message
    assert "orders (" not in f.message


def test_without_normalize_path_an_exemption_shadows_every_rule(tmp_path: Path) -> None:
    facts = _policy(tmp_path, "  - name: orders\n    path_prefix: /v1/orders\n"
                              "    allow: ['*']\n")
    doc = load("clean")
    hcm(doc)["route_config"]["virtual_hosts"][0]["domains"] = ["orders.mesh.local"]
    del hcm(doc)["normalize_path"]
    _exempt(doc, {"prefix": "/health"})
    f = _only(diagnose(doc, facts), "route.ext_authz_disabled")
    assert "every other path through dot segments" in f.message and "orders (p.yaml" in f.message


def test_an_entry_under_another_filter_name_is_ignored_as_envoy_ignores_it() -> None:
    doc = load("clean")
    hcm(doc)["http_filters"][authz_index(doc)]["name"] = "my-authz"
    _exempt(doc, {"prefix": "/v1"})  # keyed envoy.filters.http.ext_authz: not this filter
    assert diagnose(doc, FACTS) == []
    routes(doc)[0]["typed_per_filter_config"] = {"my-authz": EXEMPT[_NAME]}
    assert ids(diagnose(doc, FACTS)) == ["route.ext_authz_disabled"]


def test_weighted_cluster_exemption_is_reported() -> None:
    doc = load("clean")
    routes(doc)[-1]["route"] = {"weighted_clusters": {"clusters": [
        {"name": "local_service", "weight": 90},
        {"name": "local_service", "weight": 10, "typed_per_filter_config": EXEMPT}]}}
    f = _only(diagnose(doc, FACTS), "route.ext_authz_disabled")
    assert ".weighted_clusters.clusters[1].typed_per_filter_config" in f.path


def test_exemption_listed_first_hides_later_routes_and_header_matches_are_named() -> None:
    doc = load("clean")
    _exempt(doc, {"prefix": "/v1", "headers": [{"name": "x-debug",
                                                "string_match": {"exact": "1"}}]})
    f = _only(diagnose(doc, FACTS), "route.ext_authz_disabled")
    assert "when header x-debug, which the caller controls" in f.message
    assert "listed before route 'prefix /v1/admin'" not in f.message  # clean has no such route
    assert "which never see those requests" not in f.message
    routes(doc).insert(1, {"match": {"prefix": "/v1/admin"}, "route": {"cluster": "local_service"}})
    f = _only(diagnose(doc, FACTS), "route.ext_authz_disabled")
    assert "listed before route 'prefix /v1/admin', which never see those requests" in f.message


def test_disabled_by_default_names_the_routes_and_paths() -> None:
    doc = load("ext_authz.disabled_by_default")
    f = _only(diagnose(doc, FACTS), "ext_authz.disabled_by_default")
    assert "route #2 'prefix /'" in f.message and "every path" in f.message


# --- issue 17's new checks ---------------------------------------------------------------


def _http_cluster(doc: dict[str, Any], check: str) -> None:
    cluster = copy.deepcopy(doc["static_resources"]["clusters"][0])
    cluster["name"] = "authz_http"
    del cluster["typed_extension_protocol_options"]
    cluster["health_checks"][0].pop("grpc_health_check")
    cluster["health_checks"][0][check] = {"path": "/healthz"} if check == "http_health_check" \
        else {}
    doc["static_resources"]["clusters"].append(cluster)


@pytest.mark.parametrize(("protocol", "health_check", "mismatch"), [
    ("grpc", "http_health_check", True),
    ("grpc", "grpc_health_check", False),
    ("http", "grpc_health_check", True),
    ("http", "http_health_check", False),
])
def test_protocol_mismatch(protocol: str, health_check: str, mismatch: bool) -> None:
    doc = load("ext_authz.http_service_xfcc")
    hcm(doc)["forward_client_cert_details"] = "SANITIZE_SET"
    _http_cluster(doc, health_check)
    if protocol == "grpc":
        cfg = authz(doc)
        del cfg["http_service"], cfg["allowed_headers"]
        cfg["grpc_service"] = {"envoy_grpc": {"cluster_name": "authz_http"}, "timeout": "0.25s"}
        cfg["include_peer_certificate"] = True
        doc["static_resources"]["clusters"][-1]["typed_extension_protocol_options"] = \
            doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    else:
        authz(doc)["http_service"]["server_uri"]["cluster"] = "authz_http"
    found = ids(diagnose(doc, FACTS))
    assert ("ext_authz.protocol_mismatch" in found) is mismatch, found


def test_one_cluster_reached_with_both_protocols_is_a_mismatch() -> None:
    doc = load("clean")
    routes(doc)[-1]["typed_per_filter_config"] = {_NAME: {"@type": _PER_ROUTE, "check_settings": {
        "http_service": {"server_uri": {"uri": "http://127.0.0.1:9191", "cluster": "extauthz",
                                        "timeout": "0.25s"}}}}}
    assert "ext_authz.protocol_mismatch" in ids(diagnose(doc, FACTS))


@pytest.mark.parametrize(("change", "found"), [
    ({"forward_client_cert_details": "SANITIZE_SET"}, False),
    ({"forward_client_cert_details": "APPEND_FORWARD"}, "the caller chooses"),
    ({"forward_client_cert_details": "sanitize_set", "set_current_client_cert_details": {}},
     "without set_current_client_cert_details.uri"),
])
def test_http_service_identity_needs_sanitize_set_with_uri(
    change: dict[str, Any], found: str | bool
) -> None:
    doc = load("ext_authz.http_service_xfcc")
    hcm(doc).update(change)
    xfcc = [f for f in diagnose(doc, FACTS) if f.code == "ext_authz.http_service_xfcc"]
    if found:
        assert found in xfcc[0].message
    else:
        assert xfcc == []


@pytest.mark.parametrize(("allowed", "disallowed", "passes"), [
    ({"patterns": [{"prefix": "x-forwarded-"}]}, None, True),
    ({"patterns": [{"exact": "X-Forwarded-Client-Cert", "ignore_case": True}]}, None, True),
    ({"patterns": [{"exact": "authorization"}]}, None, False),
    ({"patterns": [{"prefix": "x-"}]}, {"patterns": [{"exact": "x-forwarded-client-cert"}]},
     False),
])
def test_http_service_must_receive_the_xfcc_header(
    allowed: dict[str, Any], disallowed: dict[str, Any] | None, passes: bool
) -> None:
    doc = load("ext_authz.http_service_xfcc")
    hcm(doc)["forward_client_cert_details"] = "SANITIZE_SET"
    authz(doc)["allowed_headers"] = allowed
    if disallowed is not None:
        authz(doc)["disallowed_headers"] = disallowed
    assert (diagnose(doc, FACTS) == []) is passes


def test_grpc_only_settings_on_http_service_and_per_route_context_extensions() -> None:
    doc = load("ext_authz.http_service_xfcc")
    hcm(doc)["forward_client_cert_details"] = "SANITIZE_SET"
    assert diagnose(doc, FACTS) == []
    routes(doc)[-1]["typed_per_filter_config"] = {_NAME: {"@type": _PER_ROUTE, "check_settings": {
        "context_extensions": {"route": "orders"}}}}
    f = _only(diagnose(doc, FACTS), "ext_authz.grpc_only_setting")
    assert "context_extensions never reach an http_service" in f.message
    # ... while on a grpc_service filter they are what extauthz reads
    doc = load("clean")
    routes(doc)[-1]["typed_per_filter_config"] = {_NAME: {"@type": _PER_ROUTE, "check_settings": {
        "context_extensions": {"route": "orders"}}}}
    assert diagnose(doc, FACTS) == []


@pytest.mark.parametrize(("mutation", "where", "stripped"), [
    ([{"remove_on_match": {"key_matcher": {"prefix": "x-extauthz-"}}}], "before", True),
    ([{"remove": "x-extauthz-principal"}], "before", False),  # the rule header stays
    ([{"remove": "x-extauthz-principal"}, {"remove": "x-extauthz-rule"}], "after", False),
])
def test_caller_extauthz_headers_must_be_removed_before_ext_authz(
    mutation: list[dict[str, Any]], where: str, stripped: bool
) -> None:
    doc = load("hcm.extauthz_headers_not_stripped")
    strip = {"name": "strip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                 "HeaderMutation", "mutations": {"request_mutations": mutation}}}
    at = authz_index(doc) + (1 if where == "after" else 0)
    hcm(doc)["http_filters"].insert(at, strip)
    assert (diagnose(doc, FACTS) == []) is stripped


def test_body_buffering_per_route_is_reported_too() -> None:
    doc = load("clean")
    routes(doc)[-1]["typed_per_filter_config"] = {_NAME: {"@type": _PER_ROUTE, "check_settings": {
        "with_request_body": {"max_request_bytes": 1024}}}}
    f = _only(diagnose(doc, FACTS), "ext_authz.request_body_buffered")
    assert f.path.endswith("check_settings.with_request_body")


@pytest.mark.parametrize(("address", "flagged"), [
    ({"socket_address": {"address": "127.0.0.1", "port_value": 9901}}, False),
    ({"socket_address": {"address": "::1", "port_value": 9901}}, False),
    ({"pipe": {"path": "/run/envoy/admin.sock"}}, False),
    ({"socket_address": {"address": "::", "port_value": 9901}}, True),
    ({"socket_address": {"address": "10.0.0.7", "port_value": 9901}}, True),
])
def test_admin_must_stay_on_loopback(address: dict[str, Any], flagged: bool) -> None:
    doc = load("clean")
    doc["admin"] = {"address": address}
    assert (ids(diagnose(doc, FACTS)) == ["admin.not_loopback"]) is flagged


def test_unprotected_listener_is_named_by_position_when_unnamed() -> None:
    doc = load("hcm.unprotected_upstream")
    del doc["static_resources"]["listeners"][1]["name"]
    f = _only(diagnose(doc, FACTS), "hcm.unprotected_upstream")
    assert f.message.startswith("unnamed listener #1 on 0.0.0.0:10001:")


def test_several_unnamed_listeners_are_told_apart() -> None:
    doc = load("clean")
    authz(doc)["failure_mode_allow"] = True
    second = copy.deepcopy(doc["static_resources"]["listeners"][0])
    second["address"]["socket_address"]["port_value"] = 10002
    doc["static_resources"]["listeners"].append(second)
    for listener in doc["static_resources"]["listeners"]:
        del listener["name"]
    labels = sorted(f.message.split(" > ")[0] for f in diagnose(doc, FACTS))
    assert labels == ["unnamed listener #1 on 0.0.0.0:10000", "unnamed listener #2 on 0.0.0.0:10002"]


def test_one_virtual_host_exemption_is_one_finding_listing_its_routes() -> None:
    doc = load("clean")
    vhost = hcm(doc)["route_config"]["virtual_hosts"][0]
    vhost["typed_per_filter_config"] = copy.deepcopy(EXEMPT)
    for i in range(5):
        vhost["routes"].insert(0, {"match": {"prefix": f"/svc{i}/"},
                                   "route": {"cluster": "local_service"}})
    [f] = diagnose(doc, FACTS)
    assert f.path.endswith(f'.virtual_hosts[0].typed_per_filter_config["{_NAME}"].disabled')
    assert "one setting skips ext_authz on 6 routes: route #1 'prefix /svc4/'" in f.message
    assert f.message.endswith("; and 3 more")  # the exact /healthz route is not counted
