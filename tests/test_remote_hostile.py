"""A hostile remote cache and a damaged local one: at most a warning and a rebuild, never a crash,
a traceback, a wrong output, or a file written outside targets/NAME."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from engine_helpers import Project, counted
from tunemake.hashing import tree_digest

PIPELINE = f"""
[target.a]
kind = "command"
cmd = "{counted('a', 'printf hello > $TUNEMAKE_OUT/x.txt')}"

[target.b]
kind = "command"
cmd = "{counted('b', 'cat $TUNEMAKE_DEP_A/x.txt > $TUNEMAKE_OUT/y.txt')}"
deps = ["a"]
"""

BIG = f"""
[cache]
link = "hardlink"

[target.big]
kind = "command"
cmd = "{counted('big', 'head -c 1500000 /dev/zero > $TUNEMAKE_OUT/w.bin')}"

[target.small]
kind = "command"
cmd = "{counted('small', 'printf small > $TUNEMAKE_OUT/s.txt')}"
"""


def clone(tmp_path: Path, name: str, tunefile: str = PIPELINE) -> Project:
    root = tmp_path / name
    (root / "runs").mkdir(parents=True)
    p = Project(root)
    p.tunefile(tunefile)
    return p


def entry_path(cache: Path, target: str) -> Path:
    """The action entry of `target` in a cache folder (local .tunecache or the remote)."""
    for path in (cache / "ac").glob("*/*.json"):
        if json.loads(path.read_text())["target"] == target:
            return path
    raise AssertionError(f"no action entry for {target} in {cache}")


def state(p: Project, target: str) -> dict:
    return json.loads((p.root / ".tunecache/state" / f"{target}.json").read_text())


def blob(cache: Path, p: Project, target: str, rel: str) -> Path:
    digest = state(p, target)["outputs"][rel]["digest"]
    return cache / "cas" / digest[:2] / digest


def assert_clean(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr


def project_files(p: Project) -> set[str]:
    """Everything in the project outside tunemake's cache and the run counters."""
    return {str(f.relative_to(p.root)) for f in p.root.rglob("*")
            if not f.is_dir() and f.relative_to(p.root).parts[0] not in (".tunecache", "runs")}


# -- 1. a hostile remote entry whose digests are all valid -------------------------------------
def extra_output(name: str):
    def mutate(entry: dict) -> None:
        entry["outputs"][name] = dict(entry["outputs"]["x.txt"])
        entry["tree"] = tree_digest(entry["outputs"])
    return mutate


def field(name: str, value):
    def mutate(entry: dict) -> None:
        entry[name] = value
    return mutate


def output_field(name: str, value):
    def mutate(entry: dict) -> None:
        entry["outputs"]["x.txt"][name] = value
        entry["tree"] = tree_digest(entry["outputs"])
    return mutate


def no_tree(entry: dict) -> None:
    del entry["tree"]


def deep_components(entry: dict) -> str:
    depth = 100_000
    return json.dumps({**entry, "components": "@"}).replace('"@"', "[" * depth + "]" * depth)


HOSTILE = {
    "300-character name": extra_output("n" * 300),
    "lone surrogate": extra_output("bad\udc80.txt"),
    "DEL": extra_output("bad\x7f.txt"),
    "NEL": extra_output("bad\x85.txt"),
    "finished yesterday": field("finished", "yesterday"),
    "duration NaN": field("duration", float("nan")),
    "host a list": field("host", ["x"]),
    "size true": output_field("size", True),
    "x yes": output_field("x", "yes"),
    "outputs a list": field("outputs", []),  # refused before records.py too: kept as a guard
    "no tree": no_tree,  # likewise
    "components nested 100,000 deep": deep_components,
}


