"""One list of header names: the server's settings and `envoy-config` refuse the same ones."""

from __future__ import annotations

import pytest

from extauthz import headers
from extauthz.cli.main import main
from extauthz.envoyconf.config import SidecarConfig
from extauthz.settings import SettingsError, load_settings

REFUSED = [*sorted(headers.RESERVED), "x caller", ":authority", "X-Upper", "a" * 129]


@pytest.mark.parametrize("name", REFUSED)
def test_a_reserved_or_malformed_principal_header_is_refused_by_serve_and_by_envoy_config(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="principal_header"):
        load_settings({"principal_header": name, "policy": "/p"}, {})
    with pytest.raises(SettingsError, match="rule_header"):
        load_settings({"rule_header": name, "policy": "/p"}, {})
    if name == name.lower().strip():  # envoy-config lowercases what it is given first
        with pytest.raises(ValueError, match="principal header"):
            SidecarConfig(principal_header=name)
        assert main(["envoy-config", "--principal-header", name]) == 2
        assert "Traceback" not in capsys.readouterr().err


def test_traceparent_is_refused_by_serve_exactly_as_by_envoy_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The case that used to differ: serve accepted it, envoy-config refused it."""
    assert main(["serve", "--policy", "/nonexistent", "--principal-header", "traceparent",
                 "--print-config"]) == 2
    assert "principal_header" in capsys.readouterr().err
    assert main(["envoy-config", "--principal-header", "traceparent"]) == 2


def test_method_override_headers_are_reserved_so_a_renamed_header_cannot_be_one() -> None:
    assert set(headers.METHOD_OVERRIDE) <= headers.RESERVED


def test_a_plain_header_name_is_accepted_by_both() -> None:
    assert load_settings({"principal_header": "x-caller", "policy": "/p"}, {}).principal_header \
        == SidecarConfig(principal_header="x-caller").principal_header == "x-caller"
    assert headers.settable_problem("x-caller") == ""
