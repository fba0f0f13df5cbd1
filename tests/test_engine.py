"""Incremental builds through the CLI: what runs, what is restored, and why."""

from __future__ import annotations

import json
import os
import time

from engine_helpers import counted

PIPELINE = f"""
default = ["report"]

[vars]
greeting = "hello"

[target.prep]
kind = "command"
cmd = "{counted('prep', 'tr a-z A-Z < data/input.txt > $TUNEMAKE_OUT/upper.txt')}"
deps = ["data/input.txt"]

[target.stats]
kind = "command"
cmd = "{counted('stats', 'wc -l < $TUNEMAKE_DEP_PREP/upper.txt > {out}/lines.txt')}"
deps = ["prep"]

[target.report]
kind = "command"
cmd = "{counted('report', 'echo ${vars.greeting} $(cat {deps.stats}/lines.txt) > $TUNEMAKE_OUT/report.txt')}"
deps = ["stats"]
"""


def setup_pipeline(project):
    project.write("data/input.txt", "one\ntwo\nthree\n")
    project.tunefile(PIPELINE)


def test_first_build_runs_everything_then_nothing(project):
    setup_pipeline(project)
    first = project.build()
    assert "3 built" in first.stdout
    assert project.read("targets/prep/upper.txt") == "ONE\nTWO\nTHREE\n"
    assert project.read("targets/stats/lines.txt").strip() == "3"
    assert project.read("targets/report/report.txt").strip() == "hello 3"
    second = project.build()
    assert "nothing to do: 3 targets up to date" in second.stdout
    assert [project.runs(n) for n in ("prep", "stats", "report")] == [1, 1, 1]


def test_source_change_rebuilds_and_touch_does_not(project):
    setup_pipeline(project)
    project.build()
    src = project.root / "data/input.txt"
    later = time.time() + 5
    os.utime(src, (later, later))  # same bytes, new mtime: re-hashed, nothing rebuilt
    assert "nothing to do" in project.build().stdout
    src.write_text("one\ntwo\nthree\nfour\n")
    out = project.build().stdout
    assert "3 built" in out
    assert project.read("targets/report/report.txt").strip() == "hello 4"


def test_early_cutoff_when_dependency_output_is_identical(project):
    setup_pipeline(project)
    project.build()
    # different input, same number of lines: prep and stats rerun, stats' output is unchanged
    (project.root / "data/input.txt").write_text("uno\ndos\ntres\n")
    out = project.build().stdout
    assert (project.runs("prep"), project.runs("stats"), project.runs("report")) == (2, 2, 1)
    assert "2 built" in out and "1 up to date" in out


def test_param_change_and_revert_hits_cache(project):
    setup_pipeline(project)
    project.build()
    out = project.build("--set", "vars.greeting=bonjour").stdout
    assert project.read("targets/report/report.txt").strip() == "bonjour 3"
    assert project.runs("report") == 2 and project.runs("prep") == 1
    assert "1 built" in out
    # back to the tunefile's value: restored from the cache, not rerun
    out = project.build().stdout
    assert "1 restored from cache" in out
    assert project.runs("report") == 2
    assert project.read("targets/report/report.txt").strip() == "hello 3"


def test_set_override_of_a_param_changes_the_key(project):
    setup_pipeline(project)
    project.build()
    cmd = counted("stats", "echo 42 > $TUNEMAKE_OUT/lines.txt")
    project.build("--set", f"stats.cmd={cmd}")
    assert project.read("targets/stats/lines.txt").strip() == "42"
    assert project.read("targets/report/report.txt").strip() == "hello 42"


def test_restore_after_deleting_targets(project):
    setup_pipeline(project)
    project.build()
    project.run("clean", check=True)
    assert not (project.root / "targets/report").exists()
    out = project.build().stdout
    assert "3 restored from cache" in out
    assert project.read("targets/report/report.txt").strip() == "hello 3"
    assert project.runs("report") == 1


def test_edited_small_output_is_restored_and_cache_is_intact(project):
    setup_pipeline(project)
    project.build()
    report = project.root / "targets/report/report.txt"
    report.write_text("edited by hand\n")
    out = project.build().stdout
    assert "restored from cache" in out
    assert report.read_text().strip() == "hello 3"
    assert project.runs("report") == 1
    assert project.run("cache", "verify").returncode == 0


