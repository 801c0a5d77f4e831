"""`extauthz doctor` inputs and outputs: Envoy's spellings, `/config_dump`s, `--admin`, SARIF,
and the exit status (0 clean, 1 findings, 2 unreadable input).

Bad input first: every way the doctor can fail to read something must end in one line naming
what and why (exit 2) or in a finding that says what was not analysed -- never a traceback and
never "no findings" about something that was not there.
"""

from __future__ import annotations

import copy
import http.server
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from extauthz.cli import main as cli
from extauthz.tools.doctor import DoctorError, diagnose
from extauthz.tools.doctor import load as load_inventory
from extauthz.tools.doctor.admin import AdminError, dump_url, fetch_config_dump
from extauthz.tools.doctor.render import line_index
from tests.unit.test_doctor import CASES, FACTS, authz, authz_index, hcm, ids, load

CORPUS = CASES / "real-world"
SARIF_SCHEMA = CASES / "sarif" / "sarif-schema-2.1.0.json"


def _dump(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CORPUS / name).read_text(encoding="utf-8"))
    return data


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- Envoy's spellings -------------------------------------------------------------------


def test_lowercase_and_numeric_enums_are_read_as_envoy_reads_them() -> None:
    doc = load("clean")
    hcm(doc)["codec_type"] = "auto"
    hcm(doc)["forward_client_cert_details"] = "append_forward"
    hcm(doc)["path_with_escaped_slashes_action"] = "2"  # REJECT_REQUEST as a numeric string
    doc["static_resources"]["clusters"][1]["lb_policy"] = "round_robin"
    doc["static_resources"]["clusters"][1]["type"] = "strict_dns"
    assert ids(diagnose(doc, FACTS)) == ["hcm.xfcc_forwarded"]


def test_router_with_empty_or_no_typed_config_is_still_the_router() -> None:
    doc = load("clean")
    router = hcm(doc)["http_filters"][-1]
    router["typed_config"] = {}
    assert diagnose(doc, FACTS) == []
    del router["typed_config"]
    assert diagnose(doc, FACTS) == []


def test_quoted_booleans_and_integers_are_read() -> None:
    doc = load("clean")
    authz(doc)["failure_mode_allow"] = "true"
    authz(doc)["status_on_error"] = {"code": "503"}
    assert ids(diagnose(doc, FACTS)) == ["ext_authz.failure_mode_allow"]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: hcm(d).update(forward_client_cert_details="SANITIZE-SET"),
     ".forward_client_cert_details: unknown value 'SANITIZE-SET'"),
    (lambda d: hcm(d).update(codec_type=99), ".codec_type: 99 is not a"),
    (lambda d: hcm(d).update(codec_type=True), ".codec_type: expected a"),
    (lambda d: authz(d).update(grpc_service="extauthz"), ".grpc_service: expected GrpcService"),
    (lambda d: hcm(d)["http_filters"][0].update(typed_config={"x": 1}),
     ".http_filters[0].typed_config: a typed config needs an '@type'"),
    (lambda d: d.update(static_resources=[]), "$.static_resources: expected BootstrapStaticResources"),
])
def test_wrong_shapes_name_the_field(mutate: Any, message: str) -> None:
    doc = load("clean")
    mutate(doc)
    with pytest.raises(DoctorError) as err:
        diagnose(doc)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_field_is_a_finding_and_the_rest_is_still_checked() -> None:
    doc = load("clean")
    authz(doc)["failure_mode_allowed"] = False  # a typo: Envoy refuses it, the default stays
    authz(doc)["failure_mode_allow"] = True
    findings = diagnose(doc, FACTS)
    assert ids(findings) == ["config.unknown_field", "ext_authz.failure_mode_allow"]
    [unknown] = [f for f in findings if f.code == "config.unknown_field"]
    assert unknown.path.endswith(f"http_filters[{authz_index(doc)}].typed_config"
                                 ".failure_mode_allowed")
    assert "ExtAuthz has no field 'failure_mode_allowed'" in unknown.message


