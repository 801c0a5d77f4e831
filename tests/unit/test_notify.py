"""Filesystem notifications (real inotify): which folders are watched, and that a change,
a new sub-folder and a ConfigMap-style swap are all seen."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from extauthz.sources.notify import open_notifier


def test_policy_folders_are_watched_with_sub_folders_and_a_files_folder_alone(
        tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    (policy / "team-a").mkdir(parents=True)
    (policy / "..2026_01_01").mkdir()  # hidden: a ConfigMap's data folder, skipped
    revocation = tmp_path / "etc"
    (revocation / "deep").mkdir(parents=True)
    notifier = open_notifier([policy], [revocation])
    assert notifier is not None
    try:
        assert set(notifier.folders) == {str(policy), str(policy / "team-a"), str(revocation)}
        assert notifier.drain() == 0
        (policy / "team-b").mkdir()  # a new sub-folder is watched after the event
        assert notifier.drain() >= 1
        assert str(policy / "team-b") in notifier.folders
        (policy / "team-b" / "x.yaml").write_text("a: 1\n")
        assert notifier.drain() >= 1
        (revocation / "deep" / "ignored.yaml").write_text("x")  # not watched: alone
        assert notifier.drain() == 0
    finally:
        notifier.close()


def test_a_configmap_swap_of_the_data_symlink_is_an_event(tmp_path: Path) -> None:
    root = tmp_path / "cm"
    (root / "..v1").mkdir(parents=True)
    (root / "..data").symlink_to("..v1")
    notifier = open_notifier([root])
    assert notifier is not None
    try:
        (root / "..v2").mkdir()
        (root / "..data_tmp").symlink_to("..v2")
        notifier.drain()
        os.replace(root / "..data_tmp", root / "..data")
        assert notifier.drain() >= 1
    finally:
        notifier.close()


def test_without_inotify_there_is_no_notifier_and_it_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "inotify_simple", None)  # as if not installed
    with caplog.at_level("INFO", logger="extauthz.reload"):
        assert open_notifier([tmp_path]) is None
    assert [r.event for r in caplog.records] == ["watch_polling"]  # type: ignore[attr-defined]
