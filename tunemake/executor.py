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
import stat
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


@dataclass
class StepResult:
    """What a finished step gave back: exit status (0 = success), log, and on success the manifest
    of its outputs, whose blobs the executor has put in the local store."""

    code: int
    log: bytes
    outputs: dict | None = None
    detail: str = ""  # one line for the console when the step failed


class Executor(Protocol):
    def gpu_slots(self) -> list[str] | None: ...  # None: the executor places GPU steps itself

    def start(self, spec: StepSpec, tmp: Path, gpus: list[str]): ...  # a step with poll() / fileno()


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
        dest = folder / name.replace("/", "_")
        placed[name] = store.link_view(manifest, dest)
        dirs[name] = dest
    for dest in dirs.values():  # folders read-only too (advisory for root, binding for everyone else)
        for dirpath, _dirs, _files in os.walk(dest, topdown=False):
            os.chmod(dirpath, 0o555)
    return dirs, placed


@dataclass
class InputWatch:
    """Stats of every input file as the key saw them, to compare with after the step."""

    views: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # dep -> (folder, {rel: stat})
    sources: dict[str, dict[str, tuple]] = field(default_factory=dict)  # source -> {file: stat}


def file_stat(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def input_changes(watch: InputWatch, rescan) -> list[str]:
    """Inputs that changed since the key was computed: '<dep NAME>' or 'SOURCE', one each.

    `rescan(source)` gives a source's files and stats now, as the key saw them then."""
    changed = []
    for name, (folder, placed) in watch.views.items():
        if any(file_stat(folder / rel) != tuple(rec[:3]) for rel, rec in placed.items()):
            changed.append(f"dependency {name}")
    for source, before in watch.sources.items():
        if rescan(source) != before:
            changed.append(source)
    return changed
