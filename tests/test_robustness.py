"""kill -9, concurrent builds, and looking after the cache (gc, verify)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from engine_helpers import counted, spawn_build, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_9_then_alive(build, pid_file) -> bool:
    """kill -9 tunemake; is the step's child (its pid in pid_file) still alive 10 s later?"""
    sleeper = int(pid_file.read_text())
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    deadline = time.monotonic() + 10
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(sleeper)


def test_kill_9_leaves_no_partial_entry_and_no_orphans(project):
    project.tunefile(f"""
        [target.slow]
        kind = "command"
        cmd = "{counted('slow', 'echo partial > $TUNEMAKE_OUT/out.txt; sleep 300 & echo $! > pids/sleeper; wait')}"
        """)
    (project.root / "pids").mkdir()
    build = spawn_build(project)
    wait_for(project.root / "pids/sleeper")
    assert _alive(int((project.root / "pids/sleeper").read_text()))
    assert not _kill_9_then_alive(build, project.root / "pids/sleeper"), "the step's children outlived tunemake"
    assert not list((project.root / ".tunecache/ac").glob("*/*.json")) if (project.root / ".tunecache/ac").exists() else True
    assert not (project.root / "targets/slow").exists()

    # the next build redoes the step cleanly and sweeps the dead build's working folder
    project.tunefile(f"""
        [target.slow]
        kind = "command"
        cmd = "{counted('slow', 'echo whole > $TUNEMAKE_OUT/out.txt')}"
        """)
    project.build()
    assert project.read("targets/slow/out.txt") == "whole\n"
    assert project.runs("slow") == 2
    assert list((project.root / ".tunecache/tmp").iterdir()) == []


def test_two_concurrent_builds_run_each_step_once(project):
    project.tunefile(f"""
        [target.a]
        kind = "command"
        cmd = "{counted('a', 'sleep 1.5; echo a > $TUNEMAKE_OUT/a')}"
        [target.b]
        kind = "command"
        cmd = "{counted('b', 'cat $TUNEMAKE_DEP_A/a > $TUNEMAKE_OUT/b')}"
        deps = ["a"]
        """)
    first = spawn_build(project)
    wait_for(project.root / "runs/a")
    second = spawn_build(project)
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0, out1
    assert second.returncode == 0, out2
    assert project.runs("a") == 1 and project.runs("b") == 1
    assert "waiting" in out2 and "another tunemake" in out2
    assert project.read("targets/b/b") == "a\n"
    assert project.run("cache", "verify").returncode == 0


def test_verify_catches_a_corrupt_blob_and_the_target_is_rebuilt(project):
    project.tunefile(f"""
        [target.t]
        kind = "command"
        cmd = "{counted('t', 'echo precious > $TUNEMAKE_OUT/x.txt')}"
        """)
    project.build()
    entry = json.loads(next((project.root / ".tunecache/ac").glob("*/*.json")).read_text())
    digest = entry["outputs"]["x.txt"]["digest"]
    blob = project.root / ".tunecache/cas" / digest[:2] / digest
    os.chmod(blob, 0o644)
    blob.write_text("tampered\n")
    proc = project.run("cache", "verify")
    assert proc.returncode == 1
    assert f"corrupt blob {digest[:16]}" in proc.stdout
    assert not blob.exists()
    project.run("clean", check=True)
    project.build()
    assert project.read("targets/t/x.txt") == "precious\n"
    assert project.runs("t") == 2
    assert project.run("cache", "verify").returncode == 0


def test_gc_evicts_unneeded_entries_first(project):
    for value in ("one", "two"):
        project.tunefile(f"""
            [target.big]
            kind = "command"
            cmd = "head -c 300000 /dev/urandom > $TUNEMAKE_OUT/{value}.bin"
            """)
        project.build()
    # the current tunefile needs "two"; "one" is only a leftover
    listing = project.run("cache", "ls", check=True).stdout
    assert "2 entries" in listing
    proc = project.run("cache", "gc", "--max-size", "400KB", check=True)
    assert "evicted" in proc.stdout
    assert "1 entries" in project.run("cache", "ls", check=True).stdout
    project.run("clean", check=True)
    out = project.build().stdout
    assert "restored from cache" in out  # the needed entry survived
    assert (project.root / "targets/big/two.bin").stat().st_size == 300000
    # a limit below what the tunefile needs evicts that too
    project.run("cache", "gc", "--max-size", "1KB", check=True)
    assert "0 entries" in project.run("cache", "ls", check=True).stdout


