"""What an executor is given and what it gives back; the step's private, read-only inputs.

An executor (local processes in `run.py`, Ray tasks in `ray_executor.py`) knows nothing of the
graph or the cache decisions: it gets a `StepSpec` and hands back a step it can poll, whose
outputs it collects into the store. Inputs are immutable for the step's lifetime: each
dependency's output is linked from the blob store into the step's own folder, so a
concurrent build that swaps `targets/DEP`, or `tunemake clean DEP`, cannot reach a running
step; an in-place edit of a hardlinked input, and an edited source, are caught by
`input_changes` after the step, and its outputs are then never cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class StepSpec:
    """One step, with project-relative params: resolved only where and when it runs."""

    target: str
    module: str  # the kind's module
    params: dict  # the kind's params, with each input value replaced as given in input_refs
    input_refs: dict[str, list[str]]  # field -> "target:NAME[/inside]" | "path:REL" | "value:V"
    deps: dict[str, dict]  # dependency target -> its output manifest {rel: {digest, size, x}}
    sources: list[str]  # source paths, project-relative (absolute only if outside the project)
    gpus: int = 0


class Executor(Protocol):
    """`start` returns a running step: poll() -> exit status or None, fileno() -> a descriptor that
    turns readable when it exits (or None: poll it), read_progress(), kill(), error_line() (a
    failed step's one-line reason), and on success collect(store) -> the outputs' manifest, their
    blobs in the store. The step's log is at step.log."""

    def gpu_slots(self) -> list[str] | None: ...  # None: the executor places GPU steps itself

    def start(self, spec: StepSpec, tmp: Path, gpus: list[str]): ...


def resolve_params(spec: StepSpec, project_dir: Path, dep_dirs: dict[str, Path],
                   placed_sources: dict[str, Path] | None = None) -> dict:
    """The params as the kind's code gets them: input refs become absolute paths (a source
    where `placed_sources` puts it, on a worker without the project's filesystem)."""

    def one(ref: str) -> str:
        how, _, value = ref.partition(":")
        if how == "target":
            owner, _, inside = value.partition("/")
            return str(dep_dirs[owner] / inside) if inside else str(dep_dirs[owner])
        if how == "path":
            if placed_sources is not None:
                return str(placed_sources[value])
            return str(Path(value) if Path(value).is_absolute() else project_dir / value)
        return value

    params = dict(spec.params)
    for fld, refs in spec.input_refs.items():
        values = [one(r) for r in refs]
        params[fld] = values if isinstance(spec.params.get(fld), list) else values[0]
    return params


def link_inputs(store, deps: dict[str, dict], folder: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Each dependency's outputs, linked read-only from the blob store into folder/NAME.

    Returns the folders by dependency, and what was linked (for `input_changes`)."""
    dirs, placed = {}, {}
    for name, manifest in deps.items():
        dest = folder / name
        placed[name] = store.link_view(manifest, dest)
        dirs[name] = dest
    return dirs, placed


@dataclass
class InputWatch:
    """Every input file as the key saw it, to compare with after the step."""

    views: dict[str, tuple[Path, dict, dict]] = field(default_factory=dict)  # dep -> (folder, {rel: stat}, manifest)
    files: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # source or code file -> (path, as hashed)


def input_changes(watch: InputWatch, changed_since) -> list[str]:
    """Inputs that changed since the key was computed: 'dependency NAME' or the source's name.

    `changed_since(path, hashed)` tells whether a source differs from how it was hashed. A view
    file whose only change is its ctime (an in-place edit that put the mtime back, or a new
    hardlink to the same blob) is re-hashed to tell."""
    from tunemake.hashing import hash_file

    changed = []
    for name, (folder, placed, manifest) in watch.views.items():
        for rel, (ino, size, mtime_ns, ctime_ns) in placed.items():
            try:
                st = os.stat(folder / rel)
            except OSError:
                changed.append(f"dependency {name}")
                break
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (ino, size, mtime_ns) or (
                    st.st_ctime_ns != ctime_ns and hash_file(folder / rel) != manifest[rel]["digest"]):
                changed.append(f"dependency {name}")
                break
    for label, (path, hashed) in watch.files.items():
        if changed_since(path, hashed):
            changed.append(label)
    return changed
