"""Content digests (blake3) with a stat cache, so unchanged large files are never re-read."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import blake3

from tunemake.fsutil import read_json, write_atomic

# Files modified this recently are hashed but not remembered: a second write within
# the filesystem's timestamp granularity would otherwise go unnoticed.
RACY_WINDOW_NS = 50_000_000
MMAP_THRESHOLD = 1 << 20


def digest_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def digest_json(obj) -> str:
    return digest_bytes(canonical_json(obj).encode())


def canonical_json(obj) -> str:
    # ensure_ascii: file names that are not valid UTF-8 (surrogate escapes) still serialize
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def hash_file(path: Path | str) -> str:
    """Digest of a file's content: multithreaded and memory-mapped for large files."""
    size = os.path.getsize(path)
    if size >= MMAP_THRESHOLD:
        return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()
    with open(path, "rb") as f:
        return blake3.blake3(f.read()).hexdigest()


def tree_digest(manifest: dict[str, dict]) -> str:
    """Digest of an output tree: relative paths, contents and executable bits."""
    return digest_json({rel: [e["digest"], bool(e.get("x"))] for rel, e in manifest.items()})


class UnhashableFile(Exception):
    """A source or output that is not a regular file (FIFO, device, dangling link)."""


def _regular_stat(path: Path) -> os.stat_result:
    """stat, following links; a FIFO, device or dangling link is an error, not a hang."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnhashableFile(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnhashableFile(f"{path}: not a regular file")
    return st


class StatCache:
    """(path, inode, size, mtime_ns) -> digest, kept in one JSON file.

    A JSON file loads in about a millisecond, where opening an sqlite-backed cache
    costs 10-30 ms: that is most of a no-op build. Concurrent builds may each write
    it; the loser's new entries are lost, which costs a re-hash, never a wrong digest.
    """

    def __init__(self, path: Path | None):
        self._path = path
        self._entries: dict[str, list] | None = None
        self._new: dict[str, list] = {}
        self.seen: dict[str, tuple] = {}  # path -> (inode, size, mtime_ns) of each file as hashed
        self.hashed_bytes = 0  # how much was actually read: tests and benchmarks check this

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = (read_json(self._path) or {}) if self._path else {}
        return self._entries

    def file(self, path: Path, st: os.stat_result | None = None) -> str:
        st = st or os.stat(path)
        key = str(path)
        self.seen[key] = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._load().get(key)
        if isinstance(hit, list) and len(hit) == 4 and hit[:3] == [st.st_ino, st.st_size, st.st_mtime_ns]:
            return hit[3]
        digest = hash_file(path)
        self.hashed_bytes += st.st_size
        if time.time_ns() - st.st_mtime_ns > RACY_WINDOW_NS:
            entry = [st.st_ino, st.st_size, st.st_mtime_ns, digest]
            self._entries[key] = entry
            self._new[key] = entry
        return digest

    def tree(self, root: Path, skip: tuple[Path, ...] = ()) -> dict[str, dict]:
        """Manifest of a folder: relative path -> digest, size, executable bit.

        Symlinks are followed (content is what matters); anything that is not a regular
        file once followed (a FIFO, a device, a dangling link) is an error, not a hang.
        """
        manifest: dict[str, dict] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            if skip:
                dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
            dirnames.sort()
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                st = _regular_stat(full)
                rel = full.relative_to(root).as_posix()
                manifest[rel] = {"digest": self.file(full, st), "size": st.st_size,
                                 "x": bool(st.st_mode & stat.S_IXUSR)}
        return manifest

    def seen_files(self, path: Path) -> dict[str, tuple]:
        """The files of a source hashed by this process, with their stats at the time."""
        root = str(path)
        return {p: s for p, s in self.seen.items() if p == root or p.startswith(root + os.sep)}

    @staticmethod
    def current_files(path: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
        """A source's files and stats now, walked exactly as `tree` walks them; no hashing."""
        if not path.is_dir():
            try:
                st = os.stat(path)
            except OSError:
                return {}
            return {str(path): (st.st_ino, st.st_size, st.st_mtime_ns)}
        found = {}
        for dirpath, dirnames, filenames in os.walk(path):
            if skip:
                dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
            for fn in filenames:
                full = Path(dirpath) / fn
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                found[str(full)] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    def source(self, path: Path, skip: tuple[Path, ...] = ()) -> str:
        """Digest of a source path: a file's content, or a folder's tree."""
        if path.is_dir():
            return "tree:" + tree_digest(self.tree(path, skip))
        return self.file(path, _regular_stat(path))

    def close(self) -> None:
        """Merge our new entries into the file (another build may have added its own)."""
        if not self._new or self._path is None:
            return
        merged = read_json(self._path) or {}
        merged.update(self._new)
        self._new = {}
        try:
            write_atomic(self._path, json.dumps(merged, separators=(",", ":")).encode(), durable=False)
        except OSError:
            pass  # only a speed-up: a read-only cache still builds
