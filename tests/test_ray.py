"""--executor ray on a local Ray cluster: same outputs as the local executor, no shared filesystem assumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import Project

pytest.importorskip("ray")

GRAPH = """
[target.words]
kind = "command"
cmd = "echo '1/2 splitting' >> $TUNEMAKE_PROGRESS; sleep 0.6; mkdir -p $TUNEMAKE_OUT/d && tr ' ' '\\n' < data/text.txt > $TUNEMAKE_OUT/d/words.txt"
deps = ["data/text.txt"]

[target.count]
kind = "command"
cmd = "wc -l < $TUNEMAKE_DEP_WORDS/d/words.txt > $TUNEMAKE_OUT/n.txt"
deps = ["words"]

[target.upper]
kind = "python"
function = "steps:upper"
deps = ["words", "steps.py"]

[target.joined]
kind = "command"
cmd = "cat {deps.count}/n.txt {deps.upper}/upper.txt > $TUNEMAKE_OUT/joined.txt"
deps = ["count", "upper"]
"""

STEPS = """
def upper(ctx):
    words = (ctx.deps["words"] / "d" / "words.txt").read_text()
    (ctx.out / "upper.txt").write_text(words.upper())
"""


def clone(tmp_path, name):
    p = Project(tmp_path / name)
    (p.root / "runs").mkdir(parents=True)
    p.write("data/text.txt", "the quick brown fox jumps\n")
    p.write("steps.py", STEPS)
    p.tunefile(GRAPH)
    return p


def outputs(p):
    base = p.root / "targets"
    return {str(f.relative_to(base)): f.read_bytes() for f in sorted(base.rglob("*")) if f.is_file()}


def test_ray_executor_matches_local(tmp_path):
    local = clone(tmp_path, "local")
    local.build("-j", "2")
    distributed = clone(tmp_path, "ray")
    proc = distributed.build("--executor", "ray", "-j", "2", "--remote", f"file://{tmp_path / 'remote'}",
                             timeout=300)
    assert "4 built" in proc.stdout
    assert "words: 1/2 splitting" in proc.stdout  # live progress travels back from the worker
    assert outputs(local) == outputs(distributed)
    assert distributed.read("targets/joined/joined.txt").startswith("5\nTHE\n")
    assert "nothing to do" in distributed.build("--executor", "ray", "--remote",
                                                f"file://{tmp_path / 'remote'}").stdout


def test_ray_gpu_step_on_cpu_cluster_fails_at_once(tmp_path):
    p = Project(tmp_path / "gpu")
    p.root.mkdir()
    p.tunefile('[target.g]\nkind = "command"\ncmd = "nvidia-smi"\ngpus = 1\n')
    proc = p.build("--executor", "ray", "--remote", f"file://{tmp_path / 'remote'}", check=False, timeout=300)
    assert proc.returncode == 1
    assert "needs 1 GPU(s) but the Ray cluster has 0" in proc.stdout


def test_ray_needs_a_remote_cache(tmp_path):
    p = Project(tmp_path / "p")
    p.root.mkdir()
    p.tunefile('[target.a]\nkind = "command"\ncmd = "true"\n')
    proc = p.build("--executor", "ray", check=False)
    assert proc.returncode == 2 and "needs a remote cache" in proc.stderr


def test_worker_kills_a_failed_steps_children_and_keeps_no_descriptor(tmp_path):
    # The worker function runs in a long-lived Ray worker process: call it in-process here.
    import os
    import time

    from tunemake.ray_executor import _run_on_worker

    pidfile = tmp_path / "sleeper.pid"
    spec = {"target": "t", "module": "tunemake.kinds.command", "input_refs": {"deps": []}, "deps": {},
            "sources": [], "params": {"cmd": f"sleep 60 & echo $! > {pidfile}; exit 1", "deps": [], "outs": [],
                                      "env": {}, "packages": [], "gpus": 0}}
    remote = (tmp_path / "remote").as_uri()

    def result():
        return list(_run_on_worker(spec, {}, remote, {}))[-1]

    assert result()["code"] == 1  # opens the process's lifeline pipe once
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert result()["code"] == 1
    assert len(os.listdir("/proc/self/fd")) == before
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{sleeper}") and time.monotonic() < deadline:
        time.sleep(0.05)
    stat_file = Path(f"/proc/{sleeper}/stat")
    state = stat_file.read_text().split()[2] if stat_file.exists() else "gone"
    assert state in ("gone", "Z"), "the failed step's background child outlived it"
