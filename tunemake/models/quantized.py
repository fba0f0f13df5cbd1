"""Quantized checkpoint folders: torchao weights per scheme, saving them, loading them back.

A quantized folder holds config.json and tokenizer files copied from the full-precision
source, the weights (model.safetensors when torchao can flatten every tensor type,
else model.pt read back with weights_only=True) and quantization.json, which says what
was done (see tunemake.kinds.quantize). Parameter names stay Hugging Face's; with tied
embeddings a quantized output projection is stored as its own `lm_head.weight`.

A layer whose in_features is not a multiple of the group size is stored with zero
columns appended up to the next multiple; a forward pre-hook appends zeros to its input,
so the extra columns contribute exactly nothing. quantization.json lists these layers.

Loaded on CPU, a packed int4 linear runs torch's int4 kernel for a few rows (decode) and a
bf16 matmul on its dequantized weight for many (prefill, eval), where that is ~2x faster.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_FILE = "quantization.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "model.pt"

SCHEMES = (
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
    "float8_weight_only",
)


def quantize_weight(
    weight: torch.Tensor, scheme: str, groupsize: int | None, chunk_rows: int = 4096
) -> tuple[torch.Tensor, dict]:
    """One linear weight [out, in] -> a torchao quantized tensor on weight's device, plus what was used.

    When groupsize does not divide in_features, zero columns are appended up to the next
    multiple (the module then needs pad_input_to_weight). Raises rather than returning the
    weight unquantized, as torchao's quantize_ silently does. Rows are quantized chunk_rows
    at a time: every scheme here except CUDA int4 keeps its scales per row (or per group
    within a row), so the result is the same (tests check it bit for bit) while the fp32
    temporaries, several times a weight's size, cover one chunk, not a whole output projection.
    """
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        PerGroup,
    )

    if scheme == "int4_weight_only" and weight.device.type == "cuda":
        config = Int4WeightOnlyConfig(group_size=groupsize, int4_packing_format="tile_packed_to_4d")
        used = {"config": "Int4WeightOnlyConfig", "group_size": groupsize, "packing": "tile_packed_to_4d",
                "tensor": "Int4TilePackedTo4dTensor"}
        return _quantize_with_config(pad_in_features(weight, groupsize), config), used  # not row-separable
    if scheme == "int4_weight_only":
        used = {
            "config": "tunemake.models.quantized.int4_cpu_weight",
            "note": "torchao Int4OpaqueTensor.from_hp's steps without its group_size <= 128 "
                    "and out_features % 16 limits",
            "group_size": groupsize,
            "packing": "int4pack_for_cpu",
            "tensor": "Int4OpaqueTensor",
        }
        return int4_cpu_weight(weight, groupsize, chunk_rows), used
    if scheme == "int8_weight_only":
        config = Int8WeightOnlyConfig()
        used = {"config": "Int8WeightOnlyConfig", "granularity": "per_row"}
    elif scheme == "int8_dynamic_activation_int8_weight":
        config = Int8DynamicActivationInt8WeightConfig()
        used = {"config": "Int8DynamicActivationInt8WeightConfig", "granularity": "per_row"}
    elif scheme == "int8_dynamic_activation_int4_weight":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(groupsize))
        used = {"config": "Int8DynamicActivationIntxWeightConfig", "weight_dtype": "int4", "group_size": groupsize,
                "packing": "unpacked_to_int8"}
    elif scheme == "float8_weight_only":
        config = Float8WeightOnlyConfig()
        used = {"config": "Float8WeightOnlyConfig", "weight_dtype": "float8_e4m3fn", "granularity": "per_row"}
    else:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    parts = [_quantize_with_config(pad_in_features(weight[start : start + chunk_rows], groupsize), config)
             for start in range(0, weight.shape[0], chunk_rows)]
    quantized = parts[0] if len(parts) == 1 else _join_rows(parts)
    used["tensor"] = type(quantized).__name__
    return quantized, used


def _join_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Quantized row blocks -> one tensor, by concatenating their inner tensors along rows."""
    names, attributes = parts[0].__tensor_flatten__()
    for part in parts:
        part_names, part_attributes = part.__tensor_flatten__()
        if (part_names != names or part_attributes != attributes
                or any(getattr(part, name).shape[0] != part.shape[0] for name in names)):
            raise RuntimeError(f"{type(part).__name__} does not keep its data per row; cannot quantize it in chunks")
    inner = {name: torch.cat([getattr(part, name) for part in parts]) for name in names}
    shape = (sum(part.shape[0] for part in parts), parts[0].shape[1])
    joined = type(parts[0]).__tensor_unflatten__(inner, attributes, shape, None)
    if tuple(joined.shape) != shape:
        raise RuntimeError(f"joined {type(joined).__name__} has shape {list(joined.shape)}, not {list(shape)}")
    return joined


