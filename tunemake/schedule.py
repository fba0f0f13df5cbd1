"""One build's main loop: decide targets as their dependencies finish, run the stale ones in
slots, collect results. Single-threaded; it waits on the steps' pidfds.

It sees steps only through the executor (`StepSpec` in, a step to poll out) and every cache
question through `decide`, the same function `status` and `build -n` use.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from pathlib import Path

from tunemake import keys, run
from tunemake.decide import State, ago, decide
from tunemake.fsutil import FileLock, rel_path, rmtree
from tunemake.graph import dependents

POLL_SECONDS = 0.02
PROGRESS_SECONDS = 0.1  # live progress refresh while every step can wake us by exiting


class Scheduler:
    def __init__(self, engine, order: list[str], options, reporter):
        from tunemake.build import Outcome

        self.engine = engine
        self.project = engine.project
        self.order = order
        self.options = options
        self.reporter = reporter
        self.outcome = Outcome()
        self.trees: dict[str, str] = {}
        self.manifests: dict[str, dict] = {}  # finished targets' outputs: what their dependents read
        self.state: dict[str, State] = {n: State.PENDING for n in order}
        # (name, key, components, its input files as the key saw them) needing a run
        self.ready: list[tuple[str, str, dict, dict]] = []
        self.running: dict[str, tuple] = {}  # name -> (step, key, components, key lock, InputWatch)
        self.announced_wait: set[str] = set()
        slots = engine.executor.gpu_slots()
        self.gpus_managed = slots is not None  # else the executor (Ray) places GPU steps itself
        self.all_gpus = slots or []
        self.free_gpus = list(self.all_gpus)
        self.stop_scheduling = False
        self._checked_writable = False
        selected = set(order)
        self.dependents = {n: [d for d in ds if d in selected] for n, ds in dependents(self.project).items()}
        self.unfinished = {n: len(self.project.targets[n].target_deps) for n in order}
        self.decidable = deque(n for n in order if self.unfinished[n] == 0)

    def run(self):
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
            for step, _key, _parts, lock, _watch in self.running.values():
                step.kill()
                rmtree(step.tmp)
                lock.release()
            raise
        finally:
            self.reporter.stop()
        for name, st in self.state.items():
            if st == State.PENDING:
                self._set(name, State.SKIPPED, "a dependency failed")
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

    def _set(self, name: str, status: State, detail: str = "") -> None:
        self.state[name] = status
        if status not in (State.RUNNING, State.WAITING):
            self.outcome.status[name] = status
        self.reporter.update(name, status, detail)

    def _succeeded(self, name: str, entry_or_state: dict, status: State, detail: str = "") -> None:
        """A target's output is known: its dependents may now be decided."""
        self.trees[name] = entry_or_state["tree"]
        self.manifests[name] = entry_or_state["outputs"]
        if status != State.UP_TO_DATE:
            try:
                self.engine.store.clear_failure(name)
            except OSError:
                pass  # a read-only cache keeps a stale failure note: only `status` reads it
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
            if self._reuse(name, key, parts, self.options.forced(name)):
                continue
            if self.options.pull_only:
                self._set(name, State.SKIPPED, "in no cache")
                continue
            self.state[name] = State.QUEUED
            self.ready.append((name, key, parts, self._as_hashed(name)))

    def _reuse(self, name: str, key: str, parts: dict, forced: bool) -> bool:
        """Up to date, or restored from a cache: True. Else the step must run (reasons recorded)."""
        decision = decide(self.engine, name, key, parts, forced)
        if decision.state == State.UP_TO_DATE:
            self._succeeded(name, decision.last, State.UP_TO_DATE)
            return True
        if decision.state == State.CACHED:
            self._writable(f"restoring {name}")
            entry = decision.entry
            if decision.remote:  # downloaded and materialized, or None
                entry = self._restorable_remote(name, key, parts, entry)
            elif not self.engine.restore(name, key, parts, entry):
                entry = None
            if entry is not None:
                if decision.remote:  # into the local action cache only now that it is materialized
                    self.engine.store.put_action(key, entry)
                where = " (from the remote cache)" if decision.remote else ""
                self._succeeded(name, entry, State.CACHED, f"built {ago(entry.get('finished'))}{where}")
                return True
            decision.reasons = keys.explain(decision.last and decision.last.get("components"), parts)
        self.outcome.reasons[name] = decision.reasons
        return False

    def _restorable_remote(self, name: str, key: str, parts: dict, entry: dict) -> dict | None:
        """A remote entry with its blobs downloaded and its outputs materialized, or None (rebuild)."""
        entry = self.engine.pull(name, key, entry)
        if entry is None:
            return None
        try:
            if self.engine.restore(name, key, parts, entry):
                return entry
        except (OSError, ValueError) as exc:  # e.g. a name this filesystem refuses
            self.engine.warn(f"warning: remote cache entry for {name} cannot be restored here "
                             f"({_one_line(exc)}); building {name}")
        return None

    def _writable(self, why: str) -> None:
        """Before the first write of this build: a read-only cache is one clear line, not a traceback."""
        if not self._checked_writable:
            self.engine.require_writable(why)
            self._checked_writable = True

    def _start_steps(self) -> None:
        still_ready = []
        for item in self.ready:
            name, key, parts, _hashed = item
            if self.stop_scheduling:
                self._set(name, State.SKIPPED, "stopped after a failure")
                continue
            need = self.project.targets[name].gpus if self.gpus_managed else 0
            if need > len(self.all_gpus):
                self._fail(name, f"needs {need} GPU(s) but {len(self.all_gpus)} visible "
                                 "(set CUDA_VISIBLE_DEVICES, or run it on a GPU machine)")
                continue
            if len(self.running) >= self.options.jobs or need > len(self.free_gpus):
                still_ready.append(item)
                continue
            self._writable(f"building {name}")
            lock = FileLock(self.engine.store.lock_path(f"key-{key}"))
            if not lock.try_acquire():
                if name not in self.announced_wait:
                    self.announced_wait.add(name)
                    twin = next((n for n, run in self.running.items() if run[1] == key), None)
                    self._set(name, State.WAITING, f"waiting for {twin}, which has the same inputs" if twin else
                              f"waiting for another tunemake (pid {lock.holder()}) building it")
                still_ready.append(item)
                continue
            # Another build may have finished it while we waited for the lock.
            if not self.options.forced(name) and self._reuse(name, key, parts, False):
                lock.release()
                continue
            self._start(name, key, parts, lock, item[3])
        self.ready = still_ready

    def _start(self, name: str, key: str, parts: dict, lock: FileLock, hashed: dict) -> None:
        from tunemake.executor import InputWatch, StepSpec  # not on the no-op path

        target = self.project.targets[name]
        need = target.gpus if self.gpus_managed else 0
        gpus, self.free_gpus = self.free_gpus[:need], self.free_gpus[need:]
        spec = StepSpec(target=name, module=target.module, params=target.key_params,
                        input_refs=target.input_refs,
                        deps={d: self.manifests[d] for d in target.target_deps},
                        sources=list(target.sources), gpus=target.gpus)
        tmp = None
        try:
            for dep in target.target_deps:
                self._ensure_blobs(dep)
            tmp = self.engine.store.new_tmp_dir(name)
            step = self.engine.executor.start(spec, tmp, gpus)
        except Exception as exc:  # noqa: BLE001 - e.g. no Ray node fits, a dependency's blob is gone
            lock.release()
            if tmp is not None:
                rmtree(tmp)
            self.free_gpus.extend(gpus)
            self._fail(name, _one_line(exc), key=key)
            return
        watch = InputWatch(views=getattr(step, "views", {}), files=hashed)
        self.running[name] = (step, key, parts, lock, watch)
        self._set(name, State.RUNNING, "; ".join(self.outcome.reasons.get(name, []))[:120])

    def _as_hashed(self, name: str) -> dict:
        """The target's sources and code files as its key hashed them: label -> (path, files)."""
        target, hasher = self.project.targets[name], self.engine.hasher
        files = {}
        for source in target.sources:
            path = keys.source_path(self.project, source)
            files[source] = (path, hasher.as_hashed(path))
        for code in target.code_files:
            path = self.project.dir / code
            files[keys.code_label(path, self.project.dir)] = (path, hasher.as_hashed(path))
        return files

    def _ensure_blobs(self, dep: str) -> None:
        """A dependency's blobs, which its dependents read, may have been evicted by `cache gc` while
        targets/DEP stayed intact: take them back from there, each re-hashed."""
        store = self.engine.store
        for rel, entry in self.manifests[dep].items():
            if not store.has_blob(entry["digest"]):
                if not store.adopt(self.project.output_dir(dep) / rel, entry["digest"], entry.get("x", False)):
                    store.state_path(dep).unlink(missing_ok=True)  # the next build restores or redoes it
                    raise RuntimeError(f"targets/{dep}/{rel} no longer matches its cache entry; build again")

    def _poll_steps(self) -> int:
        """Collect the steps that exited; how many did."""
        finished = 0
        for name in list(self.running):
            step, key, parts, lock, watch = self.running[name]
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
            try:
                self._collect(name, step, code, key, parts, watch)
            finally:
                lock.release()
                rmtree(step.tmp)
        return finished

    def _collect(self, name: str, step, code: int, key: str, parts: dict, watch) -> None:
        from tunemake.executor import input_changes

        store = self.engine.store
        log_copy = store.log_path(name)
        log = _read_log(step.log)
        try:
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            os.replace(step.log, log_copy)
        except OSError:
            pass  # the console still gets the reason
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            reason = step.error_line()
            if reason:  # a Python step's own one-line reason; its traceback stays in the log
                self._fail(name, f"{reason} ({how}; log: {rel_path(log_copy)})", key=key, record=f"{reason} ({how})")
                self.outcome.failed_logs[name] = log_copy
            else:
                self._fail(name, f"{how}, log: {rel_path(log_copy)}", log_copy, key=key)
            return
        if not step.tmp.is_dir():
            self._fail(name, "the step removed its own working folder (did it delete the cache folder?); "
                             "its outputs are gone", key=key)
            return
        skip = keys.source_skip(self.project)
        moved = input_changes(watch, lambda path, hashed: self.engine.hasher.changed_since(path, hashed, skip))
        if moved:
            # the step may have read the inputs half old, half new: its outputs belong to no key
            for dep_name, (_folder, (files, _folders), _manifest) in watch.views.items():
                if f"dependency {dep_name}" in moved:
                    for rel in files:
                        store.verify_blob(self.manifests[dep_name][rel]["digest"])  # drops a damaged blob
            self._fail(name, f"{moved[0]} changed while the step ran; its outputs were discarded: build again",
                       key=key)
            return
        try:
            manifest = step.collect(store)
            entry = self.engine.record(name, key, parts, manifest, log, step.started)
            if not self.engine.restore(name, key, parts, entry, fresh=True):
                raise RuntimeError("an output changed after the step exited (a background process "
                                   "of the step still writing?)")
        except (OSError, RuntimeError, ValueError) as exc:
            self._fail(name, f"could not collect outputs: {_one_line(exc)}", key=key)
            return
        self.engine.publish(key, entry)
        self._succeeded(name, entry, State.DONE, f"{entry['duration']:.1f}s")

    def _fail(self, name: str, detail: str, log: Path | None = None, key: str | None = None,
              record: str | None = None) -> None:
        """`record`: what `status` will say of it (default: the detail without the log's path)."""
        self._set(name, State.FAILED, detail)
        if key is not None:  # so `status` can say the same inputs failed last time
            try:
                self.engine.store.put_failure(name, {"key": key, "detail": record or detail.split(", log: ")[0],
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
            if self.state.get(dep) in (State.PENDING, State.QUEUED):
                self.ready = [r for r in self.ready if r[0] != dep]
                self._set(dep, State.SKIPPED, f"needs {name}")
                stack.extend(self.dependents.get(dep, []))


def _read_log(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the step removed its own folder (e.g. deleted the cache)
        return b"(the step's log is gone: the step removed its working folder)\n"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