@pytest.mark.parametrize("mutate", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_remote_entry_is_a_warning_and_a_rebuild(tmp_path, mutate):
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    clone(tmp_path, "a").build("--remote", url)
    path = entry_path(remote, "a")
    entry = json.loads(path.read_text())
    text = mutate(entry)
    path.write_text(text if isinstance(text, str) else json.dumps(entry))

    b = clone(tmp_path, "b")
    assert_clean(b.run("status", "--remote", url))
    proc = b.build("--remote", url)
    assert_clean(proc)
    assert "warning: remote cache" in proc.stdout + proc.stderr
    assert b.runs("a") == 1  # rebuilt, not served
    assert project_files(b) == {"tunefile.toml", "targets/a/x.txt", "targets/b/y.txt"}
    assert b.read("targets/b/y.txt") == "hello"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "remote"]
    again = b.build("--remote", url)  # the entry never reached the local cache: no repeated crash
    assert "nothing to do" in again.stdout and b.runs("a") == 1


def test_a_remote_entry_that_cannot_be_materialized_here_is_not_recorded_locally(tmp_path, capsys):
    """A valid name this filesystem refuses (as vfat refuses ':') is a warning and a rebuild."""
    from tunemake import tunefile
    from tunemake.build import Engine, Options
    from tunemake.progress import PlainReporter
    from tunemake.remote import Remote

    remote = tmp_path / "remote"
    clone(tmp_path, "a").build("--remote", f"file://{remote}")
    path = entry_path(remote, "a")
    entry = json.loads(path.read_text())
    extra_output("a:b.txt")(entry)
    path.write_text(json.dumps(entry))

    b = clone(tmp_path, "b")
    engine = Engine(tunefile.load(b.root / "tunefile.toml"), Remote(f"file://{remote}"))
    materialize = engine.store.materialize

    def like_vfat(manifest, dest):
        if any(":" in rel for rel in manifest):
            raise OSError(errno.EINVAL, "Invalid argument")
        return materialize(manifest, dest)

    engine.store.materialize = like_vfat
    try:
        outcome = engine.build(["b"], Options(), PlainReporter())
    finally:
        engine.close()
    assert outcome.status == {"a": "done", "b": "cached"}
    assert "cannot be restored here" in capsys.readouterr().out
    assert b.runs("a") == 1 and b.read("targets/b/y.txt") == "hello"
    assert "a:b.txt" not in json.loads(entry_path(b.root / ".tunecache", "a").read_text())["outputs"]


# -- 2. valid JSON of the wrong shape in the local cache ----------------------------------------
def damage_actions(p: Project) -> None:
    shutil.rmtree(p.root / "targets")
    entry_path(p.root / ".tunecache", "a").write_text(json.dumps({"outputs": {"a": 5}, "tree": "x"}))
    entry_path(p.root / ".tunecache", "b").write_text("[]")


def damage_action_fields(p: Project) -> None:
    shutil.rmtree(p.root / "targets")
    path = entry_path(p.root / ".tunecache", "a")
    entry = json.loads(path.read_text())
    extra_output("../../escaped.txt")(entry)
    path.write_text(json.dumps({**entry, "finished": "yesterday"}))


def damage_states(p: Project) -> None:
    states = p.root / ".tunecache/state"
    (states / "a.json").write_text(json.dumps({"key": state(p, "a")["key"], "tree": [], "outputs": {"x.txt": 5},
                                               "materialized": {"x.txt": [1, 2, 3, "link"]}}))
    (states / "b.json").write_text(json.dumps({"key": 3, "tree": [], "outputs": {}, "materialized": {}}))


def damage_failure(p: Project) -> None:
    key = state(p, "a")["key"]
    shutil.rmtree(p.root / "targets")
    shutil.rmtree(p.root / ".tunecache/ac")
    p.write(".tunecache/failed/a.json", json.dumps({"key": key, "detail": "bad\udc80", "finished": "yesterday"}))


def unused_shard(p: Project) -> str:
    used = {d.name for d in (p.root / ".tunecache/cas").iterdir()}
    return next(s for s in (f"{i:02x}" for i in range(256)) if s not in used)


def damage_cas_shard(p: Project) -> None:
    p.write(f".tunecache/cas/{unused_shard(p)}", "a file where a shard folder should be")


def damage_cas_blob(p: Project) -> None:
    shard = unused_shard(p)
    (p.root / ".tunecache/cas" / shard / (shard + "0" * 62)).mkdir(parents=True)


