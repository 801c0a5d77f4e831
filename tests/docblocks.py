"""The shell blocks of README.md and docs/*.md, so tests can run them as a reader would.

A block is a fenced code block tagged sh/bash/shell/console. Its commands are its lines with
backslash continuations joined; a line starting with `#` is a comment, and the comment lines
right after a command are the output the doc promises for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SHELL_TAGS = frozenset({"sh", "bash", "shell", "console"})


@dataclass(frozen=True)
class Command:
    line: str  # the command, continuations joined
    output: tuple[str, ...] = ()  # the `# ...` lines the doc shows after it


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    lineno: int  # of the opening fence
    text: str
    commands: tuple[Command, ...] = field(default=())

    @property
    def key(self) -> tuple[str, str]:
        """(doc, first command): what the registry of doc commands is keyed by."""
        return (self.doc, self.commands[0].line if self.commands else "")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_blocks(doc: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, tag = m.group(1), m.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if tag in SHELL_TAGS:
            text = "\n".join(body)
            blocks.append(Block(str(doc.relative_to(REPO)), start + 1, text, _commands(body)))
    return blocks


def _commands(body: list[str]) -> tuple[Command, ...]:
    commands: list[Command] = []
    pending = ""
    for raw in body:
        line = raw.rstrip()
        if pending:
            pending += " " + line.strip().removesuffix("\\").strip()
            if not line.endswith("\\"):
                commands.append(Command(pending))
                pending = ""
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if commands:
                last = commands[-1]
                commands[-1] = Command(last.line, (*last.output, line.lstrip()[1:].strip()))
            continue
        if line.endswith("\\"):
            pending = line.removesuffix("\\").strip()
        else:
            commands.append(Command(line.strip()))
    return tuple(commands)


def all_blocks() -> list[Block]:
    return [b for doc in documents() for b in (*shell_blocks(doc), *transcripts(doc))]


def transcripts(doc: Path) -> list[Block]:
    """Untagged blocks that are console transcripts: `$ command` lines, each followed by the
    output it printed (a command may continue over `\\`-ended lines)."""
    out: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start = m.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        if tag or not any(line.startswith("$ ") for line in body):
            continue
        commands: list[Command] = []
        pending = ""
        output: list[str] = []
        for line in body:
            if pending:
                pending += " " + line.strip().removesuffix("\\").strip()
                if not line.endswith("\\"):
                    commands.append(Command(pending))
                    pending = ""
                continue
            if line.startswith("$ "):
                if commands and output:
                    commands[-1] = Command(commands[-1].line, tuple(output))
                output = []
                text = line[2:]
                if text.endswith("\\"):
                    pending = text.removesuffix("\\").strip()
                else:
                    commands.append(Command(text.strip()))
                continue
            output.append(line)
        if commands and output:
            commands[-1] = Command(commands[-1].line, tuple(output))
        out.append(Block(str(doc.relative_to(REPO)), start + 1, "\n".join(body), tuple(commands)))
    return out


def block(doc: str, first: str) -> Block:
    """The block of `doc` whose first command starts with `first`."""
    found = [b for b in (*shell_blocks(REPO / doc), *transcripts(REPO / doc))
             if b.commands and b.commands[0].line.startswith(first)]
    assert len(found) == 1, f"{doc}: {len(found)} shell blocks start with {first!r}"
    return found[0]
