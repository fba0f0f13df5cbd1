"""Content digests (blake3) with a stat cache, so unchanged large files are never re-read."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import blake3

from tunemake.fsutil import read_json, stamp, write_atomic

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
    """(path, inode, size, mtime_ns, ctime_ns) -> digest, kept in one JSON file.

    A JSON file loads in about a millisecond, where opening an sqlite-backed cache
    costs 10-30 ms: that is most of a no-op build. Concurrent builds may each write
    it; the loser's new entries are lost, which costs a re-hash, never a wrong digest.
    """

    def __init__(self, path: Path | None):
        self._path = path
        self._entries: dict[str, list] | None = None
        self._new: dict[str, list] = {}
        # what this process hashed, to compare with after a step: path -> (inode, size, mtime_ns,
        # ctime_ns, digest), and each source path -> its files
        self.seen: dict[str, tuple] = {}
        self.source_files: dict[str, list[str]] = {}
        self.hashed_bytes = 0  # how much was actually read: tests and benchmarks check this

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = (read_json(self._path) or {}) if self._path else {}
        return self._entries

    def file(self, path: Path, st: os.stat_result | None = None) -> str:
        st = st or os.stat(path)
        key = str(path)
        hit = self._load().get(key)
        # ctime too: an edit can put the mtime back (cp -p, touch -r), but not the ctime
        now = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if isinstance(hit, list) and len(hit) == 5 and hit[:4] == now and isinstance(hit[4], str):
            digest = hit[4]
        else:
            digest = hash_file(path)
            self.hashed_bytes += st.st_size
            if time.time_ns() - st.st_ctime_ns > RACY_WINDOW_NS:
                entry = [*now, digest]
                self._entries[key] = entry
                self._new[key] = entry
        self.seen[key] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)
        return digest

    def tree(self, root: Path, skip: tuple[Path, ...] = ()) -> dict[str, dict]:
        """Manifest of a folder: relative path -> digest, size, executable bit.

        Symlinks to files are followed (content is what matters); anything that is not a regular
        file once followed (a FIFO, a device, a dangling link) is an error, not a hang.
        """
        manifest: dict[str, dict] = {}
        for full in walk_files(root, skip):
            st = _regular_stat(full)
            rel = full.relative_to(root).as_posix()
            manifest[rel] = {"digest": self.file(full, st), "size": st.st_size,
                             "x": bool(st.st_mode & stat.S_IXUSR)}
        return manifest

    def source(self, path: Path, skip: tuple[Path, ...] = ()) -> str:
        """Digest of a source path: a file's content, or a folder's tree."""
        if path.is_dir():
            manifest = self.tree(path, skip)
            self.source_files[str(path)] = [str(path / rel) for rel in manifest]
            return "tree:" + tree_digest(manifest)
        self.source_files[str(path)] = [str(path)]
        return self.file(path, _regular_stat(path))

    def as_hashed(self, path: Path) -> dict[str, tuple]:
        """A source's (or code file's) files as this process hashed them, to compare with
        `changed_since` after a step."""
        files = self.source_files.get(str(path), [str(path)])
        return {f: self.seen[f] for f in files if f in self.seen}

    @staticmethod
    def changed_since(path: Path, hashed: dict[str, tuple], skip: tuple[Path, ...] = ()) -> bool:
        """Whether a source differs from how it was hashed: a file added, removed, replaced or
        written. A file whose only change is its ctime (an edit that put the mtime back, or just
        a new hardlink) is re-hashed to tell."""
        files = [str(f) for f in walk_files(path, skip)] if path.is_dir() else [str(path)]
        if sorted(files) != sorted(hashed):
            return True
        return any(file_moved(f, hashed[f][:4], hashed[f][4]) for f in files)

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


def file_moved(path, was: tuple, digest: str, rehash: bool = True) -> bool:
    """Whether a file differs from its stamp `was` (inode, size, mtime_ns, ctime_ns) and digest. A
    file whose only change is its ctime (an edit that put the mtime back, or just a new hardlink)
    is re-hashed to tell, with `rehash`; else it counts as moved."""
    now = stamp(path)
    if now is None or now[:3] != tuple(was[:3]):
        return True
    return now[3] != was[3] and (not rehash or hash_file(path) != digest)


def walk_files(root: Path, skip: tuple[Path, ...] = ()):
    """The files of a source folder, in a stable order. Symlinked folders are followed (content is
    what matters), each real folder once (a link cycle ends); `skip` (tunemake's own folders) and
    `__pycache__` (Python writes those whenever a step imports a source module: bytes derived
    from the source, not part of it) are not entered."""
    skip_real = {os.path.realpath(p) for p in skip}
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip_real)
        for fn in sorted(filenames):
            yield Path(dirpath) / fn
