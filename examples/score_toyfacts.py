"""Score a checkpoint on the toyfacts task the way lm-eval's multiple-choice `acc` does.

    python examples/score_toyfacts.py --model CHECKPOINT_DIR --task TASK_DIR/toyfacts.jsonl [--out OUT]

For every question, each choice is scored by the summed log-probability of
its tokens after "<s> question" (with lm-eval's " " delimiter); the question
counts as right when the true choice scores highest. A quick check of the
demo model without lm-eval, and a reference for the eval kind's numbers.
Prints the accuracy (and per-attribute accuracies); --out writes them as
toyfacts_score.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from tunemake.models import Tokenizer, load_model, load_tokenizer


def choice_token_ids(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-eval splits them: encode the whole, cut at the context's length."""
    whole = tokenizer.encode(context + " " + choice, add_bos=True)
    context_ids = tokenizer.encode(context, add_bos=True)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def choice_logprobs(model, tokenizer: Tokenizer, context: str, choices: list[str]) -> list[float]:
    pairs = [choice_token_ids(tokenizer, context, c) for c in choices]
    sequences = [ctx + cont for ctx, cont in pairs]
    width = max(len(s) for s in sequences)
    # Right padding is harmless under causal attention: padding only follows the scored tokens.
    tokens = torch.tensor([s + [tokenizer.pad_id] * (width - len(s)) for s in sequences])
    logprobs = torch.log_softmax(model(tokens).float(), dim=-1)
    scores = []
    for row, (ctx, cont) in enumerate(pairs):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        scores.append(logprobs[row, positions, torch.tensor(cont)].sum().item())
    return scores


def score(model_dir: Path, task_jsonl: Path) -> dict:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = [json.loads(line) for line in task_jsonl.read_text().splitlines() if line.strip()]
    right_by_attribute: dict[str, list[bool]] = defaultdict(list)
    for doc in docs:
        scores = choice_logprobs(model, tokenizer, doc["question"], doc["choices"])
        right_by_attribute[doc.get("attribute", "all")].append(scores.index(max(scores)) == doc["answer"])
    right = [r for rs in right_by_attribute.values() for r in rs]
    return {
        "acc": sum(right) / len(right),
        "questions": len(right),
        "chance": sum(1 / len(d["choices"]) for d in docs) / len(docs),
        "acc_by_attribute": {a: sum(rs) / len(rs) for a, rs in sorted(right_by_attribute.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--task", type=Path, required=True, help="toyfacts.jsonl")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # One thread: a batch of four short sequences is too small to gain from more,
    # and on a busy machine extra threads cost far more than they save.
    torch.set_num_threads(1)

    result = score(args.model, args.task)
    by_attribute = " ".join(f"{a} {acc:.2f}" for a, acc in result["acc_by_attribute"].items())
    print(f"acc {result['acc']:.3f} on {result['questions']} questions (chance {result['chance']:.2f}); {by_attribute}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "toyfacts_score.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
