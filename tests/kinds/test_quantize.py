"""The quantize kind on tiny random checkpoints: every scheme, bit-exact reload, parity with torchao."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pydantic
import pytest
import torch
from torch import nn

from tunemake.kinds import quantize
from tunemake.models import ModelArgs, Transformer, load_model, save_checkpoint
from tunemake.models.quantized import (
    INT4_CPU_DEQUANTIZE_ROWS,
    int4_cpu_dequantize,
    int4_cpu_linear_forward,
    int4_cpu_weight,
    int4_for_device,
    pad_in_features,
    pad_input_to_weight,
    quantize_weight,
)
from tunemake.step import StepContext

SCHEMES = [
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
    "float8_weight_only",
]
# hidden 256 and attention width 256 divide every group size; the MLP width 320 divides 64 but not 128 or
# 256, so down_proj is the layer that gets a smaller group size
TINY = dict(vocab_size=384, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=320)
# the tied model's vocabulary is no multiple of 16, which the packed int4 CPU layout needs for out_features
TIED = dict(TINY, vocab_size=392, tie_word_embeddings=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on the shared 2-core machine OpenMP barriers
    waiting for descheduled threads made this file take 58 s instead of 6 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_checkpoint(folder: Path, **overrides) -> Path:
    args = ModelArgs(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # biases and norms away from their init so no term can hide
        for name, tensor in model.state_dict().items():
            if not name.endswith("proj.weight") and not name.endswith("embed_tokens.weight"):
                tensor.copy_(1 + 0.1 * torch.randn_like(tensor))
    save_checkpoint(model.state_dict(), args, folder)
    (folder / "tokenizer.json").write_text('{"stand-in": "copied verbatim"}')
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("tied"), **TIED)


@pytest.fixture(scope="module")
def untied_bias(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("qwen2"), model_type="qwen2", qkv_bias=True)


def build(source: Path, out: Path, **params) -> dict:
    ctx = StepContext(target="q", out=out, project_dir=source.parent, progress_file=out.parent / f"{out.name}.progress")
    quantize.run(quantize.Params(model=str(source), **params), ctx)
    return json.loads((out / "quantization.json").read_text())


def quantize_in_memory(model: Transformer, scheme: str, groupsize: int | None, exclude=()) -> Transformer:
    """The reference: the whole model in memory, each linear quantized in place."""
    if model.lm_head is None and "lm_head" not in exclude:
        model.lm_head = nn.Linear(model.args.dim, model.args.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name.endswith(e) for e in exclude):
            continue
        weight = module.weight.detach()
        group = groupsize
        if group and weight.shape[1] % group:
            group = quantize.layer_groupsize(weight.shape[1], group) or group
        quantized = quantize_weight(weight, scheme, group)[0]
        if type(quantized).__name__ == "Int4Tensor":  # the stored form; CPU runs the repacked one
            quantized = int4_for_device(quantized, torch.device("cpu"))
            module.forward = types.MethodType(int4_cpu_linear_forward, module)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        if module.weight.shape[1] != weight.shape[1]:
            module.register_forward_pre_hook(pad_input_to_weight)
    return model


def logits(model, seed=1) -> torch.Tensor:
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_reloads_bit_exact(tied, tmp_path, scheme, capsys):
    info = build(tied, tmp_path / "out", scheme=scheme)
    reloaded = load_model(tmp_path / "out", dtype=torch.bfloat16)
    in_memory = quantize_in_memory(load_model(tied, dtype=torch.bfloat16), scheme, info["groupsize"])
    assert torch.equal(logits(reloaded), logits(in_memory))

    full = logits(load_model(tied, dtype=torch.bfloat16)).float()
    error = (logits(reloaded).float() - full).norm() / full.norm()
    assert 0 < error < (0.4 if "int4" in scheme else 0.1), error  # lossy, yet far from unrelated logits (~1.4)

    linears = [f"model.layers.{i}.{p}" for i in range(2) for p in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
    assert sorted(info["quantized"]) == sorted(linears)
    assert info["kept"] == {}
    assert info["padded"] == {} and info["transformers_loadable"]
    if scheme in quantize.GROUPED_SCHEMES:  # 320 is no multiple of 256: those layers take 64, never skipped
        assert info["groupsize"] == 256
        assert info["smaller_group"] == {f"model.layers.{i}.mlp.down_proj": {"in_features": 320, "group_size": 64}
                                         for i in range(2)}
        assert info["group_sizes"] == {name: 64 if name.endswith("down_proj") else 256 for name in linears}
        assert ("group size 256 does not divide in_features: 2 linear layers with in_features 320 -> group size 64"
                in capsys.readouterr().out)
        progress = (tmp_path / "out.progress").read_text()
        assert "model.layers.0.mlp.down_proj: in_features 320, group size 64" in progress
    else:
        assert info["groupsize"] is None and info["smaller_group"] == {} and info["group_sizes"] == {}
    assert info["weights_file"] == "model.safetensors"  # every scheme: no pickle
    assert info["bytes_after"] == (tmp_path / "out" / info["weights_file"]).stat().st_size
    args = ModelArgs(**TIED)
    embed = args.vocab_size * args.dim
    attention = 2 * args.dim * args.n_heads * args.head_dim + 2 * args.dim * args.n_kv_heads * args.head_dim
    per_layer = attention + 3 * args.dim * args.hidden_dim + 2 * args.dim  # + two norms
    assert info["bytes_before"] == 2 * (embed + 2 * per_layer + args.dim)  # bf16, tied embedding counted once
    assert info["torch_version"] == torch.__version__ and info["torchao_version"]
    assert info["scheme"] == scheme and info["dtype"] == "bfloat16" and info["device"] == "cpu"
    assert info["peak_rss_bytes"] >= info["rss_at_start_bytes"] > 0 and info["seconds"] > 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tied / "tokenizer.json").read_text()
    config, source_config = (json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "out", tied))
    quantization_config = config.pop("quantization_config")
    assert quantization_config["quant_method"] == "torchao" and config.pop("tie_word_embeddings") is False
    source_config.pop("tie_word_embeddings", None)
    assert config.pop("dtype") == "bfloat16" and config.pop("torch_dtype") == "bfloat16"  # what it computes in now
    source_config.pop("torch_dtype", None)
    assert config == source_config  # everything else as the source had it


def test_int4_group_256_is_packed_and_smaller_than_int8(tied, tmp_path):
    info = build(tied, tmp_path / "int4", scheme="int4_weight_only")
    assert info["config"] == {"config": "Int4WeightOnlyConfig", "group_size": 256, "packing": "plain",
                              "tensor": "Int4Tensor", "qparams": "tinygemm (asymmetric, float zero point)"}
    assert info["packing"].startswith("Int4Tensor plain (device-neutral)")
    int8 = build(tied, tmp_path / "int8", scheme="int8_weight_only")
    assert info["bytes_after"] < 0.75 * int8["bytes_after"]


# group 64 divides every layer of the tiny model, so torchao's own quantize_ on the whole model
# quantizes exactly what the kind does and must give the same logits
@pytest.mark.parametrize("scheme, groupsize, config", [
    ("int4_weight_only", 64, "PrototypeInt4WeightOnlyConfig(group_size=64)"),
    ("int8_weight_only", None, "Int8WeightOnlyConfig()"),
    ("int8_dynamic_activation_int8_weight", None, "Int8DynamicActivationInt8WeightConfig()"),
    ("int8_dynamic_activation_int4_weight", 64,
     "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(64))"),
    ("float8_weight_only", None, "Float8WeightOnlyConfig()"),
])
def test_matches_torchao_quantize_on_the_whole_model(untied_bias, tmp_path, scheme, groupsize, config):
    import torchao.quantization as tq
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    info = build(untied_bias, tmp_path / "out", scheme=scheme, groupsize=groupsize)
    assert info["padded"] == {}
    naive = load_model(untied_bias, dtype=torch.bfloat16)
    namespace = {"torch": torch, "PrototypeInt4WeightOnlyConfig": PrototypeInt4WeightOnlyConfig, **vars(tq)}
    tq.quantize_(naive, eval(config, namespace))
    assert torch.equal(logits(load_model(tmp_path / "out")), logits(naive))


@pytest.mark.parametrize("groupsize", [32, 64, 128])
def test_int4_cpu_weight_equals_torchao_from_hp(groupsize):
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    weight = torch.randn(96, 512, generator=torch.Generator().manual_seed(groupsize)).bfloat16()
    ours = int4_cpu_weight(weight, groupsize)
    theirs = Int4OpaqueTensor.from_hp(weight, [1, groupsize])
    assert torch.equal(ours.qdata, theirs.qdata)
    assert torch.equal(ours.scale_and_zero, theirs.scale_and_zero)
    assert ours.block_size == theirs.block_size and ours.shape == theirs.shape


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_rows_in_chunks_gives_the_same_tensor(scheme):
    weight = torch.randn(200, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    groupsize = 128 if scheme in quantize.GROUPED_SCHEMES else None
    whole, used = quantize_weight(weight, scheme, groupsize, chunk_rows=256)
    chunked, _ = quantize_weight(weight, scheme, groupsize, chunk_rows=64)  # 64 + 64 + 64 + 8 rows
    assert type(chunked) is type(whole) and chunked.shape == whole.shape == weight.shape
    names, attributes = whole.__tensor_flatten__()
    assert chunked.__tensor_flatten__() == (names, attributes)
    for name in names:
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    if type(whole).__name__ != "Int4Tensor":  # the stored int4 form has no CPU kernel; its repacking is tested below
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
        assert torch.equal(nn.functional.linear(x, chunked), nn.functional.linear(x, whole))
    if groupsize:  # padding chunk by chunk = quantizing the zero-padded weight
        narrow = weight[:, :200]
        chunked, _ = quantize_weight(narrow, scheme, groupsize, chunk_rows=64)
        whole, _ = quantize_weight(pad_in_features(narrow, groupsize), scheme, groupsize, chunk_rows=256)
        assert chunked.shape == whole.shape == (200, 256)
        for name in names:
            assert torch.equal(getattr(chunked, name), getattr(whole, name)), name


def test_int4_cpu_weight_chunks_and_pads_rows_exactly():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 256, generator=generator).bfloat16()  # 1000 rows: not a multiple of 16 or 64
    whole = int4_cpu_weight(weight, 256, chunk_rows=1024)
    chunked = int4_cpu_weight(weight, 256, chunk_rows=128)
    assert torch.equal(whole.qdata, chunked.qdata) and torch.equal(whole.scale_and_zero, chunked.scale_and_zero)
    assert whole.shape == (1000, 256) and whole.qdata.shape[0] == 1008
    x = torch.randn(3, 256, generator=generator).bfloat16()
    padded_rows = torch.cat([weight, torch.zeros(8, 256, dtype=weight.dtype)])
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    reference = nn.functional.linear(x, Int4OpaqueTensor.from_hp(padded_rows, [1, 128]))
    ours = nn.functional.linear(x, int4_cpu_weight(weight, 128))
    assert ours.shape == (3, 1000) and torch.equal(ours, reference[:, :1000])


def test_int4_group_256_computes_with_256_wide_groups():
    """Against a dequantization written from the tinygemm formula (bf16 qparams from min/max per 256 columns)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 768, generator=generator).bfloat16()
    x = torch.randn(5, 768, generator=generator).bfloat16()
    groups = weight.view(64, 3, 256)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    zero = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
    codes = ((groups - (zero - 8 * scale)) / scale).round().clamp(0, 15)
    dequantized = ((codes.float() - 8) * scale.float() + zero.float()).view(64, 768)
    reference = x.float() @ dequantized.T

    out = nn.functional.linear(x, int4_cpu_weight(weight, 256)).float()
    assert (out - reference).norm() / reference.norm() < 0.01
    full = x.float() @ weight.float().T
    assert (out - full).norm() / full.norm() > 0.05  # int4 is lossy: the check above is not trivially met
    group128 = nn.functional.linear(x, int4_cpu_weight(weight, 128)).float()
    assert (group128 - reference).norm() / reference.norm() > 0.03  # a narrower grouping is distinguishable


