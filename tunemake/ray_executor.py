"""`--executor ray`: each step becomes a Ray task; inputs and outputs travel through the remote cache.

The driver keeps the graph and every cache decision. A worker gets a step's spec plus the
digests of its sources and dependency outputs, rebuilds a private project folder from the
remote cache (no shared filesystem is assumed), runs the step exactly as the local executor
does (`tunemake.run.start`: its own process group), uploads the outputs' blobs, and
returns the manifest. A SLURM backend (submitit) would implement the same `start` / handle
interface.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tunemake.errors import UserError

PROGRESS_SECONDS = 0.2  # how often a worker forwards the step's newest progress line


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'tunemake[ray]'") from None
    return ray


class RayExecutor:
    """Submits steps to a Ray cluster: RAY_ADDRESS if set, else a local one."""

    def __init__(self, remote):
        if remote is None:
            raise UserError("--executor ray needs a remote cache to exchange inputs and outputs "
                            "(--remote URL, TUNEMAKE_REMOTE or [cache] remote)")
        if remote.read_only:
            raise UserError("--executor ray: workers publish outputs, so the remote cache cannot be read-only")
        self.remote = remote
        self.ray = _import_ray()
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            os.environ.pop("RAY_ADDRESS", None)
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=address, log_to_driver=False, include_dashboard=False,
                              configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UserError(f"--executor ray: cannot reach or start a Ray cluster"
                                f"{f' at {address}' if address else ''}: {exc}") from None
        self._task = self.ray.remote(_run_on_worker)

    def gpu_slots(self) -> list[str] | None:
        return None  # Ray places GPU tasks itself

    def start(self, engine, name: str, tmp: Path, gpus: list[str]):
        target = engine.project.targets[name]
        available = self.ray.cluster_resources().get("GPU", 0)
        if target.gpus > available:
            raise StepRejected(f"needs {target.gpus} GPU(s) but the Ray cluster has {int(available)}")
        sources = engine.upload_sources(target)
        deps = {d: engine.store.get_state(d)["outputs"] for d in target.target_deps}
        # dependencies built or restored before the remote was in use must reach the workers too
        self.remote.push(engine.store, [e["digest"] for m in deps.values() for e in m.values()])
        options = {"num_cpus": 1, "num_gpus": target.gpus}
        if target.gpus:
            options["max_calls"] = 1  # a fresh worker process per GPU task: memory is returned
        spec = {"target": name, "module": target.module, "params": target.child_params,
                "project_dir": str(engine.project.dir)}
        # a streaming generator: the worker yields progress while the step runs, then the result
        stream = self._task.options(num_returns="streaming", **options).remote(
            spec, sources, deps, self.remote.url, self.remote.options)
        return RayStep(name, stream, tmp, self.ray)


class StepRejected(Exception):
    """No node can run this step (e.g. it needs a GPU the cluster does not have)."""


class RayStep:
    def __init__(self, target: str, stream, tmp: Path, ray):
        self.target = target
        self.stream = stream  # ray.ObjectRefGenerator of {"progress": ...} items, then the result
        self.tmp = tmp
        self.ray = ray
        self.gpus: list[str] = []
        self.started = time.time()
        self.log = tmp / "log"
        self.result: dict | None = None
        self._progress: dict | None = None

    def _drain(self) -> None:
        """Take whatever the worker has yielded so far, without blocking."""
        try:
            while self.result is None and self.stream.next_ready():
                item = self.ray.get(next(self.stream))
                if "progress" in item:
                    self._progress = item["progress"]
                else:
                    self.result = item
            if self.result is None and self.stream.is_finished():
                self.result = {"code": 1, "log": b"Ray task ended without a result\n"}
        except Exception as exc:  # the worker died, or the task raised inside Ray
            self.result = {"code": 1, "log": f"Ray task failed: {exc}\n".encode()}
        if self.result is not None and not self.log.exists():
            self.log.write_bytes(self.result["log"])

    def fileno(self) -> None:
        return None  # no local process to wake the scheduler: it polls

    def read_progress(self) -> dict | None:
        self._drain()
        progress, self._progress = self._progress, None
        return progress

    def poll(self) -> int | None:
        self._drain()
        return None if self.result is None else self.result["code"]

    def kill(self) -> None:
        if self.result is None:
            self.ray.cancel(self.stream, force=True)

    def finish(self, engine, key: str, parts: dict) -> dict:
        """The worker uploaded the blobs: verify them into the local store and record the action."""
        manifest = self.result["outputs"]
        corrupt = engine.remote.fetch(engine.store, [e["digest"] for e in manifest.values()])
        if corrupt:
            raise RuntimeError(f"outputs of {self.target} failed verification after upload: {corrupt[0][:16]}")
        return engine.record(self.target, key, parts, manifest, self.log.read_bytes(), self.started)


def _run_on_worker(spec: dict, sources: dict, deps: dict, remote_url: str, remote_options: dict):
    """Runs on a Ray worker: rebuild a private project from the cache, run the step, upload outputs.

    A generator: yields {"progress": ...} while the step runs, then the result
    ({"code", "log"} and, on success, "outputs")."""
    import shutil
    import tempfile

    from tunemake import run
    from tunemake.remote import Remote
    from tunemake.store import Store, output_manifest

    remote = Remote(remote_url, options=remote_options)
    work = Path(tempfile.mkdtemp(prefix="tunemake-worker-"))
    store, step = Store(work / "cache", link="hardlink"), None
    try:
        project = work / "project"
        project.mkdir()  # the step's working directory, even when it has no inputs
        wanted = [e["digest"] for m in list(sources.values()) + list(deps.values()) for e in m.values()]
        corrupt = remote.fetch(store, wanted)
        if corrupt:
            yield {"code": 1, "log": f"input blob {corrupt[0][:16]} failed verification\n".encode()}
            return
        for rel, manifest in sources.items():
            if list(manifest) == [""]:  # a single file
                dest = project / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(store.blob_path(manifest[""]["digest"]), dest)
            else:
                store.materialize(manifest, project / rel)
        for name, manifest in deps.items():
            (project / "targets").mkdir(parents=True, exist_ok=True)
            store.materialize(manifest, project / "targets" / name)
        params = _rebase(spec["params"], spec["project_dir"], str(project))
        dep_dirs = {name: str(project / "targets" / name) for name in deps}
        tmp = work / "step"
        tmp.mkdir()
        gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]  # set by Ray
        step = run.start(spec["target"], spec["module"], params, project, dep_dirs, tmp, gpus)
        while step.poll() is None:
            progress = step.read_progress()
            if progress:
                yield {"progress": progress}
            time.sleep(PROGRESS_SECONDS)
        code = step.poll()
        step.kill()  # background children must not write into the outputs being collected
        log = step.log.read_bytes()
        if code != 0:
            yield {"code": code, "log": log}
            return
        try:
            manifest, files = output_manifest(step.out)
        except (RuntimeError, OSError) as exc:
            yield {"code": 1, "log": log + f"could not collect outputs: {exc}\n".encode()}
            return
        for full, rel in files:
            store.ingest(full, manifest[rel]["digest"], manifest[rel]["x"])
        remote.push(store, [e["digest"] for e in manifest.values()])
        yield {"code": 0, "log": log, "outputs": manifest}
    finally:
        if step is not None:
            step.kill()  # a failed step's background children must not outlive it on the worker
        store.release_owner()  # the worker process lives on: its lock must not
        shutil.rmtree(work, ignore_errors=True)


def _rebase(value, old: str, new: str):
    """Params carry absolute paths under the driver's project folder: point them at ours."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    return value
