"""A target's key: a digest over everything that can change its output.

The key is computed from named parts ("components") so that `explain` can say
which part changed, not just that the key did.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from tunemake.hashing import StatCache, digest_json
from tunemake.tunefile import Project, Target

KEY_FORMAT = 1  # bump when the way keys are computed changes


def components(project: Project, target: Target, dep_trees: dict[str, str], hasher: StatCache) -> dict:
    """The key's parts. `dep_trees` maps each dependency target to its output tree digest."""
    return {
        "format": KEY_FORMAT,
        "kind": target.kind,
        "code": code_digests(target, project.dir, hasher),
        "params": target.key_params,
        # output digests, not keys: a dependency rebuilt to identical bytes changes nothing here
        "deps": {dep: dep_trees[dep] for dep in target.target_deps},
        "sources": {src: source_digest(project, src, hasher) for src in target.sources},
        "env": environment(tuple(target.packages), target.device_sensitive),
    }


def key_of(parts: dict) -> str:
    return digest_json(parts)


def source_path(project: Project, source: str) -> Path:
    """Where a source is: relative to the project, or absolute if it lies outside it."""
    return Path(source) if Path(source).is_absolute() else project.dir / source


def source_skip(project: Project) -> tuple[Path, ...]:
    """What a source folder holding the project (deps = ["."]) must not walk into: tunemake's own folders."""
    return (project.targets_dir, project.cache_dir)


def source_digest(project: Project, source: str, hasher: StatCache) -> str:
    from tunemake.errors import UserError
    from tunemake.hashing import UnhashableFile

    try:
        return hasher.source(source_path(project, source), source_skip(project))
    except (UnhashableFile, OSError) as exc:
        raise UserError(f"source {source}: cannot hash it: {exc}") from None


def code_digests(target: Target, project_dir: Path, hasher: StatCache) -> dict[str, str]:
    return {code_label(project_dir / f, project_dir): hasher.file(project_dir / f) for f in target.code_files}


def code_label(path: Path, project_dir: Path) -> str:
    return _code_label(str(path), str(project_dir))


@lru_cache(maxsize=None)
def _code_label(path: str, project_dir: str) -> str:
    """A label that does not depend on where the project or tunemake lives: the path inside the
    project, else the path from the top-level package down."""
    p = Path(path)
    if path.startswith(project_dir + os.sep):
        return p.relative_to(project_dir).as_posix()
    parts = p.parts
    for i in range(len(parts) - 1, -1, -1):
        if not (Path(*parts[: i + 1]).parent / "__init__.py").exists():
            return Path(*parts[i:]).as_posix()
    return p.name


def environment(packages: tuple[str, ...], device_sensitive: bool) -> dict[str, str]:
    env = {}
    for name in packages:
        env[name] = python_version() if name == "python" else package_version(name)
    if device_sensitive:
        env["device"] = device_class()
    return env


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@lru_cache(maxsize=None)
def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"


def visible_gpus() -> list[str]:
    """GPU ids a step may use, read without importing torch."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i, _ in enumerate(sorted(proc.iterdir()))]
    return []


@lru_cache(maxsize=None)
def device_class() -> str:
    """'cpu', or the GPU model: results may differ across device classes, not across machines of one."""
    proc = Path("/proc/driver/nvidia/gpus")
    if visible_gpus() and proc.is_dir():
        for info in sorted(proc.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    return "cuda:" + line.split(":", 1)[1].strip()
        return "cuda"
    return "cpu"


def explain(old: dict | None, new: dict) -> list[str]:
    """What changed between the components of the last build and now, one line each."""
    if old is None:
        return ["never built"]
    lines: list[str] = []
    if old.get("format") != new.get("format"):
        return ["tunemake's key format changed"]
    if old.get("kind") != new.get("kind"):
        lines.append(f"kind: {old.get('kind')} → {new.get('kind')}")
    for path in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(path) != new.get("code", {}).get(path):
            lines.append(f"code {path} changed")
    _diff_params("params", old.get("params", {}), new.get("params", {}), lines)
    for dep in sorted(set(old.get("deps", {})) | set(new.get("deps", {}))):
        before, after = old.get("deps", {}).get(dep), new.get("deps", {}).get(dep)
        if before is None:
            lines.append(f"dep {dep}: added")
        elif after is None:
            lines.append(f"dep {dep}: removed")
        elif before != after:
            lines.append(f"dep {dep}: output changed")
    for src in sorted(set(old.get("sources", {})) | set(new.get("sources", {}))):
        before, after = old.get("sources", {}).get(src), new.get("sources", {}).get(src)
        if before is None:
            lines.append(f"file {src} added")
        elif after is None:
            lines.append(f"file {src} removed")
        elif before != after:
            lines.append(f"file {src} changed")
    for name in sorted(set(old.get("env", {})) | set(new.get("env", {}))):
        before, after = old.get("env", {}).get(name), new.get("env", {}).get(name)
        if before != after:
            lines.append(f"{name}: {before or 'absent'} → {after or 'absent'}")
    return lines


def _diff_params(prefix: str, old, new, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            _diff_params(f"{prefix}.{k}", old.get(k, _ABSENT), new.get(k, _ABSENT), lines)
    elif old != new:
        lines.append(f"{prefix}: {_show(old)} → {_show(new)}")


_ABSENT = object()


def _show(value) -> str:
    if value is _ABSENT:
        return "absent"
    if isinstance(value, str):
        return value if len(value) < 60 else value[:57] + "..."
    return repr(value) if not isinstance(value, (list, dict)) else str(value)[:60]
