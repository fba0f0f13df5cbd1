"""Eval benchmark: our lm-eval adapter against lm-eval's own HF model class, same weights, same tasks.

A random 135M Llama-shaped fp32 checkpoint (SmolLM-135M's shapes, tied embeddings) with a
byte-level BPE tokenizer trained here is evaluated through `lm_eval.simple_evaluate` on two
local multiple-choice tasks: `mc_words` (4 choices of several tokens each, like ARC or
HellaSwag) and `mc_letters` (answer letters " A".." D", one token each, like MMLU). Once
with tunemake.lmeval_adapter.NativeLM, once with lm_eval.models.huggingface.HFLM loading a
transformers model from the same folder. The metrics of the two must agree. Speed: the
loglikelihood requests lm-eval made are replayed on both models in chunks, alternating,
keeping each chunk's best time over the rounds (the machine is shared); task building and
lm-eval's environment report cost the same for both and are not timed.

    python bench/bench_eval.py [--docs 40] [--batch-size 16] [--rounds 3]   # writes bench/out/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

OUT = Path(__file__).resolve().parent / "out"
CHECKPOINT = OUT / "random135m_fp32_eval"
TASKS = OUT / "eval_tasks"
SHAPE = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
             rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048)
WORDS = (
    "the a of and to in is it that was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said an each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down side been now find any "
    "new work part take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn cause much mean "
    "before move right boy old too same tell does set three want air well also play small end put home read hand"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_checkpoint() -> None:
    """The random model (seed 0) in fp32 with an 8k byte-level BPE; reused when present."""
    if (CHECKPOINT / "model.safetensors").exists():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tunemake.models import ModelArgs, Transformer, save_checkpoint

    CHECKPOINT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((sentence(rng, 5, 30) + "." for _ in range(20000)), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    tokenizer.save(str(CHECKPOINT / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "add_bos_token": True}
    (CHECKPOINT / "tokenizer_config.json").write_text(json.dumps(config))

    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPE, bos_token_id=0, eos_token_id=1))
    save_checkpoint(model.state_dict(), model.args, CHECKPOINT)


def make_tasks(docs: int) -> None:
    """Two multiple-choice tasks over the same random questions (seeded: same docs every run)."""
    TASKS.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    rows = []
    for _ in range(docs):
        rows.append({
            "question": sentence(rng, 12, 40) + "?",
            "choices": [sentence(rng, 2, 6) for _ in range(4)],
            "answer": rng.randrange(4),
        })
    (TASKS / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {TASKS / 'questions.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (TASKS / "mc_words.yaml").write_text(
        "task: mc_words\n" + common + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\n'
    )
    letters = "Question: {{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
    (TASKS / "mc_letters.yaml").write_text(
        "task: mc_letters\n" + common + f'doc_to_text: "{letters}"\ndoc_to_choice: ["A", "B", "C", "D"]\n'
    )


class Recorded:
    """Wraps an LM's loglikelihood to keep the requests lm-eval sends and the time spent on them."""

    def __init__(self, lm):
        self.seconds, self.requests = 0.0, []
        inner = lm.loglikelihood

        def loglikelihood(requests, *args, **kwargs):
            started = time.perf_counter()
            result = inner(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.requests += requests
            return result

        lm.loglikelihood = loglikelihood


def evaluate(lm, task: str, batch_size: int) -> tuple[dict, list]:
    """simple_evaluate on one task: its metrics, and the loglikelihood requests it made."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    recorded = Recorded(lm)
    results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(TASKS),
                              include_defaults=False), batch_size=batch_size, log_samples=False)
    del lm.loglikelihood  # back to the class's method
    metrics = {k: v for k, v in results["results"][task].items() if k in ("acc,none", "acc_norm,none")}
    return {"metrics": metrics, "seconds_in_simple_evaluate": recorded.seconds}, recorded.requests


def replay(lms: dict, requests: list, chunk: int, rounds: int) -> dict:
    """Time loglikelihood on the same requests, chunk by chunk, alternating the models each chunk.

    The machine is shared: alternating in small chunks and keeping each chunk's best time over
    the rounds exposes both models to the same load instead of one getting a quiet minute.
    """
    chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
    best = {name: [float("inf")] * len(chunks) for name in lms}
    answers = {}
    for _ in range(rounds):
        for index, part in enumerate(chunks):
            for name, lm in lms.items():
                started = time.perf_counter()
                result = lm.loglikelihood(part, disable_tqdm=True)
                best[name][index] = min(best[name][index], time.perf_counter() - started)
                answers.setdefault(name, {})[index] = result
    speed = {name: {"seconds": sum(times), "requests_per_s": len(requests) / sum(times)} for name, times in best.items()}
    ours = [a for i in range(len(chunks)) for a in answers["tunemake"][i]]
    theirs = [a for i in range(len(chunks)) for a in answers["hflm"][i]]
    speed["max_abs_logprob_difference"] = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    speed["greedy_flags_agree"] = [a[1] for a in ours] == [b[1] for b in theirs]
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=40, help="requests per timed call (10 docs of 4 choices)")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer

    make_checkpoint()
    make_tasks(args.docs)
    lms = {
        "tunemake": NativeLM(load_model(CHECKPOINT), load_tokenizer(CHECKPOINT), batch_size=args.batch_size),
        "hflm": HFLM(pretrained=AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval(),
                     tokenizer=str(CHECKPOINT), batch_size=args.batch_size),
    }
    report = {"shape": SHAPE, "dtype": "float32", "docs": args.docs, "batch_size": args.batch_size,
              "rounds": args.rounds, "chunk": args.chunk, "threads": torch.get_num_threads(),
              "load_average_at_start": os.getloadavg(), "tasks": {}}
    for task in ("mc_letters", "mc_words"):
        entry = {}
        for name, lm in lms.items():
            entry[name], requests = evaluate(lm, task, args.batch_size)
        entry["metrics_agree"] = entry["tunemake"]["metrics"] == entry["hflm"]["metrics"]
        entry["requests"] = len(requests)
        entry["replay"] = replay(lms, requests, args.chunk, args.rounds)
        entry["speedup"] = entry["replay"]["tunemake"]["requests_per_s"] / entry["replay"]["hflm"]["requests_per_s"]
        report["tasks"][task] = entry
        print(f"{task}: tunemake {entry['replay']['tunemake']['requests_per_s']:.2f} req/s, "
              f"HFLM {entry['replay']['hflm']['requests_per_s']:.2f} req/s ({entry['speedup']:.2f}x); "
              f"metrics {entry['tunemake']['metrics']} vs {entry['hflm']['metrics']}; "
              f"max |logprob difference| {entry['replay']['max_abs_logprob_difference']:.2e}", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT / 'eval.json'}")


if __name__ == "__main__":
    main()
