"""Generation: tunemake's generate vs transformers' generate on the same random 135M Llama (CPU).

For bf16, int8 weight-only and int4 weight-only, each eager and with torch.compile, measures
  - prefill: wall time of generate(1 token) for a 512-token prompt (and process CPU time)
  - decode: tokens/s for batch 1, from the first sampled token to the last (ours from
    Completion.decode_tokens_per_s, transformers' from a StoppingCriteria that stamps each step)
Each scheme runs in its own process, so memory and compile caches start clean; inside it every
contender runs once per repeat, in turn, so load from other processes on a shared machine hits
them alike. Reports best and median (the best is the least disturbed), ratios to transformers
and compile warm-up, and writes bench/out/models.json. A combination that fails is recorded
with its error text and the rest goes on.

How each side quantizes:
  - tunemake: the quantize kind (tunemake.kinds.quantize.run), read back with load_model, with
    exclude = ["lm_head"] because transformers keeps a tied output projection in bf16. The
    extra contender "tunemake_default" is the kind's defaults: group 256, lm_head quantized.
  - transformers: from_pretrained(folder, dtype=bfloat16, quantization_config=TorchAoConfig(c)),
    c = Int8WeightOnlyConfig(); for int4 the first that works of Int4WeightOnlyConfig with each
    packing format, quantize_ with it on the loaded bf16 model, and PrototypeInt4WeightOnlyConfig
    (torchao's packed CPU int4, group size <= 128, which skips every layer whose width the group
    size does not divide: at group 128 the 576-wide ones, 180 of this model's 210 linears).
  - compiled: ours is generate(compile=True); transformers' is generate's own auto-compile of
    the decode forward, with a StaticCache sized to the request and a CompileConfig allowed on
    CPU. Both compile only the decode step: prefill runs eager in either library.

    python bench/bench_models.py [--quick] [--repeats 5] [--new-tokens 64] [--schemes bf16 int8 ...]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "out" / "models.json"
SHAPE_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# our quantize kind's params per checkpoint folder
OUR_QUANTIZED = {
    "int8": {"scheme": "int8_weight_only", "exclude": ["lm_head"]},
    "int4_g128": {"scheme": "int4_weight_only", "groupsize": 128, "exclude": ["lm_head"]},
    "int4_g64": {"scheme": "int4_weight_only", "groupsize": 64, "exclude": ["lm_head"]},
    "int4_default": {"scheme": "int4_weight_only"},  # group 256, lm_head quantized too
}
# scheme -> our contenders (name -> checkpoint folder); transformers' side follows from the scheme
SCHEMES = {
    "bf16": {"tunemake": "bf16"},
    "int8": {"tunemake": "int8"},
    "int4_g128": {"tunemake": "int4_g128", "tunemake_default": "int4_default"},
    # 576 = 9 x 64: the largest group size at which torchao quantizes every linear of this model
    "int4_g64": {"tunemake": "int4_g64"},
}


def attempt(function, *args):
    """(result, None) or (None, error text): a combination that fails is a result, not the end of the run."""
    try:
        return function(*args), None
    except Exception as error:  # noqa: BLE001 - whatever fails is recorded
        lines = str(error).strip().splitlines()
        return None, f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


# --- checkpoints (made once, in the parent) ---

def make_checkpoint(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE_135M)).to(torch.bfloat16)
    model.save_pretrained(folder)


def quantize_ours(source: Path, out: Path, params: dict) -> None:
    """The quantize kind's own code path, as `tunemake build` runs it (its printout hidden)."""
    import contextlib

    from tunemake.kinds import quantize
    from tunemake.step import StepContext

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        quantize.run(quantize.Params(model=str(source), **params),
                     StepContext(target=out.name, out=out, project_dir=source.parent))


# --- the two sides ---