# --- what is not in the input ------------------------------------------------------------


def test_ads_bootstrap_is_never_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([str(CORPUS / "xds-bootstrap-ads.yaml")], capsys)
    assert code == 1 and "no findings" not in out
    assert "listeners come from LDS (ADS)" in out and "--admin" in out


def test_rds_and_ecds_without_a_dump_are_named() -> None:
    doc = load("clean")
    h = hcm(doc)
    h["rds"] = {"route_config_name": "orders", "config_source": {"ads": {}}}
    del h["route_config"]
    h["http_filters"][authz_index(doc)] = {"name": "authz", "config_discovery": {
        "config_source": {"ads": {}},
        "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"]}}
    details = sorted(f.message for f in diagnose(doc, FACTS))
    assert ids(diagnose(doc, FACTS)) == ["config.xds_not_seen"]  # not config.no_ext_authz
    assert any("route configuration 'orders' comes from RDS" in d for d in details)
    assert any("http filter 'authz' (ExtAuthz) comes from ECDS" in d for d in details)


def test_empty_input_has_no_listeners_to_trust() -> None:
    assert ids(diagnose({})) == ["config.no_ext_authz"]


# --- /config_dump ------------------------------------------------------------------------


def test_static_dump_finds_what_its_bootstrap_finds() -> None:
    raw = yaml.safe_load((CORPUS / "capture-static-extauthz.yaml").read_text(encoding="utf-8"))
    assert ids(diagnose(_dump("config_dump-static.json"))) == ids(diagnose(raw))


def test_dump_sections_are_found_by_type_not_position() -> None:
    dump = _dump("config_dump-dynamic-fs.json")
    expected = diagnose(dump)
    random.Random(7).shuffle(dump["configs"])
    assert sorted(f.message for f in diagnose(dump)) == sorted(f.message for f in expected)


def test_ecds_filter_config_is_joined_by_name() -> None:
    dump = _dump("config_dump-dynamic-fs.json")
    [f] = [f for f in diagnose(dump) if f.code == "ext_authz.failure_mode_allow"]
    assert ".ecds_filters[0].ecds_filter.typed_config.failure_mode_allow" in f.path
    inv = load_inventory(dump)
    assert set(inv.ecds) == {"authz-ecds"} and set(inv.route_configs) == {"dyn_route"}
    without = copy.deepcopy(dump)
    without["configs"] = [c for c in without["configs"] if "Ecds" not in c["@type"]]
    assert "config.xds_not_seen" in ids(diagnose(without))
    assert "config.no_ext_authz" not in ids(diagnose(without))


def test_rejected_lds_update_is_reported_not_analysed() -> None:
    findings = diagnose(_dump("config_dump-dynamic-fs-after-bad-lds.json"))
    rejected = [f for f in findings if f.code == "config.not_analysed"]
    assert len(rejected) == 2 and all("error_state" in f.path for f in rejected)
    assert not any("dyn_dup_addr" in f.message and f.code != "config.not_analysed"
                   for f in findings)


def test_warming_listener_is_checked_too() -> None:
    dump = _dump("config_dump-dynamic-fs.json")
    [section] = [c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")]
    entry = section["dynamic_listeners"][0]
    entry["warming_state"] = copy.deepcopy(entry.pop("active_state"))
    labels = {f.message.split(":")[0] for f in diagnose(dump) if f.code == "listener.plaintext"}
    assert labels == {"listener 'dyn_ingress' (dynamic, warming)"}


def test_authz_cluster_missing_from_a_dump_is_missing_not_unseen() -> None:
    dump = _dump("config_dump-static.json")
    for c in dump["configs"]:
        if c["@type"].endswith("ClustersConfigDump"):
            c["static_clusters"] = [s for s in c["static_clusters"]
                                    if s["cluster"]["name"] != "ext_authz"]
    found = ids(diagnose(dump))
    assert "authz_cluster.missing" in found and "config.xds_not_seen" not in found


def test_eds_endpoints_from_include_eds_are_used() -> None:
    dump = _dump("devstack-config_dump.json")
    for c in dump["configs"]:
        if c["@type"].endswith("ClustersConfigDump"):
            for s in c["static_clusters"]:
                if s["cluster"]["name"] == "extauthz":
                    s["cluster"].pop("load_assignment")
    assert diagnose(dump) == []  # the EndpointsConfigDump still has 127.0.0.1
    dump["configs"] = [c for c in dump["configs"] if "Endpoints" not in c["@type"]]
    assert ids(diagnose(dump)) == ["config.xds_not_seen"]


def test_filtered_dump_says_what_it_lacks() -> None:
    dump = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump."
                                  "StaticListener", "listener": {}}]}
    findings = diagnose(dump)
    assert ids(findings) == ["config.xds_not_seen"]
    assert any("?resource=" in f.message for f in findings)


