"""Eval at scale (#13) through the CLI: request-level answers shared by every eval of the same
weights and nothing else, resume after kill -9, shared-prefix scoring, batch-size invariance,
and the answers' place under `cache gc` and `cache verify`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import Project, spawn_build

sys.path.insert(0, str(Path(__file__).parent / "kinds"))
from helpers import WORDS, make_random_model  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_mc_task(folder: Path, name: str, docs: int, seed: int = 1) -> None:
    """4 choices of 1-4 words after a question of 6-14 words: multi-token continuations."""
    rng = random.Random(seed)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "?",
             "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {name}.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def eval_target(name: str, model: str = "model", tasks: str = '["tasks/mc.yaml"]', **params) -> str:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in params.items())
    return f'[target.{name}]\nkind = "eval"\nmodel = "{model}"\ntasks = {tasks}\n{extra}\n'


def answer_counts(project: Project, target: str) -> tuple[int, int]:
    """(restored, computed) units, from the step log's run record."""
    log = project.run("log", target, check=True).stdout
    found = re.search(r'"restored_units": (\d+),\s*"computed_units": (\d+)', log)
    assert found, log
    return int(found.group(1)), int(found.group(2))


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Project:
    project = Project(tmp_path / "p q $(x)")  # odd characters in the path on purpose
    make_random_model(project.root / "model")
    write_mc_task(project.root / "tasks", "mc", docs=40)
    write_mc_task(project.root / "tasks", "mc2", docs=12, seed=2)
    return project


def test_evals_of_one_checkpoint_share_answers_and_never_across_weights(project):
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(project.root / "model", project.root / "model2")
    weights = load_file(project.root / "model2" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][3, 5] = torch.nextafter(weights[name][3, 5], torch.tensor(1e9))  # one weight, one ulp
    save_file(weights, project.root / "model2" / "model.safetensors", metadata={"format": "pt"})
    project.tunefile(eval_target("a", limit=20) + eval_target("b", limit=20, batch_size=1, num_fewshot=0)
                     + eval_target("other", model="model2", limit=20))
    project.build("a", env=OFFLINE, timeout=300)
    assert answer_counts(project, "a") == (0, 20)
    project.build("b", env=OFFLINE, timeout=300)
    assert answer_counts(project, "b") == (20, 0)  # another target, another key, the same answers
    a, b = outputs(project.root / "targets" / "a"), outputs(project.root / "targets" / "b")
    assert a["samples/mc.jsonl"] == b["samples/mc.jsonl"]
    assert json.loads(a["results.json"])["results"] == json.loads(b["results.json"])["results"]
    project.build("other", env=OFFLINE, timeout=300)
    assert answer_counts(project, "other") == (0, 20)  # one ulp of one weight: nothing shared

    # served or computed, the same bytes: rebuild `a` with its whole result evicted, answers kept
    project.build("--no-cache", "a", env=OFFLINE, timeout=300)
    assert answer_counts(project, "a") == (20, 0)
    assert outputs(project.root / "targets" / "a") == a
    # and computed afresh in another cache folder
    fresh = Project(project.root.parent / "fresh")
    shutil.copytree(project.root / "model", fresh.root / "model")
    shutil.copytree(project.root / "tasks", fresh.root / "tasks")
    fresh.tunefile(eval_target("a", limit=20))
    fresh.build(env=OFFLINE, timeout=300)
    assert outputs(fresh.root / "targets" / "a") == a


