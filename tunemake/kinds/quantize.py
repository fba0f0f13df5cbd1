"""kind = "quantize": a Hugging Face checkpoint -> a transformers + torchao checkpoint folder.

Weights are read one tensor at a time from the source safetensors and quantized as they
come, so peak memory is the quantized model plus one full-precision tensor, not the
full-precision model. The output is what transformers' TorchAoConfig writes (config.json with
its quantization_config, model.safetensors in torchao's flattened format), so
`AutoModelForCausalLM.from_pretrained` loads it, and tunemake.models.load_model too.

A layer whose in_features the group size does not divide is never skipped (torchao's
quantize_ skips it silently): it gets the largest kernel group size below that divides it,
recorded per module in the quantization_config; only when none does is it zero-padded
(a form only tunemake loads). Either is printed, reported as progress and listed in
quantization.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

INPUTS = ("model",)
PACKAGES = ("python", "torch", "torchao", "safetensors")
CODE = ("tunemake.models", "tunemake.kinds.model_inputs")
DEVICE_SENSITIVE = True

# kept in step with tunemake.models.quantized (not imported here: it imports torch)
SCHEMES = Literal[
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
    "float8_weight_only",
]
GROUPED_SCHEMES = ("int4_weight_only", "int8_dynamic_activation_int4_weight")
DEFAULT_GROUPSIZE = 256  # torchtune's int4 quantization configs use 256
INT4_KERNEL_GROUPSIZES = (32, 64, 128, 256)  # tinygemm (CUDA), aten int4pack (CPU), mslk


def layer_groupsize(in_features: int, requested: int) -> int | None:
    """The largest kernel group size up to `requested` that divides in_features (None: none does)."""
    for size in sorted(INT4_KERNEL_GROUPSIZES, reverse=True):
        if size <= requested and in_features % size == 0:
            return size
    return None


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a target or a path giving a Hugging Face checkpoint folder")
    scheme: SCHEMES
    # checked against scheme (declared before it), and filled in when left out so the key does not change
    groupsize: int | None = Field(default=None, validate_default=True, description="int4 schemes only; default 256")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of linear layers kept in dtype")

    @field_validator("groupsize")
    @classmethod
    def _groupsize_fits_scheme(cls, size: int | None, info: ValidationInfo) -> int | None:
        scheme = info.data.get("scheme")
        if scheme is None:  # scheme itself was invalid and is reported on its own
            return size
        if scheme not in GROUPED_SCHEMES:
            if size is not None:
                raise ValueError(f"{scheme} quantizes per output channel and takes no groupsize")
            return None
        size = DEFAULT_GROUPSIZE if size is None else size
        if size < 2 or size & (size - 1):
            raise ValueError(f"must be a power of two, got {size}")
        if scheme == "int4_weight_only" and size not in INT4_KERNEL_GROUPSIZES:
            raise ValueError(f"int4_weight_only kernels take 32, 64, 128 or 256, got {size}")
        return size

    @field_validator("dtype")
    @classmethod
    def _dtype_fits_scheme(cls, dtype: str, info: ValidationInfo) -> str:
        if info.data.get("scheme") == "int4_weight_only" and dtype != "bfloat16":
            raise ValueError(
                f"int4_weight_only needs bfloat16 (torchao's packed int4 kernels: CUDA tinygemm accepts "
                f"only bf16, the CPU one is fast only in bf16), got {dtype}"
            )
        return dtype

    @field_validator("exclude")
    @classmethod
    def _patterns_not_empty(cls, patterns: list[str]) -> list[str]:
        if any(not pattern.strip() for pattern in patterns):
            raise ValueError("patterns must not be empty")
        return patterns


def validate(params: Params, project_dir) -> None:
    """Checks a source checkpoint folder that exists now (a target's output is checked when it is built)."""
    from tunemake.kinds.model_inputs import check_model_folder

    folder = Path(project_dir) / params.model
    if not folder.exists():
        return
    check_model_folder(folder)
    already_quantized(folder, "model")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"model: {folder} has no .safetensors weights (quantize reads safetensors only)")