def test_edited_hardlinked_large_output_never_serves_corrupt_cache(project):
    project.tunefile(f"""
        [target.big]
        kind = "command"
        cmd = "{counted('big', 'head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big.bin')}"
        """)
    project.build()
    big = project.root / "targets/big/big.bin"
    assert big.stat().st_nlink == 2  # linked to the blob, not copied
    assert not os.access(big, os.W_OK) or os.geteuid() == 0
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:  # an in-place edit reaches the blob through the link
        f.write(b"corrupt")
    out = project.build().stdout
    assert "1 built" in out  # the damaged cache entry was detected and dropped
    assert big.read_bytes() == bytes(2_000_000)
    assert project.run("cache", "verify").returncode == 0


def test_force_dry_run_and_no_cache(project):
    setup_pipeline(project)
    project.build()
    dry = project.build("-n", "--set", "vars.greeting=hi")
    assert "report  would run: params.cmd" in dry.stdout
    assert project.runs("report") == 1
    project.build("-B", "stats")
    assert (project.runs("prep"), project.runs("stats"), project.runs("report")) == (1, 2, 1)
    project.build("--no-cache")
    assert (project.runs("prep"), project.runs("stats"), project.runs("report")) == (2, 3, 2)


def test_dry_run_of_fresh_project(project):
    setup_pipeline(project)
    out = project.build("-n").stdout
    assert "prep    would run" in out and "stats   would run: dep prep will be rebuilt" in out
    assert not (project.root / "targets").exists()


def test_status_and_explain(project):
    setup_pipeline(project)
    never = json.loads(project.run("status", "--json").stdout)
    assert {e["status"] for e in never} == {"never built", "stale"}
    project.build()
    up = json.loads(project.run("status", "--json").stdout)
    assert {e["status"] for e in up} == {"up to date"}
    (project.root / "data/input.txt").write_text("x\n")
    status = {e["target"]: e for e in json.loads(project.run("status", "--json").stdout)}
    assert status["prep"]["reasons"] == ["file data/input.txt changed"]
    assert status["stats"]["reasons"] == ["dep prep will be rebuilt"]
    explain = project.run("explain", "report").stdout
    assert "dep stats" in explain
    project.build()
    explain = project.run("explain", "report", "--set", "vars.greeting=salut").stdout
    assert "params.cmd" in explain and "hello" in explain and "salut" in explain


def test_explain_names_dependency_output_change(project):
    setup_pipeline(project)
    project.build()
    (project.root / "data/input.txt").write_text("a\nb\n")
    project.build("prep", "stats")
    assert "dep stats: output changed" in project.run("explain", "report").stdout


def test_show_graph_list(project):
    setup_pipeline(project)
    project.build()
    show = project.run("show", "report", check=True).stdout
    assert "targets/report" in show and "report.txt" in show and "key " in show and "built " in show
    graph = project.run("graph", check=True).stdout
    assert graph.splitlines()[0].startswith("report (command)")
    assert "└── stats" in graph
    dot = project.run("graph", "--dot", check=True).stdout
    assert '"prep" -> "stats"' in dot and dot.startswith("digraph")
    listing = project.run("list", check=True).stdout
    assert "* report" in listing


def test_matrix_family_and_vars(project):
    project.tunefile("""
        [vars]
        suffix = "!"
        [target.q]
        kind = "command"
        matrix = {scheme = ["int8", "int4"], size = [1, 2]}
        cmd = "echo ${matrix.scheme} ${matrix.size}${vars.suffix} > $TUNEMAKE_OUT/x.txt"
        [target.all]
        kind = "command"
        cmd = "cat $TUNEMAKE_DEP_Q_INT4_2/x.txt > $TUNEMAKE_OUT/all.txt"
        deps = ["q"]
        """)
    listing = project.run("list", check=True).stdout
    for name in ("q@int8-1", "q@int8-2", "q@int4-1", "q@int4-2"):
        assert name in listing
    project.build("all")
    assert project.read("targets/q@int8-1/x.txt").strip() == "int8 1!"
    assert project.read("targets/all/all.txt").strip() == "int4 2!"
    project.build("--set", "q@int8-1.cmd=echo changed > $TUNEMAKE_OUT/x.txt", "q")
    assert project.read("targets/q@int8-1/x.txt").strip() == "changed"


