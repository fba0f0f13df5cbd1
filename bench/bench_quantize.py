"""Quantize benchmark on a random 135M Llama-shaped bf16 checkpoint (SmolLM-135M's shapes).

For each scheme, in separate processes: the quantize kind (tensor by tensor from the
memory-mapped file) against the naive way (load the whole bf16 model, quantize it in place,
save), timing and peak RSS. Then decode tokens/s of each quantized checkpoint against bf16
(one token per forward with the static KV cache), plus the other ways to get int4 with
group size 256 on CPU that GUIDE.md lists, to justify the one the kind uses.

    python bench/bench_quantize.py            # writes bench/out/quantize.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CHECKPOINT = OUT / "random135m_bf16"
SHAPE = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
             rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048)
SCHEMES = {
    "int4_weight_only": {},
    "int8_weight_only": {},
    "int8_dynamic_activation_int8_weight": {},
    "int8_dynamic_activation_int4_weight": {},
    "float8_weight_only": {},
}
PROMPT_TOKENS, DECODE_TOKENS, ROUNDS = 16, 16, 3


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_checkpoint() -> None:
    import torch

    from tunemake.models import ModelArgs, Transformer, save_checkpoint

    if (CHECKPOINT / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**SHAPE))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.init_weights()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name:
                tensor.fill_(1.0)
    save_checkpoint(model.state_dict(), model.args, CHECKPOINT)


def child_stream(scheme: str, out: Path) -> dict:
    import torch  # noqa: F401 - imports before the baseline, as in a step

    from tunemake.kinds import quantize
    from tunemake.step import StepContext

    import tunemake.models.quantized  # noqa: F401
    import torchao  # noqa: F401

    baseline = peak_rss()
    started = time.perf_counter()
    with open("/dev/null", "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            quantize.run(quantize.Params(model=str(CHECKPOINT), scheme=scheme, **SCHEMES[scheme]),
                         StepContext(target=scheme, out=out, project_dir=OUT))
        finally:
            sys.stdout = stdout
    return {"seconds": time.perf_counter() - started, "rss_after_imports": baseline, "peak_rss": peak_rss()}


def child_naive(scheme: str, out: Path) -> dict:
    import torch
    from torch import nn

    import torchao  # noqa: F401
    from tunemake.kinds import quantize
    from tunemake.models import load_model
    from tunemake.models.quantized import quantize_weight, save_quantized_state_dict

    groupsize = quantize.Params(model="x", scheme=scheme, **SCHEMES[scheme]).groupsize
    quantize._return_freed_memory_to_the_os()  # same allocator setting as the kind: compare the methods
    baseline = peak_rss()
    started = time.perf_counter()
    model = load_model(CHECKPOINT, dtype=torch.bfloat16)
    model.lm_head = nn.Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
    model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(quantize_weight(module.weight.detach(), scheme, groupsize)[0],
                                         requires_grad=False)
    out.mkdir(parents=True, exist_ok=True)
    save_quantized_state_dict(model.state_dict(), out)
    return {"seconds": time.perf_counter() - started, "rss_after_imports": baseline, "peak_rss": peak_rss()}


def int4_candidate(name: str):
    """The whole model with int4 group-256 linears made one of the other ways (in memory)."""
    import torch
    from torch import nn

    from tunemake.models import load_model
    from tunemake.models.quantized import int4_cpu_weight, pad_in_features, pad_input_to_weight

    model = load_model(CHECKPOINT, dtype=torch.bfloat16)
    model.lm_head = nn.Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach())
    if name == "legacy_Int4WeightOnlyQuantizer_g256":
        from torchao.quantization import Int4WeightOnlyQuantizer

        quantizer = Int4WeightOnlyQuantizer(groupsize=256, device=torch.device("cpu"), precision=torch.bfloat16)
        return quantizer.quantize(model)
    for module in list(model.modules()):
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            if name == "IntxWeightOnlyConfig_int4_g256_unpacked":
                from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

                if weight.shape[1] % 256:
                    module.weight = nn.Parameter(pad_in_features(weight, 256), requires_grad=False)
                    module.register_forward_pre_hook(pad_input_to_weight)
                quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(256)))
            elif name == "packed_int4_g128":  # = PrototypeInt4WeightOnlyConfig(group_size=128)
                module.weight = nn.Parameter(int4_cpu_weight(weight, 128), requires_grad=False)
                if module.weight.shape[1] != weight.shape[1]:
                    module.register_forward_pre_hook(pad_input_to_weight)
            else:
                raise ValueError(name)
    return model


def child_decode(what: str) -> dict:
    import torch

    from tunemake.models import load_model

    if what.startswith("candidate:"):
        try:
            model = int4_candidate(what.removeprefix("candidate:"))
        except Exception as error:  # a candidate that cannot do this model is a result too
            return {"error": f"{type(error).__name__}: {error}"}
    else:
        model = load_model(what, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, PROMPT_TOKENS), generator=generator)
    model.setup_cache(1, PROMPT_TOKENS + DECODE_TOKENS * (ROUNDS + 1), dtype=torch.bfloat16)
    best = float("inf")
    with torch.inference_mode():
        logits = model(prompt, input_pos=torch.arange(PROMPT_TOKENS))
        position = PROMPT_TOKENS
        for round_ in range(ROUNDS + 1):  # the first round warms up
            started = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                token = logits[:, -1:].argmax(-1)
                logits = model(token, input_pos=torch.tensor([position]))
                position += 1
            if round_:
                best = min(best, time.perf_counter() - started)
    return {"tokens_per_second": DECODE_TOKENS / best}


def in_child(*args: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child; 1 by default because on a shared, oversubscribed machine "
                             "OpenMP barriers make multi-threaded decode timings meaningless")
    options = parser.parse_args()
    if options.child:
        import torch

        torch.set_num_threads(options.threads)
        kind, *rest = options.child
        runner = {"stream": child_stream, "naive": child_naive, "decode": child_decode}[kind]
        result = runner(rest[0], Path(rest[1])) if len(rest) == 2 else runner(rest[0])
        print(json.dumps(result))
        return

    OUT.mkdir(exist_ok=True)
    make_checkpoint()
    checkpoint_bytes = (CHECKPOINT / "model.safetensors").stat().st_size
    threads = options.threads
    report = {"checkpoint": str(CHECKPOINT), "checkpoint_bytes": checkpoint_bytes, "shape": SHAPE, "threads": threads,
              "decode": {"prompt_tokens": PROMPT_TOKENS, "tokens": DECODE_TOKENS, "rounds": ROUNDS}, "schemes": {}}
    report["bf16_tokens_per_second"] = in_child("decode", str(CHECKPOINT), threads=threads)["tokens_per_second"]
    print(f"bf16 checkpoint {checkpoint_bytes / 1e6:.0f} MB, decode {report['bf16_tokens_per_second']:.1f} tok/s")
    for scheme in options.schemes:
        out = OUT / f"quantized_{scheme}"
        stream = in_child("stream", scheme, str(out), threads=threads)
        naive = in_child("naive", scheme, str(OUT / f"naive_{scheme}"), threads=threads)
        decode = in_child("decode", str(out), threads=threads)
        info = json.loads((out / "quantization.json").read_text())
        row = {
            "stream": stream,
            "naive": naive,
            "stream_peak_growth_over_checkpoint": (stream["peak_rss"] - stream["rss_after_imports"]) / checkpoint_bytes,
            "naive_peak_growth_over_checkpoint": (naive["peak_rss"] - naive["rss_after_imports"]) / checkpoint_bytes,
            "bytes_after": info["bytes_after"],
            "padded_layers": len(info["padded"]),
            "tokens_per_second": decode["tokens_per_second"],
            "decode_speedup_vs_bf16": decode["tokens_per_second"] / report["bf16_tokens_per_second"],
        }
        report["schemes"][scheme] = row
        print(f"{scheme}: stream {stream['seconds']:.1f}s peak {stream['peak_rss'] / 1e6:.0f} MB "
              f"(+{row['stream_peak_growth_over_checkpoint']:.2f}x ckpt over imports) | naive {naive['seconds']:.1f}s "
              f"peak {naive['peak_rss'] / 1e6:.0f} MB (+{row['naive_peak_growth_over_checkpoint']:.2f}x) | "
              f"{info['bytes_after'] / 1e6:.0f} MB | decode {row['tokens_per_second']:.1f} tok/s "
              f"({row['decode_speedup_vs_bf16']:.2f}x bf16)")
    report["int4_g256_candidates_tokens_per_second"] = {}
    for candidate in ("IntxWeightOnlyConfig_int4_g256_unpacked", "legacy_Int4WeightOnlyQuantizer_g256",
                      "packed_int4_g128"):
        result = in_child("decode", f"candidate:{candidate}", threads=threads)
        report["int4_g256_candidates_tokens_per_second"][candidate] = result.get("tokens_per_second", result)
        if "error" in result:
            print(f"int4 candidate {candidate}: {result['error']}")
        else:
            speed = result["tokens_per_second"]
            relative = speed / report["bf16_tokens_per_second"]
            print(f"int4 candidate {candidate}: decode {speed:.1f} tok/s ({relative:.2f}x bf16)")
    (OUT / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT / 'quantize.json'}")


if __name__ == "__main__":
    main()