def test_raising_limit_or_adding_a_task_scores_only_the_new_requests(project):
    project.tunefile(eval_target("e", limit=20))
    project.build(env=OFFLINE, timeout=300)
    project.tunefile(eval_target("e", limit=40))
    project.build(env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (20, 20)
    project.tunefile(eval_target("e", limit=40, tasks='["tasks/mc.yaml", "tasks/mc2.yaml"]'))
    project.build(env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (40, 12)
    samples = [json.loads(line) for line in project.read("targets/e/samples/mc.jsonl").splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(40))
    # compact per-sample log: lm-eval's own fields, the prompt once, no copy of the document
    first = samples[0]
    assert {"doc_id", "acc", "acc_norm", "doc_hash", "prompt", "continuations", "filtered_resps", "target"} <= set(first)
    assert "doc" not in first and "arguments" not in first and "resps" not in first
    assert len(first["continuations"]) == len(first["filtered_resps"]) == 4


def test_kill_9_mid_eval_then_build_resumes_to_identical_results(project):
    from tunemake.request_cache import stats

    write_mc_task(project.root / "tasks", "big", docs=400, seed=3)
    project.tunefile(eval_target("e", tasks='["tasks/big.yaml"]'))
    proc = spawn_build(project, "e")
    answers = project.root / ".tunecache" / "requests"
    deadline = time.monotonic() + 240
    while stats(answers)[0] < 40:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no answers were stored"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = stats(answers)[0]
    assert 40 <= saved < 400
    project.build(env=OFFLINE, timeout=600)
    restored, computed = answer_counts(project, "e")
    assert restored >= saved - 1 and restored + computed == 400  # a write under way at the kill may be lost
    resumed = outputs(project.root / "targets" / "e")

    fresh = Project(project.root.parent / "fresh")
    shutil.copytree(project.root / "model", fresh.root / "model")
    shutil.copytree(project.root / "tasks", fresh.root / "tasks")
    fresh.tunefile(eval_target("e", tasks='["tasks/big.yaml"]'))
    fresh.build(env=OFFLINE, timeout=600)
    assert outputs(fresh.root / "targets" / "e") == resumed


def test_request_answers_live_under_cache_gc_and_verify(project):
    project.tunefile(eval_target("e", limit=12))
    project.build(env=OFFLINE, timeout=300)
    before = outputs(project.root / "targets" / "e")
    listing = project.run("cache", "ls", check=True).stdout
    assert "request-level eval answers: 12 units" in listing

    # a flipped answer under its key: verify drops it, the next eval recomputes just that one
    database = project.root / ".tunecache" / "requests" / "cache.db"
    with sqlite3.connect(database) as db:
        (rowid, value), *_ = db.execute("SELECT rowid, value FROM Cache ORDER BY rowid").fetchall()
        db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (value.replace("-", "-1", 1), rowid))
    verified = project.run("cache", "verify")
    assert verified.returncode == 1 and "12 request-level eval answers: 1 corrupt (removed)" in verified.stdout
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (11, 1)
    assert outputs(project.root / "targets" / "e") == before

    # a budget that holds the outputs but not the answers evicts the answers first
    blobs = sum(p.stat().st_size for p in (project.root / ".tunecache" / "cas").rglob("*") if p.is_file())
    gc = project.run("cache", "gc", "--max-size", str(blobs + 1000), check=True).stdout
    assert "evicted 12 request-level eval answers" in gc
    assert "up to date" in project.build(env=OFFLINE).stdout  # the eval's own result was kept
    assert "request-level" not in project.run("cache", "ls", check=True).stdout

    # a database that is garbage: the eval still runs (computing), verify removes it
    database.parent.mkdir()
    database.write_bytes(b"not a database" * 100)
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (0, 12)
    assert outputs(project.root / "targets" / "e") == before
    verified = project.run("cache", "verify")
    assert "removed the request-level eval answers" in verified.stdout and verified.returncode == 1
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (0, 12)  # a fresh database, filled again


def test_a_request_cache_that_will_not_open_computes_everything(project):
    """(A read-only folder would be the natural case, but tests run as root here, where chmod
    blocks nothing: a folder where the database file should be fails to open for anyone.)"""
    project.tunefile(eval_target("e", limit=6))
    project.build(env=OFFLINE, timeout=300)
    before = outputs(project.root / "targets" / "e")
    answers = project.root / ".tunecache" / "requests"
    shutil.rmtree(answers)
    (answers / "cache.db").mkdir(parents=True)
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (0, 6)
    assert "request cache" in project.run("log", "e", check=True).stdout  # the one line saying why
    assert outputs(project.root / "targets" / "e") == before


def write_sampled_task(folder: Path, repeats: int) -> None:
    """Free generation sampled at temperature 1, each document `repeats` times (maj@k-style)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gen.jsonl").write_text("".join(json.dumps({"q": f"Is {w} hot?", "a": "yes"}) + "\n"
                                              for w in ("fire", "ice", "sand")))
    (folder / "sampled.yaml").write_text(
        "task: sampled\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: gen.jsonl\n"
        f"test_split: test\noutput_type: generate_until\nrepeats: {repeats}\n"
        "doc_to_text: \"{{q}} Answer:\"\ndoc_to_target: a\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: true\n  temperature: 1.0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_sampled_repeats_are_independent_samples_and_cached_as_such(project, batch_size):
    write_sampled_task(project.root / "tasks", repeats=4)
    project.tunefile(eval_target("e", tasks='["tasks/sampled.yaml"]', batch_size=batch_size))
    project.build(env=OFFLINE, timeout=300)
    first = outputs(project.root / "targets" / "e")
    samples = [json.loads(line) for line in first["samples/sampled.jsonl"].decode().splitlines()]
    for sample in samples:
        texts = sample["resps"][0] if "resps" in sample else None
        assert texts is not None and len(texts) == 4
        assert len(set(texts)) > 1, texts  # four draws, not one draw four times
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e")[1] == 0  # every batch restored ...
    assert outputs(project.root / "targets" / "e") == first  # ... to the same bytes


def test_tasks_sharing_contexts_keep_their_own_units(project):
    """Two tasks asking the same questions with other choices: adding the second restores every
    answer of the first, and the first's samples are the same bytes with or without it."""
    rows = [json.loads(line) for line in (project.root / "tasks" / "mc.jsonl").read_text().splitlines()]
    for row in rows:
        row["choices"] = [choice + " too" for choice in row["choices"]]
    (project.root / "tasks" / "mc_other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project.root / "tasks" / "mc_other.yaml").write_text(
        (project.root / "tasks" / "mc.yaml").read_text().replace("task: mc", "task: mc_other")
        .replace("mc.jsonl", "mc_other.jsonl"))
    project.tunefile(eval_target("e", limit=10))
    project.build(env=OFFLINE, timeout=300)
    alone = project.read("targets/e/samples/mc.jsonl")
    project.tunefile(eval_target("e", limit=10, tasks='["tasks/mc.yaml", "tasks/mc_other.yaml"]'))
    project.build(env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (10, 10)
    assert project.read("targets/e/samples/mc.jsonl") == alone


def test_rolling_windows_are_units_of_their_own(tmp_path):
    """Perplexity windows share a one-token context; packing them together would grow one pass
    with the number of documents. Each window is scored alone, and no pass exceeds max_length."""
    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer

    folder = make_random_model(tmp_path / "model")
    lm = NativeLM(load_model(folder), load_tokenizer(folder), max_length=16)
    passes = []
    score = lm._score_unit
    lm._score_unit = lambda context, continuations: passes.append(
        len(context) + sum(len(c) - 1 for c in continuations)) or score(context, continuations)
    windows = [(None, [0], list(range(5 + i, 20 + i))) for i in range(30)]  # one BOS context each
    lm._loglikelihood_tokens(windows, pack=False)
    assert len(passes) == 30 and max(passes) <= 16
    passes.clear()
    many = [(None, [0, 7, 8], [9 + i, 10, 11, 12]) for i in range(40)]  # 40 choices after one context
    lm._loglikelihood_tokens(many)
    assert len(passes) > 1 and max(passes) <= 16  # split, never longer than max_length


def test_request_cache_upkeep_never_follows_a_symlink_or_unpickles(project, tmp_path):
    project.tunefile(eval_target("e", limit=4))
    project.build(env=OFFLINE, timeout=300)
    assert project.run("cache", "verify").returncode == 0  # a healthy cache checks clean
    answers = project.root / ".tunecache" / "requests"

    # a row rewritten as a pickle: refused (a miss, recomputed), never unpickled
    with sqlite3.connect(answers / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = 4, value = ? WHERE rowid = (SELECT MIN(rowid) FROM Cache)",
                   (b"cos\nsystem\n(S'touch PWNED'\ntR.",))
    project.build("--no-cache", env=OFFLINE, timeout=300)
    assert answer_counts(project, "e") == (3, 1)
    assert not (project.root / "PWNED").exists() and not Path("PWNED").exists()
    assert project.run("cache", "verify").returncode == 0  # the bad row was dropped on the way

    # the answers folder replaced by a symlink to somebody's folder: upkeep drops the link only
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(answers), elsewhere)
    (elsewhere / "notes.txt").write_text("precious")
    answers.symlink_to(elsewhere)
    verified = project.run("cache", "verify")
    assert verified.returncode == 0 and (elsewhere / "notes.txt").read_text() == "precious"
    assert not os.path.lexists(answers)
    answers.symlink_to(elsewhere)
    project.run("cache", "gc", "--max-size", "1", check=True)
    assert (elsewhere / "notes.txt").read_text() == "precious" and (elsewhere / "cache.db").exists()
