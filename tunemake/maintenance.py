"""`tunemake cache ls | gc | verify`: looking after the local store."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunemake import request_cache
from tunemake.errors import UserError
from tunemake.fsutil import FileLock, locked, rmtree
from tunemake.store import Store

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'50GB' -> 50e9, '2GiB' -> 2*2**30, '100' -> 100 bytes."""
    m = SIZE_RE.match(text)
    if not m:
        raise UserError(f"--max-size {text!r}: expected a size such as 500MB, 50GB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = "bkmgt".index(unit or "b")
    return int(number * (1024 if binary else 1000) ** power)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class Action:
    key: str
    entry: dict
    last_used: float

    def blobs(self) -> set[str]:
        found = {e["digest"] for e in self.entry.get("outputs", {}).values()}
        if self.entry.get("log"):
            found.add(self.entry["log"])
        return found


def list_actions(store: Store) -> list[Action]:
    found = []
    for key, entry, path in store.actions():
        try:
            found.append(Action(key, entry, path.stat().st_mtime))
        except OSError:  # dropped by a concurrent build since we listed it
            continue
    return sorted(found, key=lambda a: a.last_used)


def _exclusive(store: Store) -> FileLock:
    lock = FileLock(store.lock_path("gc"))
    if not lock.try_acquire():
        print("waiting for running builds to finish ...", flush=True)
        lock.acquire()
    return lock


def gc(store: Store, live_keys: set[str], max_size: int | None) -> dict:
    """Drop unreferenced blobs; with max_size, evict until the store (blobs and request-level answers)
    fits: least-recently-used actions the current tunefile does not need first, then request-level
    answers (the least recently used), then the tunefile's own actions."""
    lock = _exclusive(store)
    try:
        actions = list_actions(store)
        sizes = {digest: path.stat().st_size for digest, path in store.blobs()}
        refs: dict[str, int] = {}
        for action in actions:
            for d in action.blobs():
                refs[d] = refs.get(d, 0) + 1
        total = sum(size for d, size in sizes.items() if d in refs)
        answers_folder = store.root / "requests"
        answers = request_cache.stats(answers_folder)[1]
        evicted, answers_evicted, answers_error = [], 0, None

        def drop(action: Action) -> int:
            """Evicts one action; returns the bytes of the blobs no other action needs."""
            store.drop_action(action.key)
            evicted.append(action)
            freed = 0
            for d in action.blobs():
                refs[d] -= 1
                freed += sizes.get(d, 0) if refs[d] == 0 else 0
            return freed

        if max_size is not None:
            for action in [a for a in actions if a.key not in live_keys]:
                if total + answers <= max_size:
                    break
                total -= drop(action)
            if total + answers > max_size:
                try:
                    answers_evicted = request_cache.shrink(answers_folder, max_size - total)
                except OSError as error:  # read-only or locked: the rest of gc still runs
                    answers_error = str(error)
                answers = request_cache.stats(answers_folder)[1]
            for action in [a for a in actions if a.key in live_keys]:
                if total + answers <= max_size:
                    break
                total -= drop(action)
        removed_bytes = removed = 0
        for digest, path in list(store.blobs()):
            if refs.get(digest, 0) == 0:
                removed_bytes += sizes.get(digest, 0)
                path.unlink(missing_ok=True)
                removed += 1
        tmp = store.root / "tmp"
        if tmp.is_dir():
            for entry in tmp.iterdir():
                rmtree(entry)  # safe: no build runs while we hold the gc lock
        return {"evicted": [(a.entry.get("target"), a.key) for a in evicted], "blobs_removed": removed,
                "bytes_removed": removed_bytes, "bytes_kept": total + answers, "answers_evicted": answers_evicted,
                "answers_error": answers_error}
    finally:
        lock.release()


def verify(store: Store, outputs: dict[str, Path]) -> dict:
    """Re-hash every blob; delete corrupt ones and the actions that needed them, and the targets/
    folders (`outputs`: target -> its folder) made from them: a materialized file may be that very
    inode (a hardlink), and the next build would otherwise find it untouched and serve it."""
    lock = _exclusive(store)
    try:
        checked, corrupt = 0, []
        for digest, _path in list(store.blobs()):
            checked += 1
            if not store.verify_blob(digest):
                corrupt.append(digest)
        dropped = []
        for action in list_actions(store):
            if any(not store.has_blob(d) for d in action.blobs()):
                store.drop_action(action.key)
                dropped.append((action.entry.get("target"), action.key))
        removed = []
        for name, folder in outputs.items():
            with locked(store.lock_path(f"target-{name}")):
                state = store.get_state(name)
                if state and any(e["digest"] in corrupt for e in state["outputs"].values()):
                    rmtree(folder)
                    store.state_path(name).unlink(missing_ok=True)
                    removed.append(name)
        answers = request_cache.verify(store.root / "requests")
        return {"checked": checked, "corrupt": corrupt, "dropped_actions": dropped, "removed_targets": removed,
                "answers": answers}
    finally:
        lock.release()
