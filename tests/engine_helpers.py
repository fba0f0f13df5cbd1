"""Engine test helpers: a throwaway project folder driven through the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Project:
    """A project folder with a tunefile, driven through `python -m tunemake`."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def tunefile(self, text: str) -> None:
        self.write("tunefile.toml", text)

    def run(self, *args: str, env: dict | None = None, check: bool | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "tunemake", "-C", str(self.root), *args],
                              capture_output=True, text=True, env=full_env, timeout=timeout)
        if check or (check is None and args and args[0] == "build"):
            assert proc.returncode == 0, f"tunemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def build(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("build", "--plain", *args, **kw)

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def runs(self, name: str) -> int:
        """How many times a step ran: test commands append a line to runs/NAME."""
        path = self.root / "runs" / name
        return len(path.read_text().splitlines()) if path.exists() else 0


def counted(name: str, body: str) -> str:
    """A shell command that records each run of target NAME, then does `body`."""
    return f"echo run >> runs/{name}; {body}"


def spawn_build(project: Project, *args: str) -> subprocess.Popen:
    """A build in the background (for kill -9 and concurrency tests), its output in .stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tunemake", "-C", str(project.root), "build", "--plain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def assert_one_line_error(proc, expected) -> str:
    """Bad input: exit code 2 and one `tunemake: error:` line holding every expected fragment."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tunemake: error: ")
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