def test_vars_built_on_other_vars_follow_overrides(project):
    project.tunefile("""
        [vars]
        base = "model"
        steps = 10
        run_name = "${vars.base}-${vars.steps}"
        outs = ["${vars.run_name}.txt"]
        [target.t]
        kind = "command"
        cmd = "echo ${vars.run_name} > $TUNEMAKE_OUT/${vars.run_name}.txt; touch $TUNEMAKE_OUT/junk"
        outs = "${vars.outs}"
        """)
    project.build()
    assert sorted(p.name for p in (project.root / "targets/t").iterdir()) == ["model-10.txt"]
    project.build("--set", "vars.steps=20")
    assert project.read("targets/t/model-20.txt").strip() == "model-20"


def test_failure_keeps_log_and_is_not_cached(project):
    project.tunefile("""
        [target.bad]
        kind = "command"
        cmd = "echo partial > $TUNEMAKE_OUT/x.txt; echo oops-detail; exit 3"
        [target.after]
        kind = "command"
        cmd = "echo > $TUNEMAKE_OUT/y"
        deps = ["bad"]
        [target.other]
        kind = "command"
        cmd = "echo ok > $TUNEMAKE_OUT/z"
        """)
    proc = project.build("bad", "after", "other", check=False)
    assert proc.returncode == 1
    assert "oops-detail" in proc.stdout  # the log's tail is shown
    assert "exit status 3" in proc.stdout
    assert "oops-detail" in project.read(".tunecache/logs/bad.log")
    assert not (project.root / "targets/bad").exists()
    assert not (project.root / "targets/other").exists()  # stopped after the failure
    proc = project.build("-k", "bad", "after", "other", check=False)
    assert proc.returncode == 1
    assert project.read("targets/other/z").strip() == "ok"
    assert "skipped  after" in proc.stdout
    status = project.run("status", check=True).stdout
    assert "never built: failed" in status and "with these inputs: exit status 3 (tunemake log bad --last)" in status
    assert not list((project.root / ".tunecache/ac").glob("*/*.json")) or all(
        json.loads(p.read_text())["target"] != "bad" for p in (project.root / ".tunecache/ac").glob("*/*.json"))
    project.build("--set", "bad.cmd=echo fixed > $TUNEMAKE_OUT/x.txt", "bad")
    assert "failed" not in project.run("status", "bad", check=True).stdout  # a success clears the record


def test_declared_outs(project):
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "mkdir -p $TUNEMAKE_OUT/model && echo w > $TUNEMAKE_OUT/model/w.bin && echo junk > $TUNEMAKE_OUT/tmp.txt"
        outs = ["model"]
        [target.missing]
        kind = "command"
        cmd = "true"
        outs = ["result.json"]
        """)
    project.build("t")
    assert (project.root / "targets/t/model/w.bin").exists()
    assert not (project.root / "targets/t/tmp.txt").exists()
    proc = project.build("missing", check=False)
    assert proc.returncode == 1 and "declared output(s) not produced: result.json" in proc.stdout


def test_command_step_is_run_directly_and_failures_are_explained(project):
    # The command is exec'd by tunemake's own child, not run under a Python step process:
    # a step costs a fork, not an interpreter.
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "tr '\\\\0' ' ' < /proc/$PPID/cmdline > $TUNEMAKE_OUT/parent"
        [target.src]
        kind = "command"
        cmd = "echo x > $TUNEMAKE_OUT/x"
        [target.typo]
        kind = "command"
        cmd = "cat {deps.sr}/x > $TUNEMAKE_OUT/y"
        deps = ["src"]
        [target.missing_program]
        kind = "command"
        cmd = ["no-such-program-xyz", "{out}"]
        """)
    project.build("t")
    parent = project.read("targets/t/parent")
    assert "-m tunemake" in parent and " build" in parent and "tunemake.step" not in parent
    assert project.read(".tunecache/logs/t.log").startswith("$ tr ")
    proc = project.build("-k", "typo", "missing_program", check=False)
    assert proc.returncode == 1
    assert "cmd refers to {deps.sr} but 'sr' is not a dependency target" in proc.stdout
    assert "command exited with status 127" in project.read(".tunecache/logs/missing_program.log")
    assert not (project.root / "targets/typo").exists()


