"""Trust: every output tunemake serves matches its key, and nothing outside a step's output is
ever moved or lost. Each test is a reproduction of a hole found by hostile testing, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from engine_helpers import REPO, Project, counted, spawn_build, wait_for


def _no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# -- 1. a step's output folder is never followed out of its private folder --------------------
def test_a_symlinked_output_folder_moves_nothing(project):
    project.write("data/keep.txt", "precious\n")
    project.tunefile("""
        [target.evil]
        kind = "command"
        cmd = "rm -rf $TUNEMAKE_OUT && ln -s $PWD/data $TUNEMAKE_OUT"
        """)
    proc = project.build(check=False)
    assert proc.returncode == 1
    assert "replaced by a symlink" in proc.stdout
    assert project.read("data/keep.txt") == "precious\n"
    assert not (project.root / "targets/evil").exists()


def test_a_step_folder_replaced_by_a_symlink_moves_nothing(project):
    project.write("data/out/keep.txt", "precious\n")
    project.tunefile("""
        [target.evil]
        kind = "command"
        cmd = 'd=$(dirname "$TUNEMAKE_OUT"); rm -rf "$d"; ln -s "$PWD/data" "$d"'
        """)
    proc = project.build(check=False)
    assert proc.returncode == 1
    _no_traceback(proc)
    assert project.read("data/out/keep.txt") == "precious\n"
    assert sorted(os.listdir(project.root / "data")) == ["out"]


def test_a_removed_output_folder_is_a_failure_not_an_empty_success(project):
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "rm -rf $TUNEMAKE_OUT"
        """)
    proc = project.build(check=False)
    assert proc.returncode == 1
    assert "removed or moved" in proc.stdout


# -- 2. a copied project uses its own inputs ------------------------------------------------------
def _write_eval(folder, acc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"results": {"t": {"acc,none": acc}}}))
    (folder / "checkpoint.json").write_text(json.dumps({"model": "m", "weight_bytes": 1}))


def _report_value(p: Project) -> float:
    report = json.loads(p.read("targets/report/report.json"))
    return report["rows"][0]["metrics"]["t acc"]["value"]


def test_a_copied_project_serves_its_own_inputs(tmp_path):
    p1 = Project(tmp_path / "p1")
    _write_eval(p1.root / "ev", 0.25)
    p1.write("mod.py", "def make(ctx):\n    (ctx.out / 'o').write_text('p1')\n")
    p1.tunefile("""
        [target.report]
        kind = "report"
        evals = ["ev"]
        [target.py]
        kind = "python"
        function = "mod:make"
        """)
    p1.build()
    assert _report_value(p1) == 0.25
    shutil.copytree(p1.root, tmp_path / "p2", symlinks=True)  # cp -a
    p2 = Project(tmp_path / "p2")
    _write_eval(p2.root / "ev", 0.75)
    p2.write("mod.py", "def make(ctx):\n    (ctx.out / 'o').write_text('p2')\n")
    p2.build()
    assert _report_value(p2) == 0.75
    assert p2.read("targets/py/o") == "p2"
    assert "nothing to do" in p1.build().stdout  # the original is untouched by its copy
    assert _report_value(p1) == 0.25 and p1.read("targets/py/o") == "p1"


