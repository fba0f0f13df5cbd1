"""Decides what is stale, schedules steps, and records their results.

For each target, dependencies first: compute its key from its components; if the
target's materialized output already has that key it is up to date; else if the
action cache has the key it is restored; else the step runs in a child process,
and only after it succeeds are its outputs moved into the store and the action
recorded (blobs first, then the action entry, each by atomic rename).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tunemake import keys, run
from tunemake.graph import closure, dependents
from tunemake.hashing import StatCache, tree_digest
from tunemake.store import (
    FileLock,
    Store,
    output_manifest,
    owner_of,
    owner_token,
    rmtree,
)
from tunemake.tunefile import Project

POLL_SECONDS = 0.02
PROGRESS_SECONDS = 0.1  # live progress refresh while every step can wake us by exiting


@dataclass
class Options:
    jobs: int = 1
    keep_going: bool = False
    force: set[str] = field(default_factory=set)  # rebuild these even if cached
    no_cache: bool = False  # rebuild every selected target
    dry_run: bool = False
    pull_only: bool = False  # restore from the caches, run nothing (`tunemake cache pull`)


@dataclass
class Outcome:
    """What a build did to each target: up to date, cached, done, failed, skipped."""

    status: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    failed_logs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(s in ("failed", "skipped") for s in self.status.values())

    def count(self, status: str) -> int:
        return sum(1 for s in self.status.values() if s == status)


class Engine:
    def __init__(self, project: Project, remote=None, executor=None):
        self.project = project
        self.executor = executor or run.LocalExecutor()
        self.store = Store(project.cache_dir, project.link)
        self.hasher = StatCache(project.cache_dir / "stat.json")
        self.remote = remote  # tunemake.remote.Remote, or None
        self.warn = lambda text: print(text, file=sys.stderr, flush=True)
        self.on_transfer = lambda name, progress: None
        self._warned: set[str] = set()

    def _warn_once(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.warn(f"warning: {text}")

    # -- the remote cache -------------------------------------------------------
    def pull(self, name: str, key: str) -> dict | None:
        """Look for a key in the remote cache; verified blobs go into the local store."""
        if self.remote is None or self.remote.broken:
            return None
        from tunemake.remote import RemoteError, action_blobs

        try:
            entry = self.remote.get_action(key)
            if entry is None:
                return None
            corrupt = self.remote.fetch(self.store, action_blobs(entry), self._transfer_progress(name, entry))
        except RemoteError as exc:
            self._warn_once(f"{exc}; building locally")
            return None
        if corrupt:
            self._warn_once(f"remote cache: {len(corrupt)} blob(s) of {name} failed verification "
                            f"(corrupt or tampered, e.g. {corrupt[0][:16]}); rebuilding {name}")
            return None
        self.store.put_action(key, entry)
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
        self.hasher.close()
        self.store.release_owner()

    # -- keys and state -------------------------------------------------------
    def components(self, name: str, trees: dict[str, str]) -> dict:
        return keys.components(self.project, self.project.targets[name], trees, self.hasher)

    def check_current(self, name: str, key: str) -> dict | None:
        """The target's state if targets/NAME holds this key's outputs untouched, else None.

        A materialized file that changed under us is checked against its blob: with
        hardlinks an in-place edit reaches the blob too, and a corrupt blob is dropped.
        """
        state = self.store.get_state(name)
        if not state or state.get("key") != key:
            return None
        record = state.get("materialized", {})
        changed = self.store.intact(record, self.project.output_dir(name))
        if not changed:
            return state
        for rel in changed:
            if rel in record and record[rel][3] == "link":
                digest = state["outputs"][rel]["digest"]
                if not self.store.verify_blob(digest):
                    self.store.drop_action(key)
        return None

    def restore(self, name: str, key: str, parts: dict, entry: dict) -> bool:
        """Materialize a cached action into targets/NAME; False if a blob is missing."""
        if not self.store.action_complete(entry):
            self.store.drop_action(key)
            return False
        os.utime(self.store.action_path(key))  # last use, for `cache gc`'s LRU order
        lock = FileLock(self.store.lock_path(f"target-{name}"))
        lock.acquire()
        try:
            if self.check_current(name, key):
                return True  # another build materialized it meanwhile; its dependents may be reading it
            record = self.store.materialize(entry["outputs"], self.project.output_dir(name))
            self.store.put_state(name, {
                "key": key, "tree": entry["tree"], "components": parts, "outputs": entry["outputs"],
                "materialized": record, "built": {k: entry.get(k) for k in
                                                  ("started", "finished", "duration", "host", "log")},
            })
        finally:
            lock.release()
        return True

    def finish(self, step: run.RunningStep, key: str, parts: dict) -> dict:
        """Move a successful local step's outputs into the store and record the action."""
        manifest, files = output_manifest(step.out)
        for full, rel in files:
            self.store.ingest(full, manifest[rel]["digest"], manifest[rel]["x"])
        return self.record(step.target, key, parts, manifest, step.log.read_bytes(), step.started)

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

    def upload_sources(self, target) -> dict[str, dict]:
        """Put a target's source files in the remote cache; returns their manifests by path."""
        manifests = {}
        for rel in target.sources:
            path = Path(rel) if Path(rel).is_absolute() else self.project.dir / rel
            if path.is_dir():
                manifest = self.hasher.tree(path)
                files = {e["digest"]: path / r for r, e in manifest.items()}
            else:
                st = path.stat()
                manifest = {"": {"digest": self.hasher.file(path, st), "size": st.st_size,
                                 "x": bool(st.st_mode & 0o100)}}
                files = {manifest[""]["digest"]: path}
            self.remote.upload_files(files)
            manifests[rel] = manifest
        return manifests

    # -- assessment (status, dry run) -----------------------------------------
    def assess(self, roots: list[str], force: set[str] = frozenset()) -> Outcome:
        """What a build would do, without doing it."""
        outcome = Outcome()
        trees: dict[str, str] = {}
        for name in closure(self.project, roots):
            target = self.project.targets[name]
            pending = [d for d in target.target_deps if d not in trees]
            if pending:
                outcome.status[name] = "stale"
                outcome.reasons[name] = [f"dep {d} will be rebuilt" for d in pending]
                continue
            parts = self.components(name, trees)
            key = keys.key_of(parts)
            state = self.store.get_state(name)
            if name in force:
                outcome.status[name], outcome.reasons[name] = "stale", ["forced (-B)"]
                continue
            if self.check_current(name, key):
                outcome.status[name] = "up to date"
                trees[name] = state["tree"]
                continue
            entry = self.store.get_action(key)
            if (entry is None or not self.store.action_complete(entry)) and self.remote is not None:
                entry = self._remote_entry(key)
            if entry is not None and (entry.get("remote") or self.store.action_complete(entry)):
                outcome.status[name] = "cached"
                if entry.get("remote"):
                    outcome.reasons[name] = ["in the remote cache"]
                elif state and state.get("key") == key:
                    outcome.reasons[name] = ["outputs in targets/ were deleted or edited"]
                else:
                    outcome.reasons[name] = keys.explain(state and state.get("components"), parts)
                trees[name] = entry["tree"]
                continue
            if state is None:
                outcome.status[name], outcome.reasons[name] = "never built", []
            else:
                outcome.status[name] = "stale"
                outcome.reasons[name] = keys.explain(state.get("components"), parts) or ["cache entry missing"]
            failure = self.store.get_failure(name)
            if failure and failure.get("key") == key:
                outcome.reasons[name].insert(0, f"failed {_ago(failure.get('finished'))} with these inputs: "
                                                f"{failure.get('detail')} (tunemake log {name} --last)")
        return outcome

    def _remote_entry(self, key: str) -> dict | None:
        from tunemake.remote import RemoteError

        if self.remote.broken:
            return None
        try:
            entry = self.remote.get_action(key)
        except RemoteError as exc:
            self._warn_once(str(exc))
            return None
        return entry and {**entry, "remote": True}

    # -- building ---------------------------------------------------------------
    def build(self, roots: list[str], options: Options, reporter) -> Outcome:
        started = time.monotonic()
        order = closure(self.project, roots)
        if options.dry_run:
            outcome = self.assess(roots, options.force)
            outcome.seconds = time.monotonic() - started
            return outcome

        gc_lock = FileLock(self.store.lock_path("gc"))
        if not gc_lock.try_acquire(shared=True):
            reporter.message("waiting for `tunemake cache gc` to finish ...")
            gc_lock.acquire(shared=True)
        try:
            self._clean_stale_tmp()
            outcome = _Scheduler(self, order, options, reporter).run()
        finally:
            gc_lock.release()
        outcome.seconds = time.monotonic() - started
        return outcome

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
        owners = {f.name.removeprefix("owner-") for f in (self.store.root / "locks").glob("owner-*")}
        for token in (set(folders) | owners) - {me}:
            if self.store.owner_gone(token):
                for entry in folders.get(token, ()):
                    rmtree(entry)