def test_a_command_that_waits_for_all_its_children_finishes(project):
    # the guard's watcher must not be a child of the command, or this would wait forever
    project.write("reap.py", """
        import os, subprocess, sys
        subprocess.Popen(["true"])
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
        open(os.path.join(os.environ["TUNEMAKE_OUT"], "x"), "w").write("reaped")
        """)
    project.tunefile('''
        [target.t]
        kind = "command"
        cmd = ["python3", "reap.py"]
        deps = ["reap.py"]
        ''')
    project.run("build", timeout=60)
    assert project.read("targets/t/x") == "reaped"


def test_command_keeps_default_signals_real_programs_and_source_deps(project):
    # Run in the foreground: SIGINT is not ignored (a background job's would be), an argv names
    # a program (never a shell builtin), and a death by signal is reported as one.
    project.write("a-b.txt", "1\n")
    project.write("a_b.txt", "2\n")
    project.tunefile("""
        [target.interrupted]
        kind = "command"
        cmd = ["sh", "-c", "kill -INT $$; echo survived > $TUNEMAKE_OUT/x"]
        [target.echo]
        kind = "command"
        cmd = ["echo", "-n", "{out}"]
        [target.sources]
        kind = "command"
        cmd = "cat a-b.txt a_b.txt > $TUNEMAKE_OUT/both"
        deps = ["a-b.txt", "a_b.txt"]
        """)
    proc = project.build("-k", "interrupted", "echo", "sources", check=False)
    assert proc.returncode == 1
    assert "command killed by SIGINT" in project.read(".tunecache/logs/interrupted.log")
    assert "-n" not in project.read(".tunecache/logs/echo.log").splitlines()[-1]  # /bin/echo, not dash's
    assert project.read("targets/sources/both") == "1\n2\n"


def test_parallel_jobs_overlap(project):
    stamp = "python3 -c 'import time; print(time.time())'"
    project.tunefile(f"""
        [target.a]
        kind = "command"
        cmd = "{stamp} > $TUNEMAKE_OUT/start; sleep 1; {stamp} > $TUNEMAKE_OUT/end"
        [target.b]
        kind = "command"
        cmd = "{stamp} > $TUNEMAKE_OUT/start; sleep 1; {stamp} > $TUNEMAKE_OUT/end"
        """)
    project.build("-j", "2", "a", "b")
    t = {n: [float(project.read(f"targets/{n}/{w}")) for w in ("start", "end")] for n in "ab"}
    assert t["a"][0] < t["b"][1] and t["b"][0] < t["a"][1]


