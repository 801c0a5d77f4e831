"""Filesystem notifications for the policy directory and the revocation list (Linux inotify).

Polling every 2 s made a revocation take 1.2-2.0 s to bite; a notification makes it
effective in well under half a second. What is watched is the *folders*, not the files:

- an editor that saves by rename, and a Kubernetes ConfigMap/Secret volume, replace files
  instead of writing them. A ConfigMap swaps its `..data` symlink to a new timestamped folder
  (`rename(..data_tmp, ..data)`), which its folder's watch sees as IN_MOVED_TO;
- a watch on a file would follow the old inode and go quiet after the first swap.

Every event only says "look again": the caller compares content fingerprints and reloads
only on a real change, so a burst of events is one reload and a half-written swap is retried
when its last event arrives. Where inotify is unavailable (not Linux, the `inotify_simple`
package missing, the per-user watch limit reached, a network filesystem that sends no
events) the caller keeps polling at `--watch-interval`, which it does in any case as a
safety net.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("extauthz.reload")

# Everything that can change what a directory's files read as. No IN_MODIFY: a write in
# progress is seen at its IN_CLOSE_WRITE (a half-written file is never reloaded early).
_MASK_NAMES = ("CLOSE_WRITE", "MOVED_TO", "MOVED_FROM", "CREATE", "DELETE", "ATTRIB",
               "DELETE_SELF", "MOVE_SELF")
MAX_WATCHED_DIRS = 1024  # a policy tree deeper than this falls back to polling past it


class ChangeNotifier:
    """One inotify instance watching a set of folders (and their non-hidden sub-folders).

    `fileno()` becomes readable when something changed; `drain()` consumes the events and
    re-arms watches for folders created since (a new sub-folder, a new `..2026_...` folder).
    """

    def __init__(self, inotify: Any, mask: int, roots: Iterable[Path],
                 single: Iterable[Path] = ()) -> None:
        self._inotify = inotify
        self._mask = mask
        self._roots = tuple(dict.fromkeys(roots))
        self._single = tuple(dict.fromkeys(single))  # watched without their sub-folders
        self._watched: dict[str, int] = {}
        self._sync()

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(self._watched)

    def drain(self) -> int:
        """Read every pending event (non-blocking); return how many there were."""
        events = self._inotify.read(timeout=0)
        if events:
            self._sync()
        return len(events)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._inotify.close()

    def _sync(self) -> None:
        """Watch every root folder and its non-hidden sub-folders (hidden ones, like a
        ConfigMap's `..2026_...` folders, are skipped as the policy loader skips them)."""
        wanted: list[str] = []
        for root in self._roots:
            wanted.extend(_folders(root))
        wanted.extend(str(folder) for folder in self._single if folder.is_dir())
        wanted = list(dict.fromkeys(wanted))
        for folder in wanted[:MAX_WATCHED_DIRS]:
            if folder in self._watched:
                continue
            try:
                self._watched[folder] = self._inotify.add_watch(folder, self._mask)
            except OSError as exc:  # gone again, or the watch limit: polling still covers it
                log.debug("cannot watch folder", extra={"event": "watch_failed",
                                                        "folder": folder, "error": str(exc)})
        for folder in [f for f in self._watched if f not in wanted]:
            wd = self._watched.pop(folder)
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)


def _folders(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    found = [str(root)]  # a ConfigMap's `..data` swap is an event of this folder
    for dirpath, dirnames, _files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, d) for d in dirnames)
    return list(dict.fromkeys(found))


def open_notifier(roots: Iterable[Path], single: Iterable[Path] = ()) -> ChangeNotifier | None:
    """A notifier for the folders `roots` (with their sub-folders) and `single` (alone: the
    folder of one file, e.g. the revocation list), or None (with one log line saying why)
    when the platform cannot provide one; the caller then relies on polling."""
    try:
        from inotify_simple import INotify, flags  # noqa: PLC0415

        mask = 0
        for name in _MASK_NAMES:
            mask |= int(getattr(flags, name))
        notifier = ChangeNotifier(INotify(), mask, roots, single)
    except (ImportError, OSError) as exc:
        log.info(
            "file notifications unavailable; reloading by polling only",
            extra={"event": "watch_polling", "error": str(exc)},
        )
        return None
    if not notifier.folders:
        notifier.close()
        return None
    return notifier
