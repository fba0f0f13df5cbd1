"""The local cache: content-addressed blobs, the action cache, and materialization.

Layout under the cache dir (a remote store uses the same `cas/` and `ac/`):

    cas/ab/abcd...      blobs, read-only, named by blake3 digest
    ac/12/1234....json  action cache: key -> output manifest + build metadata
    state/NAME.json     per target: last key, its components (for explain), what was materialized
    logs/NAME.log       the last log of each target
    failed/NAME.json    the key and reason of a target's last failed run, until it succeeds
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


class Store:
    def __init__(self, root: Path, link: str = "auto"):
        self.root = root
        self.link = link
        self._reflink_ok: bool | None = None if link in ("auto", "reflink") else False
        self._owner_lock: FileLock | None = None

    def owner(self) -> str:
        """Our token, with its lock held in this cache for as long as we live (kill -9 releases it)."""
        token = owner_token()
        if self._owner_lock is None or not self._owner_lock.path.name.endswith(token):
            self._owner_lock = FileLock(self.lock_path(f"owner-{token}"))
            self._owner_lock.try_acquire()
        return token

    def owner_gone(self, token: str) -> bool:
        """True if no live process holds that owner's lock; its lock file is then removed."""
        lock = FileLock(self.lock_path(f"owner-{token}"))
        if not lock.try_acquire():
            return False
        lock.path.unlink(missing_ok=True)
        lock.release()
        return True

    def release_owner(self) -> None:
        """At a clean exit: nothing of ours is left to protect."""
        if self._owner_lock is not None:
            self._owner_lock.path.unlink(missing_ok=True)
            self._owner_lock.release()
            self._owner_lock = None

    # -- paths ------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "cas" / digest[:2] / digest

    def action_path(self, key: str) -> Path:
        return self.root / "ac" / key[:2] / f"{key}.json"

    def state_path(self, target: str) -> Path:
        return self.root / "state" / f"{target}.json"

    def log_path(self, target: str) -> Path:
        return self.root / "logs" / f"{target}.log"

    def failure_path(self, target: str) -> Path:
        return self.root / "failed" / f"{target}.json"

    # -- the last failed run of a target with a given key (for `status`) ---------
    def put_failure(self, target: str, record: dict) -> None:
        write_json_atomic(self.failure_path(target), record)

    def get_failure(self, target: str) -> dict | None:
        return read_json(self.failure_path(target))

    def clear_failure(self, target: str) -> None:
        self.failure_path(target).unlink(missing_ok=True)

    def new_tmp_dir(self, label: str) -> Path:
        path = self.root / "tmp" / f"{self.owner()}-{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    # -- blobs --------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def ingest(self, src: Path, digest: str, executable: bool) -> None:
        """Move a finished output file into the store (a rename: same filesystem, atomic).

        The fresh file always replaces an existing blob of the same digest: that blob may have
        been damaged through a hardlink, and the fresh bytes are known to match the digest.
        """
        dst = self.blob_path(digest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode) or st.st_nlink > 1 or not stat.S_ISREG(st.st_mode):
            # a link (to a source, a dependency's output, anything): store a private copy,
            # never the shared inode, or later edits of the original would reach the cache
            tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
            shutil.copyfile(src, tmp)
            src.unlink()
            src = tmp
        os.chmod(src, 0o555 if executable else 0o444)
        try:
            os.replace(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o555 if executable else 0o444)
            os.replace(tmp, dst)
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
        entry = read_json(self.action_path(key))  # a torn or unreadable entry is a miss, never a crash
        if entry is None or not isinstance(entry.get("outputs"), dict) or "tree" not in entry:
            return None
        return entry

    def put_action(self, key: str, entry: dict) -> None:
        write_json_atomic(self.action_path(key), entry)

    def drop_action(self, key: str) -> None:
        self.action_path(key).unlink(missing_ok=True)

    def actions(self):
        ac = self.root / "ac"
        if not ac.is_dir():
            return
        for path in ac.glob("*/*.json"):
            entry = read_json(path)
            if entry is not None and isinstance(entry.get("outputs"), dict):
                yield path.stem, entry, path

    def action_complete(self, entry: dict) -> bool:
        return all(self.has_blob(e["digest"]) for e in entry["outputs"].values())

    # -- per-target state ---------------------------------------------------
    def get_state(self, target: str) -> dict | None:
        state = read_json(self.state_path(target))
        if state is None or not all(k in state for k in ("key", "tree", "outputs", "materialized")):
            return None
        return state

    def put_state(self, target: str, state: dict) -> None:
        write_json_atomic(self.state_path(target), state)

    # -- materialization ----------------------------------------------------
    def materialize(self, manifest: dict[str, dict], dest: Path) -> dict[str, list]:
        """Recreate an output tree at `dest` from blobs; returns what was placed, for `intact`."""
        staging = dest.parent / f".{dest.name}.tmp-{self.owner()}-{uuid.uuid4().hex[:6]}"
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
        """Materialized files whose stat no longer matches (deleted or edited by the user),
        and files added beside them (dependents would read them)."""
        present = sum(len(files) for _root, _dirs, files in os.walk(dest))
        if present != len(record):
            return ["(files added or removed)"]
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
            # a blob shared by outputs that differ only in the executable bit has one mode:
            # link only when it is the mode this output needs
            if bool(os.stat(blob).st_mode & stat.S_IXUSR) == executable:
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


def output_manifest(out: Path) -> tuple[dict[str, dict], list[tuple[Path, str]]]:
    """A finished step's files: {rel: {digest, size, x}} and (path, rel) pairs to ingest.

    Outputs are files. A symlink to a folder is refused rather than followed: following it
    would move someone else's files (a source, a dependency's output) into the store."""
    manifest: dict[str, dict] = {}
    files = []
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames.sort()
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                rel = Path(dirpath, name).relative_to(out).as_posix()
                raise RuntimeError(f"output {rel} is a symlink to a folder; copy the folder instead")
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            rel = full.relative_to(out).as_posix()
            st = os.stat(full)
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"output {rel} is not a regular file")
            manifest[rel] = {"digest": hash_file(full), "size": st.st_size, "x": bool(st.st_mode & 0o100)}
            files.append((full, rel))
    return manifest, files


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None if it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
        old = dest.parent / f".{dest.name}.old-{owner_token()}-{uuid.uuid4().hex[:6]}"
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
