"""Runs one step in its own process group (local executor).

The child is `python -m tunemake.step spec.json`, which dies with us (PR_SET_PDEATHSIG)
and takes its own children along. A kind that is just a command line (the command kind)
skips the interpreter: its argv is exec'd by a small `sh` that first forks a watcher into
the step's process group. The watcher blocks reading our lifeline pipe; when tunemake dies,
even by kill -9, the pipe closes and the watcher kills the group. So killing tunemake never
leaves work running, and a trivial step costs a fork and two execs.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tunemake

# The guard's stdin is the lifeline: it moves it to fd 3 for the watcher (only EOF, our death,
# ends the `read`) and execs the command in the foreground with stdin from /dev/null, so the
# command keeps default signal handling and its real exit status. The watcher is forked twice,
# so it is no child of the command (a command waiting for all its children would wait forever),
# and is born ignoring catchable signals (ignored, unlike trapped, signals survive the fork), so
# a step's own `kill 0` cannot disarm it, however early it comes.
SIGNALS = "HUP INT QUIT TERM USR1 USR2 ALRM PIPE"
GUARD = (f'exec 3<&0 </dev/null; trap "" {SIGNALS}; ( (read _ <&3; kill -KILL 0) & ); '
         f'trap - {SIGNALS}; exec "$@" 3<&-')
_lifeline: tuple[int, int, int] | None = None  # (pid, read end, write end); never written to


def _lifeline_fd() -> int:
    global _lifeline
    if _lifeline is None or _lifeline[0] != os.getpid():  # a forked child needs its own
        read_end, write_end = os.pipe()  # both close-on-exec: no other child holds the write end
        _lifeline = (os.getpid(), read_end, write_end)
    return _lifeline[1]


PACKAGE_ROOT = str(Path(tunemake.__file__).resolve().parent.parent)
ERROR_FILE = "error"  # in the step's folder: a Python step's one-line reason for failing


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
    direct: bool = False  # a command line run as is, not a Python child
    check: Callable[[], None] | None = None  # run after exit 0; a ValueError fails the step
    _code: int | None = None
    pidfd: int | None = None  # readable once the step exits (Linux pidfd); None where unsupported
    real_out: str = ""  # the output folder's resolved path at the start: outputs are taken only from there
    views: dict = field(default_factory=dict)  # dependency -> (its view folder, (file stats, folder stats), manifest)

    def poll(self) -> int | None:
        if self._code is None and self.proc.poll() is not None:
            self._code = self._checked(self.proc.returncode)
        return self._code

    def wait(self) -> int:
        self.proc.wait()
        return self.poll()

    def fileno(self) -> int | None:
        """What the scheduler polls to wake up when the step exits."""
        return self.pidfd

    def _checked(self, code: int) -> int:
        if code != 0:
            if self.direct:  # say what a Python step would have said
                self._log_line(f"command killed by {signal.Signals(-code).name}" if code < 0 and
                               -code in signal.valid_signals() else f"command exited with status {code}")
            return code
        if self.check is not None:
            self.kill()  # background children must not write into the outputs being checked
            try:
                self.check()
            except (ValueError, OSError) as exc:
                self._log_line(f"checking the outputs: {exc}")
                return 1
        return 0

    def _log_line(self, text: str) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(text + "\n")

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
        while True:  # when we are the reaper (PID 1 in a container), orphans of the group are ours to reap
            try:
                os.waitid(os.P_PGID, self.proc.pid, os.WEXITED)
            except (ChildProcessError, OSError):
                break
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def collect(self, store) -> dict:
        """After a successful exit: hash the outputs and move them into the store; the manifest."""
        from tunemake.records import check_outputs
        from tunemake.store import output_manifest

        manifest, files = output_manifest(self.out, self.real_out)
        try:  # a name the cache cannot hold: fail now, not a result that is never found again
            check_outputs(manifest)
        except ValueError as exc:
            raise RuntimeError(f"{exc} (output names must be valid UTF-8, without control characters "
                               "or backslashes, at most 255 bytes a part and 1024 in all)") from None
        for full, rel in files:
            store.ingest(full, manifest[rel]["digest"], manifest[rel]["x"])
        return manifest

    def error_line(self) -> str:
        """The one-line reason a Python step gave for failing (its traceback is in the log)."""
        try:
            return (self.tmp / ERROR_FILE).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""


class LocalExecutor:
    """Runs steps as child processes of this tunemake, GPU slots from the visible devices.
    Each step reads its dependencies from private links to their blobs (tunemake.executor)."""

    def __init__(self, project_dir: Path, store):
        self.project_dir = project_dir
        self.store = store
        self._views_dir: Path | None = None
        self.input_views = None  # tunemake.executor.InputViews, made by the first step (not on the no-op path)

    def _views_folder(self) -> Path:
        if self._views_dir is None:
            self._views_dir = self.store.new_tmp_dir("inputs")
        return self._views_dir

    def close(self) -> None:
        """After the build: no step reads the views any more."""
        from tunemake.fsutil import rmtree

        if self._views_dir is not None:
            rmtree(self._views_dir)
            self._views_dir = None

    def gpu_slots(self) -> list[str] | None:
        from tunemake.keys import visible_gpus

        return visible_gpus()

    def start(self, spec, tmp: Path, gpus: list[str]) -> RunningStep:
        from tunemake.executor import InputViews, resolve_params

        if self.input_views is None:
            self.input_views = InputViews(self.store, self._views_folder)
        dep_dirs, placed = self.input_views.link(spec.deps)
        params = resolve_params(spec, self.project_dir, dep_dirs)
        step = start(spec.target, spec.module, params, self.project_dir, dep_dirs, tmp, gpus,
                     request_cache=self.store.root / "requests")
        step.views = {name: (dep_dirs[name], placed[name], spec.deps[name]) for name in placed}
        return step


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


def start(target: str, module: str, params: dict, project_dir: Path, deps: dict[str, Path],
          tmp: Path, gpus: list[str], request_cache: Path | None = None) -> RunningStep:
    out = tmp / "out"
    out.mkdir()
    progress_file = tmp / "progress"
    log = tmp / "log"
    env = dict(os.environ)
    env["TUNEMAKE_PROGRESS"] = str(progress_file)
    env["TUNEMAKE_OUT"] = str(out)
    # A step that holds no GPU slot sees no GPU: nothing oversubscribes a device.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    kind = importlib.import_module(module)
    direct, check, stdin = hasattr(kind, "command_line"), None, subprocess.DEVNULL
    if direct:
        from tunemake.step import StepContext

        ctx = StepContext(target=target, out=out, project_dir=Path(project_dir),
                          deps={k: Path(v) for k, v in deps.items()})
        try:
            argv, extra_env = kind.command_line(params, ctx)
            log.write_text("$ " + (argv[2] if argv[:2] == ["/bin/sh", "-c"] else " ".join(argv)) + "\n")
        except ValueError as exc:  # no command line to run: the step fails with the reason in its log
            argv, extra_env = ["/bin/sh", "-c", "exit 2"], {}
            log.write_text(f"{exc}\n")
        env.update(extra_env)
        argv, stdin = ["/bin/sh", "-c", GUARD, "tunemake-step", *argv], _lifeline_fd()
        if hasattr(kind, "check_outputs"):
            def check() -> None:
                kind.check_outputs(params, out)
    else:
        spec = {
            "target": target,
            "module": module,
            "params": params,
            "project_dir": str(project_dir),
            "out": str(out),
            "deps": {k: str(v) for k, v in deps.items()},
            "progress_file": str(progress_file),
            "error_file": str(tmp / ERROR_FILE),
            "parent_pid": os.getpid(),
            "gpus": gpus,
            "request_cache": str(request_cache) if request_cache else None,
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "tunemake.step", str(spec_path)]
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            argv, cwd=project_dir, env=env, stdin=stdin, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can kill the whole tree
        )
    try:
        pidfd = os.pidfd_open(proc.pid)  # not reaped yet: nobody has waited for it
    except (AttributeError, OSError):  # not Linux >= 5.3
        pidfd = None
    return RunningStep(target, proc, tmp, out, log, progress_file, gpus, direct=direct, check=check, pidfd=pidfd,
                       real_out=os.path.realpath(out))


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        data = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
