"""PolicyStore: a new version is swapped in whole; a broken one is rejected with a logged
error and a metric while the previous version keeps serving."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extauthz.model import Identity, IdentitySource
from extauthz.observe.metrics import Sources, registry_for
from extauthz.policy.compiled import CompiledPolicy
from extauthz.sources.policy_store import MAX_FILE_BYTES, PolicyStore, load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
CLIENT = "spiffe://prod.example/ns/reload/sa/client"
HEAD = "apiVersion: extauthz/v1\nowner: t\nservice: reload\nhosts: [reload.mesh.local]\nrules:\n"
GOOD_A = HEAD + f"  - name: reload-a\n    methods: [GET]\n    path_prefix: /x\n    allow: ['{CLIENT}']\n"
GOOD_B = HEAD + "  - name: reload-b\n    methods: [GET]\n    path_prefix: /x\n    allow: [checkout]\n"
BROKEN = [
    "apiVersion: extauthz/v1\nrules: [\n",  # invalid YAML
    HEAD + "  - name: reload-c\n    path_prefix: /x\n    allow: [ghost]\n",  # unknown principal
    HEAD + "  - name: reload-d\n    path_regex: '(?=x)'\n    allow: ['*']\n",  # not RE2
    HEAD + "  - name: orders-read\n    path: /x\n    allow: ['*']\n",  # duplicate rule name
]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, d)
    (d / "reload.yaml").write_text(GOOD_A)
    return d


def metric_samples(store: PolicyStore) -> dict[str, float]:
    app = SimpleNamespace(cache=SimpleNamespace(hits=0, misses=0, size=0, maxsize=1), store=store,
                          stats=SimpleNamespace(errors=0))
    text = generate_latest(registry_for(Sources(app=app), process=False)).decode()
    return {s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def decide(policy: CompiledPolicy, principal: str = CLIENT) -> tuple[bool, str, str]:
    d = policy.evaluate(Identity(principal, IdentitySource.MTLS, "prod.example"),
                        "reload.mesh.local", "GET", "/x/1").decision
    return d.allowed, d.rule, d.policy_version


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_version_is_rejected_logged_and_counted_while_the_previous_serves(
        policy_dir: Path, broken: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    store = PolicyStore(policy_dir, on_change=lambda p: seen.append(p.version))
    assert store.reload() is True
    serving = store.current
    assert serving is not None and seen == [serving.version]

    (policy_dir / "reload.yaml").write_text(broken)
    with caplog.at_level(logging.ERROR, logger="extauthz.policy"):
        assert store.reload() is False
    assert store.current is serving  # the very same object keeps serving
    assert decide(serving) == (True, "reload-a", serving.version)
    assert (store.reloads, store.reload_failures, seen) == (1, 1, [serving.version])
    assert "reload.yaml" in store.last_error
    failed = [r for r in caplog.records if getattr(r, "event", "") == "policy_reload_failed"]
    assert len(failed) == 1 and failed[0].serving_version == serving.version  # type: ignore[attr-defined]
    metrics = metric_samples(store)
    assert metrics["extauthz_policy_reload_failures_total"] == 1
    assert metrics["extauthz_policy_reloads_total"] == 1
    assert metrics[f"extauthz_policy_info{{{serving.version}}}"] == 1

    (policy_dir / "reload.yaml").write_text(GOOD_B)
    assert store.reload() is True
    assert store.current is not serving and store.last_error == ""
    assert decide(store.current) == (False, "reload-b", store.current.version)
    assert metric_samples(store)["extauthz_policy_reloads_total"] == 2


def test_the_first_load_can_fail_and_then_nothing_serves(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BROKEN[0])
    store = PolicyStore(tmp_path)
    assert store.reload() is False and store.current is None
    assert metric_samples(store)["extauthz_policy_loaded"] == 0


def test_attempted_tells_the_watcher_when_a_reload_is_due(policy_dir: Path) -> None:
    store = PolicyStore(policy_dir)
    assert store.attempted != store.fingerprint()  # nothing attempted yet
    store.reload()
    assert store.current is not None and store.attempted == store.fingerprint() == store.current.version
    (policy_dir / "reload.yaml").write_text(BROKEN[1])
    assert store.attempted != store.fingerprint()  # changed: reload
    store.reload()
    assert store.attempted == store.fingerprint()  # broken, but already tried: no retry loop
    big = policy_dir / "big.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))  # a read error, not a parse error
    assert store.reload() is False and store.attempted.startswith("error:")
    assert store.attempted == store.fingerprint()
    big.unlink()
    assert store.attempted != store.fingerprint()  # the read error is gone: reload


def test_reloading_the_serving_version_changes_nothing(policy_dir: Path) -> None:
    store = PolicyStore(policy_dir)
    store.reload()
    first = store.current
    (policy_dir / "reload.yaml").write_text(BROKEN[0])
    store.reload()
    (policy_dir / "reload.yaml").write_text(GOOD_A)  # back to the serving content
    assert store.reload() is True
    assert store.current is first and store.reloads == 1 and store.last_error == ""


def test_checks_during_reloads_see_one_whole_version(policy_dir: Path, tmp_path: Path) -> None:
    """Every decision taken while versions (good and broken) are swapped matches exactly
    the version it names: never a mix, never a broken version, never an exception."""
    store = PolicyStore(policy_dir)
    store.reload()
    expected = {}
    for text, answer in ((GOOD_A, (True, "reload-a")), (GOOD_B, (False, "reload-b"))):
        d = tmp_path / f"copy-{answer[1]}"
        shutil.copytree(policy_dir, d)
        (d / "reload.yaml").write_text(text)
        expected[load_policy(d).version] = answer
    stop = threading.Event()
    wrong: list[object] = []
    count = 0

    def check() -> None:
        nonlocal count
        while not stop.is_set():
            policy = store.current
            assert policy is not None
            allowed, rule, version = decide(policy)
            if expected.get(version) != (allowed, rule):
                wrong.append((version, allowed, rule))
            count += 1

    threads = [threading.Thread(target=check) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            text = [GOOD_B, BROKEN[i % len(BROKEN)], GOOD_A][i % 3]
            (policy_dir / "reload.yaml").write_text(text)
            store.reload()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert wrong == [] and count > 0
    assert store.reload_failures == 10 and store.reloads == 21
