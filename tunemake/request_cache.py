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
import os
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

    class TextOnly(diskcache.Disk):
        """Keys and values are text: a row that says it holds a pickle is refused, never unpickled
        (a cache folder restored from elsewhere must not run code). Short text is stored inline
        (MODE_RAW), long text in a file (MODE_TEXT)."""

        def get(self, key, raw):
            if not raw:
                raise ValueError("a request-cache key that is not text")
            return super().get(key, raw)

        def fetch(self, mode, filename, value, read):
            if mode == diskcache.core.MODE_PICKLE:
                raise ValueError("a request-cache value that is a pickle")
            return super().fetch(mode, filename, value, read)

    return diskcache.Cache(str(folder), disk=TextOnly, size_limit=NO_LIMIT, eviction_policy="least-recently-used",
                           cull_limit=0, statistics=False)


def real_folder(folder: Path) -> bool:
    """Whether the answers folder is a folder of ours; a symlink or file in its place is removed
    (never followed: upkeep would clean the place it points to) and reads as no cache."""
    if os.path.islink(folder) or (os.path.lexists(folder) and not folder.is_dir()):
        try:
            os.unlink(folder)
        except OSError:
            pass
        return False
    return folder.is_dir()


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
            real_folder(folder)
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
            except (ValueError, UnicodeDecodeError):  # a damaged or foreign row: a miss, and gone
                self._drop(key)
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

    def _drop(self, key: str) -> None:
        try:
            self._cache.delete(key)
        except (OSError, sqlite3.Error, ValueError):
            pass

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
    if os.path.islink(folder) or not (folder / "cache.db").is_file():
        return 0, 0
    try:
        with open_cache(folder) as cache:
            return len(cache), cache.volume()
    except (OSError, sqlite3.Error):
        return 0, folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def shrink(folder: Path, max_bytes: int) -> int:
    """Evicts least-recently-used answers until the cache takes at most max_bytes; returns how many.
    A database that cannot be read is removed whole (the caller holds the gc lock)."""
    from tunemake.fsutil import rmtree

    if not real_folder(folder) or not (folder / "cache.db").is_file():
        return 0
    try:
        with open_cache(folder) as cache:
            before = len(cache)
            if cache.volume() <= max_bytes:
                return 0
            cache.reset("size_limit", max(max_bytes, 0))
            cache.cull()
            cache.reset("size_limit", NO_LIMIT)
            if cache.volume() <= max_bytes:
                return before - len(cache)
    except sqlite3.OperationalError as error:  # read-only, locked: leave it
        raise OSError(f"cannot shrink the request-level answers in {folder}: {error}") from None
    except (OSError, sqlite3.Error):
        before = 0
    rmtree(folder)  # even empty, the database's own pages do not fit; or it is unreadable
    return before


def verify(folder: Path) -> dict:
    """Checks each answer against its seal and the database itself; drops what fails. A database
    that is not one (garbage, truncated) is removed whole: it only ever saved time. One that
    cannot be written (read-only, locked) is reported and left alone."""
    from tunemake.fsutil import rmtree

    result = {"checked": 0, "corrupt": 0, "repaired": 0, "removed_database": False, "unwritable": None}
    if not real_folder(folder):
        return result
    try:
        with open_cache(folder) as cache:
            for key in list(cache.iterkeys()):
                result["checked"] += 1
                try:
                    good = checked(key, cache.get(key)) is not None
                except (ValueError, UnicodeDecodeError):
                    good = False
                if not good:
                    cache.delete(key)
                    result["corrupt"] += 1
            # value files missing or left over, sqlite integrity; safe: a real folder of ours
            result["repaired"] = len(cache.check(fix=True))
    except sqlite3.OperationalError as error:
        result["unwritable"] = str(error)
    except (OSError, sqlite3.Error, ValueError, UnicodeDecodeError):
        rmtree(folder)
        result["removed_database"] = not os.path.lexists(folder)
        if not result["removed_database"]:
            result["unwritable"] = "it could not be removed"
    return result