def ours_model(folder: Path):
    """Our model from a checkpoint folder, and what the quantize kind did to it."""
    from tunemake.models import load_model

    info_file = folder / "quantization.json"
    setup = {"weights": "bf16"}
    if info_file.exists():
        info = json.loads(info_file.read_text())
        setup = {"quantize_params": {k: info[k] for k in ("scheme", "groupsize", "exclude")},
                 "config": info["config"], "linears_quantized": len(info["quantized"]),
                 "linears_padded": len(info["padded"]), "kept": info["kept"]}
    return load_model(folder, dtype=torch.bfloat16), setup


def ours_generate(model, compile: bool):
    from tunemake.models.generation import generate

    def run(prompt, new_tokens) -> float:
        return generate(model, [prompt], max_new_tokens=new_tokens, compile=compile)[0].decode_tokens_per_s

    return run


def transformers_model(folder: Path, scheme: str):
    """The bf16 checkpoint loaded as a transformers user would for this scheme, and how it was done."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    def load(config=None):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, quantization_config=config and TorchAoConfig(config))
        model.eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model

    if scheme == "bf16":
        return load(), {"how": "from_pretrained(dtype=bfloat16)"}
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        model = load(Int8WeightOnlyConfig())
        return model, {"how": "TorchAoConfig(Int8WeightOnlyConfig())", "linear_weights": weight_types(model)}
    return transformers_int4(load, int(scheme.removeprefix("int4_g")))


def transformers_int4(load, group_size: int):
    import transformers
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    def quantized_bf16(config):
        model = load()
        quantize_(model, config)
        return model

    failed = []
    for packing in Int4PackingFormat:
        config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=packing)
        name = f"Int4WeightOnlyConfig(group_size={group_size}, int4_packing_format={packing.value!r})"
        transformers.logging.set_verbosity_error()  # its loading report prints a traceback per layer
        model, error = attempt(load, config)
        transformers.logging.set_verbosity_warning()
        if model is not None:
            return model, {"how": f"TorchAoConfig({name})", "failed": failed, "linear_weights": weight_types(model)}
        failed.append({"config": f"TorchAoConfig({name})", "error": error})
        # the fallback; its error also names the cause that transformers' generic one hides
        model, failed[-1]["quantize_error"] = attempt(quantized_bf16, config)
        if model is not None:
            return model, {"how": f"quantize_(bf16 model, {name})", "failed": failed,
                           "linear_weights": weight_types(model)}
    name = f"PrototypeInt4WeightOnlyConfig(group_size={group_size})"
    model = load(PrototypeInt4WeightOnlyConfig(group_size=group_size))
    return model, {"how": f"TorchAoConfig({name})", "failed": failed, "linear_weights": weight_types(model)}


def weight_types(model) -> dict:
    """How many nn.Linear weights are of each tensor type (torchao skips what it cannot quantize)."""
    counts = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            kind = type(module.weight.data).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def transformers_generate(model, compile: bool):
    from transformers import (
        CompileConfig,
        StaticCache,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    options = {}
    if compile:
        # generate compiles the decode forward by itself when the cache is static; on CPU only if allowed
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")  # as ours: no CUDA graphs on CPU
        config._compile_all_devices = True
        options["compile_config"] = config

    def run(prompt, new_tokens) -> float:
        if compile:
            # sized to this request, as cache_implementation="static" does on a fresh model; that one
            # grows to the longest request seen, so the 512-token prefill would size every decode's cache
            options["cache"] = StaticCache(config=model.config, max_cache_len=len(prompt) + new_tokens)
        stamps = []

        class StampEachStep(StoppingCriteria):  # called once per generated token, after sampling it
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([StampEachStep()]), **options)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0

    return run


# --- timing (in a child process per scheme) ---

def seconds(function, *args) -> tuple[float, float]:
    """Wall and process CPU time; with one thread CPU time is the work done, minus time spent descheduled."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def summary(values: list, best) -> dict:
    return {"best": best(values), "median": statistics.median(values), "samples": values}


