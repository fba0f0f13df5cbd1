"""A shared remote cache through fsspec: s3://, gs://, file://, any fsspec URL.

Same layout as the local store (`ac/` action entries, `cas/` blobs by digest). Nothing from
the remote is trusted: every blob is re-hashed before it enters the local store, action entries
are checked (tunemake.records), and any failure degrades to a local build with a warning.
Nothing is uploaded without a re-hash either: a blob damaged here must not poison the remote.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor

from tunemake.errors import UserError
from tunemake.hashing import hash_file
from tunemake.records import check_action
from tunemake.store import Store

TRANSFER_THREADS = 8
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


class RemoteError(Exception):
    """The remote could not be reached or answered nonsense: build locally instead."""


class CorruptBlob(RemoteError):
    """A local file no longer matches its digest (an output edited in place through its hardlink
    edits the blob): it was not uploaded."""

    def __init__(self, digest: str):
        super().__init__(f"the local copy of {digest[:16]} no longer matches its digest (edited in place?)")
        self.digest = digest


class Remote:
    def __init__(self, url: str, read_only: bool = False, options: dict | None = None):
        self.url = url.rstrip("/")
        self.read_only = read_only
        self.options = options or {}
        self._fs = None
        self.root = ""
        self.broken: str | None = None  # after the first network failure we stop trying
        self.damaged: set[str] = set()  # blobs the remote served corrupt: the next publish replaces them

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
            except ImportError as exc:
                scheme = self.url.split("://", 1)[0]
                extra = EXTRAS.get(scheme)
                hint = f"pip install 'tunemake[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
                raise UserError(f"remote cache {self.url}: {exc} ({hint})") from None
            except ValueError as exc:
                raise UserError(f"remote cache {self.url}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - e.g. an ftp:// server that refuses the connection
                self.broken = f"remote cache {self.url} unavailable ({type(exc).__name__}: {exc})"
                raise RemoteError(self.broken) from None
        return self._fs

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018 - resolves self.root on first use
        return posixpath.join(self.root, *parts)

    def _guard(self, what: str, fn, missing_ok: bool = False):
        if self.broken:
            raise RemoteError(self.broken)
        try:
            return fn()
        except (UserError, RemoteError):
            raise
        except FileNotFoundError:
            if missing_ok:
                raise
            self.broken = f"remote cache {self.url} unavailable ({what}: file not found)"
            raise RemoteError(self.broken) from None
        except Exception as exc:  # network, auth, throttling: all mean "build locally"
            self.broken = f"remote cache {self.url} unavailable ({what}: {type(exc).__name__}: {exc})"
            raise RemoteError(self.broken) from None

    # -- actions --------------------------------------------------------------
    def get_action(self, key: str) -> dict | None:
        path = self._path("ac", key[:2], f"{key}.json")
        try:
            self._refuse_non_file(path)
            raw = self._guard("read action", lambda: self.fs.cat_file(path), missing_ok=True)
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(raw)
            check_action(entry)
        except (ValueError, RecursionError) as exc:
            raise RemoteError(f"remote cache entry {key[:16]} is malformed: {exc}") from None
        return entry

    def _refuse_non_file(self, path: str) -> None:
        """On a shared folder (file://) a FIFO or a device where a file should be would block a read
        forever: only regular files are read. Object stores hold nothing else, and are not asked."""
        if not str(self.url).startswith(("file:", "local:", "/")):
            return
        import stat as stat_module

        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise RemoteError(f"remote cache {self.url}: {path}: {exc.strerror or exc}") from None
        if not stat_module.S_ISREG(mode):
            raise RemoteError(f"remote cache {self.url}: {path} is not a regular file")

    def put_action(self, key: str, entry: dict) -> None:
        data = json.dumps(entry, sort_keys=True).encode()
        folder = self._path("ac", key[:2])
        final = posixpath.join(folder, f"{key}.json")
        tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # written aside, then moved: a reader never sees half an entry, and whatever sat there
        # (a torn entry, a FIFO that would block a write forever) is replaced, not written into
        self._guard("write action", lambda: self.fs.makedirs(folder, exist_ok=True))
        self._guard("write action", lambda: self.fs.pipe_file(tmp, data))
        self._guard("write action", lambda: self.fs.mv(tmp, final))

    # -- blobs ----------------------------------------------------------------
    def fetch(self, store: Store, digests: list[str], on_bytes=None) -> list[str]:
        """Download the blobs the local store lacks, verifying each; returns the corrupt ones."""
        missing = sorted({d for d in digests if not store.has_blob(d)})
        if not missing:
            return []
        staging = store.new_tmp_dir("pull")
        corrupt: list[str] = []

        def one(digest: str) -> None:
            local = staging / digest
            remote_path = self._path("cas", digest[:2], digest)
            try:
                self._refuse_non_file(remote_path)
            except FileNotFoundError:  # an entry naming a blob the remote lacks: that entry is bad, not the remote
                corrupt.append(digest)
                return
            except RemoteError:  # a FIFO or a folder where the blob should be
                corrupt.append(digest)
                self.damaged.add(digest)
                return
            try:
                self._guard("download", lambda: self.fs.get_file(remote_path, str(local)), missing_ok=True)
            except FileNotFoundError:
                corrupt.append(digest)
                return
            if hash_file(local) != digest:
                local.unlink()
                corrupt.append(digest)
                self.damaged.add(digest)
                return
            if on_bytes:
                on_bytes(local.stat().st_size)
            store.ingest(local, digest, executable=False)

        try:
            _parallel(one, missing)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return corrupt

    def push(self, store: Store, digests: list[str]) -> int:
        """Upload blobs the remote lacks or holds damaged; returns how many were sent.
        Raises CorruptBlob for a local blob that fails its re-hash (verify_blob deletes it)."""
        if self.read_only:
            return 0
        return self.upload_files({d: store.blob_path(d) for d in digests}, store.verify_blob)

    def upload_files(self, files: dict, intact=None) -> int:
        """Upload files by digest (sources for remote workers), skipping those the remote already
        holds at the same size, unless it served them corrupt. Each file is re-hashed first
        (`intact(digest)`): one that no longer matches its digest raises CorruptBlob, never sent."""
        intact = intact or (lambda digest: _matches(files[digest], digest))

        def one(digest: str) -> None:
            target = self._path("cas", digest[:2], digest)
            if digest not in self.damaged and self._remote_size(target) == _size(files[digest]):
                return
            if not intact(digest):
                corrupt.append(digest)
                return
            tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._guard("upload", lambda: self.fs.makedirs(posixpath.dirname(target), exist_ok=True))
            self._guard("upload", lambda: self.fs.put_file(str(files[digest]), tmp))
            self._guard("upload", lambda: self.fs.mv(tmp, target))  # replaces a damaged blob
            self.damaged.discard(digest)
            sent.append(digest)

        sent: list[str] = []
        corrupt: list[str] = []
        _parallel(one, sorted(files))
        if corrupt:
            raise CorruptBlob(corrupt[0])
        return len(sent)

    def _remote_size(self, path: str) -> int | None:
        """The size of a remote file, None if there is none."""
        try:
            info = self._guard("stat", lambda: self.fs.info(path), missing_ok=True)
        except FileNotFoundError:
            return None
        return info.get("size") if info.get("type") == "file" else None

    def publish(self, store: Store, key: str, entry: dict) -> int:
        """Blobs first, then the action entry: a reader never sees an entry whose blobs are missing
        (and with a CorruptBlob, the entry is not published at all)."""
        if self.read_only:
            return 0
        sent = self.push(store, action_blobs(entry))
        self.put_action(key, entry)
        return sent


def action_blobs(entry: dict) -> list[str]:
    blobs = [e["digest"] for e in entry["outputs"].values()]
    if entry.get("log"):
        blobs.append(entry["log"])
    return blobs


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1  # gone: the re-hash will say so


def _matches(path, digest: str) -> bool:
    try:
        return hash_file(path) == digest
    except OSError:
        return False


def _parallel(fn, items: list[str]) -> None:
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
