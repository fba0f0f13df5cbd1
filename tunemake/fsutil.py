"""Filesystem primitives every part of the engine shares: the one atomic write, JSON records,
tree removal and swapping, and flock-based locks."""

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

READ_ONLY_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write a file whole or not at all: a temp file beside it, then a rename.
    `durable` fsyncs first (cache records); speed-ups such as the stat cache skip it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    if not os.path.isdir(path.parent):  # a stat first: on some filesystems a mkdir costs 50x more
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None if it is missing, torn, unreadable or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def swap_dir(new: Path, dest: Path, old_label: str) -> None:
    """Put `new` at `dest`, replacing whatever was there, never leaving `dest` half-written.
    The previous tree is renamed to `.NAME.old-LABEL-x` first (swept by later builds if we die)."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{old_label}-{uuid.uuid4().hex[:6]}"
        os.rename(dest, old)
        os.rename(new, dest)
        rmtree(old)
    else:
        os.rename(new, dest)


def rmtree(path: Path) -> None:
    """Remove a tree even if it holds read-only files or folders; a symlink is unlinked, never followed."""
    if os.path.islink(path):
        os.unlink(path)
        return

    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o755)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def stamp(path) -> tuple | None:
    """(inode, size, mtime_ns, ctime_ns) of a file, following links; None if it cannot be read.
    An edit can put the mtime back (cp -p, touch -r), never the ctime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def rel_path(path: Path) -> str:
    """A path as the user would type it from here (absolute where no relative path exists)."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def is_real_dir(path: Path) -> bool:
    """A folder, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class FileLock:
    """An flock on a file: released automatically if the process dies (even kill -9).

    In a cache we may only read (a read-only mount, a CI cache restored without write
    permission) an existing lock file is opened read-only, which flock accepts; a lock file
    that cannot be created at all is `unavailable`: there is nothing to coordinate with then,
    since no other process can write that cache either."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.unavailable = False

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in READ_ONLY_ERRORS + (errno.ENOENT,):
                raise
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError:
            self.unavailable = True
            return None

    def try_acquire(self, shared: bool = False) -> bool:
        fd = self._open()
        if fd is None:
            if shared:
                return True  # a shared lock on nothing: proceed, read-only
            raise OSError(errno.EROFS, "cannot create a lock file", str(self.path))
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        if not shared:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError:
                pass  # opened read-only: the holder's pid is a courtesy
        return True

    def acquire(self, shared: bool = False) -> None:
        fd = self._open()
        if fd is None:
            if shared:
                return
            raise OSError(errno.EROFS, "cannot create a lock file", str(self.path))
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