# -- 3. substituted paths are quoted --------------------------------------------------------------
def test_substituted_paths_are_quoted_in_odd_project_folders(tmp_path):
    root = tmp_path / "my proj $(touch PWNED) 'q\""
    root.mkdir()
    p = Project(root)
    p.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo hi > {out}/o"
        [target.b]
        kind = "command"
        cmd = "cat {deps.a}/o > {out}/copy; echo $# > {out}/n"
        deps = ["a"]
        [target.c]
        kind = "command"
        cmd = ["cp", "{deps.a}/o", "{out}/argv"]
        deps = ["a"]
        """)
    p.build()
    assert p.read("targets/a/o") == "hi\n"
    assert p.read("targets/b/copy") == "hi\n"
    assert p.read("targets/c/argv") == "hi\n"
    assert not list(tmp_path.rglob("PWNED")) and not (root / "my").exists() and not (tmp_path / "my").exists()


# -- 4. inputs that change while a step runs are never cached under the old key ---------------------
def test_a_source_edited_while_the_step_runs_is_not_cached_under_the_old_key(project):
    project.write("s.txt", "v1\n")
    project.tunefile(f"""
        [target.c]
        kind = "command"
        cmd = "{counted('c', 'touch started; sleep 1.5; cat s.txt > $TUNEMAKE_OUT/o')}"
        deps = ["s.txt"]
        """)
    build = spawn_build(project)
    wait_for(project.root / "started")
    project.write("s.txt", "v2\n")
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 1, out
    assert "s.txt changed while the step ran" in out
    project.write("s.txt", "v1\n")
    (project.root / "started").unlink()
    project.build()
    assert project.read("targets/c/o") == "v1\n"
    project.write("s.txt", "v2\n")
    project.build()
    assert project.read("targets/c/o") == "v2\n"


def test_a_file_added_to_a_source_folder_while_the_step_runs_is_caught(project):
    project.write("src/a.txt", "a\n")
    project.tunefile("""
        [target.c]
        kind = "command"
        cmd = "touch started; sleep 1.5; cat src/* > $TUNEMAKE_OUT/o"
        deps = ["src"]
        """)
    build = spawn_build(project)
    wait_for(project.root / "started")
    project.write("src/b.txt", "b\n")
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 1, out
    assert "src changed while the step ran" in out


def test_a_dependency_edited_in_targets_while_a_step_runs_does_not_reach_it(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo original > $TUNEMAKE_OUT/o"
        [target.b]
        kind = "command"
        cmd = "touch started; sleep 1.5; cat $TUNEMAKE_DEP_A/o > $TUNEMAKE_OUT/o"
        deps = ["a"]
        """)
    build = spawn_build(project, "b")
    wait_for(project.root / "started")
    (project.root / "targets/a/o").write_text("edited\n")  # a small output: a copy in targets/
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 0, out
    assert project.read("targets/b/o") == "original\n"
    project.build("b")  # the edited copy is replaced from the cache; b stays up to date
    assert project.read("targets/a/o") == "original\n" and project.read("targets/b/o") == "original\n"


