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
from dataclasses import asdict
from pathlib import Path

from tunemake.errors import UserError
from tunemake.executor import StepSpec

PROGRESS_SECONDS = 0.2  # how often a worker forwards the step's newest progress line


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'tunemake[ray]'") from None
    return ray


class RayExecutor:
    """Submits steps to a Ray cluster: RAY_ADDRESS if set, else a local one."""

    def __init__(self, remote, store, upload_sources):
        if remote is None:
            raise UserError("--executor ray needs a remote cache to exchange inputs and outputs "
                            "(--remote URL, TUNEMAKE_REMOTE or [cache] remote)")
        if remote.read_only:
            raise UserError("--executor ray: workers publish outputs, so the remote cache cannot be read-only")
        self.remote = remote
        self.store = store
        self.upload_sources = upload_sources  # source paths -> their manifests, blobs uploaded
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

    def start(self, spec: StepSpec, tmp: Path, gpus: list[str]):
        available = self.ray.cluster_resources().get("GPU", 0)
        if spec.gpus > available:
            raise StepRejected(f"needs {spec.gpus} GPU(s) but the Ray cluster has {int(available)}")
        sources = self.upload_sources(spec.sources)
        # dependencies built or restored before the remote was in use must reach the workers too
        self.remote.push(self.store, [e["digest"] for m in spec.deps.values() for e in m.values()])
        options = {"num_cpus": 1, "num_gpus": spec.gpus}
        if spec.gpus:
            options["max_calls"] = 1  # a fresh worker process per GPU task: memory is returned
        # a streaming generator: the worker yields progress while the step runs, then the result
        stream = self._task.options(num_returns="streaming", **options).remote(
            asdict(spec), sources, self.remote.url, self.remote.options)
        return RayStep(spec.target, stream, tmp, self.ray, self.remote)


class StepRejected(Exception):
    """No node can run this step (e.g. it needs a GPU the cluster does not have)."""


class RayStep:
    def __init__(self, target: str, stream, tmp: Path, ray, remote):
        self.target = target
        self.remote = remote
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

    def error_line(self) -> str:
        return (self.result or {}).get("detail") or ""

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

    def collect(self, store) -> dict:
        """The worker uploaded the blobs: verify them into the local store; the manifest."""
        from tunemake.records import check_outputs

        manifest = self.result["outputs"]
        check_outputs(manifest)  # what a worker sent is checked like any remote entry
        corrupt = self.remote.fetch(store, [e["digest"] for e in manifest.values()])
        if corrupt:
            raise RuntimeError(f"outputs of {self.target} failed verification after upload: {corrupt[0][:16]}")
        return manifest


def _run_on_worker(spec: dict, sources: dict, remote_url: str, remote_options: dict):
    """Runs on a Ray worker: rebuild a private project from the cache, run the step, upload outputs.

    A generator: yields {"progress": ...} while the step runs, then the result
    ({"code", "log"} and, on success, "outputs")."""
    import shutil
    import tempfile

    from tunemake import run
    from tunemake.executor import InputViews, StepSpec, resolve_params
    from tunemake.remote import Remote
    from tunemake.store import Store, output_manifest

    spec = StepSpec(**spec)
    remote = Remote(remote_url, options=remote_options)
    work = Path(tempfile.mkdtemp(prefix="tunemake-worker-"))
    store, step = Store(work / "cache", link="hardlink"), None
    try:
        project = work / "project"
        project.mkdir()  # the step's working directory, even when it has no inputs
        wanted = [e["digest"] for m in list(sources.values()) + list(spec.deps.values()) for e in m.values()]
        corrupt = remote.fetch(store, wanted)
        if corrupt:
            yield {"code": 1, "log": f"input blob {corrupt[0][:16]} failed verification\n".encode()}
            return
        placed = {}
        for rel, manifest in sources.items():
            # a source outside the driver's project (an absolute path) gets a place inside ours
            dest = project / rel if not Path(rel).is_absolute() else project / "_outside" / rel.lstrip("/")
            placed[rel] = dest
            if list(manifest) == [""]:  # a single file
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(store.blob_path(manifest[""]["digest"]), dest)
            else:
                store.materialize(manifest, dest)
        tmp = work / "step"
        tmp.mkdir()
        dep_dirs, _ = InputViews(store, lambda: work / "inputs").link(spec.deps)
        params = resolve_params(spec, project, dep_dirs, placed)
        gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]  # set by Ray
        step = run.start(spec.target, spec.module, params, project, dep_dirs, tmp, gpus)
        while step.poll() is None:
            progress = step.read_progress()
            if progress:
                yield {"progress": progress}
            time.sleep(PROGRESS_SECONDS)
        code = step.poll()
        step.kill()  # background children must not write into the outputs being collected
        log = step.log.read_bytes() if step.log.exists() else b""
        if code != 0:
            reason = step.error_line()
            yield {"code": code, "log": log, "detail": reason}
            return
        try:
            manifest, files = output_manifest(step.out, step.real_out)
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
        store.owners.release()  # the worker process lives on: its lock must not
        shutil.rmtree(work, ignore_errors=True)
