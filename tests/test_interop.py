"""A quantize output is a transformers + torchao checkpoint, and tunemake reads what transformers writes.

Every checkpoint is built through the CLI from tiny random transformers models of each
architecture family; transformers (the reference, test-only) loads it with from_pretrained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import Project


def _models_conftest():
    """tests/models/conftest.py, which makes the tiny random transformers models, under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("models_conftest", Path(__file__).parent / "models" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _models_conftest()
make_hf_model, ARCHITECTURES = _conftest.make_hf_model, _conftest.ARCHITECTURES

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# the schemes transformers + torchao can run on CPU: every one is checked on every family
CPU_SCHEMES = ["int8_weight_only", "int8_dynamic_activation_int8_weight", "int8_dynamic_activation_int4_weight",
               "float8_weight_only"]
FAMILIES = {  # name -> (model_type, overrides): untied and tied heads, biases, qk-norm, a sliding window, Gemma
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "head_dim": 24}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen2_bias": ("qwen2", {"use_sliding_window": False}),
    "qwen3_qk_norm": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}),
    "gemma": ("gemma", {"head_dim": 24}),  # tied, GeGLU, (1 + weight) norms, scaled embeddings
    "gemma2": ARCHITECTURES["gemma2"],  # + sandwich norms, soft caps, alternating sliding layers
    "gemma3": ARCHITECTURES["gemma3"],  # + q/k norms, local and global RoPE
    # fused qkv_proj and gate_up_proj, partial rotary, LongRoPE; an original context past the greedy check's 22
    # tokens (the long factors' switch mid-generation is checked against transformers in tests/models)
    "phi4_mini": ("phi3", {**ARCHITECTURES["phi4_mini_longrope"][1], "original_max_position_embeddings": 32}),
}
TOKENS = torch.tensor([[1, 17, 33, 90, 5, 64, 7, 120, 3, 44]])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One project: every family in bf16, each quantized with every CPU scheme and with int4."""
    root = tmp_path_factory.mktemp("interop")
    project = Project(root)
    targets = []
    for family, (model_type, overrides) in FAMILIES.items():
        model = make_hf_model(root / family, model_type, **overrides)
        model.to(torch.bfloat16).save_pretrained(root / family)
        for scheme in CPU_SCHEMES + ["int4_weight_only"]:
            targets.append(f'[target.{family}_{scheme}]\nkind = "quantize"\nmodel = "{family}"\nscheme = "{scheme}"\n')
    project.tunefile("\n".join(targets))
    project.build(env=OFFLINE, timeout=900)
    return project


def transformers_load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def no_load_problems(info: dict) -> bool:
    return not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_transformers_loads_the_output_and_computes_the_same_logits(built, family, scheme):
    from tunemake.models import load_model

    folder = built.root / "targets" / f"{family}_{scheme}"
    theirs, info = transformers_load(folder)
    assert no_load_problems(info), info
    quantized = [name for name, module in theirs.named_modules()
                 if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ != "Parameter"
                 and type(module.weight.data) is not torch.Tensor]
    recorded = json.loads((folder / "quantization.json").read_text())["quantized"]
    assert sorted(quantized) == sorted(recorded)  # every quantized layer arrived as its torchao tensor
    ours = load_model(folder)
    with torch.no_grad():
        expected, actual = ours(TOKENS).float(), theirs(TOKENS).logits.float()
    # the same torchao tensors through the same ops; two implementations of attention and norms
    assert torch.allclose(actual, expected, atol=2e-2, rtol=2e-2), (actual - expected).abs().max()
    if scheme != "int8_dynamic_activation_int4_weight":
        # 8da4w's activation quantization depends on the other tokens in a call, so a KV-cache decode
        # (transformers' generate) and one full-sequence pass (the check below) differ by design
        assert_same_greedy_text(theirs, ours)


def assert_same_greedy_text(theirs, ours, steps: int = 12) -> None:
    """transformers' greedy continuation (its KV cache) is tunemake's too: at every step tunemake's
    top token is the same, or ties with it within the tolerance of the two implementations
    (random tiny models have near-ties that rounding breaks either way)."""
    with torch.no_grad():
        out = theirs.generate(TOKENS, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0)
        logits = ours(out).float()[0, TOKENS.shape[1] - 1 : -1]
    chosen = out[0, TOKENS.shape[1]:]
    assert len(chosen) == steps
    gaps = logits.max(-1).values - logits.gather(-1, chosen[:, None])[:, 0]
    # 0 where tunemake picks the same token; else within the logits' tolerance (dynamic activation
    # quantization turns the implementations' last-bit differences into whole int8 steps)
    assert (gaps <= 2e-2 * (1 + logits.abs().max())).all(), gaps


@pytest.mark.parametrize("family", ["llama", "qwen3_qk_norm"])
def test_int4_loads_as_torchao_int4_and_fails_loudly_where_it_cannot_run(built, family):
    """transformers gets the exact stored Int4Tensor (plain packing, what mslk's CUDA kernels read);
    on CPU its forward raises instead of computing with anything else, and the tensor means the
    same weights as tunemake's repacked CPU kernel."""
    from safetensors import safe_open

    from tunemake.models import load_model
    from tunemake.models.quantized import int4_dequantize

    folder = built.root / "targets" / f"{family}_int4_weight_only"
    theirs, info = transformers_load(folder)
    assert no_load_problems(info), info
    weight = theirs.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == "Int4Tensor"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for part in ("qdata", "scale", "zero_point"):
            assert torch.equal(getattr(weight, part), f.get_tensor(f"model.layers.0.mlp.down_proj._weight_{part}"))
    with pytest.raises(Exception, match="mslk"), torch.no_grad():
        theirs(TOKENS)
    for module in theirs.modules():  # what the mslk kernel computes: (code - 8) * scale + zero per group
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int4Tensor":
            module.weight = torch.nn.Parameter(int4_dequantize(module.weight), requires_grad=False)
    with torch.no_grad():
        expected, actual = load_model(folder)(TOKENS).float(), theirs(TOKENS).logits.float()
    # tunemake runs the packed CPU kernel, transformers here a bf16 matmul on the same weights
    assert (actual - expected).norm() / expected.norm() < 2e-2


def test_layers_no_group_divides_are_padded_and_transformers_refuses_them(tmp_path):
    """in_features 200: no kernel group size (32..256) divides it, so tunemake pads (and says
    transformers cannot load it); transformers must then fail, not initialize random weights."""
    project = Project(tmp_path)
    make_hf_model(tmp_path / "odd", "llama", intermediate_size=200).to(torch.bfloat16).save_pretrained(tmp_path / "odd")
    project.tunefile('[target.q]\nkind = "quantize"\nmodel = "odd"\nscheme = "int8_dynamic_activation_int4_weight"\n')
    project.build(env=OFFLINE)
    log = "\n".join(path.read_text() for path in tmp_path.rglob("*.log"))
    assert "padded (not skipped): 2 linear layers with in_features 200 -> 256" in log
    assert "transformers cannot load padded layers" in log
    info = json.loads(project.read("targets/q/quantization.json"))
    assert info["transformers_loadable"] is False and len(info["padded"]) == 2
    assert "loads in transformers: no (padded layers)" in project.run("show", "q", check=True).stdout
    # transformers takes the padded tensors as they are (nothing random) and its first forward refuses them
    model, loading = transformers_load(tmp_path / "targets" / "q")
    assert no_load_problems(loading)
    assert list(model.model.layers[0].mlp.down_proj.weight.shape) == [64, 256]
    with pytest.raises(RuntimeError, match="cannot be multiplied"), torch.no_grad():
        model(TOKENS)
    # the padding is visible in the tensors themselves: without quantization.json tunemake still runs it
    import shutil

    from tunemake.models import load_model

    shutil.copytree(tmp_path / "targets" / "q", tmp_path / "bare")
    (tmp_path / "bare" / "quantization.json").unlink()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "bare")(TOKENS), load_model(tmp_path / "targets" / "q")(TOKENS))


