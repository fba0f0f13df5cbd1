"""Every CUDA path of tunemake, on one GPU, in a few minutes: one line per path, ok or its error.

    python bench/gpu_check.py            # from the repository root (it puts the repo on sys.path)

Needs a CUDA build of torch plus tunemake's own dependencies (torchao, lm-eval, pydantic, ...);
transformers only for the last line (tokens/s against transformers + TorchAoConfig). Nothing
is downloaded: the models, tokenizer and task are made here. The paths, each through the CLI
(`python -m tunemake build` in a scratch project, as a user runs them):

- quantize on CUDA: int4 (stored plain, repacked for tinygemm), int8, int8 dynamic activation,
  8da4w, float8 where the GPU has it; transformers loading tunemake's int4 on CUDA;
- eval (lm-eval) and generate on CUDA, generate with torch.compile;
- a checkpoint moved between devices: int4 quantized on CPU then run on CUDA, and quantized
  on CUDA then run on CPU, with the same answers as the checkpoint on its own device;
- decode tokens/s of int4 and bf16 against transformers + TorchAoConfig on the same GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "kinds")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
RESULTS: list[str] = []


def report(path: str, action) -> object:
    started = time.perf_counter()
    try:
        detail = action()
    except Exception as error:  # one line per path: the error, not the traceback (that goes to stderr)
        traceback.print_exc(file=sys.stderr)
        line = f"FAIL {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        detail = None
    else:
        line = f"ok   {path} ({time.perf_counter() - started:.1f} s){': ' + detail if isinstance(detail, str) else ''}"
    print(line, flush=True)
    RESULTS.append(line)
    return detail


def build(project: Path, *targets: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tunemake", "build", "--plain", *targets], cwd=project, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        raise RuntimeError(" | ".join(lines[-3:]))


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("FAIL cuda: torch.cuda.is_available() is False (a CUDA build of torch and a visible GPU are needed)")
        return 1
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"device: {name}, compute capability {capability[0]}.{capability[1]}, torch {torch.__version__}")
    from helpers import make_random_model, write_toyfacts_task

    with tempfile.TemporaryDirectory(prefix="tunemake-gpu-") as tmp:
        project = Path(tmp)
        make_random_model(project / "base")
        write_toyfacts_task(project / "tasks")
        float8 = capability >= (8, 9)
        targets = {
            "int4_cuda": 'kind = "quantize"\nmodel = "base"\nscheme = "int4_weight_only"\ndevice = "cuda"',
            "int4_cpu": 'kind = "quantize"\nmodel = "base"\nscheme = "int4_weight_only"\ndevice = "cpu"',
            "int8_cuda": 'kind = "quantize"\nmodel = "base"\nscheme = "int8_weight_only"\ndevice = "cuda"',
            "int8_dyn_cuda": 'kind = "quantize"\nmodel = "base"\nscheme = "int8_dynamic_activation_int8_weight"\n'
                             'device = "cuda"',
            "da4w_cuda": 'kind = "quantize"\nmodel = "base"\nscheme = "int8_dynamic_activation_int4_weight"\n'
                         'device = "cuda"',
            "gen_int8_dyn_cuda": 'kind = "generate"\nmodel = "int8_dyn_cuda"\nprompt = "the cat"\nmax_new_tokens = 16\n'
                                 'device = "cuda"',
            "gen_da4w_cuda": 'kind = "generate"\nmodel = "da4w_cuda"\nprompt = "the cat"\nmax_new_tokens = 16\n'
                             'device = "cuda"',
            "float8_cuda": 'kind = "quantize"\nmodel = "base"\nscheme = "float8_weight_only"\ndevice = "cuda"',
            "eval_int4_cuda": 'kind = "eval"\nmodel = "int4_cuda"\ntasks = ["tasks/toyfacts.yaml"]\ndevice = "cuda"',
            "eval_int4_cpu_on_cuda": 'kind = "eval"\nmodel = "int4_cpu"\ntasks = ["tasks/toyfacts.yaml"]\ndevice = "cuda"',
            "eval_int4_cuda_on_cpu": 'kind = "eval"\nmodel = "int4_cuda"\ntasks = ["tasks/toyfacts.yaml"]\ndevice = "cpu"',
            "eval_int8_cuda": 'kind = "eval"\nmodel = "int8_cuda"\ntasks = ["tasks/toyfacts.yaml"]\ndevice = "cuda"',
            "gen_int4_cuda": 'kind = "generate"\nmodel = "int4_cuda"\nprompt = "the cat"\nmax_new_tokens = 16\ndevice = "cuda"',
            "gen_int4_cuda_compiled": 'kind = "generate"\nmodel = "int4_cuda"\nprompt = "the cat"\nmax_new_tokens = 16\n'
                                      'device = "cuda"\ncompile = true',
            "gen_int4_cpu": 'kind = "generate"\nmodel = "int4_cpu"\nprompt = "the cat"\nmax_new_tokens = 16\ndevice = "cpu"',
            "gen_int4_cpu_on_cuda": 'kind = "generate"\nmodel = "int4_cpu"\nprompt = "the cat"\nmax_new_tokens = 16\n'
                                    'device = "cuda"',
        }
        if float8:
            targets["gen_float8_cuda"] = ('kind = "generate"\nmodel = "float8_cuda"\nprompt = "the cat"\n'
                                          'max_new_tokens = 16\ndevice = "cuda"')
        (project / "tunefile.toml").write_text("".join(f"[target.{t}]\n{body}\n\n" for t, body in targets.items()))

        def results(target: str) -> dict:
            return json.loads((project / "targets" / target / "results.json").read_text())["results"]["toyfacts"]

        def text(target: str) -> list:
            """The generated tokens of every sample (records also carry params such as device)."""
            lines = (project / "targets" / target / "samples.jsonl").read_text().splitlines()
            return [json.loads(line)["tokens"] for line in lines if line.strip()]

        report("quantize int4 on cuda (stored plain, repacked for tinygemm when loaded)",
               lambda: build(project, "int4_cuda") or
               json.loads((project / "targets/int4_cuda/quantization.json").read_text())["packing"])
        report("quantize int4 on cpu", lambda: build(project, "int4_cpu"))
        report("quantize int8 on cuda", lambda: build(project, "int8_cuda"))
        report("int8 dynamic activation on cuda: quantize, generate", lambda: build(project, "gen_int8_dyn_cuda"))
        report("8da4w on cuda: quantize, generate", lambda: build(project, "gen_da4w_cuda"))
        report("transformers loads tunemake's int4 on cuda", lambda: transformers_runs(project / "targets" / "int4_cuda"))
        if float8:
            report("quantize float8 on cuda", lambda: build(project, "float8_cuda"))
            report("generate float8 on cuda", lambda: build(project, "gen_float8_cuda"))
        else:
            print(f"skip float8: compute capability {capability} < 8.9", flush=True)
        report("eval int4 on cuda", lambda: build(project, "eval_int4_cuda") or f"acc {results('eval_int4_cuda')['acc,none']:.4f}")
        report("eval int8 on cuda", lambda: build(project, "eval_int8_cuda") or f"acc {results('eval_int8_cuda')['acc,none']:.4f}")

        def moved_to_cuda() -> str:
            build(project, "eval_int4_cpu_on_cuda", "gen_int4_cpu", "gen_int4_cpu_on_cuda")
            a, b = results("eval_int4_cuda")["acc,none"], results("eval_int4_cpu_on_cuda")["acc,none"]
            same_text = text("gen_int4_cpu") == text("gen_int4_cpu_on_cuda")
            return f"acc {b:.4f} (quantized on cuda: {a:.4f}); greedy text same as on cpu: {same_text}"

        def moved_to_cpu() -> str:
            build(project, "eval_int4_cuda_on_cpu")
            return f"acc {results('eval_int4_cuda_on_cpu')['acc,none']:.4f} (on cuda: {results('eval_int4_cuda')['acc,none']:.4f})"

        report("int4 quantized on cpu, run on cuda", moved_to_cuda)
        report("int4 quantized on cuda, run on cpu", moved_to_cpu)
        report("generate int4 on cuda", lambda: build(project, "gen_int4_cuda"))
        report("generate int4 on cuda with torch.compile", lambda: build(project, "gen_int4_cuda_compiled") or
               ("same text as eager" if text("gen_int4_cuda") == text("gen_int4_cuda_compiled") else "text differs from eager"))
        report("decode tokens/s against transformers + TorchAoConfig", lambda: speed_against_transformers(project))
    failed = [line for line in RESULTS if line.startswith("FAIL")]
    print(f"{len(RESULTS) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def transformers_runs(folder: Path) -> str:
    """from_pretrained of a tunemake output on CUDA, with no load-report problems, and one forward
    (int4 needs mslk there; its absence is this path's error, not tunemake's)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", output_loading_info=True)
    problems = {key: sorted(value)[:3] for key, value in info.items() if value}
    if problems:
        raise RuntimeError(f"load report: {problems}")
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9]], device="cuda"))
    return type(model.model.layers[0].mlp.down_proj.weight).__name__


