"""What the recipes share: checks of the model input (quantize, eval, generate) and the name the
tunefile gives an input path (eval, generate, report).

A module of its own, listed in each of those kinds' CODE, so that editing it rebuilds them all.
"""

from __future__ import annotations

from pathlib import Path


def check_model_folder(folder: Path) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"model: {folder} is a file; expected a checkpoint folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: {folder} has no config.json (not a checkpoint folder)")


def check_device(device_name: str, dtype_name: str | None):
    """The torch device, after checking it can run dtype (before any weight is read)."""
    import torch

    if device_name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch sees no CUDA device")
        if dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype: bfloat16 is not supported on {torch.cuda.get_device_name()}")
    # float16 and bfloat16 run on CPU in torch >= 2.1 (slower than float32 there, but correct)
    return torch.device(device_name)


def dependency_name(ctx, folder: Path) -> str:
    """How the tunefile names a path: the target that built it (`NAME`, or `NAME/inside` for a path in
    its output), else the path relative to the project. Never the step's private folders, so that
    outputs which record it stay byte-identical from run to run and project to project."""
    resolved = Path(folder).resolve()
    for name, path in ctx.deps.items():
        root = Path(path).resolve()
        if resolved == root:
            return name
        if root in resolved.parents:
            return f"{name}/{resolved.relative_to(root).as_posix()}"
    try:
        return str(resolved.relative_to(Path(ctx.project_dir).resolve()))
    except ValueError:
        return str(folder)
