"""The local cache: content-addressed blobs, the action cache, and materialization.

Layout under the cache dir (a remote store uses the same `cas/` and `ac/`):

    cas/ab/abcd...      blobs, read-only, named by blake3 digest
    ac/12/1234....json  action cache: key -> output manifest + build metadata
    state/NAME.json     per target: last key, its components (for explain), what was materialized
    logs/NAME.log       the last log of each target
    tmp/                steps write here; moved into cas/ only after success
    locks/              flock files: one per key being built, one per target being materialized
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path

from tunemake.hashing import hash_file

FICLONE = 0x40049409  # linux/fs.h: clone a file's extents (btrfs, xfs, ...)
SMALL_FILE = 1 << 20  # below this, `auto` copies: small outputs are the ones people open and edit


class Store:
    def __init__(self, root: Path, link: str = "auto"):
        self.root = root
        self.link = link
        self._reflink_ok: bool | None = None if link in ("auto", "reflink") else False

    # -- paths ------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "cas" / digest[:2] / digest

    def action_path(self, key: str) -> Path:
        return self.root / "ac" / key[:2] / f"{key}.json"

    def state_path(self, target: str) -> Path:
        return self.root / "state" / f"{target}.json"

    def log_path(self, target: str) -> Path:
        return self.root / "logs" / f"{target}.log"

    def new_tmp_dir(self, label: str) -> Path:
        path = self.root / "tmp" / f"{os.getpid()}-{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    # -- blobs --------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def ingest(self, src: Path, digest: str, executable: bool) -> None:
        """Move a finished output file into the store (a rename: same filesystem, atomic)."""
        dst = self.blob_path(digest)
        if dst.exists():
            src.unlink()
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # store content, not links that may point anywhere
            real = src.with_name(src.name + ".deref")
            shutil.copyfile(src, real)
            src.unlink()
            src = real
        os.chmod(src, 0o555 if executable else 0o444)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o555 if executable else 0o444)
            os.rename(tmp, dst)
            src.unlink()

    def put_bytes(self, data: bytes) -> str:
        from tunemake.hashing import digest_bytes

        digest = digest_bytes(data)
        if not self.has_blob(digest):
            tmp = self.new_tmp_dir("bytes") / "blob"
            tmp.write_bytes(data)
            self.ingest(tmp, digest, executable=False)
            shutil.rmtree(tmp.parent, ignore_errors=True)
        return digest

    def verify_blob(self, digest: str) -> bool:
        """Re-hash a blob; a corrupt blob is deleted so it is never served again."""
        path = self.blob_path(digest)
        if not path.exists():
            return False
        if hash_file(path) == digest:
            return True
        path.unlink(missing_ok=True)
        return False

    def blobs(self):
        cas = self.root / "cas"
        if not cas.is_dir():
            return
        for sub in sorted(cas.iterdir()):
            for blob in sub.iterdir():
                if len(blob.name) == 64:
                    yield blob.name, blob

    # -- action cache -------------------------------------------------------
    def get_action(self, key: str) -> dict | None:
        try:
            return json.loads(self.action_path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn or unreadable entry is a miss, never a crash

    def put_action(self, key: str, entry: dict) -> None:
        write_json_atomic(self.action_path(key), entry)

    def drop_action(self, key: str) -> None:
        self.action_path(key).unlink(missing_ok=True)

    def actions(self):
        ac = self.root / "ac"
        if not ac.is_dir():
            return
        for path in ac.glob("*/*.json"):
            try:
                yield path.stem, json.loads(path.read_text()), path
            except (OSError, ValueError):
                continue

    def action_complete(self, entry: dict) -> bool:
        return all(self.has_blob(e["digest"]) for e in entry["outputs"].values())

    # -- per-target state ---------------------------------------------------
    def get_state(self, target: str) -> dict | None:
        try:
            return json.loads(self.state_path(target).read_text())
        except (OSError, ValueError):
            return None

    def put_state(self, target: str, state: dict) -> None:
        write_json_atomic(self.state_path(target), state)

    # -- materialization ----------------------------------------------------
    def materialize(self, manifest: dict[str, dict], dest: Path) -> dict[str, list]:
        """Recreate an output tree at `dest` from blobs; returns what was placed, for `intact`."""
        staging = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        staging.mkdir(parents=True)
        record: dict[str, list] = {}
        try:
            for rel, entry in manifest.items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                how = self._place(self.blob_path(entry["digest"]), target, entry["size"], entry.get("x", False))
                st = os.stat(target)
                record[rel] = [st.st_ino, st.st_size, st.st_mtime_ns, how]
            swap_dir(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    @staticmethod
    def intact(record: dict[str, list], dest: Path) -> list[str]:
        """Materialized files whose stat no longer matches: deleted or edited by the user."""
        changed = []
        for rel, (ino, size, mtime_ns, _how) in record.items():
            try:
                st = os.stat(dest / rel)
            except OSError:
                changed.append(rel)
                continue
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (ino, size, mtime_ns):
                changed.append(rel)
        return changed

    def _place(self, blob: Path, target: Path, size: int, executable: bool) -> str:
        if self._reflink_ok is not False and self._reflink(blob, target):
            os.chmod(target, 0o755 if executable else 0o644)
            return "reflink"
        if self.link == "hardlink" or (self.link == "auto" and size >= SMALL_FILE):
            try:
                os.link(blob, target)
                return "link"
            except OSError:
                pass  # other filesystem, or links unsupported: fall back to a copy
        shutil.copyfile(blob, target)
        os.chmod(target, 0o755 if executable else 0o644)
        return "copy"

    def _reflink(self, blob: Path, target: Path) -> bool:
        try:
            with open(blob, "rb") as src, open(target, "wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            self._reflink_ok = True
            return True
        except OSError:
            target.unlink(missing_ok=True)
            self._reflink_ok = False
            return False

    # -- locks --------------------------------------------------------------
    def lock_path(self, name: str) -> Path:
        path = self.root / "locks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def swap_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`, replacing whatever was there, never leaving `dest` half-written."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.rename(dest, old)
        os.rename(new, dest)
        rmtree(old)
    else:
        os.rename(new, dest)


def rmtree(path: Path) -> None:
    """Remove a tree even if it holds read-only files or folders."""
    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


class FileLock:
    """An flock on a file: released automatically if the process dies (even kill -9)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self, shared: bool = False) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        return True

    def acquire(self, shared: bool = False) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        self._fd = fd

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def locked(path: Path, shared: bool = False):
    lock = FileLock(path)
    lock.acquire(shared)
    try:
        yield lock
    finally:
        lock.release()
