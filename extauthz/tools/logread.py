"""Streams decision-log records out of files: plain or gzip, one line at a time.

    stats = ReadStats()
    for record in iter_records(["decisions.log", "decisions.log.1.gz"], stats):
        ...

Memory is constant: a line longer than `MAX_LINE_BYTES` is skipped in chunks (and counted),
never read whole. Nothing in a log is fatal: a line that is not a JSON object is counted as
`malformed`; a last line without its newline that does not parse (the writer was cut off, or
the file is still being written) is counted as `truncated`, as is a gzip stream that ends early.
Gzip is recognized by its magic bytes, whatever the file is called; `-` reads stdin.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_LINE_BYTES = 64 * 1024
MAX_PROBLEMS = 20  # problem samples kept for the report (the counters count them all)
_GZIP_MAGIC = b"\x1f\x8b"
_DECODER = json.JSONDecoder()


class LogReadError(OSError):
    """A log file cannot be opened at all (missing, unreadable)."""


@dataclass
class ReadStats:
    files: int = 0
    lines: int = 0
    records: int = 0
    blank: int = 0
    malformed: int = 0
    truncated: int = 0
    oversized: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{where}: {what}")

    @property
    def skipped(self) -> int:
        return self.malformed + self.truncated + self.oversized

    def as_dict(self) -> dict[str, object]:
        return {"files": self.files, "lines": self.lines, "records": self.records,
                "blank": self.blank, "malformed": self.malformed, "truncated": self.truncated,
                "oversized": self.oversized, "problems": list(self.problems)}


def _open(name: str) -> tuple[IO[bytes], IO[bytes]]:
    """(the stream to read, the file under it); both closed by the caller."""
    if name == "-":
        raw: IO[bytes] = sys.stdin.buffer
    else:
        try:
            raw = Path(name).open("rb")  # noqa: SIM115 - closed by iter_records
        except OSError as exc:
            raise LogReadError(f"{name}: cannot open: {exc.strerror or exc}") from None
    peek = getattr(raw, "peek", None)
    head = peek(2)[:2] if peek is not None else b""
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    return raw, raw


def iter_records(names: Iterable[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Every JSON-object line of every file, in order; `stats` counts everything else."""
    for name in names:
        stats.files += 1
        stream, raw = _open(name)
        try:
            yield from _records(name, stream, stats)
        finally:
            if name != "-":
                stream.close()
                raw.close()


def _records(name: str, stream: IO[bytes], stats: ReadStats) -> Iterator[dict[str, Any]]:
    number = 0
    decode = _DECODER.decode
    while True:
        try:
            line = stream.readline(MAX_LINE_BYTES + 1)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            stats.truncated += 1
            stats.problem(name, f"stream ends early after line {number}: {exc}")
            return
        if not line:
            return
        number += 1
        stats.lines += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            stats.oversized += 1
            stats.problem(f"{name}:{number}", f"line longer than {MAX_LINE_BYTES} bytes")
            if not _skip_rest(stream):
                return
            continue
        if not line.strip():
            stats.blank += 1
            continue
        try:
            obj = decode(line.decode("utf-8"))
        except ValueError:
            if line.endswith(b"\n"):
                stats.malformed += 1
                stats.problem(f"{name}:{number}", "not JSON")
            else:
                stats.truncated += 1
                stats.problem(f"{name}:{number}", "last line is cut off (no newline)")
            continue
        if not isinstance(obj, dict):
            stats.malformed += 1
            stats.problem(f"{name}:{number}", "not a JSON object")
            continue
        stats.records += 1
        yield obj


def _skip_rest(stream: IO[bytes]) -> bool:
    """Read to the end of an oversized line; False at end of file (or a broken stream)."""
    while True:
        try:
            chunk = stream.readline(MAX_LINE_BYTES)
        except (EOFError, zlib.error, OSError):
            return False
        if not chunk:
            return False
        if chunk.endswith(b"\n"):
            return True
