"""Quantized checkpoint folders: torchao weights per scheme, saving them, loading them back.

A quantized folder is a standard transformers + torchao checkpoint: config.json is the
source's with the `quantization_config` that transformers' TorchAoConfig writes, and the
weights are model.safetensors in torchao's flattened-tensor format (never pickle). tunemake
adds quantization.json, which says what was done per layer (see tunemake.kinds.quantize).
Parameter names stay Hugging Face's; with tied embeddings a quantized output projection is
stored as its own `lm_head.weight` and config.json says `tie_word_embeddings: false`.

int4 is stored device-neutral, as torchao's Int4Tensor (plain packing: two 4-bit codes per
byte, a bf16 scale and zero point per group, tinygemm's asymmetric quantization), and
repacked when loaded for the device's kernel: aten's int4pack for CPU, tinygemm's tile
packing on CUDA. Loaded on CPU, a packed int4 linear runs torch's int4 kernel for a few rows
(decode) and a bf16 matmul on its dequantized weight for many (prefill, eval), ~2x faster there.

A layer whose in_features no kernel group size divides is stored with zero columns appended
(a forward pre-hook appends zeros to its input, so they contribute nothing); quantization.json
lists it. The quantize kind first tries a smaller group size for such a layer, which every
loader understands.
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

SCHEMES = (
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_dynamic_activation_int4_weight",
    "float8_weight_only",
)


# what quantization.json says of each scheme's config, beyond its class and group size
SCHEME_DETAILS = {
    "int8_weight_only": {"granularity": "per_row"},
    "int8_dynamic_activation_int8_weight": {"granularity": "per_row"},
    "int8_dynamic_activation_int4_weight": {"weight_dtype": "int4", "packing": "unpacked_to_int8"},
    "float8_weight_only": {"weight_dtype": "float8_e4m3fn", "granularity": "per_row"},
}
GROUPED = ("int4_weight_only", "int8_dynamic_activation_int4_weight")


def scheme_config(scheme: str, groupsize: int | None):
    """The torchao config of a scheme at a group size: what quantizes a layer, and what
    config.json's quantization_config says of it (int4 as plain Int4Tensor, the stored form)."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        PerGroup,
    )

    if scheme == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=groupsize, int4_packing_format="plain")
    if scheme == "int8_dynamic_activation_int4_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(groupsize))
    configs = {"int8_weight_only": Int8WeightOnlyConfig, "float8_weight_only": Float8WeightOnlyConfig,
               "int8_dynamic_activation_int8_weight": Int8DynamicActivationInt8WeightConfig}
    if scheme not in configs:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return configs[scheme]()


def quantize_weight(
    weight: torch.Tensor, scheme: str, groupsize: int | None, chunk_rows: int = 4096
) -> tuple[torch.Tensor, dict]:
    """One linear weight [out, in] -> a torchao quantized tensor on weight's device, plus what was used.

    When groupsize does not divide in_features, zero columns are appended up to the next
    multiple (the module then needs pad_input_to_weight). Raises rather than returning the
    weight unquantized, as torchao's quantize_ silently does. Rows are quantized chunk_rows
    at a time: every scheme here keeps its scales per row (or per group within a row), so the result is the same (tests check it bit for bit) while the fp32
    temporaries, several times a weight's size, cover one chunk, not a whole output projection.
    """
    if scheme == "int4_weight_only":
        used = {"config": "Int4WeightOnlyConfig", "group_size": groupsize, "packing": "plain",
                "tensor": "Int4Tensor", "qparams": "tinygemm (asymmetric, float zero point)"}
        return int4_weight(weight, groupsize, chunk_rows), used
    config = scheme_config(scheme, groupsize)
    used = {"config": type(config).__name__, **SCHEME_DETAILS[scheme]}
    if scheme in GROUPED:
        used["group_size"] = groupsize
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