def time_scheme(scheme: str, work: Path, options) -> dict:
    setup, sides = {}, {}  # sides: name -> (generate wrapper, model)
    for name, folder in SCHEMES[scheme].items():
        loaded, error = attempt(ours_model, work / folder)
        setup[name] = loaded[1] if loaded else {"error": error}
        if loaded:
            sides[name] = (ours_generate, loaded[0])
    loaded, error = attempt(transformers_model, work / "bf16", scheme)
    setup["transformers"] = loaded[1] if loaded else {"error": error}
    if loaded:
        sides["transformers"] = (transformers_generate, loaded[0])

    contenders, results = {}, {}
    for variant, compile in (("", False), ("_compiled", True)):
        for name in [*SCHEMES[scheme], "transformers"]:
            if name in sides:
                wrapper, model = sides[name]
                contenders[name + variant] = wrapper(model, compile)
            else:
                results[name + variant] = {"error": "not loaded: " + setup[name]["error"]}

    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, SHAPE_135M["vocab_size"], (options.prefill_tokens,), generator=generator).tolist()
    calls = {"prefill": (long_prompt, 1), "decode": (long_prompt[:16], options.new_tokens)}
    startup = inductor_startup_seconds()
    results.update(warm_up(contenders, calls, scheme))
    graphs = compiled_graphs()
    working = {name: run for name, run in contenders.items() if "error" not in results[name]}
    for name, timed in time_interleaved(working, calls, options.repeats).items():
        result = results[name]
        result.update(timed)
        if name.endswith("_compiled") and "error" not in result:  # the first call less an ordinary one
            result["compile_seconds"] = result["first_call_seconds"] - result["decode_call_seconds"]["median"]
    return {"setup": setup, "contenders": results, "inductor_startup_seconds": startup,
            "graphs_compiled_while_timing": compiled_graphs() - graphs, "ratios_vs_transformers": ratios(results)}


def inductor_startup_seconds() -> float:
    """A throwaway compile: a process's first one pays ~8 s of inductor start-up here, which would
    otherwise be charged to whichever contender compiles first."""
    started = time.perf_counter()
    torch.compile(lambda x: (x * 2).sin().sum(), fullgraph=True, dynamic=False)(torch.randn(8))
    return time.perf_counter() - started


def warm_up(contenders: dict, calls: dict, scheme: str) -> dict:
    """Allocator, oneDNN kernels, and compiling the decode step, by the very calls timed later
    (a static cache of another length would compile again)."""
    results = {}
    for name, run in contenders.items():
        graphs = compiled_graphs()
        first_call, error = attempt(seconds, run, *calls["decode"])
        error = error or attempt(run, *calls["prefill"])[1]
        if error:
            results[name] = {"error": error}
        else:
            results[name] = {"first_call_seconds": first_call[0], "graphs_compiled": compiled_graphs() - graphs}
        print(f"{scheme} {name} warm-up: {results[name]}", flush=True)
    return results


def time_interleaved(contenders: dict, calls: dict, repeats: int) -> dict:
    """Every contender once per repeat. No inference_mode around the calls: each generate sets
    its own grad mode, as for its users."""
    samples = {name: {"prefill": [], "prefill_cpu": [], "decode": [], "decode_call": []} for name in contenders}
    errors = {}

    def one_round(run) -> tuple:
        wall, cpu = seconds(run, *calls["prefill"])
        started = time.perf_counter()
        rate = run(*calls["decode"])
        return wall, cpu, rate, time.perf_counter() - started

    for _ in range(repeats):
        for name, run in contenders.items():
            if name not in errors:
                values, error = attempt(one_round, run)
                if error:
                    errors[name] = {"error": error}
                    continue
                for key, value in zip(samples[name], values):
                    samples[name][key].append(value)
    results = dict(errors)
    for name, sample in samples.items():
        if name not in errors:
            results[name] = {
                "prefill_seconds": summary(sample["prefill"], min),
                "prefill_cpu_seconds": summary(sample["prefill_cpu"], min),
                "decode_tokens_per_s": summary(sample["decode"], max),
                "decode_call_seconds": summary(sample["decode_call"], min),
            }
    return results