def test_an_in_place_edit_of_a_hardlinked_dependency_during_a_step_is_caught(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big"
        [target.b]
        kind = "command"
        cmd = "touch started; sleep 1.5; md5sum < $TUNEMAKE_DEP_A/big > $TUNEMAKE_OUT/sum"
        deps = ["a"]
        """)
    project.build("a")
    big = project.root / "targets/a/big"
    assert os.stat(big).st_nlink > 1  # a hardlink to the blob, as the README says
    build = spawn_build(project, "b")
    wait_for(project.root / "started")
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:  # in place: through the shared inode, the blob and b's view change too
        f.write(b"X")
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 1, out
    assert "dependency a changed while the step ran" in out
    (project.root / "started").unlink()
    project.build("b")  # the damaged blob was dropped: a is rebuilt, then b from the right bytes
    expected = subprocess.run("head -c 2000000 /dev/zero | md5sum", shell=True, capture_output=True,
                              text=True).stdout
    assert project.read("targets/b/sum") == expected


# -- 5 and 6. a dependency swapped or cleaned by another tunemake cannot reach a running step ---------
def test_three_concurrent_builds_swapping_a_dependency_a_b_a(project):
    wait = "while [ ! -e {0} ]; do sleep 0.02; done"
    project.tunefile(f"""
        [target.d]
        kind = "command"
        cmd = "echo A > $TUNEMAKE_OUT/v"
        [target.e]
        kind = "command"
        cmd = "touch started; {wait.format('go1')}; cat $TUNEMAKE_DEP_D/v > $TUNEMAKE_OUT/v; touch read1; {wait.format('go2')}; cat $TUNEMAKE_DEP_D/v >> $TUNEMAKE_OUT/v"
        deps = ["d"]
        """)
    first = spawn_build(project, "e")
    wait_for(project.root / "started")
    project.build("--set", "d.cmd=echo B > $TUNEMAKE_OUT/v", "d")  # A -> B while e runs
    (project.root / "go1").touch()
    wait_for(project.root / "read1")
    project.build("d")  # B -> A: the final state is what e was keyed on
    (project.root / "go2").touch()
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    assert project.read("targets/e/v") == "A\nA\n"  # e read A all along, never B
    for f in ("started", "go1", "go2", "read1"):
        (project.root / f).unlink()
    # with B, e is built from B: both settings coexist in the cache
    for f in ("go1", "go2"):
        (project.root / f).touch()
    project.build("--set", "d.cmd=echo B > $TUNEMAKE_OUT/v", "e")
    assert project.read("targets/e/v") == "B\nB\n"


def test_clean_of_a_dependency_while_a_dependent_runs(project):
    project.tunefile("""
        [target.d]
        kind = "command"
        cmd = "echo data > $TUNEMAKE_OUT/v"
        [target.e]
        kind = "command"
        cmd = "touch started; sleep 1.5; cat $TUNEMAKE_DEP_D/v > $TUNEMAKE_OUT/v"
        deps = ["d"]
        """)
    first = spawn_build(project, "e")
    wait_for(project.root / "started")
    project.run("clean", "d", check=True)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    assert project.read("targets/e/v") == "data\n"


# -- 7. cache verify never leaves corrupt bytes being served -------------------------------------
def test_verify_of_a_corrupt_blob_also_invalidates_the_materialized_target(project):
    project.tunefile(f"""
        [target.a]
        kind = "command"
        cmd = "{counted('a', 'head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big')}"
        """)
    project.build()
    big = project.root / "targets/a/big"
    st = os.stat(big)
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:
        f.write(b"X")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # the stat no longer tells
    os.chmod(big, 0o444)
    proc = project.run("cache", "verify")
    assert proc.returncode == 1 and "corrupt" in proc.stdout
    proc = project.build()
    assert "nothing to do" not in proc.stdout
    assert project.runs("a") == 2
    assert (project.root / "targets/a/big").read_bytes() == b"\0" * 2000000


# -- 11 and 13. a read-only, missing or odd cache is one line, never a traceback ---------------------
def _read_only(project, *args):
    """Run tunemake with .tunecache mounted read-only (a user namespace: no privileges needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    cache = project.root / ".tunecache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = (f'mount --bind -o ro "{cache}" "{cache}" && exec "{sys.executable}" -m tunemake '
           f'-C "{project.root}" "$@"')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd, "sh", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    if "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
        pytest.skip("user namespaces are not available here")
    return proc


def test_a_read_only_cache_serves_no_op_builds_and_status(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo a > $TUNEMAKE_OUT/o"
        [target.b]
        kind = "command"
        cmd = "echo b > $TUNEMAKE_OUT/o"
        """)
    project.build("a")
    proc = _read_only(project, "build", "--plain", "a")
    _no_traceback(proc)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    proc = _read_only(project, "status")
    _no_traceback(proc)
    assert proc.returncode == 0 and "up to date" in proc.stdout and "never built" in proc.stdout
    proc = _read_only(project, "build", "--plain", "b")
    _no_traceback(proc)
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_cache_folder_that_is_a_file(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo a > $TUNEMAKE_OUT/o"
        """)
    (project.root / ".tunecache").write_text("not a folder")
    for args in (["build", "--plain"], ["status"], ["cache", "gc"], ["cache", "verify"]):
        proc = project.run(*args, check=False)
        _no_traceback(proc)
        assert proc.returncode == 2 and "is not a folder" in proc.stderr, args


def test_a_step_that_deletes_the_cache(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo a > $TUNEMAKE_OUT/o"
        [target.wipe]
        kind = "command"
        cmd = "rm -rf .tunecache"
        deps = ["a"]
        """)
    proc = project.build(check=False)
    _no_traceback(proc)
    assert proc.returncode == 1
    assert "failed  wipe  (the step removed its own working folder (did it delete the cache folder?)" \
        in proc.stdout, proc.stdout
    proc = project.build("a")  # the next build starts from an empty cache
    assert project.read("targets/a/o") == "a\n"


# -- 14. a step's own error is one line on the console, the traceback in the log ----------------------
def test_a_built_in_kind_error_at_step_time_is_one_line(project):
    project.write("notamodel/config.json", "{}")
    project.write("tasks/t.yaml", "task: t\n")
    project.tunefile("""
        [target.e]
        kind = "eval"
        model = "notamodel"
        tasks = ["no_such_lm_eval_task_xyz"]
        """)
    proc = project.build(check=False, timeout=300)
    assert proc.returncode == 1
    _no_traceback(proc)
    failed = [line for line in proc.stdout.splitlines() if line.split()[:2] == ["failed", "e"]]
    assert len(failed) == 1 and "no_such_lm_eval_task_xyz" in failed[0], proc.stdout
    assert "│" not in proc.stdout  # no log tail: the one line says it
    log = project.run("log", "e", "--last", check=True).stdout
    assert "Traceback" in log
    status = project.run("status", "e", check=True).stdout
    assert status.count("(") == status.count(")"), status


# -- one decision for build, -n and status --------------------------------------------------------
def test_dry_run_and_status_agree_with_the_build(project):
    project.tunefile(f"""
        [target.a]
        kind = "command"
        cmd = "{counted('a', 'echo a > $TUNEMAKE_OUT/o')}"
        """)
    project.build()
    dry = project.build("-n", "--no-cache")
    assert "would run" in dry.stdout and "up to date" not in dry.stdout
    project.build("--no-cache")
    assert project.runs("a") == 2
    assert "would run" in project.build("-n", "-B", "a").stdout
    assert "up to date" in project.build("-n").stdout


def test_a_dependency_whose_blobs_gc_evicted_is_still_read_right(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "head -c 1500000 /dev/urandom > $TUNEMAKE_OUT/big; echo small > $TUNEMAKE_OUT/s"
        [target.b]
        kind = "command"
        cmd = "cat $TUNEMAKE_DEP_A/big $TUNEMAKE_DEP_A/s > $TUNEMAKE_OUT/o"
        deps = ["a"]
        """)
    project.build("a")
    project.run("cache", "gc", "--max-size", "0", check=True)  # evicts a's entry and blobs; targets/a stays
    project.build("b")
    assert (project.root / "targets/b/o").read_bytes() == (
        (project.root / "targets/a/big").read_bytes() + b"small\n")


def test_an_in_place_edit_that_puts_the_mtime_back_is_still_caught(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big"
        [target.b]
        kind = "command"
        cmd = "f=$TUNEMAKE_DEP_A/big; touch -r $f stamp; chmod u+w $f; printf X | dd of=$f conv=notrunc 2>/dev/null; touch -r stamp $f; echo done > $TUNEMAKE_OUT/o"
        deps = ["a"]
        [target.c]
        kind = "command"
        cmd = "md5sum < $TUNEMAKE_DEP_A/big > $TUNEMAKE_OUT/sum"
        deps = ["a"]
        """)
    project.build("a")
    proc = project.build("b", check=False)
    assert proc.returncode == 1 and "dependency a changed while the step ran" in proc.stdout, proc.stdout
    project.build("c")  # a's damaged blob was found and dropped: c reads the real bytes
    expected = subprocess.run("head -c 2000000 /dev/zero | md5sum", shell=True, capture_output=True,
                              text=True).stdout
    assert project.read("targets/c/sum") == expected


def test_an_edited_hardlinked_output_that_puts_the_mtime_back(project):
    project.tunefile(f"""
        [target.a]
        kind = "command"
        cmd = "{counted('a', 'head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big')}"
        """)
    project.build()
    big = project.root / "targets/a/big"
    st = os.stat(big)
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:
        f.write(b"X")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(big, 0o444)
    # -n and status say what the build will do: run it (the cache entry is damaged), not restore it
    assert "would run" in project.build("-n").stdout
    assert "stale" in project.run("status", check=True).stdout
    project.build()
    assert project.runs("a") == 2
    assert big.read_bytes() == b"\0" * 2000000


def test_an_edited_hardlinked_output_with_a_read_only_cache(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "head -c 2000000 /dev/zero > $TUNEMAKE_OUT/big"
        """)
    project.build()
    big = project.root / "targets/a/big"
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:
        f.write(b"X")
    proc = _read_only(project, "build", "--plain")
    _no_traceback(proc)
    assert proc.returncode == 2 and "not writable" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_code_file_edited_during_its_own_step_is_caught(project):
    project.write("mod.py", "import time\n\ndef make(ctx):\n    (ctx.project_dir / 'started').touch()\n"
                            "    time.sleep(2)\n    (ctx.out / 'o').write_text('v1')\n")
    project.tunefile("""
        [target.py]
        kind = "python"
        function = "mod:make"
        """)
    build = spawn_build(project, "py")
    wait_for(project.root / "started")
    project.write("mod.py", "def make(ctx):\n    (ctx.out / 'o').write_text('v2')\n")
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 1 and "mod.py changed while the step ran" in out, out


def test_a_report_over_paths_inside_a_dependency_is_byte_identical_across_rebuilds(project):
    project.tunefile("""
        [target.evs]
        kind = "command"
        cmd = "mkdir -p $TUNEMAKE_OUT/x && cp ev/* $TUNEMAKE_OUT/x/"
        deps = ["ev"]
        [target.report]
        kind = "report"
        evals = ["evs/x", "ev"]
        """)
    _write_eval(project.root / "ev", 0.5)
    project.build()
    first = project.read("targets/report/report.json")
    assert ".tunecache" not in first and str(project.root) not in first, first
    assert json.loads(first)["rows"][0]["eval"] == "evs/x"
    project.build("-B", "report")
    assert project.read("targets/report/report.json") == first


def test_a_step_importing_a_source_module_does_not_invalidate_its_source(project):
    project.write("src/helper.py", "VALUE = 7\n")
    project.write("show.py", "import sys\nsys.path.insert(0, 'src')\nimport helper\nprint(helper.VALUE)\n")
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "echo run >> runs/t; env -u PYTHONDONTWRITEBYTECODE python3 show.py > $TUNEMAKE_OUT/o"
        deps = ["src", "show.py"]
        """)
    project.build()
    assert (project.root / "src/__pycache__").is_dir()  # Python wrote it into the source folder
    assert project.read("targets/t/o") == "7\n"
    assert "nothing to do" in project.build().stdout and project.runs("t") == 1


# -- siblings found by hostile testing --------------------------------------------------------------
def test_a_relative_project_folder(project):
    project.tunefile('[target.a]\nkind = "command"\ncmd = "echo a > {out}/o"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tunemake", "-C", project.root.name, "build", "--plain"],
                          cwd=project.root.parent, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert project.read("targets/a/o") == "a\n"


def test_a_symlinked_folder_inside_a_source_is_tracked(project):
    project.write("real/f", "hello\n")
    (project.root / "src").mkdir()
    os.symlink("../real", project.root / "src/sub")
    os.symlink("..", project.root / "src/loop")  # a cycle ends
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "cat src/sub/f > {out}/o"
        deps = ["src"]
        """)
    project.build()
    project.write("real/f", "changed\n")
    project.build()
    assert project.read("targets/a/o") == "changed\n"