class _Scheduler:
    """One build's main loop: single-threaded, polling child processes."""

    def __init__(self, engine: Engine, order: list[str], options: Options, reporter):
        self.engine = engine
        self.project = engine.project
        self.order = order
        self.options = options
        self.reporter = reporter
        self.outcome = Outcome()
        self.trees: dict[str, str] = {}
        self.state: dict[str, str] = {n: "pending" for n in order}
        self.ready: list[tuple[str, str, dict]] = []  # (name, key, components) needing a run
        self.running: dict[str, tuple[run.RunningStep, str, dict, FileLock]] = {}
        self.announced_wait: set[str] = set()
        slots = engine.executor.gpu_slots()
        self.gpus_managed = slots is not None  # else the executor (Ray) places GPU steps itself
        self.all_gpus = slots or []
        self.free_gpus = list(self.all_gpus)
        self.stop_scheduling = False
        selected = set(order)
        self.dependents = {n: [d for d in ds if d in selected] for n, ds in dependents(self.project).items()}
        self.unfinished = {n: len(self.project.targets[n].target_deps) for n in order}
        self.decidable = deque(n for n in order if self.unfinished[n] == 0)

    def run(self) -> Outcome:
        self.engine.warn = self.reporter.message
        self.engine.on_transfer = self.reporter.progress
        self.reporter.start(self.order)
        try:
            while True:
                self._decide_ready_targets()
                self._start_steps()
                finished = self._poll_steps()
                if not self.running and not self.ready and (self.stop_scheduling or not self.decidable):
                    break
                if (self.running or self.ready) and not finished:  # a finished step may free a slot
                    self.reporter.tick()
                    self._wait()
        except BaseException:
            for step, _key, _parts, lock in self.running.values():
                step.kill()
                rmtree(step.tmp)
                lock.release()
            raise
        finally:
            self.reporter.stop()
        for name, st in self.state.items():
            if st == "pending":
                self._set(name, "skipped", "a dependency failed")
        return self.outcome

    def _wait(self) -> None:
        """Until a step exits (a pidfd turns readable) or it is time to look at progress again."""
        fds = [step.fileno() for step, *_ in self.running.values()]
        slots_full = len(self.running) >= self.options.jobs  # then ready steps wait for an exit too
        if fds and None not in fds and (slots_full or not self.ready):
            poller = select.poll()  # not select(): descriptors above 1023 are fine
            for fd in fds:
                poller.register(fd, select.POLLIN)
            poller.poll(PROGRESS_SECONDS * 1000)
        else:  # steps without a pidfd (Ray, older kernels), or steps waiting for a lock
            time.sleep(POLL_SECONDS)

    def _set(self, name: str, status: str, detail: str = "") -> None:
        self.state[name] = status
        if status not in ("running", "waiting"):
            self.outcome.status[name] = status
        self.reporter.update(name, status, detail)

    def _succeeded(self, name: str, tree: str, status: str, detail: str = "") -> None:
        """A target's output is known: its dependents may now be decided."""
        self.trees[name] = tree
        if status != "up to date":
            self.engine.store.clear_failure(name)
        self._set(name, status, detail)
        for dependent in self.dependents.get(name, ()):
            if dependent in self.unfinished:
                self.unfinished[dependent] -= 1
                if self.unfinished[dependent] == 0:
                    self.decidable.append(dependent)

    def _decide_ready_targets(self) -> None:
        while self.decidable and not self.stop_scheduling:
            name = self.decidable.popleft()
            parts = self.engine.components(name, self.trees)
            key = keys.key_of(parts)
            forced = self.options.no_cache or name in self.options.force
            if not forced and self._reuse(name, key, parts):
                continue
            if self.options.pull_only:
                self._set(name, "skipped", "in no cache")
                continue
            self.state[name] = "queued"
            self.ready.append((name, key, parts))
            last = self.engine.store.get_state(name)
            self.outcome.reasons[name] = (["forced"] if forced else
                                          keys.explain(last and last.get("components"), parts))

    def _reuse(self, name: str, key: str, parts: dict) -> bool:
        state = self.engine.check_current(name, key)
        if state:
            self._succeeded(name, state["tree"], "up to date")
            return True
        entry = self.engine.store.get_action(key)
        where = ""
        if entry is None or not self.engine.store.action_complete(entry):
            entry, where = self.engine.pull(name, key), " (from the remote cache)"
        if entry is not None and self.engine.restore(name, key, parts, entry):
            self._succeeded(name, entry["tree"], "cached", f"built {_ago(entry.get('finished'))}{where}")
            return True
        return False

    def _start_steps(self) -> None:
        still_ready = []
        for name, key, parts in self.ready:
            if self.stop_scheduling:
                self._set(name, "skipped", "stopped after a failure")
                continue
            need = self.project.targets[name].gpus if self.gpus_managed else 0
            if need > len(self.all_gpus):
                self._fail(name, f"needs {need} GPU(s) but {len(self.all_gpus)} visible "
                                 "(set CUDA_VISIBLE_DEVICES, or run it on a GPU machine)")
                continue
            if len(self.running) >= self.options.jobs or need > len(self.free_gpus):
                still_ready.append((name, key, parts))
                continue
            lock = FileLock(self.engine.store.lock_path(f"key-{key}"))
            if not lock.try_acquire():
                if name not in self.announced_wait:
                    self.announced_wait.add(name)
                    self._set(name, "waiting", f"waiting for another tunemake (pid {lock.holder()}) building it")
                still_ready.append((name, key, parts))
                continue
            # Another build may have finished it while we waited for the lock.
            if not (self.options.no_cache or name in self.options.force):
                if self._reuse(name, key, parts):
                    lock.release()
                    continue
            gpus, self.free_gpus = self.free_gpus[:need], self.free_gpus[need:]
            tmp = self.engine.store.new_tmp_dir(name.replace("/", "_"))
            try:
                step = self.engine.executor.start(self.engine, name, tmp, gpus)
            except Exception as exc:  # e.g. no Ray node can satisfy the step's resources
                lock.release()
                rmtree(tmp)
                self.free_gpus.extend(gpus)
                self._fail(name, str(exc))
                continue
            self.running[name] = (step, key, parts, lock)
            self._set(name, "running", "; ".join(self.outcome.reasons.get(name, []))[:120])
        self.ready = still_ready

    def _poll_steps(self) -> int:
        """Collect the steps that exited; how many did."""
        finished = 0
        for name in list(self.running):
            step, key, parts, lock = self.running[name]
            p = step.read_progress()
            if p:
                self.reporter.progress(name, p)
            code = step.poll()
            if code is None:
                continue
            del self.running[name]
            finished += 1
            step.kill()  # background children of the step must not outlive it (or write into its outputs)
            self.free_gpus.extend(step.gpus)
            log_copy = self.engine.store.log_path(name)
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                replaced = self._deps_replaced(name) if isinstance(step, run.RunningStep) else []
                if code == 0 and replaced:
                    # another tunemake (other --set values) swapped an input while the step read
                    # it: the outputs may mix both, so they must not be cached under this key
                    os.replace(step.log, log_copy)
                    self._fail(name, f"targets/{replaced[0]} was replaced by another tunemake build "
                                     "while this step ran; its outputs were discarded: build again", key=key)
                elif code == 0:
                    try:
                        entry = step.finish(self.engine, key, parts)
                    except Exception as exc:  # e.g. outputs lost on the way back from a remote worker
                        self._fail(name, f"could not collect outputs: {exc}", key=key)
                        continue
                    self.engine.restore(name, key, parts, entry)
                    self.engine.publish(key, entry)
                    os.replace(step.log, log_copy)
                    self._succeeded(name, entry["tree"], "done", f"{entry['duration']:.1f}s")
                else:
                    os.replace(step.log, log_copy)
                    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                    self._fail(name, f"{how}, log: {_rel(log_copy)}", log_copy, key=key)
            finally:
                lock.release()
                rmtree(step.tmp)
        return finished

    def _deps_replaced(self, name: str) -> list[str]:
        """Dependencies whose targets/ folder no longer holds the output this step was keyed on."""
        replaced = []
        for dep in self.project.targets[name].target_deps:
            state = self.engine.store.get_state(dep)
            if state is None or state["tree"] != self.trees.get(dep):
                replaced.append(dep)
        return replaced

    def _fail(self, name: str, detail: str, log: Path | None = None, key: str | None = None) -> None:
        self._set(name, "failed", detail)
        if key is not None:  # so `status` can say the same inputs failed last time
            try:
                self.engine.store.put_failure(name, {"key": key, "detail": detail.split(", log: ")[0],
                                                     "finished": time.time()})
            except OSError:  # a convenience: never a reason to stop the build
                pass
        if log is not None:
            self.outcome.failed_logs[name] = log
            tail = run.log_tail(log)
            if tail:
                self.reporter.message("\n".join(f"    │ {line}" for line in tail.splitlines()))
        if not self.options.keep_going:
            self.stop_scheduling = True
        self._skip_dependents(name)

    def _skip_dependents(self, name: str) -> None:
        stack = list(self.dependents.get(name, []))
        while stack:
            dep = stack.pop()
            if self.state.get(dep) in ("pending", "queued"):
                self.ready = [r for r in self.ready if r[0] != dep]
                self._set(dep, "skipped", f"needs {name}")
                stack.extend(self.dependents.get(dep, []))


def _ago(ts: float | None) -> str:
    if not ts:
        return "earlier"
    secs = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