def int4_weight(weight: torch.Tensor, groupsize: int, chunk_rows: int = 4096) -> torch.Tensor:
    """A linear weight [out, in] -> torchao's Int4Tensor (plain packing), on weight's device.

    The quantization is tinygemm's (what Int4WeightOnlyConfig does on CUDA, and
    Int4OpaqueTensor on CPU): per group an asymmetric 4-bit code u in 0..15, weight =
    (u - 8) * scale + zero. Int4Tensor stores the same numbers the way mslk's kernels read
    them: the signed code u - 8 as a nibble, even columns in the low nibble, scale and zero
    point as [groups, out]. Nothing here needs mslk, CUDA or the CPU kernel, so the stored
    form is the same on every device. Columns are zero-padded to a multiple of groupsize;
    rows go chunk_rows at a time (groups never cross rows), so the int32 codes of a large
    vocabulary never exist all at once.
    """
    from torchao.quantization import Int4Tensor
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    if weight.ndim != 2:
        raise ValueError(f"int4_weight needs a 2-D weight, got {list(weight.shape)}")
    block_size = [1, groupsize]
    packed, scales, zeros = [], [], []
    for start in range(0, weight.shape[0], chunk_rows):
        rows = pad_in_features(weight[start : start + chunk_rows], groupsize)
        scale, zero = _choose_qparams_affine_tinygemm(
            rows, MappingType.ASYMMETRIC, block_size, torch.int32, 0, 15, 1e-6, None, rows.dtype
        )
        codes = _quantize_affine_tinygemm(rows, block_size, scale, zero, torch.int32, 0, 15)
        # nibble of the signed code u - 8 is u ^ 8; odd columns go in the high nibble
        packed.append((((codes[:, 1::2] << 4) | codes[:, ::2]) ^ 0x88).to(torch.uint8).view(torch.int8))
        scales.append(scale.reshape(len(rows), -1))
        zeros.append(zero.reshape(len(rows), -1))
    in_features = weight.shape[1] + (-weight.shape[1] % groupsize)
    return Int4Tensor(
        qdata=torch.cat(packed), scale=torch.cat(scales).t().contiguous(), zero_point=torch.cat(zeros).t().contiguous(),
        block_size=block_size, shape=torch.Size((weight.shape[0], in_features)),
    )


def int4_codes(weight) -> torch.Tensor:
    """An Int4Tensor's codes as int32 [out, in], 0..15 (tinygemm's unsigned form)."""
    nibbles = weight.qdata.view(torch.uint8).to(torch.int32) ^ 0x88
    return torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(weight.shape[0], weight.shape[1])