SPEED_MODEL = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152)


def speed_against_transformers(project: Path) -> str:
    """A random model of SmolLM2-135M's shape: tunemake generate (int4 at group 64, lm_head in
    bf16, and bf16) against transformers generate with TorchAoConfig(Int4WeightOnlyConfig(
    group_size=64, tile_packed_to_4d)) and in bf16, decode tokens/s on both sides."""
    import torch

    from tunemake.models import ModelArgs, Transformer, save_checkpoint

    folder = project / "speed"
    from helpers import write_tokenizer

    write_tokenizer(folder)
    args = ModelArgs(**SPEED_MODEL, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(std=0.02)
    save_checkpoint({k: v.bfloat16() for k, v in model.state_dict().items()}, args, folder)
    del model
    tokens = 128
    with open(project / "tunefile.toml", "a") as tunefile:
        # group 64: 576 = 9 x 64, so torchao's quantize_ (transformers' side) skips no layer; lm_head stays bf16,
        # as transformers keeps it
        tunefile.write('[target.speed_int4]\nkind = "quantize"\nmodel = "speed"\nscheme = "int4_weight_only"\n'
                       'groupsize = 64\nexclude = ["lm_head"]\ndevice = "cuda"\n\n')
        for name, model_name in (("speed_gen_int4", "speed_int4"), ("speed_gen_bf16", "speed")):
            tunefile.write(f'[target.{name}]\nkind = "generate"\nmodel = "{model_name}"\nprompt = "the cat"\n'
                           f'max_new_tokens = {tokens}\nbatch_size = 1\ndevice = "cuda"\n\n')
    build(project, "speed_gen_int4", "speed_gen_bf16")
    ours = {name: json.loads((project / "targets" / f"speed_gen_{name}" / "speed.json").read_text())["decode_tokens_per_s"]
            for name in ("int4", "bf16")}
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig
    except ImportError as error:
        return f"tunemake int4 {ours['int4']:.0f} tok/s, bf16 {ours['bf16']:.0f} tok/s; transformers not installed ({error})"
    theirs = {}
    configs = {"int4": TorchAoConfig(Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")),
               "bf16": None}
    for name, config in configs.items():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                  quantization_config=config).eval()
        prompt = torch.tensor([[1, 5, 9]], device="cuda")
        hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)  # warm-up
        # decode only, as tunemake's decode_tokens_per_s: a full run minus a prefill-plus-one-token run
        times = []
        for new_tokens in (1, tokens):
            torch.cuda.synchronize()
            started = time.perf_counter()
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        theirs[name] = (tokens - 1) / max(times[1] - times[0], 1e-9)
        del hf
    return "; ".join(f"{name}: tunemake {ours[name]:.0f} tok/s, transformers {theirs[name]:.0f} tok/s "
                     f"({ours[name] / theirs[name]:.2f}x)" for name in ("int4", "bf16"))


if __name__ == "__main__":
    sys.exit(main())
