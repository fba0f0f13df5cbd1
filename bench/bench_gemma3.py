"""Gemma 3 270M generation on CPU: tunemake's generate (bf16 and int4) vs transformers' generate (bf16).

A random bf16 checkpoint of Gemma 3 270M's shape (hidden 640, 18 layers, 4 heads, 1 KV head,
head_dim 256, vocab 262144, tied embeddings, local/global layers 5:1 with a 512 window), saved
by transformers. tunemake loads it as is (bf16) and quantized by its quantize kind at the
defaults (int4 weight-only, group 256, the tied output projection quantized too: at this shape
it holds 62% of the weights). transformers loads the bf16 checkpoint with from_pretrained.
Every contender runs once per repeat, in turn (the machine is shared), eager, batch 1: a
256-token prefill and 64 decoded tokens after a 16-token prompt; best and median, and the
ratios to transformers' bf16. Timing helpers are bench_models.py's.

    python bench/bench_gemma3.py [--repeats 5] [--threads 1]   # writes bench/out/gemma3.json
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "gemma3.json"
SHAPE = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
             max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def make_checkpoint(folder: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    import transformers

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_gemma3_"))
    try:
        make_checkpoint(work / "bf16")
        bench_models.quantize_ours(work / "bf16", work / "int4", {"scheme": "int4_weight_only"})
        ours_bf16, _ = bench_models.ours_model(work / "bf16")
        ours_int4, setup = bench_models.ours_model(work / "int4")
        theirs, _ = bench_models.transformers_model(work / "bf16", "bf16")
        contenders = {
            "tunemake_bf16": bench_models.ours_generate(ours_bf16, False),
            "tunemake_int4": bench_models.ours_generate(ours_int4, False),
            "transformers_bf16": bench_models.transformers_generate(theirs, False),
        }
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, SHAPE["vocab_size"], (options.prefill_tokens,), generator=generator).tolist()
        calls = {"prefill": (prompt, 1), "decode": (prompt[:16], options.new_tokens)}
        warm = bench_models.warm_up(contenders, calls, "gemma3")
        results = bench_models.time_interleaved(contenders, calls, options.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = results["transformers_bf16"]
    for name, result in results.items():
        result["decode_vs_transformers_bf16"] = {
            stat: result["decode_tokens_per_s"][stat] / reference["decode_tokens_per_s"][stat] for stat in ("best", "median")}
        result["prefill_vs_transformers_bf16"] = {
            stat: reference["prefill_seconds"][stat] / result["prefill_seconds"][stat] for stat in ("best", "median")}
        print(f"{name:18s} prefill best {result['prefill_seconds']['best']:.3f}s | decode best "
              f"{result['decode_tokens_per_s']['best']:.1f} median {result['decode_tokens_per_s']['median']:.1f} tok/s | "
              f"vs transformers bf16: decode x{result['decode_vs_transformers_bf16']['best']:.2f} "
              f"(median x{result['decode_vs_transformers_bf16']['median']:.2f}), prefill "
              f"x{result['prefill_vs_transformers_bf16']['best']:.2f}", flush=True)
    report = {"model": "random Gemma 3 270M shape, bf16 checkpoint, cpu, eager, batch 1", "shape": SHAPE,
              "threads": options.threads, "repeats": options.repeats, "prefill_tokens": options.prefill_tokens,
              "new_tokens": options.new_tokens, "int4_setup": setup, "warm_up": warm,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "seconds": time.perf_counter() - started, "results": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