def test_padded_columns_contribute_nothing():
    weight = torch.randn(32, 320, generator=torch.Generator().manual_seed(0)).bfloat16()
    linear = nn.Linear(320, 32, bias=False)
    linear.weight = nn.Parameter(int4_cpu_weight(weight, 256), requires_grad=False)
    assert linear.weight.shape == (32, 512)
    linear.register_forward_pre_hook(pad_input_to_weight)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(1)).bfloat16()
    padded_x = torch.cat([x, torch.zeros(3, 192, dtype=x.dtype)], dim=1)
    assert torch.equal(linear(x), nn.functional.linear(padded_x, linear.weight))
    assert pad_in_features(weight, 64) is weight


def test_exclude_keeps_layers_in_dtype_and_leaves_tied_head_tied(tied, tmp_path):
    info = build(tied, tmp_path / "out", scheme="int8_weight_only", exclude=["lm_head", "*.down_proj"])
    assert info["kept"] == {"lm_head": "excluded (stays tied to model.embed_tokens)",
                            "model.layers.0.mlp.down_proj": "excluded", "model.layers.1.mlp.down_proj": "excluded"}
    assert len(info["quantized"]) == 12
    model = load_model(tmp_path / "out")
    source = load_model(tied, dtype=torch.bfloat16)
    assert model.lm_head is None
    kept = model.model.layers[1].mlp.down_proj.weight
    assert type(kept.data) is torch.Tensor and torch.equal(kept, source.model.layers[1].mlp.down_proj.weight)
    assert type(model.model.layers[1].mlp.up_proj.weight).__name__ == "Int8Tensor"
    reference = quantize_in_memory(source, "int8_weight_only", None, exclude=("lm_head", "down_proj"))
    assert torch.equal(logits(model), logits(reference))


