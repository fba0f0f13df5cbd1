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


class InputViews:
    """The read-only views of dependency outputs for the steps of one build, one per output tree,
    shared by every step that reads that tree (a base checkpoint read by quantize, eval and
    generate is linked once). They live in a folder of the build's own (`folder()` makes it on
    first use), out of reach of other builds and of `tunemake clean`, until `close`.

    A view is reused only while its files still have the stats they were linked with; one that
    changed (a step wrote into it) is left to the steps reading it and a fresh one is made."""

    def __init__(self, store, folder):
        self.store = store
        self.folder = folder  # () -> the build's folder for views
        self._views: dict[tuple, tuple[Path, tuple]] = {}  # (dep, tree) -> (folder, (file stats, folder stats))
        self._made = 0

    def link(self, deps: dict[str, dict]) -> tuple[dict[str, Path], dict[str, dict]]:
        """Each dependency's view: its folder and what was linked there (for `input_changes`)."""
        from tunemake.hashing import tree_digest

        dirs, placed = {}, {}
        for name, manifest in deps.items():
            # per dependency as well as per tree: two dependencies with identical outputs keep
            # their own folders, so a step can still tell them apart by path (the report kind does)
            tree = (name, tree_digest(manifest))
            view = self._views.get(tree)
            if view is not None and view_changed(view[0], view[1], manifest, rehash=False):
                # a step wrote into it: the blobs it links may be damaged too (an in-place edit
                # through a hardlink); a damaged one is dropped, and this step fails
                for entry in manifest.values():
                    if not self.store.verify_blob(entry["digest"]):
                        raise RuntimeError(f"the cached outputs of {name} were changed by a step; build again")
                view = None
            if view is None:
                self._made += 1
                dest = self.folder() / f"{self._made}-{name}"
                view = self._views[tree] = (dest, self.store.link_view(manifest, dest))
            dirs[name], placed[name] = view
        return dirs, placed


def view_changed(folder: Path, placed: tuple[dict, dict], manifest: dict, rehash: bool = True) -> bool:
    """Whether a view differs from how it was linked: a file added (even for a moment: its folder's
    mtime moved), removed or rewritten. A file whose only change is its ctime (an edit that put the
    mtime back, or just a new hardlink to the same blob) is re-hashed with `rehash`, else counted
    as changed."""
    from tunemake.hashing import file_moved

    files, folders = placed
    for rel, (mtime_ns, ctime_ns) in folders.items():
        try:
            st = os.stat(folder / rel)
        except OSError:
            return True
        if (st.st_mtime_ns, st.st_ctime_ns) != (mtime_ns, ctime_ns):
            return True
    if sum(len(names) for _root, _dirs, names in os.walk(folder)) != len(files):
        return True
    return any(file_moved(folder / rel, was, manifest[rel]["digest"], rehash) for rel, was in files.items())


@dataclass
class InputWatch:
    """Every input file as the key saw it, to compare with after the step."""

    views: dict[str, tuple[Path, tuple, dict]] = field(default_factory=dict)  # dep -> (folder, link_view's stats, manifest)
    files: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # source or code file -> (path, as hashed)


def input_changes(watch: InputWatch, changed_since) -> list[str]:
    """Inputs that changed since the key was computed: 'dependency NAME' or the source's name.

    `changed_since(path, hashed)` tells whether a source differs from how it was hashed. A view
    file whose only change is its ctime (an in-place edit that put the mtime back, or a new
    hardlink to the same blob) is re-hashed to tell."""
    changed = [f"dependency {name}" for name, (folder, placed, manifest) in watch.views.items()
               if view_changed(folder, placed, manifest)]
    for label, (path, hashed) in watch.files.items():
        if changed_since(path, hashed):
            changed.append(label)
    return changed
