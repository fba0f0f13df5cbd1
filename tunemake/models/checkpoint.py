"""Hugging Face model folders in and out: config.json + safetensors (single or sharded).

Loading builds the model on the meta device and assigns memory-mapped tensors, so a
checkpoint is never held twice. Pickles are never executed: .bin files go through
torch.load(weights_only=True).
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunemake.models.llama import ModelArgs, Transformer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
# tensors some older checkpoints carry that are recomputed, never learned
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# a multimodal Gemma 3's text model under transformers' names (as saved by transformers >= 4.52, and as first
# released), and the vision tower and projector, which the text model does not use
TEXT_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def tensor_names(folder):
    """stored name -> the model's name (None: not the model's), for a checkpoint folder: the
    identity, but for a multimodal Gemma 3, whose text model is what loads."""
    try:
        multimodal = read_json(Path(folder) / CONFIG_FILE).get("model_type") == "gemma3"
    except (FileNotFoundError, ValueError):
        multimodal = False  # read_config reports it
    return text_model_name if multimodal else (lambda name: name)


def text_model_name(name: str) -> str | None:
    """A checkpoint tensor's name in the text model, or None for a vision tensor it does not use."""
    if name.startswith(VISION_PREFIXES):
        return None
    for prefix, ours in TEXT_MODEL_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return name


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(folder) -> ModelArgs:
    path = Path(folder) / CONFIG_FILE
    return ModelArgs.from_hf_config(read_json(path), source=str(path))


def weight_files(folder) -> dict[str, Path]:
    """Tensor name -> file from a shard index, or {"": file} for a single-file checkpoint."""
    folder = Path(folder)
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: missing or empty 'weight_map'")
            files = {}
            for name, shard in weight_map.items():
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"{index_path}: shard {shard!r} (holding tensor {name!r}) is missing")
                files[name] = shard_path
            return files
        if (folder / single_name).is_file():
            return {"": folder / single_name}
    raise FileNotFoundError(
        f"{folder}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX})"
    )


def load_state_dict(folder) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Memory-mapped tensors of a checkpoint folder and the file each came from."""
    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    found, rename = set(), tensor_names(folder)
    for path in sorted(set(files.values())):
        for stored, tensor in _read_weight_file(path).items():
            found.add(stored)
            name = rename(stored)
            if name is None:
                continue
            if name in tensors:
                raise ValueError(f"{path}: tensor {stored!r} also appears in {origin[name]}")
            tensors[name] = tensor
            origin[name] = path
    indexed = {name for name in files if name}
    for name in sorted(indexed - found):
        raise ValueError(f"{files[name]}: tensor {name!r} is listed in the shard index but not in the file")
    return tensors, origin


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: cannot read safetensors file: {error}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only refuses anything but plain tensors and containers
        raise ValueError(f"{path}: cannot load as a plain tensor file (weights_only=True): {error}") from None
    if not isinstance(data, dict) or not all(isinstance(t, torch.Tensor) for t in data.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return data


@contextmanager
def meta_device():
    """Builds modules on the meta device without their random init: nn.Linear and nn.Embedding
    initialise in __init__, and the first such call on meta tensors costs ~1.2 s of torch's lazy
    imports here, for values the checkpoint's tensors replace anyway (transformers skips the
    init the same way). Not thread-safe: it swaps torch.nn.init's functions while it lasts."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def load_model(folder, device="cpu", dtype: torch.dtype | None = torch.float32) -> Transformer:
    """Builds the model on the meta device and assigns the checkpoint's tensors.

    dtype converts floating-point weights (None keeps the file's dtypes). A quantized folder
    (tunemake's quantization.json, or a TorchAoConfig that transformers wrote into config.json)
    is loaded by tunemake.models.quantized.
    """
    folder = Path(folder)
    from tunemake.models.quantized import is_quantized, load_quantized_model

    if is_quantized(folder):

        return load_quantized_model(folder, device, dtype)
    args = read_config(folder)
    with meta_device():
        model = Transformer(args)
    tensors, origin = load_state_dict(folder)
    state = checked_state_dict(model, tensors, origin, folder)
    state = {name: _convert(tensor, device, dtype) for name, tensor in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()


def _convert(tensor: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def checked_state_dict(model: Transformer, tensors: dict, origin: dict, folder) -> dict[str, torch.Tensor]:
    """The tensors the model expects, after checking names and shapes with errors naming file and tensor."""
    expected = model.state_dict()
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        if name not in expected:
            raise ValueError(
                f"{origin[name]}: unexpected tensor {name!r} for a {model.args.model_type} model with this {CONFIG_FILE}"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{origin[name]}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"{CONFIG_FILE} implies {list(expected[name].shape)}"
            )
        state[name] = tensor
    missing = sorted(expected.keys() - state.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{folder}: checkpoint lacks tensor {missing[0]!r}{more}")
    return state


def save_checkpoint(state_dict: dict, args: ModelArgs, folder, tokenizer_from: Path | None = None) -> None:
    """Writes config.json + model.safetensors in the HF layout (+ tokenizer files copied from tokenizer_from)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in state_dict.items()
        if not (name == "lm_head.weight" and args.tie_word_embeddings)
    }
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    config = args.to_hf_config()
    if len(float_dtypes) == 1:
        config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():
                shutil.copyfile(source, folder / name)