DAMAGE = {"action entries": damage_actions, "action fields": damage_action_fields, "state files": damage_states,
          "failure record": damage_failure, "cas shard": damage_cas_shard, "cas blob": damage_cas_blob}
COMMANDS = {"build": ("build", "--plain"), "status": ("status",), "verify": ("cache", "verify"),
            "gc": ("cache", "gc")}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_local_cache_is_a_miss_for_every_command(tmp_path, damage):
    problems = []
    for name, command in COMMANDS.items():
        p = clone(tmp_path, name)
        p.build()
        damage(p)
        proc = p.run(*command)
        if "Traceback" in proc.stderr or proc.returncode not in (0, 1):
            problems.append(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            continue
        p.build()
        if (p.read("targets/a/x.txt"), p.read("targets/b/y.txt")) != ("hello", "hello"):
            problems.append(f"{name}: wrong outputs after the next build")
        if project_files(p) != {"tunefile.toml", "targets/a/x.txt", "targets/b/y.txt"}:
            problems.append(f"{name}: files written outside targets/NAME: {sorted(project_files(p))}")
    assert not problems, "\n".join(problems)
    assert sorted(os.listdir(tmp_path)) == sorted(COMMANDS)


# -- 3. `cache push` re-hashes blobs; a damaged remote blob is repaired --------------------------
def test_push_never_uploads_an_output_edited_in_place_through_its_hardlink(tmp_path):
    remote = tmp_path / "remote"
    p = clone(tmp_path, "p", BIG)
    p.build()
    w = p.root / "targets/big/w.bin"
    assert w.stat().st_nlink > 1  # the output is the blob
    os.chmod(w, 0o644)
    with open(w, "r+b") as f:
        f.write(b"EDITED")
    proc = p.run("cache", "push", "--remote", f"file://{remote}")
    assert_clean(proc)
    assert proc.returncode == 0
    assert "big:" in proc.stdout and "pushed 1 target" in proc.stdout
    assert not blob(remote, p, "big", "w.bin").exists()
    assert not (remote / "ac").exists() or all(json.loads(f.read_text())["target"] != "big"
                                               for f in (remote / "ac").glob("*/*.json"))
    p.build()  # the edited output was not silently kept: redone
    assert p.runs("big") == 2 and w.read_bytes() == bytes(1500000)


def test_a_corrupt_remote_blob_is_repaired_by_the_process_that_rebuilt_it(tmp_path):
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    a = clone(tmp_path, "a", BIG)
    a.build("--remote", url)
    damaged = blob(remote, a, "big", "w.bin")
    damaged.write_bytes(b"X" + damaged.read_bytes()[1:])  # same size: only a re-hash can tell
    b = clone(tmp_path, "b", BIG)
    proc = b.build("--remote", url)
    assert "failed verification" in proc.stdout + proc.stderr
    assert b.runs("big") == 1
    c = clone(tmp_path, "c", BIG)
    c.build("--remote", url)
    assert c.runs("big") == 0
    assert (c.root / "targets/big/w.bin").read_bytes() == bytes(1500000)


def test_push_replaces_a_remote_blob_of_the_wrong_size(tmp_path):
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    a = clone(tmp_path, "a", BIG)
    a.build("--remote", url)
    damaged = blob(remote, a, "big", "w.bin")
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert "pushed 2 targets (1 new blobs)" in a.run("cache", "push", "--remote", url, check=True).stdout
    c = clone(tmp_path, "c", BIG)
    c.build("--remote", url)
    assert c.runs("big") == 0
    assert (c.root / "targets/big/w.bin").read_bytes() == bytes(1500000)


def test_a_fifo_in_a_shared_folder_remote_is_a_warning_not_a_hang(tmp_path):
    remote = tmp_path / "remote"
    a = clone(tmp_path, "a")
    a.build("--remote", remote.as_uri())
    entry = entry_path(remote, "a")
    entry.unlink()
    os.mkfifo(entry)
    b = clone(tmp_path, "b")
    proc = b.build("--remote", remote.as_uri(), timeout=60)  # never blocks reading the FIFO
    assert_clean(proc)
    assert b.read("targets/b/y.txt") == "hello"