def test_params_defaults_and_errors_name_the_field():
    params = quantize.Params(model="base", scheme="int4_weight_only")
    assert params.model_dump() == {"model": "base", "scheme": "int4_weight_only", "groupsize": 256,
                                   "dtype": "bfloat16", "device": "auto", "exclude": []}
    bad = [  # (fields, the field pydantic reports, message)
        (dict(scheme="int3_weight_only"), "scheme", "Input should be"),
        (dict(scheme="int4_weight_only", groupsize=100), "groupsize", "must be a power of two, got 100"),
        (dict(scheme="int4_weight_only", groupsize=512), "groupsize", "int4_weight_only kernels take"),
        (dict(scheme="int8_dynamic_activation_int4_weight", groupsize=0), "groupsize", "must be a power of two"),
        (dict(scheme="int8_weight_only", groupsize=128), "groupsize", "int8_weight_only quantizes per output channel"),
        (dict(scheme="int4_weight_only", dtype="float32"), "dtype", "int4_weight_only needs bfloat16"),
        (dict(scheme="int8_weight_only", dtype="float64"), "dtype", "Input should be"),
        (dict(scheme="int8_weight_only", device="tpu"), "device", "Input should be"),
        (dict(scheme="int8_weight_only", exclude=[" "]), "exclude", "patterns must not be empty"),
        (dict(scheme="int8_weight_only", group_size=64), "group_size", "Extra inputs are not permitted"),
    ]
    for fields, field, message in bad:
        with pytest.raises(pydantic.ValidationError) as caught:
            quantize.Params(model="base", **fields)
        error = caught.value.errors()[0]
        assert error["loc"] == (field,) and message in error["msg"], (fields, error)
    assert quantize.Params(model="b", scheme="int8_dynamic_activation_int4_weight", groupsize=32).groupsize == 32


