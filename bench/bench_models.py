"""tunemake's native model vs transformers on the same random 135M Llama weights (bf16, CPU).

Measures, side by side and interleaved so machine noise hits both alike:
  - prefill: time to first token for a 512-token prompt (generate 1 token)
  - decode: tokens/s for batch 1, from generate(N+1) minus generate(1) wall time
Prints the ratios and writes bench/out/models.json.

    python bench/bench_models.py [--repeats 3] [--new-tokens 64] [--compile]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tunemake.models import load_model  # noqa: E402
from tunemake.models.generation import generate  # noqa: E402

SHAPE_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def make_checkpoint(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE_135M)).to(torch.bfloat16)
    model.save_pretrained(folder)


def ours_generate(model, prompt, new_tokens, compile=False):
    generate(model, [prompt], max_new_tokens=new_tokens, compile=compile)


def hf_generate(model, prompt, new_tokens):
    model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def seconds(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    # 1 by default: on a shared 2-core machine a 2-thread OpenMP kernel stalls whenever one
    # of its threads is descheduled, which swamps the difference being measured
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    from transformers import AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="bench_models_"))
    make_checkpoint(folder)
    ours = load_model(folder, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, SHAPE_135M["vocab_size"], (options.prefill_tokens,), generator=generator).tolist()
    short_prompt = long_prompt[:16]
    n = options.new_tokens

    contenders = {"tunemake": lambda p, k: ours_generate(ours, p, k), "transformers": lambda p, k: hf_generate(hf, p, k)}
    if options.compile:
        started = time.perf_counter()
        ours_generate(ours, short_prompt, n + 1, compile=True)  # compiles the decode step
        print(f"torch.compile warm-up: {time.perf_counter() - started:.1f}s")
        contenders["tunemake_compiled"] = lambda p, k: ours_generate(ours, p, k, compile=True)

    for run in contenders.values():  # warm-up: allocator, oneDNN kernels
        run(short_prompt, 2)
        run(long_prompt, 1)

    prefill = {name: [] for name in contenders}
    decode = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(options.repeats):
            for name, run in contenders.items():
                prefill[name].append(seconds(run, long_prompt, 1))
                first = seconds(run, short_prompt, 1)
                decode[name].append(n / (seconds(run, short_prompt, n + 1) - first))

    result = {
        "model": "random 135M Llama (SmolLM-135M shape), bf16, cpu",
        "threads": options.threads,
        "repeats": options.repeats,
        "torch": torch.__version__,
        "prefill_tokens": options.prefill_tokens,
        "new_tokens": n,
        "prefill_seconds": {name: statistics.median(v) for name, v in prefill.items()},
        "decode_tokens_per_s": {name: statistics.median(v) for name, v in decode.items()},
    }
    result["prefill_speedup_vs_transformers"] = {
        name: result["prefill_seconds"]["transformers"] / s for name, s in result["prefill_seconds"].items()
    }
    result["decode_speedup_vs_transformers"] = {
        name: r / result["decode_tokens_per_s"]["transformers"] for name, r in result["decode_tokens_per_s"].items()
    }
    for name in contenders:
        print(
            f"{name:18s} prefill {options.prefill_tokens} tok: {result['prefill_seconds'][name]:.3f}s "
            f"(x{result['prefill_speedup_vs_transformers'][name]:.2f})   "
            f"decode: {result['decode_tokens_per_s'][name]:.1f} tok/s (x{result['decode_speedup_vs_transformers'][name]:.2f})"
        )
    out = Path(__file__).resolve().parent / "out" / "models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
