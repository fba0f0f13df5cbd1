"""Who owns a working folder in the cache: each process has a token, and holds the lock
`locks/owner-TOKEN` for as long as it lives (kill -9 releases it). A later build judges a
folder left behind by whether that lock is free, not by its pid, so this holds across PID
namespaces (containers) sharing one cache.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from tunemake.fsutil import FileLock

_owner: tuple[int, str] | None = None


def owner_token() -> str:
    """This process's name in working-folder names: pid plus a random part, so it stays unique
    across PID namespaces sharing one cache; liveness is its lock (`locks/owner-TOKEN`), not the pid."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():  # a forked child is a new owner
        _owner = (os.getpid(), f"{os.getpid()}x{uuid.uuid4().hex[:8]}")
    return _owner[1]


def owner_of(name: str) -> str | None:
    """The owner token in a working folder's name: `TOKEN-label-x` in tmp/, `.NAME.tmp-TOKEN-x`
    or `.NAME.old-TOKEN-x` beside targets."""
    fields = name.split("-")
    token = fields[0] if not name.startswith(".") else fields[-2] if len(fields) >= 3 else ""
    head, x, tail = token.partition("x")
    return token if x and head.isdigit() and len(tail) == 8 else None


class Owners:
    """The owner locks of one cache (`lock_path(name)` gives a lock file's path)."""

    def __init__(self, lock_path: Callable[[str], Path]):
        self.lock_path = lock_path
        self._mine: FileLock | None = None

    def mine(self) -> str:
        """Our token, with its lock held in this cache for as long as we live."""
        token = owner_token()
        if self._mine is None or not self._mine.path.name.endswith(token):
            self._mine = FileLock(self.lock_path(f"owner-{token}"))
            self._mine.try_acquire()
        return token

    def gone(self, token: str) -> bool:
        """True if no live process holds that owner's lock; its lock file is then removed."""
        lock = FileLock(self.lock_path(f"owner-{token}"))
        if not lock.try_acquire():
            return False
        lock.path.unlink(missing_ok=True)
        lock.release()
        return True

    def release(self) -> None:
        """At a clean exit: nothing of ours is left to protect."""
        if self._mine is not None:
            self._mine.path.unlink(missing_ok=True)
            self._mine.release()
            self._mine = None
