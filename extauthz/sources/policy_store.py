"""Reads the policy directory and swaps compiled versions in atomically.

A version is the hash of the files' names and contents, so the same files always produce
the same version on every replica, and a decision can be traced to the exact text that made
it. A reload that fails for any reason leaves the previous version serving.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from extauthz.policy.compiled import CompiledPolicy, compile_policy
from extauthz.policy.document import PolicyDocument, PolicyError, load_yaml, parse_document

log = logging.getLogger("extauthz.policy")

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml", ".test.yaml", ".test.yml")
MAX_FILE_BYTES = 4 * 1024 * 1024


class PolicyLoadError(Exception):
    """The directory as a whole cannot be loaded (each cause names its file)."""


def policy_files(directory: Path) -> list[Path]:
    """Policy files under `directory`, sorted; hidden entries (e.g. Kubernetes ConfigMap
    `..data` folders) and policy test files are skipped."""
    if not directory.is_dir():
        raise PolicyLoadError(f"{directory}: policy directory does not exist or is not a directory")
    found: list[Path] = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        name = path.name
        if name.endswith(POLICY_SUFFIXES) and not name.endswith(TEST_SUFFIXES) and path.is_file():
            found.append(path)
    return found


@dataclass(frozen=True, slots=True)
class LoadedFile:
    path: Path
    text: bytes


def read_files(directory: Path) -> list[LoadedFile]:
    files = []
    for path in policy_files(directory):
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise PolicyLoadError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            files.append(LoadedFile(path, path.read_bytes()))
        except OSError as exc:
            raise PolicyLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not files:
        raise PolicyLoadError(f"{directory}: no policy files (*.yaml, *.yml) found")
    return files


def version_of(directory: Path, files: list[LoadedFile]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.path.relative_to(directory)).encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(f.text).digest())
    return digest.hexdigest()[:16]


def parse_files(directory: Path, files: list[LoadedFile]) -> list[PolicyDocument]:
    return [parse_document(load_yaml(f.text, _source(directory, f)), _source(directory, f))
            for f in files]


def _source(directory: Path, f: LoadedFile) -> str:
    return str(f.path.relative_to(directory))


def load_policy(directory: Path) -> CompiledPolicy:
    """Read, validate and compile a whole directory. Raises PolicyLoadError / PolicyError."""
    files = read_files(directory)
    docs = parse_files(directory, files)
    return compile_policy(docs, version_of(directory, files))


class PolicyStore:
    """Holds the serving policy. `current` is a plain attribute read: swapping it is atomic."""

    def __init__(self, directory: Path, on_change: Callable[[CompiledPolicy], None] | None = None):
        self.directory = directory
        self.current: CompiledPolicy | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str = ""
        # The fingerprint of the files the last reload read (loaded or not): the watcher
        # reloads when `fingerprint()` differs from it, so a reload that read a half-swapped
        # directory is retried once the swap completes, and a broken version is not retried
        # (nor counted as a failure again) until its files change.
        self.attempted: str = ""
        self._on_change = on_change

    def fingerprint(self) -> str:
        """The version the directory's files would have now (no parsing): a reload is due
        when it differs from `attempted`."""
        try:
            files = read_files(self.directory)
        except PolicyLoadError as exc:
            return f"error:{exc}"
        return version_of(self.directory, files)

    def reload(self) -> bool:
        """Load and swap in a new version; on any failure keep serving the previous one."""
        try:
            try:
                files = read_files(self.directory)
            except PolicyLoadError as exc:
                self.attempted = f"error:{exc}"
                raise
            self.attempted = version_of(self.directory, files)
            policy = compile_policy(parse_files(self.directory, files), self.attempted)
        except (PolicyLoadError, PolicyError) as exc:
            self.reload_failures += 1
            self.last_error = str(exc)
            log.error("policy reload failed; keeping the previous version",
                      extra={"event": "policy_reload_failed", "error": str(exc),
                             "serving_version": self.current.version if self.current else None})
            return False
        except Exception as exc:
            self.reload_failures += 1
            self.last_error = f"unexpected error: {exc!r}"
            log.exception("policy reload failed unexpectedly; keeping the previous version",
                          extra={"event": "policy_reload_failed"})
            return False
        previous = self.current
        self.last_error = ""
        if previous is not None and previous.version == policy.version:
            return True
        self.current = policy
        self.reloads += 1
        log.info("policy loaded", extra={
            "event": "policy_loaded", "version": policy.version,
            "previous_version": previous.version if previous else None,
            "rules": len(policy.rules), "principals": len(policy.principals)})
        if self._on_change is not None:
            self._on_change(policy)
        return True