def test_gc_without_limit_removes_unreferenced_blobs_only(project):
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "echo keep > $TUNEMAKE_OUT/x"
        """)
    project.build()
    stray = project.root / ".tunecache/cas/ff" / ("f" * 64)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("nobody needs me")
    out = project.run("cache", "gc", check=True).stdout
    assert "removed 1 blobs" in out
    assert not stray.exists()
    project.run("clean", check=True)
    assert "restored from cache" in project.build().stdout


def test_forced_rebuild_repairs_a_blob_damaged_through_a_hardlink(project):
    project.tunefile("""
        [cache]
        link = "hardlink"
        [target.a]
        kind = "command"
        cmd = "echo fresh > $TUNEMAKE_OUT/x"
        [target.b]
        kind = "command"
        cmd = "cat {deps.a}/x > $TUNEMAKE_OUT/y"
        deps = ["a"]
        """)
    project.build("a")
    x = project.root / "targets/a/x"
    os.chmod(x, 0o644)
    with open(x, "a") as f:
        f.write("EDITED\n")
    project.build("-B", "a")
    project.build()
    assert project.read("targets/a/x") == "fresh\n"
    assert project.read("targets/b/y") == "fresh\n"
    assert project.run("cache", "verify").returncode == 0


def test_background_child_of_a_step_cannot_write_into_the_cache(project):
    project.tunefile("""
        [target.bg]
        kind = "command"
        cmd = "exec 3>$TUNEMAKE_OUT/x; echo first >&3; (sleep 1; echo LATE >&3) &"
        """)
    project.build()
    time.sleep(1.5)
    assert project.read("targets/bg/x") == "first\n"
    assert project.run("cache", "verify").returncode == 0


def test_output_hardlinked_to_a_source_does_not_tie_the_source_to_the_cache(project):
    src = project.write("data.txt", "v1\n")
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "ln data.txt $TUNEMAKE_OUT/copy.txt"
        deps = ["data.txt"]
        """)
    project.build()
    assert os.access(src, os.W_OK) and (src.stat().st_mode & 0o200)
    assert src.stat().st_nlink == 1
    src.write_text("v2\n")
    assert project.run("cache", "verify").returncode == 0


def test_executable_bit_survives_shared_blobs(project):
    project.tunefile("""
        [target.plain]
        kind = "command"
        cmd = "head -c 1200000 /dev/zero > $TUNEMAKE_OUT/f"
        [target.exe]
        kind = "command"
        cmd = "head -c 1200000 /dev/zero > $TUNEMAKE_OUT/f; chmod +x $TUNEMAKE_OUT/f"
        """)
    project.build()
    assert os.stat(project.root / "targets/exe/f").st_mode & 0o100
    assert not os.stat(project.root / "targets/plain/f").st_mode & 0o100


def test_files_added_to_a_materialized_output_are_not_fed_to_dependents(project):
    project.tunefile("""
        [target.a]
        kind = "command"
        cmd = "echo a > $TUNEMAKE_OUT/a"
        [target.b]
        kind = "command"
        cmd = "ls {deps.a} > $TUNEMAKE_OUT/listing"
        deps = ["a"]
        """)
    project.build("a")
    (project.root / "targets/a/extra").write_text("junk")
    project.build()
    assert project.read("targets/b/listing") == "a\n"
    assert not (project.root / "targets/a/extra").exists()


def test_repointed_symlink_source_rebuilds(project):
    project.write("v1/f.txt", "one\n")
    project.write("v2/f.txt", "two\n")
    os.symlink("v1", project.root / "data")
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "cat data/f.txt > $TUNEMAKE_OUT/f"
        deps = ["data"]
        """)
    project.build()
    os.unlink(project.root / "data")
    os.symlink("v2", project.root / "data")
    project.build()
    assert project.read("targets/t/f") == "two\n"


def test_project_folder_as_a_source_reaches_up_to_date(project):
    project.write("input.txt", "x\n")
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "ls input.txt > $TUNEMAKE_OUT/f"
        deps = ["."]
        """)
    project.build()
    assert "nothing to do" in project.build().stdout


