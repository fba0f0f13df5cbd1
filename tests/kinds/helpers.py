"""Tiny checkpoints, tokenizers and lm-eval tasks built in the test, for the eval/generate/report kinds.

Import as `from helpers import ...` (pytest puts this folder on sys.path for the tests in it).
"""

from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = (
    "yes no is fire hot ice water wet sand sky blue grass snow white coal the a of and to in it "
    "question answer true false cat dog red green big small"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, max_position_embeddings=256)

# (question, index of the true choice in ["yes", "no"]): 5 of 8 answers are "yes"
TOYFACTS = [
    ("Is fire hot?", 0),
    ("Is ice hot?", 1),
    ("Is water wet?", 0),
    ("Is sand wet?", 1),
    ("Is the sky blue?", 0),
    ("Is grass blue?", 1),
    ("Is snow white?", 0),
    ("Is a cat small?", 0),
]


def write_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json (adds <s>) that both tunemake and transformers load; " yes" is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?" for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def token_id(folder: Path, text: str) -> int:
    """The single token `text` encodes to (asserting it is one)."""
    from tunemake.models import load_tokenizer

    ids = load_tokenizer(folder).encode(text, add_bos=False)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens: {ids}"
    return ids[0]


def random_args(folder: Path, **overrides):
    """ModelArgs for the tokenizer in folder."""
    from tunemake.models import ModelArgs, load_tokenizer

    tokenizer = load_tokenizer(folder)
    return ModelArgs(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=sorted(tokenizer.eos_ids)[0],
        **{**TINY, **overrides},
    )


def make_random_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama with its tokenizer (std 0.3 so predictions vary with the input)."""
    import torch

    from tunemake.models import Transformer, save_checkpoint

    write_tokenizer(folder)
    args = random_args(folder, **overrides)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.3)
    save_checkpoint(model.state_dict(), args, folder)
    return folder


def make_constant_model(folder: Path, favourite: str = " yes", seed: int = 0) -> Path:
    """A model whose next-token distribution is the same after any input and peaks hard on `favourite`.

    Every token has the same embedding, so every position carries the same vector through
    attention (an average of equal values) and the MLP; the output row of the favourite
    token is then set along the final hidden state, giving it a logit margin of ~20.
    """
    import torch

    from tunemake.models import Transformer, save_checkpoint

    write_tokenizer(folder)
    args = random_args(folder)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.randn(args.dim).expand(args.vocab_size, -1))
        hidden = {}
        handle = model.lm_head.register_forward_hook(lambda m, inputs, out: hidden.setdefault("h", inputs[0]))
        model(torch.tensor([[1, 2, 3]]))
        handle.remove()
        h = hidden["h"][0, -1]
        model.lm_head.weight[token_id(folder, favourite)] = 20 * h / h.norm() ** 2 + model.lm_head.weight.mean(0)
    save_checkpoint(model.state_dict(), args, folder)
    return folder


def write_toyfacts_task(folder: Path, name: str = "toyfacts") -> Path:
    """A yes/no multiple-choice task with data in a subfolder, named relative to the YAML."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "answer": a}) for q, a in TOYFACTS]
    (folder / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {name}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: data/{name}.jsonl
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}} Answer:"
            doc_to_choice: ["yes", "no"]
            doc_to_target: answer
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return folder / f"{name}.yaml"


def write_toygen_task(folder: Path) -> Path:
    """The same questions as free generation (3 tokens), its first yes/no scored by exact match."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "answer": ["yes", "no"][a]}) for q, a in TOYFACTS]
    (folder / "data" / "toygen.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "toygen.yaml").write_text(
        textwrap.dedent(
            """\
            task: toygen
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: data/toygen.jsonl
            test_split: test
            output_type: generate_until
            doc_to_text: "{{question}} Answer:"
            doc_to_target: answer
            target_delimiter: " "
            generation_kwargs:
              until: ["\\n", "."]
              max_gen_toks: 3
              do_sample: false
            filter_list:
              - name: first_word
                filter:
                  - function: regex
                    regex_pattern: "(yes|no)"
                  - function: take_first
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return folder / "toygen.yaml"


def expected_yes_accuracy() -> float:
    return sum(1 for _, answer in TOYFACTS if answer == 0) / len(TOYFACTS)