def test_a_source_edit_that_puts_the_mtime_back_is_seen(project):
    project.write("in.txt", "aaaa\n")
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "cat in.txt > {out}/o"
        deps = ["in.txt"]
        """)
    project.build()
    st = os.stat(project.root / "in.txt")
    time.sleep(0.1)  # past the stat cache's racy window
    project.write("in.txt", "bbbb\n")
    os.utime(project.root / "in.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    project.build()
    assert project.read("targets/a/o") == "bbbb\n"


def test_output_names_the_cache_cannot_hold_fail_the_step_at_once(project):
    project.tunefile("""
        [target.tilde]
        kind = "command"
        cmd = "echo x > {out}/~notes.txt"
        [target.newline]
        kind = "command"
        cmd = 'echo x > "$TUNEMAKE_OUT/$(printf "a\\nb")"'
        """)
    proc = project.build("-k", check=False)
    assert proc.returncode == 1
    assert "failed  newline  (could not collect outputs: unsafe output path" in proc.stdout
    assert project.read("targets/tilde/~notes.txt") == "x\n"
    assert "nothing to do" in project.build("tilde").stdout


def test_an_optional_input_path_that_appears_later_becomes_a_source(project):
    project.write("m/config.json", "{}")
    project.tunefile("""
        [target.e]
        kind = "eval"
        model = "m"
        tasks = ["mytasks"]
        """)
    assert "mytasks" not in project.run("list", check=True).stdout  # an lm-eval task name, for now
    project.write("mytasks/t.yaml", "task: t\n")  # now a local task folder: a source, in the key
    assert "mytasks" in project.run("list", check=True).stdout


def test_a_cache_folder_that_holds_the_users_files_is_refused(project):
    project.write("mystuff/logs/a.log", "mine\n")
    project.write("mystuff/tmp/proj/keep", "mine\n")
    project.tunefile("""
        [cache]
        dir = "mystuff"
        [target.a]
        kind = "command"
        cmd = "echo a > {out}/o"
        """)
    for args in (["build", "--plain"], ["cache", "gc"]):
        proc = project.run(*args, check=False)
        assert proc.returncode == 2 and "already holds other files" in proc.stderr, proc.stderr
    assert project.read("mystuff/logs/a.log") == "mine\n" and project.read("mystuff/tmp/proj/keep") == "mine\n"


def test_cache_subfolders_that_are_files_are_repaired(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo a > {out}/o"
        """)
    project.build()
    shutil.rmtree(project.root / "targets")
    for name in ("cas", "ac", "state", "logs", "tmp"):
        shutil.rmtree(project.root / ".tunecache" / name, ignore_errors=True)
        (project.root / ".tunecache" / name).write_text("junk")
    project.build()
    assert project.read("targets/a/o") == "a\n"
    assert "nothing to do" in project.build().stdout