def test_validate_checks_an_existing_source_folder(tied, tmp_path):
    params = lambda model: quantize.Params(model=model, scheme="int8_weight_only")  # noqa: E731
    quantize.validate(params(str(tied)), tmp_path)
    quantize.validate(params("some_target"), tmp_path)  # not a path: the engine resolves target names
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model: .*empty has no config.json"):
        quantize.validate(params("empty"), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="model: .*file is a file"):
        quantize.validate(params("file"), tmp_path)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model: .*noweights has no .safetensors"):
        quantize.validate(params("noweights"), tmp_path)
    build(tied, tmp_path / "q", scheme="int8_weight_only")
    with pytest.raises(ValueError, match="model: .*q is already quantized"):
        quantize.validate(params("q"), tmp_path)


def test_run_fails_before_writing_on_bad_exclude_or_device(tied, tmp_path):
    with pytest.raises(ValueError, match="exclude: pattern 'lm_hed' matches no linear layer"):
        build(tied, tmp_path / "out", scheme="int8_weight_only", exclude=["lm_hed"])
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device: cuda requested"):
            build(tied, tmp_path / "out", scheme="int8_weight_only", device="cuda")


def test_reload_refuses_bad_records_pickles_and_mismatched_tensors(tied, tmp_path):
    build(tied, tmp_path / "out", scheme="int4_weight_only", groupsize=64)
    record = tmp_path / "out" / "quantization.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "dtype": None}))
    with pytest.raises(ValueError, match="quantization.json: field 'dtype' is missing or not a string"):
        load_model(tmp_path / "out")
    record.write_text(json.dumps(info))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors: tensors do not match .*unexpected: \['model.layers.1"):
        load_model(tmp_path / "out")
    # an output of an older tunemake (pickled int4 weights): refused, never unpickled
    (tmp_path / "out" / "model.safetensors").rename(tmp_path / "out" / "model.pt")
    record.write_text(json.dumps({**info, "weights_file": "model.pt"}))
    with pytest.raises(ValueError, match="model.pt: written by an older tunemake as a pickle; quantize again"):
        load_model(tmp_path / "out")


def test_summary_and_resources(tied, tmp_path, monkeypatch):
    build(tied, tmp_path / "out", scheme="int8_dynamic_activation_int4_weight", groupsize=128)
    text = quantize.summary(tmp_path / "out")
    assert "int8_dynamic_activation_int4_weight, group size 128, bfloat16 on cpu" in text
    assert "15 quantized (2 with a smaller group size, 0 padded), 0 kept" in text and "model.safetensors" in text
    assert "loads in transformers: yes" in text
    int4 = build(tied, tmp_path / "int4", scheme="int4_weight_only")
    assert "loads in transformers: yes (it runs there on CUDA with mslk" in quantize.summary(tmp_path / "int4")
    assert int4["transformers_loadable"]
    params = lambda device: quantize.Params(model="m", scheme="int8_weight_only", device=device)  # noqa: E731
    assert quantize.resources(params("cuda")) == {"gpus": 1}
    assert quantize.resources(params("cpu")) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert quantize.resources(params("auto")) == {}


def test_kind_module_does_not_import_torch():
    code = "import sys, tunemake.kinds.quantize; sys.exit('torch' in sys.modules or 'torchao' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sharded_checkpoint_quantizes_like_a_single_file(tied, tmp_path):
    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (sharded / name).write_text((tied / name).read_text())
    tensors = load_file(tied / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, sharded / file_name)
    weight_map = {name: file_name for file_name, shard_names in shards.items() for name in shard_names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    build(sharded, tmp_path / "from_shards", scheme="int4_weight_only")
    build(tied, tmp_path / "from_file", scheme="int4_weight_only")
    assert torch.equal(logits(load_model(tmp_path / "from_shards")), logits(load_model(tmp_path / "from_file")))


def test_checkpoint_lacking_a_tensor_fails_before_writing(tied, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tied / "config.json").read_text())
    tensors = load_file(tied / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        build(broken, tmp_path / "out", scheme="int8_weight_only")
    assert not (tmp_path / "out").exists()


def test_cli_builds_shows_and_reuses_the_quantized_target(project, tmp_path):
    random_checkpoint(project.root / "base", **TIED)
    project.tunefile("""
        [target.int4]
        kind = "quantize"
        model = "base"
        scheme = "int4_weight_only"
        exclude = ["lm_head"]
    """)
    project.build("int4")
    out = project.root / "targets" / "int4"
    info = json.loads((out / "quantization.json").read_text())
    assert info["groupsize"] == 256 and len(info["quantized"]) == 14 and len(info["smaller_group"]) == 2
    direct = tmp_path / "direct"
    build(project.root / "base", direct, scheme="int4_weight_only", exclude=["lm_head"])
    assert torch.equal(logits(load_model(out)), logits(load_model(direct)))

    shown = project.run("show", "int4", check=True).stdout
    assert "linear layers: 14 quantized (2 with a smaller group size, 0 padded), 1 kept in bfloat16" in shown
    log = "\n".join(p.read_text() for p in project.root.rglob("*.log"))
    assert "2 linear layers with in_features 320 -> group size 64 (not skipped)" in log
    project.build("int4")
    assert json.loads((out / "quantization.json").read_text()) == info  # restored, not rebuilt


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_qwen3_keeps_its_qk_norms_and_matches_the_in_memory_reference(tmp_path, scheme):
    source = random_checkpoint(tmp_path / "qwen3", model_type="qwen3", qk_norm=True)
    info = build(source, tmp_path / "out", scheme=scheme)
    assert not any("norm" in name for name in info["quantized"])
    reloaded = load_model(tmp_path / "out", dtype=torch.bfloat16)
    assert reloaded.args.qk_norm and reloaded.args.model_type == "qwen3"
    original = load_model(source, dtype=torch.bfloat16)
    assert torch.equal(reloaded.model.layers[1].self_attn.k_norm.weight, original.model.layers[1].self_attn.k_norm.weight)
    in_memory = quantize_in_memory(original, scheme, info["groupsize"])
    assert torch.equal(logits(reloaded), logits(in_memory))


@pytest.mark.parametrize("rows,groupsize", [(1536, 64), (1000, 256), (48, 32), (80, 128), (17, 128)])
def test_int4_cpu_dequantize_is_the_weight_the_kernel_uses(rows, groupsize):
    # full 64-row blocks, a shorter last block, rows padded to 16: the kernel applied to an
    # identity matrix returns exactly the weight it computes with
    weight = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    packed = int4_cpu_weight(weight, groupsize)
    kernel = nn.functional.linear(torch.eye(256, dtype=torch.bfloat16), packed).t()
    dense = int4_cpu_dequantize(packed)
    assert dense.shape == (rows, 256) and torch.equal(dense, kernel)


def test_loaded_int4_model_uses_the_kernel_for_decode_and_dense_math_for_long_inputs(tied, tmp_path):
    build(tied, tmp_path / "out", scheme="int4_weight_only")
    model = load_model(tmp_path / "out")
    linear = model.model.layers[0].mlp.down_proj  # 320 input features, group size 64
    assert type(linear.weight).__name__ == "Int4OpaqueTensor" and linear.weight.block_size == [1, 64]
    dense = int4_cpu_dequantize(linear.weight)
    generator = torch.Generator().manual_seed(0)
    few = torch.randn(1, 3, 320, generator=generator).bfloat16()
    many = torch.randn(2, INT4_CPU_DEQUANTIZE_ROWS // 2, 320, generator=generator).bfloat16()
    with torch.no_grad():
        assert torch.equal(linear(few), nn.functional.linear(few, linear.weight))
        fast = linear(many)
        assert torch.equal(fast, nn.functional.linear(many, dense))
        kernel = nn.functional.linear(many, linear.weight)
    # the same int4 model: the two paths differ only by rounding the weight to bf16
    assert ((fast.float() - kernel.float()).norm() / kernel.float().norm()) < 1e-2


@pytest.mark.parametrize("rows, columns, groupsize", [(100, 320, 64), (392, 256, 256), (64, 1024, 128), (13, 96, 32)])
def test_cuda_tinygemm_inputs_match_torchao_from_hp(rows, columns, groupsize):
    """The CUDA repack cannot run here, but everything before the CUDA-only packing op can: the
    uint8 code pairs and packed scales must be what Int4TilePackedTo4dTensor.from_hp builds (its
    steps, replayed on CPU), and the padded region must stand for zero weights."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    from tunemake.models.quantized import int4_weight, tinygemm_inputs

    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(rows)).bfloat16()
    padded = nn.functional.pad(weight, (0, -columns % 1024, 0, -rows % 8))
    scale, zero = _choose_qparams_affine_tinygemm(padded, MappingType.ASYMMETRIC, (1, groupsize), torch.int32, 0, 15,
                                                  None, torch.bfloat16, torch.bfloat16)
    codes = _quantize_affine_tinygemm(padded, [1, groupsize], scale, zero, torch.int32, 0, 15)
    their_pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    their_scales = pack_tinygemm_scales_and_zeros(scale.reshape(len(padded), -1), zero.reshape(len(padded), -1),
                                                  torch.bfloat16)
    pairs, scales = tinygemm_inputs(int4_weight(weight, groupsize))
    assert pairs.shape == their_pairs.shape and pairs.dtype == torch.uint8 and scales.shape == their_scales.shape
    groups = columns // groupsize
    assert torch.equal(pairs[:rows, : columns // 2], their_pairs[:rows, : columns // 2])
    assert torch.equal(scales[:groups, :rows], their_scales[:groups, :rows])
    # padding: code 0 with scale 1 and zero 8 is the weight (0 - 8) * 1 + 8 = 0
    assert (pairs[rows:] == 0).all() and (pairs[:, columns // 2 :] == 0).all()
    assert (scales[groups:, :, 0] == 1).all() and (scales[groups:, :, 1] == 8).all() and (scales[:, rows:, 1] == 8).all()


def test_sharded_torchao_checkpoint_with_a_weight_split_across_files_loads(tied, tmp_path):
    """transformers flattens the state dict, then shards it: a weight's qdata and scale may land in
    different files. tunemake reads them as one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    build(tied, tmp_path / "q", scheme="int8_weight_only")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    keys = sorted(tensors)
    split = keys.index("lm_head._weight_qdata") + 1  # lm_head's qdata in one shard, its scale in the next
    shards = {"model-00001-of-00002.safetensors": keys[:split], "model-00002-of-00002.safetensors": keys[split:]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, tmp_path / "q" / name, metadata)
    (tmp_path / "q" / "model.safetensors").unlink()
    weight_map = {k: name for name, part in shards.items() for k in part}  # transformers indexes the flat keys
    (tmp_path / "q" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    (tmp_path / "q" / "quantization.json").unlink()  # as transformers writes it: no quantization.json either
    model = load_model(tmp_path / "q")
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    (tmp_path / "again").mkdir()
    build(tied, tmp_path / "again" / "q", scheme="int8_weight_only")
    assert torch.equal(logits(model), logits(load_model(tmp_path / "again" / "q")))
    assert info["scheme"] == "int8_weight_only"


def test_int4_with_an_activation_pre_scale_is_refused_not_dropped():
    from tunemake.models.quantized import int4_weight

    weight = int4_weight(torch.randn(32, 64).bfloat16(), 64)
    weight.act_pre_scale = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="activation pre-scale"):
        int4_for_device(weight, torch.device("cpu"))


def test_validate_refuses_a_checkpoint_transformers_quantized(tied, tmp_path):
    folder = tmp_path / "hf_quantized"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((tied / "model.safetensors").read_bytes())
    config = json.loads((tied / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "torchao"}}))
    with pytest.raises(ValueError, match="is already quantized \\(config.json has a quantization_config\\)"):
        quantize.validate(quantize.Params(model="hf_quantized", scheme="int8_weight_only"), tmp_path)


def test_outputs_are_byte_identical_across_processes(tied, tmp_path):
    """safetensors writes its metadata map in a per-process random order; the header is rewritten
    sorted, so a rebuilt checkpoint has the same bytes and nothing downstream reruns."""
    import hashlib

    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); import test_quantize as t; "
            "t.build(Path(sys.argv[1]), Path(sys.argv[2]), scheme='int8_dynamic_activation_int4_weight')")
    digests = set()
    for run in range(2):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, "-c", code, str(tied), str(out), str(Path(__file__).parent)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(run + 1)})
        digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_tampered_or_lying_checkpoints_fail_loudly_naming_the_file(tied, tmp_path):
    from safetensors import safe_open

    build(tied, tmp_path / "int4", scheme="int4_weight_only", groupsize=64)
    path = tmp_path / "int4" / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["model.layers.0.mlp.up_proj.weight"])
    meta["_data"]["block_size"] = [1, 32]  # the scale and zero point were made for 64
    header["__metadata__"]["model.layers.0.mlp.up_proj.weight"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + length :])
    with pytest.raises(ValueError, match=r"model.safetensors: model.layers.0.mlp.up_proj.weight: Int4Tensor parts do not fit"):
        load_model(tmp_path / "int4")
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors"):
        load_model(tmp_path / "int4")

    build(tied, tmp_path / "int8", scheme="int8_weight_only")
    record = tmp_path / "int8" / "quantization.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "scheme": "float8_weight_only"}))
    with pytest.raises(ValueError, match="the weights are Int8Tensor, not what scheme float8_weight_only"):
        load_model(tmp_path / "int8")
    record.write_text(json.dumps({**info, "dtype": "float32"}))
    with pytest.raises(ValueError, match="is quantized for torch.bfloat16, but the checkpoint records dtype float32"):
        load_model(tmp_path / "int8")
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as f:
        assert f.metadata()["tensor_names"]
