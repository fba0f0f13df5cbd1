"""The local cache: content-addressed blobs, the action cache, and materialization.

Layout under the cache dir (a remote store uses the same `cas/` and `ac/`):

    cas/ab/abcd...      blobs, read-only, named by blake3 digest
    ac/12/1234....json  action cache: key -> output manifest + build metadata
    state/NAME.json     per target: last key, its components (for explain), what was materialized
    logs/NAME.log       the last log of each target
    failed/NAME.json    the key and reason of a target's last failed run, until it succeeds
    tmp/                steps write here; moved into cas/ only after success
    requests/           the eval's request-level answers (tunemake.request_cache, a diskcache)
    locks/              flock files: one per key being built, one per target being materialized
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from pathlib import Path

from tunemake.fsutil import is_real_dir, read_json, rmtree, swap_dir, write_json_atomic
from tunemake.hashing import hash_file
from tunemake.owners import Owners, owner_token
from tunemake.records import check_action, check_failure, check_state, is_digest

FICLONE = 0x40049409  # linux/fs.h: clone a file's extents (btrfs, xfs, ...)
SMALL_FILE = 1 << 20  # below this, `auto` copies: small outputs are the ones people open and edit


CACHEDIR_TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: backup tools skip the folder too
CACHEDIR_TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# A tunemake cache folder: `tunemake cache gc` manages it.\n"
LAYOUT = ("cas", "ac", "state", "logs", "failed", "tmp", "locks", "requests")


def looks_like_a_cache(folder: Path) -> bool:
    """A folder tunemake may write into: empty, tagged, or a cache made before tags (cas/ and ac/)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return True  # unreadable: the store's own errors will say so
    if CACHEDIR_TAG in names:  # cargo, ccache and others write this tag too: only ours will do
        try:
            return "tunemake" in (folder / CACHEDIR_TAG).read_text(errors="replace")
        except OSError:
            return False
    return not names or {"cas", "ac"} <= names


