"""The engine: keys, the up-to-date check, restoring from the caches, recording results.

For each target, dependencies first: compute its key from its components; `decide` whether
the target's materialized output already has that key (up to date), a cache has it
(restore), or the step must run (`schedule.Scheduler`). Only after a step succeeds are its
outputs moved into the store and the action recorded (blobs first, then the action entry,
each by atomic rename).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunemake import keys, run
from tunemake.decide import State, decide
from tunemake.errors import UserError
from tunemake.fsutil import FileLock, locked, rel_path, rmtree, stamp
from tunemake.graph import closure
from tunemake.hashing import StatCache, hash_file, tree_digest
from tunemake.owners import owner_of, owner_token
from tunemake.store import Store
from tunemake.tunefile import Project


@dataclass
class Options:
    jobs: int = 1
    keep_going: bool = False
    force: set[str] = field(default_factory=set)  # rebuild these even if cached
    no_cache: bool = False  # rebuild every selected target
    dry_run: bool = False
    pull_only: bool = False  # restore from the caches, run nothing (`tunemake cache pull`)

    def forced(self, name: str) -> bool:
        return self.no_cache or name in self.force


@dataclass
class Outcome:
    """What a build did (or, assessed, would do) to each target."""

    status: dict[str, State] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    failed_logs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(s in (State.FAILED, State.SKIPPED) for s in self.status.values())

    def count(self, status: State) -> int:
        return sum(1 for s in self.status.values() if s == status)


class Engine:
    def __init__(self, project: Project, remote=None, executor=None):
        self.project = project
        self.store = Store(project.cache_dir, project.link)
        self.executor = executor or run.LocalExecutor(project.dir, self.store)
        self.hasher = StatCache(project.cache_dir / "stat.json")
        self.remote = remote  # tunemake.remote.Remote, or None
        self.warn = lambda text: print(text, file=sys.stderr, flush=True)
        self.on_transfer = lambda name, progress: None
        self._warned: set[str] = set()
        self.damaged: set[str] = set()  # keys whose blobs were found edited in place

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.warn(f"warning: {text}")

    # -- the remote cache -------------------------------------------------------
    def pull(self, name: str, key: str, entry: dict) -> dict | None:
        """Download a remote entry's blobs into the local store, each verified; the entry, or None.

        The entry itself is not recorded here: the caller records it only once its outputs are
        materialized, so a remote entry that cannot be materialized never poisons the local cache."""
        if self.remote is None or self.remote.broken:
            return None
        from tunemake.remote import RemoteError, action_blobs

        try:
            corrupt = self.remote.fetch(self.store, action_blobs(entry), self._transfer_progress(name, entry))
        except RemoteError as exc:
            self._warn_once(f"{exc}; building locally")
            return None
        except OSError as exc:  # the local side: a full disk, a damaged cas/ folder
            self._warn_once(f"remote cache: cannot store {name}'s blobs locally ({exc.strerror or exc}); "
                            f"building {name}")
            return None
        if corrupt:
            self._warn_once(f"remote cache: {len(corrupt)} blob(s) of {name} failed verification "
                            f"(corrupt or tampered, e.g. {corrupt[0][:16]}); rebuilding {name}")
            return None
        return entry

    def _transfer_progress(self, name: str, entry: dict):
        """A byte counter for a download, shown as the target's progress (MB done / total)."""
        import threading

        total = sum(e["size"] for e in entry["outputs"].values())
        done = [0]
        lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with lock:
                done[0] += n
                self.on_transfer(name, {"done": done[0] >> 20, "total": max(1, total >> 20),
                                        "message": "MB from the remote cache"})
        return on_bytes

    def publish(self, key: str, entry: dict) -> None:
        if self.remote is None or self.remote.read_only or self.remote.broken:
            return
        from tunemake.remote import RemoteError

        try:
            self.remote.publish(self.store, key, entry)
        except RemoteError as exc:
            self._warn_once(f"{exc}; the result stays in the local cache only")

    def close(self) -> None:
        if hasattr(self.executor, "close"):
            self.executor.close()
        self.hasher.close()
        self.store.owners.release()

    # -- keys and state -------------------------------------------------------
    def components(self, name: str, trees: dict[str, str]) -> dict:
        return keys.components(self.project, self.project.targets[name], trees, self.hasher)

    def check_current(self, name: str, key: str, repair: bool = True, state: dict | None = None,
                      holding_lock: bool = False) -> dict | None:
        """The target's state if targets/NAME holds this key's outputs untouched, else None.

        A materialized file whose only change is its ctime is re-hashed (an in-place edit can put
        the mtime back). A file that changed is checked against its blob: with hardlinks an
        in-place edit reaches the blob too; the key of a damaged blob goes into `self.damaged`,
        and with `repair` the blob and the action entry that needs it are dropped (and re-hashed
        files have their new ctime recorded). `state`: the record, if the caller has read it;
        `holding_lock`: the caller holds the target's lock."""
        state = state or self.store.get_state(name)
        if not state or state.get("key") != key:
            return None
        record = state["materialized"]
        out = self.project.output_dir(name)
        changed, touched = self.store.intact(record, out)
        if touched and not changed:
            before = {rel: stamp(out / rel) for rel in touched}
            changed = [rel for rel in touched if not _same_content(out / rel, state["outputs"][rel]["digest"])]
            if not changed and repair:
                self._refresh_record(name, state, out, before, holding_lock)
        if not changed:
            return state
        for rel in changed:
            if rel in record and record[rel][3] == "link":
                if not self.store.verify_blob(state["outputs"][rel]["digest"], delete=repair):
                    self.damaged.add(key)
                    if repair:
                        self.store.drop_action(key)
        return None

    def _refresh_record(self, name: str, state: dict, out: Path, before: dict, holding_lock: bool) -> None:
        """Re-hashed files are fine: remember their new ctime, so the next build need not re-hash.
        Only if nothing moved since they were stamped before hashing, and the record on disk is
        still the one that was checked. Best effort (a read-only cache): only a speed-up."""
        def refresh() -> None:
            if self.store.get_state(name) != state:
                return  # another build wrote a new record meanwhile
            updated = {**state, "materialized": dict(state["materialized"])}
            for rel, was in before.items():
                if was is None or stamp(out / rel) != was:
                    return
                placed = state["materialized"][rel]
                updated["materialized"][rel] = [*was[:3], placed[3], was[3]]
            self.store.put_state(name, updated)

        try:
            if holding_lock:
                refresh()
            else:
                with locked(self.store.lock_path(f"target-{name}")):
                    refresh()
        except OSError:
            pass

    def restore(self, name: str, key: str, parts: dict, entry: dict, fresh: bool = False) -> bool:
        """Materialize a cached action into targets/NAME; False if a blob is missing. `fresh`: the
        step just ran (-B, --no-cache: perhaps to other bytes), so targets/NAME gets its outputs
        even if it already holds the key's (steps read views, never targets/, so this is safe)."""
        if not self.store.action_complete(entry):
            self.store.drop_action(key)
            return False
        try:
            os.utime(self.store.action_path(key))  # last use, for `cache gc`'s LRU order
        except OSError:
            pass  # a remote entry not yet recorded locally
        lock = FileLock(self.store.lock_path(f"target-{name}"))
        lock.acquire()
        try:
            if not fresh and self.check_current(name, key, holding_lock=True):
                return True  # another build materialized it meanwhile
            record = self.store.materialize(entry["outputs"], self.project.output_dir(name))
            self.store.put_state(name, {
                "key": key, "tree": entry["tree"], "components": parts, "outputs": entry["outputs"],
                "materialized": record, "built": {k: entry.get(k) for k in
                                                  ("started", "finished", "duration", "host", "log")},
            })
        finally:
            lock.release()
        return True

    def record(self, target: str, key: str, parts: dict, manifest: dict, log: bytes, started: float,
               host: str | None = None) -> dict:
        """Write the action entry; the outputs' blobs are already in the store."""
        finished = time.time()
        entry = {
            "target": target, "key": key, "kind": parts["kind"], "outputs": manifest,
            "tree": tree_digest(manifest), "log": self.store.put_bytes(log), "started": started,
            "finished": finished, "duration": round(finished - started, 3),
            "host": host or socket.gethostname(), "components": parts,
        }
        self.store.put_action(key, entry)
        return entry

    def upload_sources(self, sources: list[str]) -> dict[str, dict]:
        """Put source files in the remote cache (for remote workers); returns their manifests by path."""
        manifests = {}
        for rel in sources:
            path = keys.source_path(self.project, rel)
            if path.is_dir():
                manifest = self.hasher.tree(path, keys.source_skip(self.project))
                files = {e["digest"]: path / r for r, e in manifest.items()}
            else:
                st = path.stat()
                manifest = {"": {"digest": self.hasher.file(path, st), "size": st.st_size,
                                 "x": bool(st.st_mode & 0o100)}}
                files = {manifest[""]["digest"]: path}
            self.remote.upload_files(files)
            manifests[rel] = manifest
        return manifests

    # -- assessment (status, explain, dry run) -----------------------------------
    def assess(self, roots: list[str], options: Options | None = None) -> Outcome:
        """What a build would do, without doing it: the same `decide` as a build, no side effects."""
        options = options or Options()
        outcome = Outcome()
        trees: dict[str, str] = {}
        for name in closure(self.project, roots):
            target = self.project.targets[name]
            pending = [d for d in target.target_deps if d not in trees]
            if pending:
                outcome.status[name] = State.STALE
                outcome.reasons[name] = [f"dep {d} will be rebuilt" for d in pending]
                continue
            parts = self.components(name, trees)
            decision = decide(self, name, keys.key_of(parts), parts, options.forced(name), repair=False)
            outcome.status[name] = decision.state
            outcome.reasons[name] = decision.reasons
            if decision.state == State.UP_TO_DATE:
                trees[name] = decision.last["tree"]
            elif decision.state == State.CACHED:
                trees[name] = decision.entry["tree"]
        return outcome

    def remote_entry(self, key: str) -> dict | None:
        """The remote cache's entry for a key (checked, not yet trusted locally), or None."""
        from tunemake.remote import RemoteError

        if self.remote is None or self.remote.broken:
            return None
        try:
            return self.remote.get_action(key)
        except RemoteError as exc:
            self._warn_once(str(exc))
            return None

    # -- building ---------------------------------------------------------------
    def build(self, roots: list[str], options: Options, reporter) -> Outcome:
        from tunemake.schedule import Scheduler

        started = time.monotonic()
        order = closure(self.project, roots)
        if options.dry_run:
            outcome = self.assess(roots, options)
            outcome.seconds = time.monotonic() - started
            return outcome

        gc_lock = FileLock(self.store.lock_path("gc"))
        if not gc_lock.try_acquire(shared=True):
            reporter.message("waiting for `tunemake cache gc` to finish ...")
            gc_lock.acquire(shared=True)
        try:
            self.store.prepare()
            self._clean_stale_tmp()
            outcome = Scheduler(self, order, options, reporter).run()
        finally:
            gc_lock.release()
        outcome.seconds = time.monotonic() - started
        return outcome

    def require_writable(self, why: str) -> None:
        """A one-line error when the cache cannot take what a build must write."""
        root = self.store.root
        probe = root / "tmp"
        try:
            probe.mkdir(parents=True, exist_ok=True)
            test = probe / f".probe-{owner_token()}"
            test.touch()
            test.unlink()
        except OSError as exc:
            raise UserError(f"cache folder {rel_path(root)} is not writable ({exc.strerror or exc}); "
                            f"{why} needs to write to it") from None

    def _clean_stale_tmp(self) -> None:
        """Remove working folders left by builds that were killed: their owner lock is free."""
        me = owner_token()
        folders: dict[str, list[Path]] = {}
        for parent in (self.store.root / "tmp", self.project.targets_dir):
            if not parent.is_dir():
                continue
            for entry in parent.iterdir():
                if parent == self.project.targets_dir and not entry.name.startswith("."):
                    continue
                token = owner_of(entry.name)
                if token is None or token == me:
                    continue
                if parent == self.project.targets_dir and not self.store.lock_path(f"owner-{token}").exists():
                    continue  # staged by a build using another cache folder: not ours to judge
                folders.setdefault(token, []).append(entry)
        # owners that left no folder are swept too, so their lock files do not pile up
        locks = self.store.root / "locks"
        owners = {f.name.removeprefix("owner-") for f in locks.glob("owner-*")} if locks.is_dir() else set()
        for token in (set(folders) | owners) - {me}:
            try:
                if self.store.owners.gone(token):
                    for entry in folders.get(token, ()):
                        rmtree(entry)
            except OSError:
                pass  # a read-only cache: nothing of anyone's can be swept, and nothing needs to be


def _same_content(path: Path, digest: str) -> bool:
    try:
        return hash_file(path) == digest
    except OSError:
        return False