def already_quantized(folder: Path, field: str, label: str | None = None) -> None:
    """Refuse a quantized source (tunemake's or one transformers wrote): quantizing twice compounds the loss."""
    label = label or str(folder)
    if (folder / "quantization.json").exists():
        raise ValueError(f"{field}: {label} is already quantized (has quantization.json); give a full-precision one")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # check_model_folder and read_config report a broken config.json
    if isinstance(config, dict) and "quantization_config" in config:
        raise ValueError(f"{field}: {label} is already quantized (config.json has a quantization_config); "
                         "give a full-precision one")


def resources(params: Params) -> dict:
    if params.device == "cuda" or (params.device == "auto" and _gpu_visible()):
        return {"gpus": 1}
    return {}


def _gpu_visible() -> bool:
    """An NVIDIA GPU is present and not hidden, found without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def summary(out_dir) -> str:
    info = json.loads((Path(out_dir) / "quantization.json").read_text())
    group = f", group size {info['groupsize']}" if info.get("groupsize") else ""
    config = info["config"]
    lines = [
        f"{info['scheme']}{group}, {info['dtype']} on {info['device']}: "
        f"{config.get('config')} -> {config.get('tensor')}",
        f"linear layers: {len(info['quantized'])} quantized ({len(info.get('smaller_group', {}))} with a smaller "
        f"group size, {len(info['padded'])} padded), {len(info['kept'])} kept in {info['dtype']}",
        f"packing: {info.get('packing')}; loads in transformers: "
        f"{TRANSFORMERS_NOTE.get(info['scheme'], 'yes') if info.get('transformers_loadable', True) else 'no (padded layers)'}",
        f"weights: {info['bytes_before'] / 1e6:.1f} MB -> {info['bytes_after'] / 1e6:.1f} MB ({info['weights_file']})",
        f"took {info['seconds']:.1f} s, peak RSS {info['peak_rss_bytes'] / 1e6:.0f} MB; "
        f"torch {info['torch_version']}, torchao {info['torchao_version']}",
    ]
    return "\n".join(lines)


def run(params: Params, ctx) -> None:
    import fnmatch
    import shutil
    import time
    from collections import Counter

    import torch
    import torchao
    from safetensors import safe_open

    from tunemake.models import Transformer, read_config
    from tunemake.models.checkpoint import CONFIG_FILE, TOKENIZER_FILES, checked_state_dict, meta_device
    from tunemake.models.quantized import QUANTIZATION_FILE, quantize_weight, save_quantized_state_dict

    started = time.perf_counter()
    _return_freed_memory_to_the_os()
    rss_at_start = _max_rss_bytes()
    source = Path(params.model)
    device = _resolve_device(params.device)
    dtype = getattr(torch, params.dtype)

    # everything that can be wrong with the checkpoint is found here, before any tensor is read
    from tunemake.kinds.model_inputs import dependency_name

    already_quantized(source, "model", dependency_name(ctx, source))
    args = read_config(source)
    with meta_device():
        model = Transformer(args)
    shapes, tensor_files, stored_names = _safetensors_shapes(source)
    state_names = list(checked_state_dict(model, shapes, tensor_files, source))
    linear_names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}

    def excluded(module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in params.exclude)

    # (output name, source tensor) for every tensor written; tied embeddings get a quantized lm_head of their own
    plan = [(name, name) for name in state_names]
    state_dict, quantized, padded, kept = {}, [], {}, {}
    if getattr(model, "lm_head", None) is None:
        linear_names.add("lm_head")
        if excluded("lm_head"):
            kept["lm_head"] = "excluded (stays tied to model.embed_tokens)"
        else:
            plan.append(("lm_head.weight", "model.embed_tokens.weight"))
    for pattern in params.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linear_names):
            raise ValueError(f"exclude: pattern {pattern!r} matches no linear layer of {source}")

    config_used = None
    bytes_before = 0
    groups, smaller = {}, {}  # module -> group size used; those below the requested one, and why
    for done, (name, source_name) in enumerate(plan):
        module_name, _, leaf = name.rpartition(".")
        if source_name in state_dict:  # the tied output projection: the embedding, already read
            tensor = state_dict[source_name]
        else:
            with safe_open(str(tensor_files[source_name]), framework="pt") as f:
                # a private copy, so the file's pages are not held for the rest of the run
                tensor = f.get_tensor(stored_names[source_name]).to(device=device, dtype=dtype, copy=True)
            bytes_before += tensor.numel() * tensor.element_size()
        if module_name not in linear_names or leaf != "weight":
            state_dict[name] = tensor
        elif excluded(module_name):
            state_dict[name] = tensor
            kept[module_name] = "excluded"
        else:
            in_features = tensor.shape[1]
            group = params.groupsize
            if group is not None and in_features % group:
                fitting = layer_groupsize(in_features, group)
                if fitting is not None:
                    group = fitting
                    smaller[module_name] = {"in_features": in_features, "group_size": group}
                    ctx.progress(done, len(plan), f"{module_name}: in_features {in_features}, group size {group}")
            state_dict[name], config_used = quantize_weight(tensor, params.scheme, group)
            groups[module_name] = group
            quantized.append(module_name)
            stored_in_features = state_dict[name].shape[1]
            if stored_in_features != in_features:
                padded[module_name] = {"in_features": in_features, "padded_in_features": stored_in_features}
                message = f"padded {module_name}: in_features {in_features} -> {stored_in_features}"
                ctx.progress(done, len(plan), message)
        del tensor
        ctx.progress(done + 1, len(plan), name)

    ctx.out.mkdir(parents=True, exist_ok=True)
    weights_file = save_quantized_state_dict(state_dict, ctx.out)
    for file_name in TOKENIZER_FILES:
        if (source / file_name).is_file():
            shutil.copyfile(source / file_name, ctx.out / file_name)
    config = json.loads((source / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("model_type") == "gemma3":  # a multimodal Gemma 3: the output is its text model alone
        config = model.args.to_hf_config()
    if "lm_head" in quantized and getattr(model, "lm_head", None) is None:
        config["tie_word_embeddings"] = False  # the tied output projection is quantized on its own
    for key in ("dtype", "torch_dtype"):  # the dtype the model computes in now (transformers 5 reads "dtype")
        if key in config or key == "dtype":
            config[key] = params.dtype
    config["quantization_config"] = torchao_quantization_config(params, groups, sorted(kept))
    (ctx.out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    info = {
        "scheme": params.scheme,
        "groupsize": params.groupsize,
        "dtype": params.dtype,
        "device": device.type,
        "exclude": params.exclude,
        # the config of the requested group size; layers that took another are in group_sizes
        "config": {**(config_used or {}), **({"group_size": params.groupsize} if params.groupsize else {})},
        "weights_file": weights_file,
        # stored device-neutral; tunemake repacks it when loading (transformers needs mslk on CUDA for it)
        "packing": PACKING.get(params.scheme, "torchao's own, the same on every device"),
        "quantized": quantized,
        "group_sizes": {module: groups[module] for module in quantized} if params.groupsize else {},
        "smaller_group": smaller,
        "padded": padded,
        "kept": kept,
        "transformers_loadable": not padded,
        "bytes_before": bytes_before,  # the full-precision tensors, in dtype
        "bytes_after": (ctx.out / weights_file).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "rss_at_start_bytes": rss_at_start,  # after imports, before any weight was read
        "peak_rss_bytes": _max_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "torch_version": torch.__version__,
        "torchao_version": torchao.__version__,
    }
    (ctx.out / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    narrower = Counter(f"{p['in_features']} -> group size {p['group_size']}" for p in smaller.values())
    for what, count in sorted(narrower.items()):
        print(f"group size {params.groupsize} does not divide in_features: {count} linear layers with in_features "
              f"{what} (not skipped); names in {QUANTIZATION_FILE}", flush=True)
    widenings = Counter(f"{p['in_features']} -> {p['padded_in_features']}" for p in padded.values())
    for widening, count in sorted(widenings.items()):
        print(f"padded (not skipped): {count} linear layers with in_features {widening} to fit groupsize "
              f"{params.groupsize}; names in {QUANTIZATION_FILE}; transformers cannot load padded layers", flush=True)
    print(
        f"quantized {len(quantized)} linear layers with {params.scheme} ({len(smaller)} with a smaller group size, "
        f"{len(padded)} padded), kept {len(kept)} in {params.dtype}; "
        f"{info['bytes_before'] / 1e6:.1f} MB -> {info['bytes_after'] / 1e6:.1f} MB",
        flush=True,
    )


TRANSFORMERS_NOTE = {"int4_weight_only": "yes (it runs there on CUDA with mslk; on CPU its forward raises)"}
PACKING = {"int4_weight_only": "Int4Tensor plain (device-neutral); repacked when loaded: int4pack_for_cpu on CPU, "
                               "tinygemm tile_packed_to_4d on CUDA"}


def torchao_quantization_config(params: Params, groups: dict[str, int | None], kept: list[str]) -> dict:
    """config.json's quantization_config, as transformers' TorchAoConfig.to_dict() writes it: one
    torchao config for every layer, or an FqnToConfig where group sizes differ."""
    import warnings
    from collections import Counter

    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig

    from tunemake.models.quantized import scheme_config as layer_config

    sizes = Counter(groups.values())
    if len(sizes) <= 1:
        quant_type = layer_config(params.scheme, next(iter(sizes)) if sizes else params.groupsize)
    else:
        # "_default" for the most common size and a key per other module: vLLM matches keys against its fused
        # module names (qkv_proj, gate_up_proj), so only layers it does not fuse (down_proj) may be named
        common = sizes.most_common(1)[0][0]
        configs = {"_default": layer_config(params.scheme, common)}
        configs.update((module, layer_config(params.scheme, size)) for module, size in groups.items() if size != common)
        with warnings.catch_warnings():  # torchao 0.18 calls "_default" deprecated; transformers and vLLM read it
            warnings.simplefilter("ignore")
            quant_type = FqnToConfig(configs)
    return {"quant_method": "torchao", "quant_type": {"default": config_to_dict(quant_type)},
            "modules_to_not_convert": kept or None, "include_input_output_embeddings": False,
            "untie_embedding_weights": False}


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def _safetensors_shapes(folder: Path) -> tuple[dict, dict[str, Path], dict[str, str]]:
    """Meta tensors with the shape of every tensor the text model uses, the file holding each, and
    its name in that file (a multimodal Gemma 3 stores its text model under a prefix)."""
    import torch
    from safetensors import safe_open

    from tunemake.models.checkpoint import tensor_names, weight_files

    shapes, files, stored_names = {}, {}, {}
    rename = tensor_names(folder)
    for path in sorted(set(weight_files(folder).values())):
        if path.suffix != ".safetensors":
            raise ValueError(f"model: {path} is not safetensors; quantize reads safetensors checkpoints only")
        with safe_open(str(path), framework="pt") as f:
            for stored in f.keys():
                name = rename(stored)
                if name is None:
                    continue
                if name in files:
                    raise ValueError(f"{path}: tensor {stored!r} also appears in {files[name]}")
                shapes[name] = torch.empty(f.get_slice(stored).get_shape(), device="meta")
                files[name] = path
                stored_names[name] = stored
    return shapes, files, stored_names


def _return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold after big frees, so later multi-MB temporaries come from a
    heap that rarely shrinks and RSS ratchets up tensor by tensor (measured: 2.4x instead of 0.9x
    the checkpoint for float8 on the 135M bench). A fixed 1 MiB threshold gives them back on free."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