def _quantize_with_config(weight: torch.Tensor, config) -> torch.Tensor:
    from torchao.quantization import quantize_

    # quantize_ works on modules: lend the weight a throwaway Linear
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(linear, config)
    quantized = linear.weight.detach()
    if type(quantized) is torch.Tensor:
        raise RuntimeError(f"torchao {type(config).__name__} left a weight of shape {list(weight.shape)} unquantized")
    return quantized


def int4_cpu_weight(weight: torch.Tensor, groupsize: int, chunk_rows: int = 4096) -> torch.Tensor:
    """Packed int4 for aten._weight_int4pack_mm_for_cpu, for every group size that kernel takes (32..256).

    The steps of torchao's Int4OpaqueTensor.from_hp (tinygemm asymmetric qparams with a float
    zero point, the quantization Int4WeightOnlyConfig uses on CUDA), which asserts group size
    <= 128 although the kernel accepts 256 and fails when out_features is not a multiple of
    16: here rows are zero-padded to 16 (the linear op slices the output back) and columns to
    a multiple of groupsize. Rows go chunk_rows at a time (a multiple of the packing's
    independent 64-row blocks) so the int32 codes of a large vocabulary never exist all at
    once. Tests check it equals from_hp bit for bit at 32/64/128.
    """
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    if weight.ndim != 2 or weight.device.type != "cpu":
        raise ValueError(f"int4_cpu_weight needs a 2-D cpu weight, got {list(weight.shape)} on {weight.device}")
    if chunk_rows % 64:
        raise ValueError(f"chunk_rows must be a multiple of 64, got {chunk_rows}")
    block_size = [1, groupsize]
    packed, scales_and_zeros = [], []
    for start in range(0, weight.shape[0], chunk_rows):
        rows = pad_in_features(weight[start : start + chunk_rows], groupsize)
        if len(rows) % 16:
            rows = F.pad(rows, (0, 0, 0, -len(rows) % 16))
        scale, zero_point = _choose_qparams_affine_tinygemm(
            rows, MappingType.ASYMMETRIC, block_size, torch.int32, 0, 15, 1e-6, None, rows.dtype
        )
        int_data = _quantize_affine_tinygemm(rows, block_size, scale, zero_point, torch.int32, 0, 15)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(int_data, 1))
        scales_and_zeros.append(
            pack_tinygemm_scales_and_zeros(scale.reshape(len(rows), -1), zero_point.reshape(len(rows), -1), scale.dtype)
        )
    in_features = weight.shape[1] + (-weight.shape[1] % groupsize)
    return Int4OpaqueTensor(
        qdata=torch.cat(packed), scale_and_zero=torch.cat(scales_and_zeros, dim=1), block_size=block_size,
        shape=torch.Size((weight.shape[0], in_features)),
    )


