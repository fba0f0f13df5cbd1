"""The child side of a step: `python -m tunemake.step SPEC.json`.

The parent (tunemake.run) writes a spec, starts this module in a fresh process
group and reads its log and progress files. Here we make sure we die with the
parent (even on kill -9 of tunemake), take our own children with us, and call
the kind's `run` with validated params.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


@dataclass
class StepContext:
    """What a kind's `run(params, ctx)` gets besides its params."""

    target: str
    out: Path  # fresh, empty folder: everything written here is the target's output
    project_dir: Path  # the tunefile's folder; also the working directory
    deps: dict[str, Path] = field(default_factory=dict)  # dependency target -> its output folder
    progress_file: Path | None = None
    cuda_devices: str | None = None  # what CUDA_VISIBLE_DEVICES was set to, if the step holds GPUs
    # the local cache's .tunecache/requests (tunemake.request_cache); None where there is none (a Ray worker)
    request_cache: Path | None = None

    def progress(self, done: int | None = None, total: int | None = None, message: str = "") -> None:
        """Report progress to the parent's live view, e.g. progress(12, 30, "layer")."""
        if self.progress_file is None:
            return
        line = json.dumps({"done": done, "total": total, "message": message})
        with open(self.progress_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def die_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the tunemake process that started us dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate_group(signum, frame):  # noqa: ARG001 - signal handler signature
    # We lead our own process group: take every child and grandchild down with us.
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(128 + signum)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    signal.signal(signal.SIGTERM, _terminate_group)
    signal.signal(signal.SIGINT, _terminate_group)
    die_with_parent()
    if os.getppid() != spec["parent_pid"]:  # the parent died before prctl took effect
        _terminate_group(signal.SIGTERM, None)

    module = importlib.import_module(spec["module"])
    params = module.Params.model_validate(spec["params"])
    ctx = StepContext(
        target=spec["target"],
        out=Path(spec["out"]),
        project_dir=Path(spec["project_dir"]),
        deps={k: Path(v) for k, v in spec["deps"].items()},
        progress_file=Path(spec["progress_file"]) if spec.get("progress_file") else None,
        cuda_devices=os.environ.get("CUDA_VISIBLE_DEVICES") if spec.get("gpus") else None,
        request_cache=Path(spec["request_cache"]) if spec.get("request_cache") else None,
    )
    started = time.time()
    print(f"[tunemake] {spec['target']}: {spec['module']} started", flush=True)
    try:
        module.run(params, ctx)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - traceback to the log, one line to the console
        traceback.print_exc()
        _write_error(spec.get("error_file"), one_line(exc))
        return 1
    print(f"[tunemake] {spec['target']}: done in {time.time() - started:.2f}s", flush=True)
    return 0


def one_line(exc: BaseException) -> str:
    """What the console shows of a step's exception: its message on one line (the type only when
    it says something the message does not: a user error raised as ValueError reads plainly)."""
    text = " ".join(str(exc).split()) if str(exc).strip() else ""
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = text.strip("'")
    if type(exc) in (ValueError, RuntimeError, SystemExit) and text:
        return text[:500]
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _write_error(path: str | None, text: str) -> None:
    if not path:
        return
    try:
        Path(path).write_text(text + "\n", encoding="utf-8")
    except OSError:
        pass  # the log still has the traceback


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
