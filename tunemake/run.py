"""Runs one step in its own process group (local executor).

The child is `python -m tunemake.step spec.json`; it dies with us (PR_SET_PDEATHSIG)
and takes its own children along, so killing tunemake never leaves work running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tunemake

PACKAGE_ROOT = str(Path(tunemake.__file__).resolve().parent.parent)


@dataclass
class RunningStep:
    target: str
    proc: subprocess.Popen
    tmp: Path
    out: Path
    log: Path
    progress_file: Path
    gpus: list[str]
    started: float = field(default_factory=time.time)
    _offset: int = 0
    last_progress: dict | None = None

    def poll(self) -> int | None:
        return self.proc.poll()

    def read_progress(self) -> dict | None:
        """The newest complete progress line the step appended since we last looked."""
        try:
            with open(self.progress_file, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return None
        end = chunk.rfind(b"\n")
        if end < 0:
            return None
        self._offset += end + 1
        for line in reversed(chunk[:end].splitlines()):
            try:
                self.last_progress = _parse_progress(line.decode("utf-8", "replace"))
                return self.last_progress
            except ValueError:
                continue
        return None

    def kill(self) -> None:
        """SIGKILL the step's whole process group (the step itself may already have exited)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def finish(self, engine, key: str, parts: dict) -> dict:
        return engine.finish(self, key, parts)


class LocalExecutor:
    """Runs steps as child processes of this tunemake, GPU slots from the visible devices."""

    def gpu_slots(self) -> list[str] | None:
        from tunemake.keys import visible_gpus

        return visible_gpus()

    def start(self, engine, name: str, tmp: Path, gpus: list[str]) -> RunningStep:
        project = engine.project
        target = project.targets[name]
        deps = {d: str(project.output_dir(d)) for d in target.target_deps}
        return start(name, target.module, target.child_params, project.dir, deps, tmp, gpus)


def _parse_progress(line: str) -> dict:
    """JSON ({"done": 3, "total": 10, "message": "..."}) or plain text ("3/10 epoch")."""
    line = line.strip()
    if not line:
        raise ValueError("empty")
    if line.startswith("{"):
        data = json.loads(line)
        return {"done": data.get("done"), "total": data.get("total"), "message": str(data.get("message", ""))}
    head, _, rest = line.partition(" ")
    done, slash, total = head.partition("/")
    if slash and done.isdigit() and total.isdigit():
        return {"done": int(done), "total": int(total), "message": rest}
    return {"done": None, "total": None, "message": line}


def start(target: str, module: str, params: dict, project_dir: Path, deps: dict[str, str],
          tmp: Path, gpus: list[str]) -> RunningStep:
    out = tmp / "out"
    out.mkdir()
    progress_file = tmp / "progress"
    log = tmp / "log"
    spec = {
        "target": target,
        "module": module,
        "params": params,
        "project_dir": str(project_dir),
        "out": str(out),
        "deps": deps,
        "progress_file": str(progress_file),
        "parent_pid": os.getpid(),
        "gpus": gpus,
    }
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["TUNEMAKE_PROGRESS"] = str(progress_file)
    env["TUNEMAKE_OUT"] = str(out)
    # A step that holds no GPU slot sees no GPU: nothing oversubscribes a device.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunemake.step", str(spec_path)],
            cwd=project_dir, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can kill the whole tree
        )
    return RunningStep(target, proc, tmp, out, log, progress_file, gpus)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        data = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