def int4_dequantize(weight) -> torch.Tensor:
    """The dense weight an Int4Tensor stands for, in its scale's dtype (fp32 math, as the kernels)."""
    out_features, in_features = weight.shape
    group = weight.block_size[-1]
    codes = int4_codes(weight).reshape(out_features, in_features // group, group).float()
    scale = weight.scale.t().float().unsqueeze(-1)
    zero = weight.zero_point.t().float().unsqueeze(-1)
    return codes.sub_(8).mul_(scale).add_(zero).reshape(out_features, in_features).to(weight.scale.dtype)


def int4_for_device(weight, device: torch.device, chunk_rows: int = 4096) -> torch.Tensor:
    """Repack a stored Int4Tensor for the kernel of `device`: Int4OpaqueTensor (aten int4pack)
    on CPU, Int4TilePackedTo4dTensor (tinygemm) on CUDA, with the stored codes, scales and zero
    points (quantizing on that device differs only for constant groups, whose eps differs)."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    device = torch.device(device)
    if getattr(weight, "act_pre_scale", None) is not None or getattr(weight, "activation_dtype", None) not in (
            None, torch.bfloat16):
        # an AWQ/SmoothQuant pre-scale or float8 activations: the repacked kernels would drop them
        raise ValueError("int4 weights with an activation pre-scale or float8 activations are not supported "
                         "(tunemake runs int4 weight-only with bf16 activations)")
    if weight.scale.dtype != torch.bfloat16:
        raise ValueError(f"int4 weights need bfloat16 scales (the int4 kernels' only dtype), got {weight.scale.dtype}")
    out_features, in_features = weight.shape
    group = weight.block_size[-1]
    scale, zero = weight.scale.t(), weight.zero_point.t()  # [out, groups]
    if device.type == "cpu":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        if chunk_rows % 64:
            raise ValueError(f"chunk_rows must be a multiple of 64, got {chunk_rows}")
        packed = []
        for start in range(0, out_features, chunk_rows):  # the packing works in independent 64-row blocks
            codes = int4_codes(_row_slice(weight, start, start + chunk_rows)).cpu()
            if len(codes) % 16:  # the CPU layout needs out_features % 16; the linear op slices the rows back
                codes = F.pad(codes, (0, 0, 0, -len(codes) % 16))
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        rows = -out_features % 16
        # padded rows (code 0, scale 1, zero 8) stand for zero weights
        scale_and_zero = pack_tinygemm_scales_and_zeros(F.pad(scale.cpu(), (0, 0, 0, rows), value=1.0),
                                                        F.pad(zero.cpu(), (0, 0, 0, rows), value=8.0), scale.dtype)
        return Int4OpaqueTensor(qdata=torch.cat(packed), scale_and_zero=scale_and_zero, block_size=[1, group],
                                shape=torch.Size((out_features, in_features)))
    if device.type == "cuda":
        from torchao.quantization import Int4TilePackedTo4dTensor

        if torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError(f"int4 on CUDA needs tinygemm's tensor cores (compute capability 8.0 or newer), "
                             f"got {torch.cuda.get_device_capability(device)}")
        pairs, scale_and_zero = tinygemm_inputs(weight.to(device))
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        return Int4TilePackedTo4dTensor(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, group],
                                        shape=torch.Size((out_features, in_features)))
    raise ValueError(f"int4 weights run on cpu or cuda, not {device.type}")


def tinygemm_inputs(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """What aten._convert_weight_to_int4pack and the tinygemm linear take for an Int4Tensor, on its
    device: the codes as uint8 pairs [out', in'/2] (even column in the high nibble) and the packed
    scales and zeros [groups', out', 2], with out' and in' padded to multiples of 8 and 1024 as
    Int4TilePackedTo4dTensor.from_hp pads (padded weights are 0: code 0, scale 1, zero 8; the
    linear zero-pads the input and slices padded rows off). Plain tensor ops, so tests run it on CPU."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    out_features, in_features = weight.shape
    rows, columns = -out_features % 8, -in_features % 1024
    codes = F.pad(int4_codes(weight), (0, columns, 0, rows))
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    groups = columns // weight.block_size[-1]
    scale = F.pad(weight.scale.t(), (0, groups, 0, rows), value=1.0)
    zero = F.pad(weight.zero_point.t(), (0, groups, 0, rows), value=8.0)
    return pairs, pack_tinygemm_scales_and_zeros(scale, zero, scale.dtype)


def _row_slice(weight, start: int, stop: int):
    """Rows start:stop of an Int4Tensor, as an Int4Tensor (qdata rows, scale and zero columns)."""
    from torchao.quantization import Int4Tensor

    stop = min(stop, weight.shape[0])
    return Int4Tensor(qdata=weight.qdata[start:stop], scale=weight.scale[:, start:stop],
                      zero_point=weight.zero_point[:, start:stop], block_size=weight.block_size,
                      shape=torch.Size((stop - start, weight.shape[1])))


def int4_cpu_weight(weight: torch.Tensor, groupsize: int, chunk_rows: int = 4096) -> torch.Tensor:
    """Packed int4 for aten._weight_int4pack_mm_for_cpu, for every group size that kernel takes
    (32..256, where torchao's Int4OpaqueTensor.from_hp stops at 128 and needs out_features % 16):
    the stored form repacked. Tests check it equals from_hp bit for bit at 32/64/128."""
    return int4_for_device(int4_weight(weight, groupsize, chunk_rows), torch.device("cpu"), chunk_rows)


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
    """Writes the weights into folder as model.safetensors in torchao's flattened-tensor format
    (what transformers' TorchAoConfig writes and reads) and returns the file name.

    Empties state_dict: torchao's flattening clones each tensor, so the originals are dropped
    one by one to keep a single copy of the model in memory.
    """
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    for name, tensor in state_dict.items():
        if type(tensor) is not torch.Tensor and type(tensor).__name__ not in ALLOWED_TENSORS_SUBCLASSES:
            raise TypeError(f"{name}: torchao cannot write {type(tensor).__name__} to safetensors, and tunemake "
                            "writes no pickle")
    names = list(state_dict)
    tensors, metadata = {}, {}
    for name in names:
        flat, flat_metadata = flatten_tensor_state_dict({name: state_dict.pop(name)})
        tensors.update((key, value.contiguous().cpu()) for key, value in flat.items())
        metadata[name] = flat_metadata[name]
    metadata["tensor_names"] = json.dumps(names)
    save_file(tensors, str(Path(folder) / SAFETENSORS_FILE), metadata)
    canonical_header(Path(folder) / SAFETENSORS_FILE)
    return SAFETENSORS_FILE


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place. safetensors writes the
    metadata map in a per-process random order, so the same tensors gave other bytes on every
    build and everything downstream of a rebuilt checkpoint reran. The header holds the same
    entries compactly either way, so the sorted one has the same length (padded with spaces,
    as the format allows); the data after it is not touched."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:
            raise RuntimeError(f"{path}: sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(canonical + b" " * (length - len(canonical)))


def load_quantized_state_dict(folder: Path, weights_file: str | None = None, device: str | torch.device = "cpu") -> dict:
    """The torchao tensors of a folder's safetensors (one file, or the shards of an index)."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from tunemake.models.checkpoint import weight_files

    folder = Path(folder)
    if weights_file is not None and weights_file != SAFETENSORS_FILE:
        raise ValueError(f"{folder / weights_file}: written by an older tunemake as a pickle; quantize again "
                         f"(tunemake reads quantized weights from safetensors only)")
    files = sorted(set(weight_files(folder).values()))
    if any(path.suffix != ".safetensors" for path in files):
        raise ValueError(f"{folder}: quantized weights must be safetensors, found {', '.join(p.name for p in files)}")
    # transformers flattens, then shards: one weight's parts may sit in different files
    tensors, metadata = {}, {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                tensors.update((key, f.get_tensor(key)) for key in f.keys())
                shard = f.metadata() or {}
            names = json.loads(shard.pop("tensor_names", "[]"))
        except Exception as error:  # safetensors' own error types: a truncated or garbled file
            raise ValueError(f"{path}: cannot read safetensors: {type(error).__name__}: {error}") from None
        if not names:
            raise ValueError(f"{path}: no torchao metadata (tensor_names): plain weights under a torchao "
                             "quantization_config, or a file that is not a torchao checkpoint")
        metadata.update(shard)
        known = json.loads(metadata.get("tensor_names", "[]"))
        metadata["tensor_names"] = json.dumps(list(dict.fromkeys(known + names)))  # shards may repeat the list
    where = files[0] if len(files) == 1 else folder
    try:
        state_dict, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except Exception as error:  # torchao's own errors for a tampered or foreign header
        raise ValueError(f"{where}: torchao metadata does not describe its tensors: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if leftover:
        raise ValueError(f"{where}: tensors not described by the safetensors metadata: {', '.join(sorted(leftover)[:5])}")
    for name, tensor in state_dict.items():
        if type(tensor).__name__ == "Int4Tensor":
            out_features, in_features = tensor.shape
            groups = in_features // tensor.block_size[-1]
            if (in_features % tensor.block_size[-1] or list(tensor.qdata.shape) != [out_features, in_features // 2]
                    or list(tensor.scale.shape) != [groups, out_features]
                    or list(tensor.zero_point.shape) != [groups, out_features]):
                raise ValueError(f"{where}: {name}: Int4Tensor parts do not fit its shape {list(tensor.shape)} and "
                                 f"block size {tensor.block_size} (qdata {list(tensor.qdata.shape)}, "
                                 f"scale {list(tensor.scale.shape)})")
    return state_dict


def read_quantization_info(folder: Path) -> dict:
    """What a quantized folder holds: tunemake's quantization.json, or for a checkpoint that
    transformers wrote (a TorchAoConfig in config.json, no quantization.json) the same fields
    read from its quantization_config."""
    path = Path(folder) / QUANTIZATION_FILE
    if not path.exists() and torchao_config(folder) is not None:
        return info_from_torchao_config(folder)
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


# the torchao tensor each scheme stores (int4 as loaded: repacked for the device)
SCHEME_TENSORS = {
    "int4_weight_only": {"Int4OpaqueTensor", "Int4TilePackedTo4dTensor"},
    "int8_weight_only": {"Int8Tensor"},
    "int8_dynamic_activation_int8_weight": {"Int8Tensor"},
    "int8_dynamic_activation_int4_weight": {"IntxUnpackedToInt8Tensor"},
    "float8_weight_only": {"Float8Tensor"},
}

# torchao config class -> tunemake scheme, for checkpoints other tools wrote
CONFIG_SCHEMES = {
    "Int4WeightOnlyConfig": "int4_weight_only",
    "Int8WeightOnlyConfig": "int8_weight_only",
    "Int8DynamicActivationInt8WeightConfig": "int8_dynamic_activation_int8_weight",
    "Int8DynamicActivationIntxWeightConfig": "int8_dynamic_activation_int4_weight",
    "Float8WeightOnlyConfig": "float8_weight_only",
}


def is_quantized(folder) -> bool:
    """A quantized folder: tunemake's quantization.json, or a TorchAoConfig that transformers wrote."""
    return (Path(folder) / QUANTIZATION_FILE).is_file() or torchao_config(folder) is not None


def torchao_config(folder) -> dict | None:
    """config.json's quantization_config when it is transformers' TorchAoConfig, else None."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and quantization.get("quant_method") == "torchao":
        return quantization
    return None


def info_from_torchao_config(folder) -> dict:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    quant_type = config["quantization_config"].get("quant_type")
    default = quant_type.get("default") if isinstance(quant_type, dict) else None
    if not isinstance(default, dict):
        raise ValueError(f"{path}: quantization_config.quant_type has no 'default' torchao config")
    inner = default
    if default.get("_type") == "FqnToConfig":  # per-module configs: the scheme of the first
        configs = list(((default.get("_data") or {}).get("fqn_to_config") or {}).values())
        inner = next((c for c in configs if isinstance(c, dict) and c.get("_type")), {})
    kind = inner.get("_type")
    weight_dtype = ((inner.get("_data") or {}).get("weight_dtype") or {}).get("_data")
    if kind == "Int8DynamicActivationIntxWeightConfig" and weight_dtype != "int4":
        kind = f"{kind} with weight_dtype {weight_dtype}"
    if kind not in CONFIG_SCHEMES:
        raise ValueError(f"{path}: quantization_config uses torchao {kind}, which tunemake cannot load "
                         f"(it reads {', '.join(CONFIG_SCHEMES)})")
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"{path}: dtype must be bfloat16, float16 or float32, got {dtype!r}")
    group = (inner.get("_data") or {}).get("group_size")
    return {"scheme": CONFIG_SCHEMES[kind], "groupsize": group if isinstance(group, int) else None, "dtype": dtype,
            "device": "any", "weights_file": None, "padded": {}, "written_by": "transformers (TorchAoConfig)"}


def load_quantized_model(folder, device="cpu", dtype=None):
    """A Transformer whose linear weights are the torchao tensors stored in folder.

    The compute dtype is the one the checkpoint was quantized for; a different `dtype`
    is reported on stderr and not applied (its scales and packed weights are tied to it).
    """
    from tunemake.models import Transformer, read_config
    from tunemake.models.checkpoint import meta_device

    folder = Path(folder)
    info = read_quantization_info(folder)
    stored_dtype = getattr(torch, info["dtype"])
    if dtype is not None and dtype != stored_dtype:
        print(f"tunemake: {folder} is quantized for {info['dtype']}; loading it in {info['dtype']}, not {dtype}",
              file=sys.stderr)
    device = torch.device(device)
    state_dict = load_quantized_state_dict(folder, info["weights_file"], device)
    for name, tensor in state_dict.items():
        if type(tensor).__name__ == "Int4Tensor":  # stored device-neutral: repack for this device's kernel
            state_dict[name] = int4_for_device(tensor, device)
        elif type(tensor).__name__ == "Int4TilePackedTo4dTensor" and device.type != "cuda":
            raise ValueError(f"{folder}: {name} is int4 packed for CUDA's tinygemm kernel (int4_packing_format "
                             f"tile_packed_to_4d), which runs on CUDA only; quantize with tunemake for a portable int4")

    args = read_config(folder)
    with meta_device():
        model = Transformer(args)
        if getattr(model, "lm_head", None) is None and "lm_head.weight" in state_dict:
            model.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
    padded = dict(info.get("padded", {}))
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder / (info['weights_file'] or SAFETENSORS_FILE)}: tensors do not match the model in config.json "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    kinds = {type(t).__name__ for t in state_dict.values() if type(t) is not torch.Tensor}
    allowed = SCHEME_TENSORS.get(info["scheme"], kinds)
    if not kinds <= allowed:  # a record that disagrees with the tensors is not trusted
        raise ValueError(f"{folder}: the weights are {', '.join(sorted(kinds))}, not what scheme {info['scheme']} "
                         f"(quantization.json or config.json) stores ({', '.join(sorted(allowed))})")
    for name, tensor in state_dict.items():
        if type(tensor) is not torch.Tensor and tensor.dtype != stored_dtype:
            raise ValueError(f"{folder}: {name} is quantized for {tensor.dtype}, but the checkpoint records dtype "
                             f"{info['dtype']}")
    for name, tensor in state_dict.items():
        module_name, _, leaf = name.rpartition(".")
        want = list(expected[name].shape)
        block = (getattr(tensor, "block_size", None) or [0])[-1]
        if (module_name not in padded and leaf == "weight" and len(want) == 2 and block > 1
                and tensor.shape[1] == want[1] + (-want[1] % block) != want[1]):
            # zero columns up to a multiple of the group size: a padded layer, even without quantization.json
            padded[module_name] = {"in_features": want[1], "padded_in_features": tensor.shape[1]}
        if module_name in padded:
            want[1] = padded[module_name]["padded_in_features"]
        if list(tensor.shape) != want:
            raise ValueError(f"{folder / (info['weights_file'] or SAFETENSORS_FILE)}: tensor {name} has shape {list(tensor.shape)}, "
                             f"config.json implies {want}")
        if type(tensor) is torch.Tensor and tensor.is_floating_point():
            tensor = tensor.to(stored_dtype)
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    for module_name in padded:
        model.get_submodule(module_name).register_forward_pre_hook(pad_input_to_weight)
    if device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.Linear) and type(module.weight).__name__ == "Int4OpaqueTensor":
                module.forward = types.MethodType(int4_cpu_linear_forward, module)
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, buffer.to(device))
    return model.eval()
