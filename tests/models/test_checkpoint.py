"""HF folders in and out: sharded, .bin, bad input, and round trips through transformers."""

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from tests.models.conftest import make_hf_model
from tunemake.models import ModelArgs, load_model, read_config, save_checkpoint

TOKENS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def max_difference(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_sharded_safetensors_load(tmp_path):
    hf_model = make_hf_model(tmp_path / "src", "llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model = load_model(tmp_path / "sharded")
    assert max_difference(model(TOKENS), hf_model(TOKENS).logits) < 1e-5


@torch.no_grad()
def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    hf_model = make_hf_model(tmp_path, "qwen2", use_sliding_window=False)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model = load_model(tmp_path)
    assert max_difference(model(TOKENS), hf_model(TOKENS).logits) < 1e-5


class Payload:
    """Stands for arbitrary pickled code: weights_only must refuse to build it."""


def test_bin_with_pickled_object_is_refused(tmp_path):
    make_hf_model(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(64), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: cannot load as a plain tensor file"):
        load_model(tmp_path)


def test_malformed_config_names_the_file(tmp_path):
    make_hf_model(tmp_path, "llama")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        load_model(tmp_path)


def test_bad_config_field_names_file_and_field(tmp_path):
    make_hf_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: field 'num_hidden_layers' must be a positive integer"):
        read_config(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        read_config(tmp_path)


def test_unsupported_rope_type_is_an_error(tmp_path):
    make_hf_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported"):
        read_config(tmp_path)


def test_missing_shard_names_index_and_shard(tmp_path):
    make_hf_model(tmp_path / "src", "llama").save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json: shard '{shards[-1].name}'"):
        load_model(tmp_path / "sharded")


def test_wrong_shape_names_file_and_tensor(tmp_path):
    make_hf_model(tmp_path, "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[95, 64\], config\.json implies \[96, 64\]",
    ):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    make_hf_model(tmp_path, "llama")
    from safetensors.torch import save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint lacks tensor 'model\.norm\.weight'"):
        load_model(tmp_path)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    make_hf_model(tmp_path, "llama")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(tmp_path)


@pytest.mark.parametrize("variant", ["llama3_rope", "llama_tied_wide_heads", "mistral_window", "qwen2_tied", "qwen3_qk_norm", "qwen2_window", "gemma", "gemma2", "gemma3", "phi3", "phi4_mini_longrope"])
@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from tests.models.conftest import ARCHITECTURES

    model_type, overrides = ARCHITECTURES[variant]
    make_hf_model(tmp_path / "src", model_type, **overrides)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    model = load_model(tmp_path / "src")
    save_checkpoint(model.state_dict(), model.args, tmp_path / "out", tokenizer_from=tmp_path / "src")
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert max_difference(reloaded(TOKENS).logits, model(TOKENS)) < 1e-5
    # and bit-exact through our own loader
    again = load_model(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_save_keeps_dtype_and_drops_tied_head(tmp_path):
    make_hf_model(tmp_path / "src", "qwen2", tie_word_embeddings=True, use_sliding_window=False)
    model = load_model(tmp_path / "src", dtype=torch.bfloat16)
    state = dict(model.state_dict(), **{"lm_head.weight": model.model.embed_tokens.weight})
    save_checkpoint(state, model.args, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in saved
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "out", dtype=None).model.norm.weight.dtype == torch.bfloat16


def test_config_reads_both_rope_spellings():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    v4 = ModelArgs.from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": dict(llama3)})
    v5 = ModelArgs.from_hf_config({**base, "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    legacy_type_key = ModelArgs.from_hf_config(
        {**base, "rope_theta": 500000.0, "rope_scaling": {**llama3, "type": "llama3", "rope_type": None}}
    )
    assert v4 == v5 == legacy_type_key
    assert v4.rope_theta == 500000.0 and v4.rope_scaling == llama3
    assert ModelArgs.from_hf_config(v4.to_hf_config()) == v4


def test_quantized_folder_delegates_to_quantized_module(tmp_path, monkeypatch):
    (tmp_path / "quantization.json").write_text("{}")
    calls = []
    fake = types.ModuleType("tunemake.models.quantized")
    fake.load_quantized_model = lambda folder, device, dtype: calls.append((folder, device, dtype)) or "quantized"
    # quantized: quantization.json, or (folder "hf") a TorchAoConfig in config.json
    fake.is_quantized = lambda folder: (folder / "quantization.json").exists() or folder.name == "hf"
    monkeypatch.setitem(sys.modules, "tunemake.models.quantized", fake)
    assert load_model(tmp_path, dtype=torch.bfloat16) == "quantized"
    # a folder transformers wrote (a TorchAoConfig in config.json, no quantization.json) goes there too
    (tmp_path / "hf").mkdir()
    assert load_model(tmp_path / "hf", dtype=torch.bfloat16) == "quantized"
    assert calls == [(tmp_path, "cpu", torch.bfloat16), (tmp_path / "hf", "cpu", torch.bfloat16)]


def test_config_defaults_follow_transformers_per_family():
    from transformers import Qwen3Config

    base = dict(vocab_size=10, hidden_size=64, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4)
    qwen3 = ModelArgs.from_hf_config({**base, "model_type": "qwen3"})
    assert qwen3.head_dim == Qwen3Config(**base).head_dim == 128 and qwen3.qk_norm and not qwen3.qkv_bias
    assert ModelArgs.from_hf_config({**base, "model_type": "llama"}).head_dim == 16


def test_phi3_and_gemma3_config_spellings_read_as_transformers_reads_them():
    """Early Phi-3 names for LongRoPE, the top-level original context winning over a nested one,
    Gemma 3's global RoPE base defaulting to 1e6, and the three-key rope_scaling written back."""
    from tunemake.models import ModelArgs

    half = [1.0] * 8
    base = {"model_type": "phi3", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 131072}
    for name in ("su", "yarn", "longrope"):
        args = ModelArgs.from_hf_config({**base, "original_max_position_embeddings": 4096, "rope_scaling": {
            "type": name, "short_factor": half, "long_factor": half, "original_max_position_embeddings": 8192}})
        assert args.rope_scaling["rope_type"] == "longrope"
        assert args.rope_scaling["original_max_position_embeddings"] == 4096
        assert args.rope_scaling["factor"] == 32
        written = args.to_hf_config()
        assert written["rope_scaling"] == {"type": "longrope", "short_factor": half, "long_factor": half}
        assert written["original_max_position_embeddings"] == 4096
    gemma3 = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 6,
              "num_attention_heads": 4, "intermediate_size": 96}
    assert ModelArgs.from_hf_config(gemma3).rope_theta == 1e6
    nested = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    assert ModelArgs.from_hf_config({**gemma3, "rope_parameters": nested}).rope_theta == 1e6
    args = ModelArgs.from_hf_config({**gemma3, "rope_parameters": nested, "rope_theta": 5e5})
    assert (args.rope_theta, args.local_rope_theta) == (5e5, 10000.0)
    assert args.layer_types == ["sliding_attention"] * 5 + ["full_attention"]


@torch.no_grad()
def test_multimodal_gemma3_loads_and_quantizes_as_its_text_model(tmp_path):
    """Gemma 3 4B and larger ship as the multimodal `gemma3` (a text_config that keeps only what
    differs from Gemma3TextConfig's defaults, the text model under model.language_model., a
    vision tower beside it): tunemake loads the text model with transformers' text-only logits,
    and quantizes it into a Gemma3ForCausalLM checkpoint transformers loads."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tests.models.conftest import TINY, randomize_
    from tunemake.kinds import quantize
    from tunemake.step import StepContext

    text = {key: TINY[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "max_position_embeddings")}
    text.update(num_hidden_layers=3, head_dim=24, sliding_window=6, query_pre_attn_scalar=20,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    reference = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                                                            mm_tokens_per_image=4)).eval()
    randomize_(reference.model.language_model)
    reference.config.model_type = "gemma3"
    reference.save_pretrained(tmp_path / "mm")
    # as the released checkpoints' config.json: text_config without the fields at their defaults
    saved = json.loads((tmp_path / "mm" / "config.json").read_text())
    assert saved["model_type"] == "gemma3"
    for key in ("rms_norm_eps", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_activation"):
        saved["text_config"].pop(key, None)
    (tmp_path / "mm" / "config.json").write_text(json.dumps(saved))

    model = load_model(tmp_path / "mm")
    assert model.args.model_type == "gemma3_text" and model.args.layer_types[1] == "full_attention"
    assert max_difference(model(TOKENS), reference(input_ids=TOKENS).logits) < 1e-5

    out = tmp_path / "int8"
    out.mkdir()
    quantize.run(quantize.Params(model=str(tmp_path / "mm"), scheme="int8_weight_only"),
                 StepContext(target="int8", out=out, project_dir=tmp_path))
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    assert max_difference(theirs(TOKENS).logits.float(), load_model(out)(TOKENS).float()) < 2e-2
