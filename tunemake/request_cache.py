"""The eval's request-level answers: .tunecache/requests, a diskcache (sqlite) of scored units.

A unit is what one forward computation answers: the log-likelihoods of every continuation
scored after one context, or the texts of one batch of generations. Its key is a digest of
the scope (weights and tokenizer files, dtype, device class and threads, torch and the
scoring code) and of the unit itself (token ids; for generation also the sampling settings,
stop strings and seed), so an answer is only ever served for the computation that made it.
Each value carries a digest of its key and its own JSON: a flipped bit or a row copied under
another key reads as a miss, never as an answer.

Imported by the eval step and by `tunemake cache` (gc, verify, ls); it never imports torch.
Every failure to open or write degrades to computing the answers: this cache only saves time.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import blake3

FORMAT = 1  # bump when what a unit's key covers, or how its value is written, changes
NO_LIMIT = 2**62  # `tunemake cache gc --max-size` bounds the folder, not diskcache's own culling


def digest(data) -> str:
    return blake3.blake3(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def open_cache(folder: Path):
    """The diskcache at `folder`, or raises OSError / sqlite3.Error (read-only, corrupt)."""
    import diskcache

    return diskcache.Cache(str(folder), size_limit=NO_LIMIT, eviction_policy="least-recently-used",
                           cull_limit=0, statistics=False)


class RequestCache:
    """get/put of unit answers under one scope; without a folder (or one that will not open) it
    stores nothing and every get misses."""

    def __init__(self, folder: Path | None, scope: dict, log=print):
        self.scope = digest({"format": FORMAT, **scope})
        self.log = log
        self.hits = self.misses = 0
        self._cache = None
        if folder is None:
            return
        try:
            self._cache = open_cache(folder)
        except (OSError, sqlite3.Error) as error:
            log(f"[tunemake] request cache {folder} unavailable ({error}); computing every request")

    def key(self, unit_kind: str, unit) -> str:
        return digest({"scope": self.scope, "kind": unit_kind, "unit": unit})

    def get(self, key: str):
        value = None
        if self._cache is not None:
            try:
                value = checked(key, self._cache.get(key))
            except (OSError, sqlite3.Error) as error:
                self._disable(error)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        if self._cache is None:
            return
        try:
            self._cache.set(key, sealed(key, value))  # one sqlite transaction: kill -9 leaves it or nothing
        except (OSError, sqlite3.Error) as error:
            self._disable(error)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def _disable(self, error) -> None:
        self.log(f"[tunemake] request cache failed ({error}); computing the remaining requests")
        self._cache = None


def sealed(key: str, value) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return json.dumps([digest([key, text]), text])


def checked(key: str, stored):
    """The value written by `sealed` for this very key, or None."""
    try:
        check, text = json.loads(stored)
        if check == digest([key, text]):
            return json.loads(text)
    except (TypeError, ValueError):
        pass
    return None


# ---- upkeep, for tunemake cache ls | gc | verify --------------------------------------------
def stats(folder: Path) -> tuple[int, int]:
    """(entries, bytes on disk) of the request cache; (0, 0) when there is none."""
    if not (folder / "cache.db").is_file():
        return 0, 0
    try:
        with open_cache(folder) as cache:
            return len(cache), cache.volume()
    except (OSError, sqlite3.Error):
        return 0, folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def shrink(folder: Path, max_bytes: int) -> int:
    """Evicts least-recently-used answers until the cache takes at most max_bytes; returns how many."""
    from tunemake.fsutil import rmtree

    if not (folder / "cache.db").is_file():
        return 0
    with open_cache(folder) as cache:
        before = len(cache)
        if cache.volume() <= max_bytes:
            return 0
        cache.reset("size_limit", max(max_bytes, 0))
        cache.cull()
        cache.reset("size_limit", NO_LIMIT)
        if cache.volume() <= max_bytes:
            return before - len(cache)
    rmtree(folder)  # even empty, the database's own pages do not fit (the caller holds the gc lock)
    return before


def verify(folder: Path) -> dict:
    """Checks each answer against its seal and the database itself; drops what fails.
    A database that will not open is removed whole: it only ever saved time."""
    from tunemake.fsutil import rmtree

    if not folder.exists():
        return {"checked": 0, "corrupt": 0, "repaired": 0, "removed_database": False}
    try:
        with open_cache(folder) as cache:
            checked_count = corrupt = 0
            for key in list(cache.iterkeys()):
                checked_count += 1
                if checked(key, cache.get(key)) is None:
                    cache.delete(key)
                    corrupt += 1
            warnings = cache.check(fix=True)  # value files missing or unaccounted for, sqlite integrity
            return {"checked": checked_count, "corrupt": corrupt, "repaired": len(warnings), "removed_database": False}
    except (OSError, sqlite3.Error, UnicodeDecodeError):
        rmtree(folder)
        return {"checked": 0, "corrupt": 0, "repaired": 0, "removed_database": True}