class Store:
    def __init__(self, root: Path, link: str = "auto"):
        self.root = root
        self.link = link
        self._reflink_ok: bool | None = None if link in ("auto", "reflink") else False
        self.owners = Owners(self.lock_path)

    def prepare(self) -> None:
        """Before a build writes: tag the folder, and remove anything that is not a folder where one
        of ours should be (a damaged cache would otherwise fail every build the same way).
        Best effort: a read-only cache is reported when something must actually be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tag = self.root / CACHEDIR_TAG
            if not tag.exists():
                tag.write_text(CACHEDIR_TAG_TEXT)
            for name in LAYOUT:
                path = self.root / name
                if os.path.lexists(path) and not is_real_dir(path):
                    os.unlink(path)
        except OSError:
            pass

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
        return _checked(check_failure, read_json(self.failure_path(target)))

    def clear_failure(self, target: str) -> None:
        self.failure_path(target).unlink(missing_ok=True)

    def new_tmp_dir(self, label: str) -> Path:
        path = self.root / "tmp" / f"{self.owners.mine()}-{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    # -- blobs --------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()  # a folder where a blob should be is no blob

    def ingest(self, src: Path, digest: str, executable: bool) -> None:
        """Move a finished output file into the store (a rename: same filesystem, atomic).

        The fresh file always replaces an existing blob of the same digest: that blob may have
        been damaged through a hardlink, and the fresh bytes are known to match the digest.
        """
        dst = self.blob_path(digest)
        self._ensure_dir(dst.parent)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode) or st.st_nlink > 1 or not stat.S_ISREG(st.st_mode):
            # a link (to a source, a dependency's output, anything): store a private copy,
            # never the shared inode, or later edits of the original would reach the cache
            tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
            shutil.copyfile(src, tmp)
            if hash_file(tmp) != digest:  # the linked file changed after it was hashed
                tmp.unlink()
                raise RuntimeError(f"{src.name} changed while its output was being stored")
            src.unlink()
            src = tmp
        os.chmod(src, 0o555 if executable else 0o444)
        try:
            os.replace(src, dst)
        except IsADirectoryError:  # a damaged cache: a folder where the blob should be
            rmtree(dst)
            os.replace(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o555 if executable else 0o444)
            os.replace(tmp, dst)
            src.unlink()

    def adopt(self, path: Path, digest: str, executable: bool) -> bool:
        """Take a file back into the store as the blob `digest`, if its content still is that."""
        tmp = self.new_tmp_dir("adopt") / "blob"
        try:
            shutil.copyfile(path, tmp)
            if hash_file(tmp) != digest:
                return False
            self.ingest(tmp, digest, executable)
            return True
        except OSError:
            return False
        finally:
            rmtree(tmp.parent)

    def put_bytes(self, data: bytes) -> str:
        from tunemake.hashing import digest_bytes

        digest = digest_bytes(data)
        if not self.has_blob(digest):
            tmp = self.new_tmp_dir("bytes") / "blob"
            tmp.write_bytes(data)
            self.ingest(tmp, digest, executable=False)
            shutil.rmtree(tmp.parent, ignore_errors=True)
        return digest

    def verify_blob(self, digest: str, delete: bool = True) -> bool:
        """Re-hash a blob; a corrupt blob is deleted (with `delete`, and where the cache is
        writable) so it is never served again."""
        path = self.blob_path(digest)
        if not path.exists():
            return False
        if hash_file(path) == digest:
            return True
        if delete:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: the caller still treats the blob as corrupt
        return False

    def blobs(self):
        cas = self.root / "cas"
        if not cas.is_dir():
            return
        for sub in sorted(cas.iterdir()):
            if not sub.is_dir():  # a stray file where a shard folder should be
                continue
            for blob in sub.iterdir():
                if is_digest(blob.name) and blob.name.startswith(sub.name) and blob.is_file():
                    yield blob.name, blob

    # -- action cache -------------------------------------------------------
    def get_action(self, key: str) -> dict | None:
        # a torn, unreadable or misshapen entry is a miss, never a crash
        return _checked(check_action, read_json(self.action_path(key)))

    def put_action(self, key: str, entry: dict) -> None:
        write_json_atomic(self.action_path(key), entry)

    def drop_action(self, key: str) -> None:
        try:
            self.action_path(key).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache: the entry stays, and decide() knows the key is damaged

    def actions(self):
        ac = self.root / "ac"
        if not ac.is_dir():
            return
        for path in ac.glob("*/*.json"):
            key = path.stem
            if not (is_digest(key) and path.parent.name == key[:2]):
                continue  # not where get_action or drop_action would look for it
            entry = _checked(check_action, read_json(path))
            if entry is not None:
                yield key, entry, path

    def action_complete(self, entry: dict) -> bool:
        """Every blob present, at its recorded size: a blob something appended to after it was
        stored (a step's escaped background process still holding the file) is not served."""
        for e in entry["outputs"].values():
            try:
                st = os.stat(self.blob_path(e["digest"]))
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_size != e["size"]:
                return False
        return True

    # -- per-target state ---------------------------------------------------
    def get_state(self, target: str) -> dict | None:
        return _checked(check_state, read_json(self.state_path(target)))

    def put_state(self, target: str, state: dict) -> None:
        write_json_atomic(self.state_path(target), state)

    # -- materialization ----------------------------------------------------
    def materialize(self, manifest: dict[str, dict], dest: Path) -> dict[str, list]:
        """Recreate an output tree at `dest` from blobs; returns what was placed, for `intact`."""
        staging = dest.parent / f".{dest.name}.tmp-{self.owners.mine()}-{uuid.uuid4().hex[:6]}"
        staging.mkdir(parents=True)
        record: dict[str, list] = {}
        try:
            made, how = {staging}, {}
            for rel, entry in manifest.items():
                target = staging / rel
                _make_parent(target, made, staging)
                how[rel] = self._place(self.blob_path(entry["digest"]), target, entry["size"], entry.get("x", False))
            for rel in manifest:  # after every link: files of one content share an inode, whose ctime each link moves
                st = os.stat(staging / rel)
                record[rel] = [st.st_ino, st.st_size, st.st_mtime_ns, how[rel], st.st_ctime_ns]
            swap_dir(staging, dest, owner_token())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    def link_view(self, manifest: dict[str, dict], dest: Path) -> tuple[dict[str, list], dict[str, list]]:
        """A step's private copy of a dependency's outputs: blobs reflinked or hardlinked (copied
        only when neither works, or the executable bit differs), never shared with targets/.
        Files and folders are read-only (binding for other users, advisory for root): returns the
        stats of the files and of the folders, which `executor.view_changed` compares with later
        (a file edited, or one added even for a moment, moves them)."""
        dest.mkdir(parents=True)  # an output with no files is an empty folder
        made = {dest}
        for rel, entry in manifest.items():
            target = dest / rel
            _make_parent(target, made, dest)
            blob = self.blob_path(entry["digest"])
            x = bool(entry.get("x", False))
            blob_st = os.stat(blob)
            if blob_st.st_size != entry["size"]:  # appended to since it was stored
                raise RuntimeError(f"the cached bytes of {rel} were changed; build again")
            if self._reflink_ok is not False and self._reflink(blob, target):
                os.chmod(target, 0o555 if x else 0o444)
                continue
            if bool(blob_st.st_mode & stat.S_IXUSR) == x:
                try:
                    os.link(blob, target)
                    continue
                except OSError:
                    pass
            shutil.copyfile(blob, target)
            os.chmod(target, 0o555 if x else 0o444)
        folders = {}
        for folder in made:  # only the view's own (a chmod moves nothing but that folder's ctime)
            os.chmod(folder, 0o555)
            st = os.stat(folder)
            folders[str(folder.relative_to(dest))] = [st.st_mtime_ns, st.st_ctime_ns]
        # stats after every link: two files of one content share an inode, whose ctime each link moves
        files: dict[str, list] = {}
        for rel in manifest:
            st = os.stat(dest / rel)
            files[rel] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        return files, folders

    @staticmethod
    def intact(record: dict[str, list], dest: Path) -> tuple[list[str], list[str]]:
        """(changed, touched): materialized files whose stat no longer matches (deleted or edited
        by the user), or "(files added or removed)" (dependents would read those); and files
        whose only change is their ctime: an edit that put the mtime back, or just another hardlink
        to the same blob. Those must be re-hashed to tell."""
        present = sum(len(files) for _root, _dirs, files in os.walk(dest))
        if present != len(record):
            return ["(files added or removed)"], []
        changed, touched = [], []
        for rel, placed in record.items():
            ino, size, mtime_ns = placed[:3]
            try:
                st = os.stat(dest / rel)
            except OSError:
                changed.append(rel)
                continue
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (ino, size, mtime_ns):
                changed.append(rel)
            elif len(placed) < 5 or st.st_ctime_ns != placed[4]:
                touched.append(rel)
        return changed, touched

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
        try:
            self._ensure_dir(path.parent)
        except OSError:
            pass  # a read-only cache: FileLock copes (see there)
        return path

    @staticmethod
    def _ensure_dir(folder: Path) -> None:
        """One of our folders: an lstat first (on some filesystems a mkdir costs 50x more); a file
        or a symlink where it should be (a damaged cache) is removed, never followed."""
        if not is_real_dir(folder):
            if os.path.lexists(folder):
                os.unlink(folder)
            folder.mkdir(parents=True, exist_ok=True)


def output_manifest(out: Path, real_root: str | None = None) -> tuple[dict[str, dict], list[tuple[Path, str]]]:
    """A finished step's files: {rel: {digest, size, x}} and (path, rel) pairs to ingest.

    Outputs are files. Nothing is followed out of the step's private folder: the output folder
    itself must still be the real folder the step was given (`real_root`, its resolved path at
    the start), not a symlink a step put in its place, and a symlink to a folder inside it is
    refused. Following either would move someone else's files (a source, a dependency's
    output, any folder) into the store."""
    if not is_real_dir(out) or (real_root is not None and os.path.realpath(out) != real_root):
        what = "replaced by a symlink" if os.path.islink(out) else "removed or moved"
        raise RuntimeError(f"the step's output folder ($TUNEMAKE_OUT) was {what}; write files into it instead")
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
            try:
                st = os.stat(full)
            except OSError as exc:
                raise RuntimeError(f"output {rel}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"output {rel} is not a regular file")
            manifest[rel] = {"digest": hash_file(full), "size": st.st_size, "x": bool(st.st_mode & 0o100)}
            files.append((full, rel))
    return manifest, files


def _checked(check, record: dict | None) -> dict | None:
    """The record if it has the shape `check` wants, else None: a damaged record is a miss."""
    try:
        check(record)
    except ValueError:
        return None
    return record


def _make_parent(path: Path, made: set[Path], root: Path) -> None:
    """The folder of a file being placed in a fresh tree under `root`, made once (`made`: the
    folders of the tree made so far; never a folder above `root`)."""
    if path.parent not in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        made.update(p for p in path.parents if p == root or root in p.parents)

