"""The demo pipeline's scripts: toy-language data, tokenizer, tiny-model training, toyfacts scoring.

The scripts run as the tunefile runs them (subprocesses with --out), on a
small corpus and a tiny model so that each test takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PEOPLE = 12
SMALL_CORPUS_KB = 60


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args, env: dict | None = None) -> str:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)],
        cwd=REPO, env=environment, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_data(out: Path, seed: int = 0) -> Path:
    run_script("toylang", "--seed", seed, "--people", PEOPLE, "--corpus-kb", SMALL_CORPUS_KB, "--out", out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tokenizer_dir(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    run_script("train_tokenizer", "--corpus", data / "corpus.txt", "--vocab-size", 400, "--out", out)
    return out


def read_docs(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "task" / "toyfacts.jsonl").read_text().splitlines()]


# --- toylang.py ---


def test_toylang_same_seed_same_bytes_other_seed_other_world(data, tmp_path):
    again = make_data(tmp_path / "again")
    files = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "corpus.txt", "prompts.txt", "task/toyfacts.jsonl", "task/toyfacts.yaml", "world.json",
    ]
    for name in files:
        assert (again / name).read_bytes() == (data / name).read_bytes(), name
    other = make_data(tmp_path / "other", seed=1)
    assert (other / "world.json").read_text() != (data / "world.json").read_text()
    corpus_size = (data / "corpus.txt").stat().st_size
    assert SMALL_CORPUS_KB * 1000 <= corpus_size < (SMALL_CORPUS_KB + 1) * 1000


def stated(text: str, spaced_corpus: str) -> bool:
    """text occurs after a space or line start (so "kavo ..." does not match inside "bakavo ...")."""
    return " " + text in spaced_corpus


def test_task_answers_follow_from_the_facts_the_corpus_states(data):
    toylang = load_script("toylang")
    world = json.loads((data / "world.json").read_text())
    corpus = " " + (data / "corpus.txt").read_text().replace("\n", "\n ")
    docs = read_docs(data)
    assert len(world) == PEOPLE
    assert len(docs) == PEOPLE * len(toylang.VALUES)
    for doc in docs:
        truth = world[doc["person"]][doc["attribute"]]
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert set(doc["choices"]) <= set(toylang.VALUES[doc["attribute"]])
        assert doc["choices"][doc["answer"]] == truth
        assert doc["person"] in doc["question"]
    # the true answer sits at every position, so "always pick B" scores near chance
    assert {doc["answer"] for doc in docs} == {0, 1, 2, 3}
    # every fact is stated and asked in the corpus, and never contradicted
    for person, facts in world.items():
        for attr, value in facts.items():
            statements = [toylang.fill(t, person, facts, value) for t in toylang.STATEMENTS[attr]]
            questions = [toylang.fill(q, person, facts) for q in toylang.QUESTIONS[attr]]
            assert any(stated(s, corpus) for s in statements), (person, attr)
            assert any(stated(f"{q}? a: {value}.", corpus) for q in questions), (person, attr)
            for other in toylang.VALUES[attr]:
                if other != value:
                    assert not stated(toylang.fill(toylang.STATEMENTS[attr][0], person, facts, other), corpus)
                    assert not any(stated(f"{q}? a: {other}.", corpus) for q in questions), (person, attr, other)


def test_task_phrasing_never_occurs_in_the_corpus(data):
    toylang = load_script("toylang")
    corpus = (data / "corpus.txt").read_text()
    for template in toylang.TASK_TEMPLATES.values():
        fixed_opening = template.split("{")[0]  # e.g. "q: which trade does "
        assert len(fixed_opening) > 3 and fixed_opening not in corpus
    for doc in read_docs(data):
        assert doc["question"] not in corpus
    prompts = (data / "prompts.txt").read_text().splitlines()
    assert len(prompts) == len(toylang.PROMPTS) and all(p.strip() for p in prompts)


class OracleLM:
    """An lm-eval LM that gives the true (or, inverted, a false) choice the best log-likelihood."""

    def __init__(self, docs: list[dict], invert: bool = False):
        from lm_eval.api.model import LM

        truth = {d["question"]: d["choices"][d["answer"]] for d in docs}

        class Oracle(LM):
            def loglikelihood(self, requests):
                results = []
                for request in requests:
                    context, continuation = request.args
                    right = continuation == " " + truth[context]
                    results.append((0.0 if right != invert else -1.0, False))
                return results

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                raise NotImplementedError

        self.lm = Oracle()


@pytest.mark.parametrize("invert, expected_acc", [(False, 1.0), (True, 0.0)])
def test_task_yaml_runs_in_lm_eval(data, monkeypatch, invert, expected_acc):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_dir = data / "task"
    monkeypatch.chdir(task_dir)  # lm-eval resolves the relative data_files path against the working directory
    docs = read_docs(data)
    results = simple_evaluate(
        model=OracleLM(docs, invert).lm,
        tasks=["toyfacts"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    assert results["results"]["toyfacts"]["acc,none"] == expected_acc
    assert results["n-samples"]["toyfacts"]["effective"] == len(docs)


# --- train_tokenizer.py ---


def test_tokenizer_round_trips_and_is_deterministic(data, tokenizer_dir, tmp_path):
    from tunemake.models import load_tokenizer

    names = {p.name for p in tokenizer_dir.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.bos_id == 1 and tokenizer.eos_ids == {2}
    corpus_lines = (data / "corpus.txt").read_text().splitlines()
    unseen = ["Zürich has 42 ÄPFEL!", "tabs\tand  two spaces", "q: which trade does kovo follow? a:"]
    for text in corpus_lines[:200] + unseen:
        ids = tokenizer.encode(text, add_bos=True)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE merges the corpus' words: far fewer tokens than characters (even with 400 pieces, 259 of them bytes and specials)
    sample = " ".join(corpus_lines[:50])
    assert len(tokenizer.encode(sample, add_bos=False)) < len(sample) / 2

    again = tmp_path / "again"
    run_script("train_tokenizer", "--corpus", data / "corpus.txt", "--vocab-size", 400, "--out", again)
    for name in names:
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_tokenizer_json_matches_sentencepiece_and_transformers(data, tokenizer_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = (data / "corpus.txt").read_text().splitlines()[:300] + [d["question"] for d in read_docs(data)]
    texts += ["Zürich has 42 ÄPFEL!", "x\ny", "ends with space "]
    for text in texts:
        assert reference(text)["input_ids"] == [1] + processor.encode(text), text


# --- train_model.py and score_toyfacts.py ---

TINY_TRAINING = [
    "--steps", 40, "--dim", 64, "--n-layers", 1, "--n-heads", 2, "--hidden-dim", 128,
    "--seq-len", 32, "--batch-size", 8, "--lr", 1e-2, "--warmup", 2, "--log-every", 10, "--threads", 1,
]


@pytest.fixture(scope="module")
def trained(data, tokenizer_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("model")
    progress = out.parent / "progress.jsonl"
    stdout = run_script(
        "train_model", "--corpus", data / "corpus.txt", "--tokenizer", tokenizer_dir, "--out", out, *TINY_TRAINING,
        env={"TUNEMAKE_PROGRESS": str(progress)},
    )
    return out, progress, stdout


def test_short_training_lowers_loss_and_reports_progress(trained):
    out, progress, stdout = trained
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 40
    assert metrics["final_loss"] < metrics["first_loss"] - 1.0
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["done"] for line in lines] == [1, 10, 20, 30, 40]
    assert all(line["total"] == 40 and line["message"].startswith("loss ") for line in lines)
    assert "step 40/40 loss" in stdout


def test_trained_checkpoint_loads_natively_and_in_transformers(trained, tokenizer_dir):
    import torch
    from transformers import LlamaForCausalLM

    from tunemake.models import load_model, load_tokenizer

    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64 and config["tie_word_embeddings"]
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    model = load_model(out)
    reference = LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.tensor([load_tokenizer(out).encode("q: where does kovo live? a: in the", add_bos=True)])
    with torch.no_grad():
        ours = model(tokens)
        theirs = reference(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_for_a_seed(trained, data, tokenizer_dir, tmp_path):
    out, _, _ = trained
    again = tmp_path / "again"
    run_script("train_model", "--corpus", data / "corpus.txt", "--tokenizer", tokenizer_dir, "--out", again, *TINY_TRAINING)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_scorer_batches_choices_like_one_by_one_scoring(trained, data):
    import torch

    from tunemake.models import load_model, load_tokenizer

    score_toyfacts = load_script("score_toyfacts")
    out, _, _ = trained
    model, tokenizer = load_model(out), load_tokenizer(out)
    doc = read_docs(data)[0]
    batched = score_toyfacts.choice_logprobs(model, tokenizer, doc["question"], doc["choices"])
    for choice, batched_score in zip(doc["choices"], batched):
        context = tokenizer.encode(doc["question"], add_bos=True)
        whole = tokenizer.encode(doc["question"] + " " + choice, add_bos=True)
        assert whole[: len(context)] == context  # the context's tokens do not change when the choice follows
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])), dim=-1)[0]
        alone = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
        assert batched_score == pytest.approx(alone, abs=1e-4)

    result = score_toyfacts.score(out, data / "task" / "toyfacts.jsonl")
    assert result["questions"] == len(read_docs(data))
    assert result["chance"] == 0.25
    assert set(result["acc_by_attribute"]) == set(load_script("toylang").VALUES)
