"""`extauthz doctor` on configs nobody here wrote (tests/cases/doctor/real-world/).

Issue 17's definition of done, checked file by file: every planted bypass is found (the
expected findings and the text they must contain), nothing doctor could not read is reported as
"no findings", and no config that Envoy accepts is refused -- every config of the corpus is run
through the real `envoy --mode validate` (dumps: their bootstrap section), and the originals
Envoy 1.40 refuses are shown to be refused by Envoy yet read by the doctor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import main as cli
from extauthz.tools.doctor import CHECKS, diagnose

from .conftest import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "cases" / "doctor" / "real-world"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load(
    (CORPUS / "expected.yaml").read_text(encoding="utf-8"))
CONFIGS = sorted(p for p in CORPUS.glob("*.yaml") if p.name != "expected.yaml")
DUMPS = sorted(CORPUS.glob("*.json"))
REFUSED = sorted((CORPUS / "refused-by-envoy-1.40").glob("*.yaml"))
CERTS = "/etc/extauthz/certs"
FSXDS = "/etc/extauthz/fsxds/"


def _load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _name(path: Path) -> str:
    return str(path.relative_to(CORPUS))


def test_every_file_has_a_source_and_expectations() -> None:
    files = {_name(p) for p in [*CONFIGS, *DUMPS, *REFUSED]}
    assert files == set(EXPECTED)
    for path in [*CONFIGS, *REFUSED]:
        head = path.read_text(encoding="utf-8").split("\n", 3)[:3]
        assert any(line.startswith("# source:") for line in head) or "written for this corpus" \
            in (CORPUS / "README.md").read_text(encoding="utf-8").split(path.name)[1][:80], path
    for case in EXPECTED.values():
        assert set(case["findings"]) <= set(CHECKS)


@pytest.mark.parametrize("path", [*CONFIGS, *DUMPS, *REFUSED], ids=_name)
def test_findings_are_the_expected_ones(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = EXPECTED[_name(path)]
    assert sorted({f.code for f in diagnose(_load(path))}) == case["findings"]
    code = cli.main(["doctor", str(path), "--fail-on", "info"])
    out = capsys.readouterr().out
    assert code == (1 if case["findings"] else 0), out
    if case["findings"]:
        assert "no findings" not in out
    for text in case.get("mentions", []):
        assert text in out, f"{path.name}: report lacks {text!r}:\n{out}"


def test_the_planted_prefix_exemption_names_the_paths_it_opens() -> None:
    """The bypass issue 17 reports, on the real dump: '/health' also opens '/healthcare/...'."""
    [f] = [f for f in diagnose(_load(CORPUS / "config_dump-static.json"))
           if f.code == "route.ext_authz_disabled"]
    assert f.path.startswith("$.configs[") and "routes[0].typed_per_filter_config" in f.path
    assert re.search(r"e\.g\. /health, /health/anything, /health-admin/x, /healthcare/x",
                     f.message), f.message


def _with_placeholders(text: str, certs_dir: Path, fsxds: Path) -> str:
    return (text.replace(CERTS, str(certs_dir)).replace(FSXDS, f"{fsxds}/")
            .replace('"filename": "[redacted]"', f'"filename": "{certs_dir}/server.key"'))


@pytest.fixture(scope="module")
def fsxds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fsxds")
    for src in (CORPUS / "capture-fsxds").glob("*.yaml"):
        (d / src.name).write_text(src.read_text(encoding="utf-8").replace(FSXDS, f"{d}/"),
                                  encoding="utf-8")
    return d


def _validate(envoy_bin: str, name: str, text: str, tmp_path: Path) -> str:
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    proc = envoy_validate(envoy_bin, config)
    out = proc.stdout + proc.stderr
    return "OK" if proc.returncode == 0 and "OK" in out else out


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_is_accepted_by_envoy(
    envoy_bin: str, certs_dir: Path, fsxds: Path, tmp_path: Path, path: Path
) -> None:
    text = _with_placeholders(path.read_text(encoding="utf-8"), certs_dir, fsxds)
    assert _validate(envoy_bin, path.name, text, tmp_path) == "OK"


@pytest.mark.parametrize("path", DUMPS, ids=_name)
def test_dump_bootstrap_is_accepted_by_envoy(
    envoy_bin: str, certs_dir: Path, fsxds: Path, tmp_path: Path, path: Path
) -> None:
    """A dump is what a running Envoy served; its bootstrap section must load again."""
    [boot] = [c["bootstrap"] for c in _load(path)["configs"]
              if c["@type"].endswith("BootstrapConfigDump")]
    for added_by_envoy in ("user_agent_name", "user_agent_build_version"):
        boot.get("node", {}).pop(added_by_envoy, None)
    text = _with_placeholders(json.dumps(boot), certs_dir, fsxds)
    text = text.replace(str(Path("/tmp/devdump/work/access.log")), str(tmp_path / "access.log"))
    assert _validate(envoy_bin, path.stem + "-bootstrap.json", text, tmp_path) == "OK"


@pytest.mark.parametrize("path", REFUSED, ids=_name)
def test_refused_original_is_refused_by_envoy_but_read_by_doctor(
    envoy_bin: str, certs_dir: Path, fsxds: Path, tmp_path: Path, path: Path
) -> None:
    text = _with_placeholders(path.read_text(encoding="utf-8"), certs_dir, fsxds)
    result = _validate(envoy_bin, path.name, text, tmp_path)
    assert "with type URL: ''" in result  # Envoy 1.40: `typed_config: {}` on the router
    assert diagnose(yaml.safe_load(text))  # the doctor reads it (and finds what is wrong)
