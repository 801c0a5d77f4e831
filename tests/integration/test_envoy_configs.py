"""Every Envoy config we ship or render is accepted by the real Envoy (`--mode validate`).

Validation opens the files a config references (certificates, trust bundle), so each config is
validated against freshly made certificates in a temporary directory: shipped files have
`/etc/extauthz/certs/` rewritten to it. Envoy missing is a failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.envoyconf.bootstrap import (
    DEFAULT_CERTS_DIR,
    SidecarConfig,
    config_with_certs_dir,
    main,
    render,
    render_yaml,
)

from .conftest import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "envoy").glob("*.yaml"))


def _assert_valid(envoy_bin: str, config: Path) -> None:
    proc = envoy_validate(envoy_bin, config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in out, f"{config}:\n{out}"


def test_shipped_sidecar_is_the_rendered_default() -> None:
    shipped = ROOT / "envoy" / "sidecar.yaml"
    assert shipped.read_text(encoding="utf-8") == render_yaml(), (
        "envoy/sidecar.yaml is stale: python -m extauthz.envoyconf.bootstrap --write envoy/sidecar.yaml"
    )
    assert main(["--check", str(shipped)]) == 0


def test_there_are_shipped_configs() -> None:
    assert ROOT / "envoy" / "sidecar.yaml" in SHIPPED


@pytest.mark.parametrize("shipped", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates(
    envoy_bin: str, certs_dir: Path, tmp_path: Path, shipped: Path
) -> None:
    text = shipped.read_text(encoding="utf-8").replace(DEFAULT_CERTS_DIR, str(certs_dir))
    config = tmp_path / shipped.name
    config.write_text(text, encoding="utf-8")
    _assert_valid(envoy_bin, config)


VARIANTS = {
    "tcp": SidecarConfig(),
    "unix": SidecarConfig(extauthz="unix:/run/extauthz/extauthz.sock"),
    "file-log-port-0": SidecarConfig(
        listen_address="127.0.0.1", listen_port=0, admin_port=0, access_log_path="/dev/null"
    ),
    "ipv6-extauthz": SidecarConfig(extauthz="[::1]:9191", authz_timeout_s=0.1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rendered_variant_validates(
    envoy_bin: str, certs_dir: Path, tmp_path: Path, name: str
) -> None:
    config = tmp_path / f"{name}.yaml"
    config.write_text(render_yaml(config_with_certs_dir(str(certs_dir), VARIANTS[name])))
    _assert_valid(envoy_bin, config)


def test_validation_is_not_a_rubber_stamp(envoy_bin: str, certs_dir: Path, tmp_path: Path) -> None:
    doc = render(config_with_certs_dir(str(certs_dir)))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["path_with_escaped_slashes_action"] = "NOT_AN_ACTION"
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(doc))
    assert envoy_validate(envoy_bin, config).returncode != 0
    missing = tmp_path / "missing-certs.yaml"
    missing.write_text(render_yaml(config_with_certs_dir(str(tmp_path / "nowhere"))))
    assert envoy_validate(envoy_bin, missing).returncode != 0


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return typed


def test_rendered_safety_settings() -> None:
    doc = render()
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    hcm = _hcm(doc)
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    authz = hcm["http_filters"][1]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["include_peer_certificate"] is True
    assert authz["transport_api_version"] == "V3"
    assert authz["status_on_error"] == {"code": 503}
    assert authz["grpc_service"]["timeout"] == "0.25s"
    assert "with_request_body" not in authz
    log = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["principal"] == "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:principal)%"
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert "grpc_health_check" in clusters["extauthz"]["health_checks"][0]


def test_unix_socket_cluster_uses_a_pipe() -> None:
    doc = render(SidecarConfig(extauthz="unix:/run/x.sock"))
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    [endpoint] = clusters["extauthz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": "/run/x.sock"}}


@pytest.mark.parametrize("bad", ["localhost", "unix:relative.sock", "host:0", "host:99999", ":1"])
def test_bad_extauthz_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        SidecarConfig(extauthz=bad)