def test_round_trip_is_bit_exact_and_stored_int4_is_device_neutral(built):
    """Quantize -> safetensors -> load gives exactly the in-memory tensors; the stored int4 has no
    device-specific packing (plain nibbles, scale and zero point) and repacks to the CPU kernel's
    layout exactly as quantizing for the CPU kernel directly does."""
    from safetensors import safe_open

    from tunemake.models import load_model
    from tunemake.models.quantized import int4_cpu_weight, int4_for_device, load_quantized_state_dict

    folder = built.root / "targets" / "llama_int4_weight_only"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["model.layers.0.self_attn.q_proj.weight"])["_type"] == "Int4Tensor"
    stored = load_quantized_state_dict(folder)
    source = load_model(built.root / "llama", dtype=torch.bfloat16)
    weight = source.model.layers[1].mlp.up_proj.weight.detach()
    group = stored["model.layers.1.mlp.up_proj.weight"].block_size[-1]
    direct = int4_cpu_weight(weight, group)
    repacked = int4_for_device(stored["model.layers.1.mlp.up_proj.weight"], torch.device("cpu"))
    assert torch.equal(repacked.qdata, direct.qdata) and torch.equal(repacked.scale_and_zero, direct.scale_and_zero)


def test_tunemake_evaluates_a_checkpoint_transformers_wrote_like_its_own(tmp_path):
    """transformers + TorchAoConfig(Int8WeightOnlyConfig()).save_pretrained, then tunemake's eval:
    the same numbers, document by document, as on tunemake's own int8 output of the same model."""
    sys.path.insert(0, str(Path(__file__).parent / "kinds"))
    from helpers import make_random_model, write_toyfacts_task
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    project = Project(tmp_path)
    make_random_model(tmp_path / "base")
    write_toyfacts_task(tmp_path / "tasks")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16,
                                                  quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    theirs.save_pretrained(tmp_path / "hf_int8")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "base" / name).exists():
            (tmp_path / "hf_int8" / name).write_bytes((tmp_path / "base" / name).read_bytes())
    lm_head_quantized = type(theirs.lm_head.weight.data).__name__ != "Tensor"
    exclude = "" if lm_head_quantized else 'exclude = ["lm_head"]'  # quantize what transformers quantized
    project.tunefile(f"""
        [target.int8]
        kind = "quantize"
        model = "base"
        scheme = "int8_weight_only"
        {exclude}

        [target.eval_ours]
        kind = "eval"
        model = "int8"
        tasks = ["tasks/toyfacts.yaml"]

        [target.eval_theirs]
        kind = "eval"
        model = "hf_int8"
        tasks = ["tasks/toyfacts.yaml"]
        """)
    project.build(env=OFFLINE, timeout=600)
    ours, hf = (json.loads(project.read(f"targets/{t}/results.json")) for t in ("eval_ours", "eval_theirs"))
    assert ours["results"]["toyfacts"]["acc,none"] == hf["results"]["toyfacts"]["acc,none"]
    per_doc = [[json.loads(line)["filtered_resps"] for line in project.read(f"targets/{t}/samples/toyfacts.jsonl")
                .splitlines()] for t in ("eval_ours", "eval_theirs")]
    assert per_doc[0] == per_doc[1]  # every log-likelihood, bit for bit
    checkpoint = json.loads(project.read("targets/eval_theirs/checkpoint.json"))
    assert checkpoint["quantization"]["scheme"] == "int8_weight_only"