def test_two_targets_with_the_same_inputs_say_so(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "sleep 0.5; echo same > {out}/o"
        [target.b]
        kind = "command"
        cmd = "sleep 0.5; echo same > {out}/o"
        """)
    proc = project.build("-j", "2")
    assert "waiting for another tunemake" not in proc.stdout
    assert "which has the same inputs" in proc.stdout, proc.stdout
    assert project.read("targets/a/o") == project.read("targets/b/o") == "same\n"


# -- siblings found by a second round of hostile testing ----------------------------------------
def test_a_file_added_to_a_dependency_view_reaches_no_other_step(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo hello > {out}/a.txt"
        [target.evil]
        kind = "command"
        deps = ["a"]
        cmd = "echo INJECTED > {deps.a}/extra.txt; echo ok > {out}/e.txt"
        [target.b]
        kind = "command"
        deps = ["a"]
        cmd = "cat {deps.a}/* > {out}/b.txt"
        """)
    proc = project.build("-k", "evil", "b", check=False)
    assert "failed  evil  (dependency a changed while the step ran" in proc.stdout, proc.stdout
    assert project.read("targets/b/b.txt") == "hello\n"


def test_a_forced_rerun_replaces_the_materialized_output(project):
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "date +%s%N > {out}/t.txt"
        [target.u]
        kind = "command"
        deps = ["t"]
        cmd = "cat {deps.t}/t.txt > {out}/u.txt"
        """)
    project.build()
    before = project.read("targets/t/t.txt")
    project.build("-B", "t", "u")
    after = project.read("targets/t/t.txt")
    assert after != before and project.read("targets/u/u.txt") == after
    state = json.loads(project.read(".tunecache/state/t.json"))
    entry = json.loads(project.read(f".tunecache/ac/{state['key'][:2]}/{state['key']}.json"))
    assert state["tree"] == entry["tree"]
    assert "nothing to do" in project.build().stdout


def _eval_maker(name):
    return (f'[target.{name}]\nkind = "command"\n'
            'cmd = "mkdir -p {out}/sub; cp ev/* {out}/; cp ev/* {out}/sub/"\ndeps = ["ev"]\n')


def test_report_rows_of_evals_with_identical_outputs_keep_their_names(project):
    _write_eval(project.root / "ev", 0.5)
    project.tunefile(_eval_maker("e1") + _eval_maker("e2") + """
        [target.rep]
        kind = "report"
        evals = ["e1", "e2"]
        baseline = "e2"
        [target.sub]
        kind = "report"
        evals = ["e1/sub", "e2/sub"]
        baseline = "e2/sub"
        """)
    project.build()
    for name, evals in (("rep", ["e1", "e2"]), ("sub", ["e1/sub", "e2/sub"])):
        report = json.loads(project.read(f"targets/{name}/report.json"))
        assert [row["eval"] for row in report["rows"]] == evals
        assert report["baseline"] == evals[1]


def test_a_cache_tag_of_another_tool_is_not_ours(project):
    project.write("target/tmp/fixtures/data", "precious\n")
    project.write("target/CACHEDIR.TAG", "Signature: 8a477f597d28d172789f06886806bc55\n# created by cargo.\n")
    project.tunefile("""
        [cache]
        dir = "target"
        [target.a]
        kind = "command"
        cmd = "echo a > {out}/o"
        """)
    for args in (["build", "--plain"], ["cache", "gc"]):
        proc = project.run(*args, check=False)
        assert proc.returncode == 2 and "already holds other files" in proc.stderr, proc.stderr
    assert project.read("target/tmp/fixtures/data") == "precious\n"


def test_a_python_step_interrupted_by_its_own_code_is_one_line(project):
    project.write("mod.py", "def make(ctx):\n    raise KeyboardInterrupt\n")
    project.tunefile("""
        [target.py]
        kind = "python"
        function = "mod:make"
        """)
    proc = project.build(check=False)
    assert proc.returncode == 1
    _no_traceback(proc)
    assert "failed  py  (KeyboardInterrupt (exit status 1" in proc.stdout, proc.stdout


# -- siblings found by a third review ---------------------------------------------------------------
def test_a_file_a_step_adds_to_its_view_and_removes_again_reaches_no_other_step(project):
    project.tunefile("""
        [target.dep]
        kind = "command"
        cmd = "echo f > {out}/f"
        [target.s1]
        kind = "command"
        deps = ["dep"]
        cmd = "touch {deps.dep}/extra; touch s1-started; sleep 1; rm {deps.dep}/extra; echo ok > {out}/o"
        [target.s2]
        kind = "command"
        deps = ["dep"]
        cmd = "while [ ! -e s1-started ]; do sleep 0.02; done; ls {deps.dep} > {out}/o"
        """)
    proc = project.build("-k", "-j", "2", "s1", "s2", check=False)
    assert "nothing" not in proc.stdout
    if (project.root / "targets/s2/o").exists():
        assert project.read("targets/s2/o") == "f\n", proc.stdout  # never `extra`
    assert "failed  s1  (dependency dep changed while the step ran" in proc.stdout, proc.stdout


def test_a_view_made_after_an_in_place_edit_of_the_blob_is_refused(project):
    project.tunefile("""
        [target.dep]
        kind = "command"
        cmd = "head -c 1500000 /dev/zero > {out}/big"
        [target.s1]
        kind = "command"
        deps = ["dep"]
        cmd = "f={deps.dep}/big; chmod u+w $f; printf DIRTY | dd of=$f conv=notrunc 2>/dev/null; echo > {out}/o"
        [target.s2]
        kind = "command"
        deps = ["dep", "s1"]
        cmd = "head -c 5 {deps.dep}/big | od -c > {out}/o"
        """)
    project.build("-k", check=False)
    if (project.root / "targets/s2/o").exists():
        assert "D   I   R" not in project.read("targets/s2/o")
    project.write("tunefile.toml", project.read("tunefile.toml").replace(
        "chmod u+w $f; printf DIRTY | dd of=$f conv=notrunc 2>/dev/null; ", ""))
    project.build()
    assert "D   I   R" not in project.read("targets/s2/o")
    assert (project.root / "targets/dep/big").read_bytes() == b"\0" * 1500000


def test_no_folder_above_a_view_or_an_output_changes_mode(project):
    project.tunefile("""
        [target.dep]
        kind = "command"
        cmd = "mkdir -p {out}/a/b && echo x > {out}/a/b/f"
        [target.use]
        kind = "command"
        deps = ["dep"]
        cmd = "cat {deps.dep}/a/b/f > {out}/o"
        """)
    ancestors = [project.root, *project.root.parents]
    before = {p: os.stat(p).st_mode for p in ancestors}
    project.build()
    assert project.read("targets/use/o") == "x\n"
    assert {p: os.stat(p).st_mode for p in ancestors} == before
    assert os.stat(project.root / ".tunecache").st_mode & 0o200 and os.stat(project.root / ".tunecache/tmp").st_mode & 0o200