def test_special_files_as_sources_are_clear_errors(project):
    os.mkfifo(project.root / "pipe")
    os.symlink("nowhere", project.root / "dangling")
    for dep, words in (("pipe", "not a regular file or folder"), ("dangling", "broken symlink")):
        project.tunefile(f'[target.t]\nkind = "command"\ncmd = "true"\ndeps = ["{dep}"]\n')
        proc = project.run("build", check=False, timeout=30)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    (project.root / "pipe").unlink()
    project.write("folder/ok.txt", "x")
    os.mkfifo(project.root / "folder/pipe")
    project.tunefile('[target.t]\nkind = "command"\ncmd = "true"\ndeps = ["folder"]\n')
    proc = project.run("build", check=False, timeout=30)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


def test_stale_working_folders_are_judged_by_their_owner_lock_not_the_pid(project):
    # A pid that does not exist here may be a live build in another PID namespace sharing the
    # cache: its folders stay while its owner lock is held, and go once the lock is free.
    project.tunefile('[target.t]\nkind = "command"\ncmd = "echo t > $TUNEMAKE_OUT/t"\n')
    token = "999999999x0123abcd"
    tmp = project.root / ".tunecache/tmp" / f"{token}-t-deadbeef"
    staging = project.root / "targets" / f".t.tmp-{token}-abc123"
    for folder in (tmp, staging):
        folder.mkdir(parents=True)
    lock = project.root / ".tunecache/locks" / f"owner-{token}"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        project.build()
        assert tmp.is_dir() and staging.is_dir()
    finally:
        holder.kill()
        holder.wait()
    stray = lock.with_name("owner-888888888x89abcdef")  # a dead owner that left no folder
    stray.write_text("")
    foreign = project.root / "targets" / ".t.tmp-777777777x89abcdef-abc123"  # owner uses another cache
    foreign.mkdir()
    project.build()
    assert not tmp.exists() and not staging.exists() and not lock.exists() and not stray.exists()
    assert foreign.is_dir()
    assert project.read("targets/t/t") == "t\n"


def test_a_symlinked_folder_in_the_outputs_is_refused_and_nothing_is_moved(project):
    (project.root / "data").mkdir()
    (project.root / "data/keep.txt").write_text("mine\n")
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "ln -s $PWD/data $TUNEMAKE_OUT/data; echo x > $TUNEMAKE_OUT/x"
        """)
    proc = project.build(check=False)
    assert proc.returncode == 1
    assert "output data is a symlink to a folder" in proc.stdout
    assert project.read("data/keep.txt") == "mine\n"
    assert not (project.root / "targets/t").exists()


def test_a_concurrent_build_with_other_settings_cannot_reach_a_running_step(project):
    project.tunefile("""
        [target.d]
        kind = "command"
        cmd = "echo one > $TUNEMAKE_OUT/v"
        [target.e]
        kind = "command"
        cmd = "touch started; sleep 2; cat $TUNEMAKE_DEP_D/v > $TUNEMAKE_OUT/v"
        deps = ["d"]
        """)
    first = spawn_build(project, "e")
    wait_for(project.root / "started")
    project.build("--set", "d.cmd=echo two > $TUNEMAKE_OUT/v", "d")  # swaps targets/d under e
    out, _ = first.communicate(timeout=60)
    # e reads its private, read-only view of d: both builds succeed, each with its own d
    assert first.returncode == 0, out
    assert project.read("targets/e/v") == "one\n"
    assert project.read("targets/d/v") == "two\n"
    assert "nothing to do" not in project.build("e").stdout  # d back to "one": e is up to date with it
    assert project.read("targets/e/v") == "one\n" and project.read("targets/d/v") == "one\n"


def test_a_step_that_signals_its_own_group_still_dies_with_tunemake(project):
    project.tunefile("""
        [target.t]
        kind = "command"
        cmd = "trap '' TERM; kill 0; sleep 300 & echo $! > pids/sleeper; wait"
        """)
    (project.root / "pids").mkdir()
    build = spawn_build(project)
    wait_for(project.root / "pids/sleeper")
    assert not _kill_9_then_alive(build, project.root / "pids/sleeper"), "`kill 0` in the step disarmed the guard"