def ratios(results: dict) -> dict:
    """>1 means faster than transformers in the same variant (eager vs eager, compiled vs compiled)."""
    table = {}
    for name, result in results.items():
        reference = results.get("transformers_compiled" if name.endswith("_compiled") else "transformers", {})
        if name.startswith("transformers") or "error" in result or "error" in reference:
            continue
        row = {}
        for stat in ("best", "median"):
            row[f"prefill_{stat}"] = reference["prefill_seconds"][stat] / result["prefill_seconds"][stat]
            row[f"decode_{stat}"] = result["decode_tokens_per_s"][stat] / reference["decode_tokens_per_s"][stat]
        row["prefill_cpu_best"] = reference["prefill_cpu_seconds"]["best"] / result["prefill_cpu_seconds"]["best"]
        table[name] = row
    return table


# --- the parent: prepare, run each scheme in a child, report ---

def run_child(scheme: str, work: Path, options) -> dict:
    result_file = work / f"result_{scheme}.json"
    command = [sys.executable, __file__, "--child", scheme, "--work", str(work), "--threads", str(options.threads),
               "--repeats", str(options.repeats), "--new-tokens", str(options.new_tokens),
               "--prefill-tokens", str(options.prefill_tokens)]
    # a fresh inductor cache per scheme: the warm-up measures a cold compile, not a cache hit
    # (within the process, a later compile may still reuse kernels of identical source)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor_{scheme}")}
    started = time.perf_counter()
    code = subprocess.call(command, env=env)
    if code or not result_file.exists():
        return {"error": f"child process exited with code {code}"}
    result = json.loads(result_file.read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


def print_scheme(scheme: str, report: dict) -> None:
    if "error" in report:
        print(f"\n{scheme}: FAILED {report['error']}")
        return
    print(f"\n{scheme}: transformers via {report['setup']['transformers'].get('how')}")
    for name, result in report["contenders"].items():
        if "error" in result:
            print(f"  {name:26s} FAILED {result['error']}")
            continue
        prefill, decode = result["prefill_seconds"], result["decode_tokens_per_s"]
        ratio = report["ratios_vs_transformers"].get(name)
        versus = (f" | vs transformers: prefill x{ratio['prefill_best']:.2f} (median x{ratio['prefill_median']:.2f})"
                  f" decode x{ratio['decode_best']:.2f} (median x{ratio['decode_median']:.2f})") if ratio else ""
        warmup = f" | compile {result['compile_seconds']:.1f}s" if "compile_seconds" in result else ""
        print(f"  {name:26s} prefill best {prefill['best']:.3f}s median {prefill['median']:.3f}s | decode best "
              f"{decode['best']:.1f} median {decode['median']:.1f} tok/s{warmup}{versus}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 16 new tokens, 128-token prefill")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    # 1 by default: on a shared 2-core machine a 2-thread OpenMP kernel stalls whenever one
    # of its threads is descheduled, which swamps the difference being measured
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--child", choices=list(SCHEMES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.quick:
        options.repeats, options.new_tokens, options.prefill_tokens = 2, 16, 128
    torch.set_num_threads(options.threads)

    if options.child:
        result = time_scheme(options.child, options.work, options)
        (options.work / f"result_{options.child}.json").write_text(json.dumps(result))
        return

    import torchao
    import transformers

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_models_"))
    try:
        make_checkpoint(work / "bf16")
        for folder in sorted({f for s in options.schemes for f in SCHEMES[s].values()} - {"bf16"}):
            quantize_ours(work / "bf16", work / folder, OUR_QUANTIZED[folder])
        reports = {}
        for scheme in options.schemes:
            reports[scheme] = run_child(scheme, work, options)
            print_scheme(scheme, reports[scheme])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "model": "random 135M Llama (SmolLM-135M shape), bf16 checkpoint, cpu",
        "threads": options.threads,
        "repeats": options.repeats,
        "prefill_tokens": options.prefill_tokens,
        "new_tokens": options.new_tokens,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torchao": torchao.__version__},
        "our_quantize_params": OUR_QUANTIZED,
        "seconds": time.perf_counter() - started,
        "schemes": reports,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