def test_gpu_step_without_gpu_fails_at_once(project):
    project.tunefile("""
        [target.g]
        kind = "command"
        cmd = "nvidia-smi > $TUNEMAKE_OUT/x"
        gpus = 1
        """)
    proc = project.build(check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    assert "needs 1 GPU(s) but 0 visible" in proc.stdout


def test_gpu_slot_sets_cuda_visible_devices(project):
    project.tunefile("""
        [target.g]
        kind = "command"
        cmd = "echo $CUDA_VISIBLE_DEVICES > $TUNEMAKE_OUT/gpus"
        gpus = 1
        [target.c]
        kind = "command"
        cmd = "echo [$CUDA_VISIBLE_DEVICES] > $TUNEMAKE_OUT/gpus"
        """)
    project.build(env={"CUDA_VISIBLE_DEVICES": "3,5"})
    assert project.read("targets/g/gpus").strip() == "3"
    assert project.read("targets/c/gpus").strip() == "[]"


def test_progress_lines_reach_the_build_output(project):
    project.tunefile("""
        [target.p]
        kind = "command"
        cmd = "echo '3/10 epoch' >> $TUNEMAKE_PROGRESS; sleep 0.3; touch $TUNEMAKE_OUT/x"
        """)
    assert "p: 3/10 epoch" in project.build().stdout


def test_python_kind_and_recipe_code_change(project):
    project.write("steps.py", """
        def make(ctx, text, times):
            (ctx.out / "out.txt").write_text(text * times)
        """)
    project.tunefile("""
        [target.py]
        kind = "python"
        function = "steps:make"
        args = {text = "ab", times = 3}
        """)
    project.build()
    assert project.read("targets/py/out.txt") == "ababab"
    assert "nothing to do" in project.build().stdout
    project.write("steps.py", """
        def make(ctx, text, times):
            (ctx.out / "out.txt").write_text(text.upper() * times)
        """)
    assert "code steps.py changed" in project.run("explain", "py").stdout
    project.build()
    assert project.read("targets/py/out.txt") == "ABABAB"


def test_package_version_change_invalidates(project, tmp_path_factory):
    site = tmp_path_factory.mktemp("site")

    def install(version: str) -> None:
        for old in site.glob("fakepkg-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        info = site / f"fakepkg-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")

    project.tunefile(f"""
        [target.v]
        kind = "command"
        cmd = "{counted('v', 'echo x > $TUNEMAKE_OUT/x')}"
        packages = ["fakepkg"]
        """)
    env = {"PYTHONPATH": str(site)}
    install("1.0")
    project.build(env=env)
    assert "nothing to do" in project.build(env=env).stdout
    install("2.0")
    assert "fakepkg: 1.0 → 2.0" in project.run("explain", "v", env=env).stdout
    project.build(env=env)
    assert project.runs("v") == 2


def test_entry_point_kind(project, tmp_path_factory):
    site = tmp_path_factory.mktemp("plugin")
    (site / "mykind.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "class Params(BaseModel):\n"
        "    model_config = ConfigDict(extra='forbid')\n"
        "    word: str\n"
        "def run(params, ctx):\n"
        "    (ctx.out / 'w.txt').write_text(params.word * 2)\n")
    info = site / "mykind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mykind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tunemake.kinds]\ndouble = mykind\n")
    project.tunefile("""
        [target.w]
        kind = "double"
        word = "ha"
        """)
    project.build(env={"PYTHONPATH": str(site)})
    assert project.read("targets/w/w.txt") == "haha"


def test_no_op_never_imports_torch(project):
    setup_pipeline(project)
    project.build()
    proc = project.run("build", env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "tunemake.cli" in imported
    assert not imported & {"torch", "torchao", "lm_eval", "transformers", "pydantic", "rich"}


def test_reference_to_a_path_inside_a_target_output(project):
    project.tunefile("""
        [target.data]
        kind = "command"
        cmd = "mkdir -p $TUNEMAKE_OUT/task && echo q > $TUNEMAKE_OUT/task/q.txt"
        [target.use]
        kind = "command"
        cmd = "cat {deps.data}/task/q.txt > $TUNEMAKE_OUT/got"
        deps = ["data/task/q.txt"]
        """)
    assert "data" in project.run("graph", check=True).stdout
    project.build("use")
    assert project.read("targets/use/got") == "q\n"


def test_log_shows_how_the_current_outputs_were_made_even_after_a_cache_restore(project):
    project.tunefile("""
        [vars]
        word = "first"
        [target.t]
        kind = "command"
        cmd = "echo making ${vars.word}; echo ${vars.word} > $TUNEMAKE_OUT/x"
        """)
    project.build()
    project.build("--set", "vars.word=second")
    project.build()  # restored from the cache: no step ran
    assert "making first" in project.run("log", "t", check=True).stdout
    assert "making second" in project.run("log", "t", "--last", check=True).stdout
    assert "tunemake log t" in project.run("show", "t", check=True).stdout
    proc = project.run("log", "nope")
    assert proc.returncode == 2 and "unknown target 'nope'" in proc.stderr
    project.run("cache", "gc", "--max-size", "0", check=True)  # drops the entry and its log blob
    proc = project.run("log", "t")
    assert proc.returncode == 2 and "removed by `cache gc`" in proc.stderr and "making" not in proc.stdout