# From this many input rows (tokens x batch) on, a bf16 matmul on the dequantized weight beats
# the packed int4 CPU kernel (1536x576 weight, one thread, 512 rows: 0.7 ms to dequantize +
# 2.1 ms matmul vs 5.5 ms; the kernel wins below ~150 rows). Decode never gets here.
INT4_CPU_DEQUANTIZE_ROWS = 256


def int4_cpu_dequantize(weight) -> torch.Tensor:
    """The dense weight an Int4OpaqueTensor stands for, in its scales' dtype (torchao 0.18 has
    no dequantize for it). Tests check it against the kernel applied to an identity matrix.

    Undoes aten._convert_weight_to_int4pack_for_cpu: each full block of 64 output rows is
    stored as [in_features, 32] bytes, row j in the low nibble and row 32 + j in the high one;
    the last, shorter block as [in_features, rows / 2] bytes, rows 2i and 2i + 1. Then the
    tinygemm dequantization, (code - 8) * scale + zero, per group of in_features.
    """
    packed = weight.qdata
    rows, in_features = packed.shape[0], weight.shape[1]
    full = rows // 64 * 64
    blocks = []
    if full:
        b = packed[:full].view(rows // 64, in_features, 32)
        blocks.append(torch.cat([b & 0xF, b >> 4], 2).transpose(1, 2).reshape(full, in_features))
    if rows > full:
        b = packed[full:].view(in_features, (rows - full) // 2)
        blocks.append(torch.stack([b & 0xF, b >> 4], -1).view(in_features, rows - full).t())
    out_features, group = weight.shape[0], weight.block_size[1]
    codes = (torch.cat(blocks) if len(blocks) > 1 else blocks[0])[:out_features]
    scale_and_zero = weight.scale_and_zero[:, :out_features].float()  # [groups, out_features, 2]
    scale = scale_and_zero[..., 0].t().unsqueeze(-1)  # [out_features, groups, 1]
    zero = scale_and_zero[..., 1].t().unsqueeze(-1)
    dense = codes.reshape(out_features, in_features // group, group).float().sub_(8).mul_(scale).add_(zero)
    return dense.view(out_features, in_features).to(weight.scale_and_zero.dtype)  # fp32 math, as the kernel


def int4_cpu_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear with a packed int4 CPU weight: the int4 kernel for few rows (decode), a dense
    matmul on the dequantized weight for many (prefill, eval), where the kernel is ~2x slower."""
    if x.numel() // x.shape[-1] >= INT4_CPU_DEQUANTIZE_ROWS:
        return F.linear(x, int4_cpu_dequantize(module.weight).to(x.dtype), module.bias)
    return F.linear(x, module.weight, module.bias)


def pad_in_features(weight: torch.Tensor, multiple: int | None) -> torch.Tensor:
    """Append zero columns so in_features becomes a multiple of `multiple` (a no-op when it is, or None)."""
    missing = -weight.shape[1] % multiple if multiple else 0
    return F.pad(weight, (0, missing)) if missing else weight


def pad_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a padded Linear: zero-extend the input to the stored weight's width."""
    x = args[0]
    return (F.pad(x, (0, module.weight.shape[1] - x.shape[-1])),) + tuple(args[1:])


def save_quantized_state_dict(state_dict: dict[str, torch.Tensor], folder: Path) -> str:
    """Writes the weights into folder and returns the file name: safetensors when torchao can
    flatten every tensor type, else torch.save.

    Empties state_dict on the safetensors path: torchao's flattening clones each tensor, so
    the originals are dropped one by one to keep a single copy of the model in memory.
    """
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    flattenable = all(
        type(t) is torch.Tensor or type(t).__name__ in ALLOWED_TENSORS_SUBCLASSES for t in state_dict.values()
    )
    if not flattenable:
        torch.save(state_dict, Path(folder) / TORCH_FILE)
        return TORCH_FILE
    from safetensors.torch import save_file

    names = list(state_dict)
    tensors, metadata = {}, {}
    for name in names:
        flat, flat_metadata = flatten_tensor_state_dict({name: state_dict.pop(name)})
        tensors.update((key, value.contiguous().cpu()) for key, value in flat.items())
        metadata[name] = flat_metadata[name]
    metadata["tensor_names"] = json.dumps(names)
    save_file(tensors, str(Path(folder) / SAFETENSORS_FILE), metadata)
    return SAFETENSORS_FILE


def load_quantized_state_dict(folder: Path, weights_file: str, device: str | torch.device = "cpu") -> dict:
    path = Path(folder) / weights_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file named in {QUANTIZATION_FILE} is missing")
    if weights_file == SAFETENSORS_FILE:
        from safetensors import safe_open
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata()
        state_dict, leftover = unflatten_tensor_state_dict(tensors, metadata)
        if leftover:
            raise ValueError(f"{path}: tensors not described by its metadata: {', '.join(sorted(leftover))}")
        return state_dict
    if weights_file == TORCH_FILE:
        import torchao.prototype.quantization.int4  # noqa: F401 - registers Int4OpaqueTensor as a safe global

        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    raise ValueError(f"{Path(folder) / QUANTIZATION_FILE}: unknown weights_file {weights_file!r}")


def read_quantization_info(folder: Path) -> dict:
    path = Path(folder) / QUANTIZATION_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read quantization record: {error}") from None
    for key in ("scheme", "dtype", "device", "weights_file"):
        if not isinstance(info.get(key), str):
            raise ValueError(f"{path}: field {key!r} is missing or not a string")
    if info["dtype"] not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"{path}: field 'dtype' must be bfloat16, float16 or float32, got {info['dtype']!r}")
    return info


def load_quantized_model(folder, device="cpu", dtype=None):
    """A Transformer whose linear weights are the torchao tensors stored in folder.

    The compute dtype is the one the checkpoint was quantized for; a different `dtype`
    is reported on stderr and not applied (its scales and packed weights are tied to it).
    """
    from tunemake.models import Transformer, read_config

    folder = Path(folder)
    info = read_quantization_info(folder)
    stored_dtype = getattr(torch, info["dtype"])
    if dtype is not None and dtype != stored_dtype:
        print(f"tunemake: {folder} is quantized for {info['dtype']}; loading it in {info['dtype']}, not {dtype}",
              file=sys.stderr)
    device = torch.device(device)
    if info["scheme"] == "int4_weight_only" and device.type != torch.device(info["device"]).type:
        raise ValueError(f"{folder / QUANTIZATION_FILE}: int4 weights are packed for {info['device']}, "
                         f"cannot load on {device.type}; quantize again with device = \"{device.type}\"")
    state_dict = load_quantized_state_dict(folder, info["weights_file"], device)

    args = read_config(folder)
    with torch.device("meta"):
        model = Transformer(args)
        if getattr(model, "lm_head", None) is None and "lm_head.weight" in state_dict:
            model.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
    padded = info.get("padded", {})
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder / info['weights_file']}: tensors do not match the model in config.json "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for name, tensor in state_dict.items():
        module_name, _, leaf = name.rpartition(".")
        want = list(expected[name].shape)
        if module_name in padded:
            want[1] = padded[module_name]["padded_in_features"]
        if list(tensor.shape) != want:
            raise ValueError(f"{folder / info['weights_file']}: tensor {name} has shape {list(tensor.shape)}, "
                             f"config.json implies {want}")
        if type(tensor) is torch.Tensor and tensor.is_floating_point():
            tensor = tensor.to(stored_dtype)
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    for module_name in padded:
        model.get_submodule(module_name).register_forward_pre_hook(pad_input_to_weight)
    if info["scheme"] == "int4_weight_only" and device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.Linear) and type(module.weight).__name__ == "Int4OpaqueTensor":
                module.forward = types.MethodType(int4_cpu_linear_forward, module)
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, buffer.to(device))
    return model.eval()