def test_dump_section_without_type_is_unreadable() -> None:
    with pytest.raises(DoctorError, match=r"\$\.configs\[0\]: a /config_dump section"):
        diagnose({"configs": [{"bootstrap": {}}]})


# --- --admin -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://10.0.0.7:9901", "http://example.com:9901", "http://0.0.0.0:9901",
    "https://127.0.0.1:9901", "http://127.0.0.1", "http://127.0.0.1:notaport",
    "http://localhost.evil.example:9901",
])
def test_admin_url_off_loopback_or_malformed_is_refused(url: str) -> None:
    with pytest.raises(AdminError) as err:
        dump_url(url)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:9901", "http://127.0.0.1:9901/config_dump?include_eds"),
    ("127.0.0.1:9901", "http://127.0.0.1:9901/config_dump?include_eds"),
    ("http://[::1]:9901/", "http://[::1]:9901/config_dump?include_eds"),
    ("http://localhost:15000", "http://localhost:15000/config_dump?include_eds"),
])
def test_admin_url_on_loopback_is_accepted(url: str, expected: str) -> None:
    assert dump_url(url) == expected


class _Admin(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200
    seen: list[str] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[tuple[type[_Admin], int]]:
    handler = type("Handler", (_Admin,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_admin_fetch_reads_the_dump(
    admin: tuple[type[_Admin], int], capsys: pytest.CaptureFixture[str]
) -> None:
    handler, port = admin
    handler.body = (CORPUS / "config_dump-static.json").read_bytes()
    code, out, err = _run(["--admin", f"http://127.0.0.1:{port}", "--format", "json"], capsys)
    assert code == 1, err
    doc = json.loads(out)
    assert doc["config"] == f"http://127.0.0.1:{port}/config_dump?include_eds"
    assert "route.ext_authz_disabled" in {f["id"] for f in doc["findings"]}
    assert handler.seen == ["/config_dump?include_eds"]


@pytest.mark.parametrize(("status", "body", "message"), [
    (200, b"<html>not envoy</html>", "is not JSON"),
    (200, b'{"listeners": []}', "not a /config_dump"),
    (403, b"{}", "answered HTTP 403"),
])
def test_admin_that_does_not_serve_a_dump_exits_2(
    admin: tuple[type[_Admin], int], capsys: pytest.CaptureFixture[str],
    status: int, body: bytes, message: str,
) -> None:
    handler, port = admin
    handler.status, handler.body = status, body
    code, out, err = _run(["--admin", f"http://127.0.0.1:{port}"], capsys)
    assert (code, out) == (2, "")
    assert message in err and err.count("\n") == 1


def test_admin_unreachable_or_remote_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from extauthz.devstack.stack import free_tcp_port

    code, out, err = _run(["--admin", f"http://127.0.0.1:{free_tcp_port()}"], capsys)
    assert (code, out) == (2, "") and "cannot reach the Envoy admin interface" in err
    code, out, err = _run(["--admin", "http://192.0.2.1:9901"], capsys)
    assert (code, out) == (2, "") and "refusing a non-loopback address" in err
    assert err.count("\n") == 1


def test_fetch_refuses_oversized_answers(
    admin: tuple[type[_Admin], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from extauthz.tools.doctor import admin as admin_module

    handler, port = admin
    handler.body = b'{"configs": []}' + b" " * 100
    monkeypatch.setattr(admin_module, "MAX_DUMP_BYTES", 64)
    with pytest.raises(AdminError, match="larger than 64 bytes"):
        fetch_config_dump(f"http://127.0.0.1:{port}")


def test_config_and_admin_together_or_neither_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([], capsys)[0] == 2
    code, _, err = _run([str(CASES / "clean.yaml"), "--admin", "http://127.0.0.1:9"], capsys)
    assert code == 2 and "not both" in err


# --- SARIF -------------------------------------------------------------------------------


def _sarif(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out, _ = _run([str(path), "--format", "sarif"], capsys)
    return code, json.loads(out)


def test_sarif_is_valid_sarif_2_1_0(capsys: pytest.CaptureFixture[str]) -> None:
    schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
    for path in (CASES / "unsafe.yaml", CORPUS / "config_dump-static.json", CASES / "clean.yaml"):
        code, doc = _sarif(path, capsys)
        jsonschema.validate(doc, schema)
        assert code == (0 if path.name == "clean.yaml" else 1)
    broken = copy.deepcopy(doc)
    broken["runs"][0]["results"] = [{"level": "fatal"}]
    with pytest.raises(jsonschema.ValidationError):  # the schema really is checked
        jsonschema.validate(broken, schema)


def test_sarif_results_point_at_the_offending_line(capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES / "ext_authz.failure_mode_allow.yaml"
    _, doc = _sarif(path, capsys)
    [result] = doc["runs"][0]["results"]
    assert result["ruleId"] == "ext_authz.failure_mode_allow" and result["level"] == "error"
    location = result["locations"][0]["physicalLocation"]
    line = path.read_text(encoding="utf-8").splitlines()[location["region"]["startLine"] - 1]
    assert line.strip() == "failure_mode_allow: true"
    rules = doc["runs"][0]["tool"]["driver"]["rules"]
    assert rules[result["ruleIndex"]]["id"] == "ext_authz.failure_mode_allow"


def test_sarif_levels_follow_severity(capsys: pytest.CaptureFixture[str]) -> None:
    _, doc = _sarif(CASES / "ext_authz.status_on_error_not_503.yaml", capsys)
    assert [r["level"] for r in doc["runs"][0]["results"]] == ["note"]
    _, again = _sarif(CASES / "ext_authz.status_on_error_not_503.yaml", capsys)
    assert again == doc  # deterministic, fingerprints included


def test_line_index_follows_camel_case_and_map_keys() -> None:
    text = "a:\n  fooBar:\n    - x: 1\n  m:\n    envoy.filters.http.ext_authz:\n      y: 2\n"
    lines = line_index(text)
    assert lines["$.a.foo_bar[0].x"] == 3
    assert lines['$.a.m["envoy.filters.http.ext_authz"].y'] == 6
    assert line_index("a: [") == {}


def test_faster_validation_is_scoped_to_the_doctor_and_still_validates() -> None:
    import betterproto2

    from extauthz.tools.doctor.parsing import _reused_validators, api_class

    before = betterproto2.Message._validate
    diagnose(load("unsafe"))
    assert betterproto2.Message._validate is before  # no lasting change to the library
    timeout = api_class("google.protobuf", "Duration")(seconds=1)
    timeout.seconds = "one"  # type: ignore[assignment]  # wrong type behind pydantic's back
    with _reused_validators(), pytest.raises(ValueError, match="seconds"):
        bytes(timeout)


def test_an_analysis_bug_is_one_line_and_exit_2_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from extauthz.tools.doctor import analysis

    def explode(self: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'routes'\nsecond line")

    monkeypatch.setattr(analysis.Doctor, "run", explode)
    code, out, err = _run([str(CASES / "clean.yaml")], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "could not analyse (AttributeError" in err
    assert "doctor bug" in err and "Traceback" not in err
