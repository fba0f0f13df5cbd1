"""tunemake's native model vs transformers on the same random 135M Llama weights (bf16, CPU).

Measures, side by side and interleaved so machine noise hits both alike:
  - prefill: time to first token for a 512-token prompt (wall time of generate(1 token))
  - decode: tokens/s for batch 1, from the first sampled token to the last (ours from
    Completion.decode_tokens_per_s, transformers' from a StoppingCriteria that stamps each step)
Reports the best and the median of the repeats (the best is the least disturbed by other
processes on a shared machine), prints the ratios and writes bench/out/models.json.

    python bench/bench_models.py [--repeats 5] [--new-tokens 64] [--compile]
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


def ours_decode_rate(model, prompt, new_tokens, compile=False) -> float:
    return generate(model, [prompt], max_new_tokens=new_tokens, compile=compile)[0].decode_tokens_per_s


def hf_decode_rate(model, prompt, new_tokens) -> float:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class StampEachStep(StoppingCriteria):  # called once per generated token, after sampling it
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([StampEachStep()]),
    )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def seconds(function, *args) -> tuple[float, float]:
    """Wall and process CPU time; with one thread CPU time is the work done, minus time spent descheduled."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(samples: dict, best) -> dict:
    return {name: {"best": best(v), "median": statistics.median(v), "samples": v} for name, v in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
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

    contenders = {
        "tunemake": lambda p, k: ours_decode_rate(ours, p, k),
        "transformers": lambda p, k: hf_decode_rate(hf, p, k),
    }
    compile_seconds = None
    if options.compile:
        started = time.perf_counter()
        ours_decode_rate(ours, short_prompt, n, compile=True)  # compiles the decode step
        compile_seconds = time.perf_counter() - started
        print(f"torch.compile warm-up: {compile_seconds:.1f}s")
        contenders["tunemake_compiled"] = lambda p, k: ours_decode_rate(ours, p, k, compile=True)

    for run in contenders.values():  # warm-up: allocator, oneDNN kernels
        run(short_prompt, 3)
        run(long_prompt, 1)

    prefill = {name: [] for name in contenders}
    prefill_cpu = {name: [] for name in contenders}
    decode = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(options.repeats):
            for name, run in contenders.items():
                wall, cpu = seconds(run, long_prompt, 1)
                prefill[name].append(wall)
                prefill_cpu[name].append(cpu)
                decode[name].append(run(short_prompt, n))

    result = {
        "model": "random 135M Llama (SmolLM-135M shape), bf16, cpu",
        "threads": options.threads,
        "repeats": options.repeats,
        "torch": torch.__version__,
        "prefill_tokens": options.prefill_tokens,
        "new_tokens": n,
        "compile_seconds": compile_seconds,
        "prefill_seconds": summary(prefill, min),
        "prefill_cpu_seconds": summary(prefill_cpu, min),
        "decode_tokens_per_s": summary(decode, max),
    }
    result["prefill_cpu_speedup_vs_transformers_best"] = {
        name: result["prefill_cpu_seconds"]["transformers"]["best"] / v["best"]
        for name, v in result["prefill_cpu_seconds"].items()
    }
    for stat in ("best", "median"):
        hf_prefill = result["prefill_seconds"]["transformers"][stat]
        hf_decode = result["decode_tokens_per_s"]["transformers"][stat]
        result[f"prefill_speedup_vs_transformers_{stat}"] = {
            name: hf_prefill / v[stat] for name, v in result["prefill_seconds"].items()
        }
        result[f"decode_speedup_vs_transformers_{stat}"] = {
            name: v[stat] / hf_decode for name, v in result["decode_tokens_per_s"].items()
        }
    for name in contenders:
        prefill_s, decode_r = result["prefill_seconds"][name], result["decode_tokens_per_s"][name]
        print(
            f"{name:18s} prefill {options.prefill_tokens} tok best {prefill_s['best']:.3f}s "
            f"(x{result['prefill_speedup_vs_transformers_best'][name]:.2f}) median {prefill_s['median']:.3f}s "
            f"(x{result['prefill_speedup_vs_transformers_median'][name]:.2f}) | decode best {decode_r['best']:.1f} tok/s "
            f"(x{result['decode_speedup_vs_transformers_best'][name]:.2f}) median {decode_r['median']:.1f} tok/s "
            f"(x{result['decode_speedup_vs_transformers_median'][name]:.2f}) | prefill CPU best "
            f"{result['prefill_cpu_seconds'][name]['best']:.3f}s (x{result['prefill_cpu_speedup_vs_transformers_best'][name]:.2f})"
        )
    out = Path(__file__).resolve().parent / "out" / "models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
