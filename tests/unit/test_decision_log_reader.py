"""The decision-log reader: bad input is counted, never fatal; gzip by content; bounded lines."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import pytest

from extauthz.tools import logread as decision_log_reader
from extauthz.tools.logread import (
    MAX_LINE_BYTES,
    MAX_PROBLEMS,
    LogReadError,
    ReadStats,
    iter_records,
)

GOOD = json.dumps({"time": "2024-05-01T12:00:00.000000Z", "reason": "allowed"})


def read(*paths: Path | str) -> tuple[list[dict[str, object]], ReadStats]:
    stats = ReadStats()
    return list(iter_records([str(p) for p in paths], stats)), stats


def test_a_missing_file_is_a_read_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LogReadError, match="nope.log"):
        read(tmp_path / "nope.log")


def test_malformed_and_non_object_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    p = tmp_path / "d.log"
    p.write_text(f"{GOOD}\nnot json\n[1, 2]\n\"str\"\n\n{GOOD}\n\xff\n".replace("\xff", "{\"a\":"))
    records, stats = read(p)
    assert len(records) == 2
    assert (stats.malformed, stats.blank, stats.truncated, stats.lines) == (4, 1, 0, 7)
    assert stats.problems[0] == f"{p}:2: not JSON"
    assert f"{p}:3: not a JSON object" in stats.problems


def test_invalid_utf8_is_malformed_not_a_crash(tmp_path: Path) -> None:
    p = tmp_path / "d.log"
    p.write_bytes(b'{"a": "\xff\xfe"}\n' + GOOD.encode() + b"\n")
    records, stats = read(p)
    assert len(records) == 1 and stats.malformed == 1


def test_a_cut_off_last_line_is_truncated_but_a_complete_one_is_read(tmp_path: Path) -> None:
    cut = tmp_path / "cut.log"
    cut.write_text(f"{GOOD}\n{GOOD[:25]}")
    records, stats = read(cut)
    assert len(records) == 1 and stats.truncated == 1 and stats.malformed == 0
    assert "cut off" in stats.problems[0]
    whole = tmp_path / "whole.log"
    whole.write_text(f"{GOOD}\n{GOOD}")  # no final newline, but valid JSON: kept
    records, stats = read(whole)
    assert len(records) == 2 and stats.truncated == 0


def test_a_gzip_stream_that_ends_early_is_truncated_not_fatal(tmp_path: Path) -> None:
    full = gzip.compress((f"{GOOD}\n" * 2000).encode())
    p = tmp_path / "d.log.gz"
    p.write_bytes(full[: len(full) // 2])
    other = tmp_path / "next.log"
    other.write_text(f"{GOOD}\n")
    records, stats = read(p, other)
    assert stats.truncated == 1 and "stream ends early" in stats.problems[0]
    assert records[-1] == json.loads(GOOD)  # the next file is still read
    assert stats.files == 2


def test_gzip_is_recognized_by_content_whatever_the_name(tmp_path: Path) -> None:
    p = tmp_path / "decisions.log.1"
    p.write_bytes(gzip.compress(f"{GOOD}\n{GOOD}\n".encode()))
    records, stats = read(p)
    assert len(records) == 2 and stats.skipped == 0


def test_an_oversized_line_is_skipped_in_chunks_and_the_next_line_read(tmp_path: Path) -> None:
    p = tmp_path / "big.log"
    huge = '{"x": "' + "a" * (3 * MAX_LINE_BYTES) + '"}'
    p.write_text(f"{GOOD}\n{huge}\n{GOOD}\n{huge}")
    records, stats = read(p)
    assert len(records) == 2
    assert stats.oversized == 2 and stats.lines == 4


def test_no_line_is_ever_read_beyond_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant memory: every readline is bounded."""
    p = tmp_path / "big.log"
    p.write_text("x" * (5 * MAX_LINE_BYTES) + f"\n{GOOD}\n")
    sizes: list[int] = []
    real_open = decision_log_reader._open

    class Spy(io.BufferedReader):
        def readline(self, size: int | None = -1) -> bytes:
            sizes.append(-1 if size is None else size)
            return super().readline(size)

    def spying_open(name: str) -> tuple[io.BufferedReader, io.BufferedReader]:
        for f in real_open(name):
            f.close()
        spy = Spy(io.FileIO(name))
        return spy, spy

    monkeypatch.setattr(decision_log_reader, "_open", spying_open)
    records, stats = read(p)
    assert len(records) == 1 and stats.oversized == 1
    assert sizes and all(0 < s <= MAX_LINE_BYTES + 1 for s in sizes)


def test_problem_samples_are_bounded_but_counters_count_everything(tmp_path: Path) -> None:
    p = tmp_path / "bad.log"
    p.write_text("nope\n" * (MAX_PROBLEMS * 5))
    _, stats = read(p)
    assert stats.malformed == MAX_PROBLEMS * 5 and len(stats.problems) == MAX_PROBLEMS


def test_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = gzip.compress(f"{GOOD}\n".encode())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    records, stats = read("-")
    assert len(records) == 1 and stats.files == 1
