"""The registry of target kinds.

A kind is one module. The engine imports it in the parent process to validate
params and compute keys, so its top level may import only light modules
(pydantic, the standard library); torch and friends are imported inside `run`,
which executes in the step's own child process.

A kind module defines:

- ``Params``: a pydantic model with ``extra="forbid"``; defaults are filled in
  before hashing, so writing a default explicitly does not change the key.
- ``run(params, ctx)``: does the work in the child, writing into ``ctx.out``
  (see ``tunemake.step.StepContext``).
- or, for a kind that is just a command line, ``command_line(params, ctx)`` returning
  ``(argv, env)`` and optionally ``check_outputs(params, out_dir)`` (raise
  ``ValueError`` to fail the step): the engine runs argv itself, with no Python
  child in between; params then come as the plain validated dict.
- ``INPUTS`` (optional): names of params whose values (a string or a list of
  strings) name another target or a source path relative to the tunefile. They
  become dependencies, and ``run`` receives them as absolute paths.
- ``OPTIONAL_INPUTS`` (optional): like ``INPUTS``, but a value that is neither a
  target nor an existing path is passed through unchanged (e.g. lm-eval task
  names mixed with local task files).
- ``PACKAGES`` (optional): distributions whose versions belong in the key;
  ``"python"`` stands for the interpreter's major.minor. A tuple, or a
  function of params (the command kind lets users list them).
- ``CODE`` (optional): extra modules or packages whose source goes into the key
  (the kind's own module always does).
- ``DEVICE_SENSITIVE`` (optional, default False): the device class (cpu, or the
  GPU model) belongs in the key.
- ``resources(params)`` (optional): ``{"gpus": n}``; default no GPU.
- ``validate(params, project_dir)`` (optional): cheap checks run in the parent
  before anything is built; raise ``ValueError("field: message")``.
- ``summary(out_dir)`` (optional): text that ``tunemake show`` prints.
- ``code_files(params, project_dir)`` (optional): more source files for the key
  that depend on params (the ``python`` kind hashes the user's module).

Users add kinds without editing tunemake: ``kind = "python"`` with
``function = "pkg.module:fn"``, or a module registered under the
``tunemake.kinds`` entry-point group (the entry point's name is the kind name).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BUILTIN = {
    "command": "tunemake.kinds.command",
    "python": "tunemake.kinds.python",
    "quantize": "tunemake.kinds.quantize",
    "eval": "tunemake.kinds.evaluate",
    "generate": "tunemake.kinds.generate",
    "report": "tunemake.kinds.report",
}


class UnknownKind(LookupError):
    pass


@dataclass(frozen=True)
class Kind:
    name: str
    module: str
    params: type
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    packages: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    code: tuple[str, ...]
    device_sensitive: bool
    resources: Callable[[Any], dict]
    validate: Callable[[Any, Any], None] | None
    summary: Callable[[Any], str] | None
    code_files: Callable[[Any, Path], list[str]] | None

    def packages_for(self, params) -> tuple[str, ...]:
        return tuple(self.packages(params)) if callable(self.packages) else self.packages

    def source_files(self) -> list[str]:
        """Files whose content is part of every key of this kind."""
        files = _package_files(self.module)
        for name in self.code:
            files.extend(_package_files(name))
        return files


_cache: dict[str, Kind] = {}


def _tuple_or_callable(value):
    return value if callable(value) else tuple(value)


def available() -> list[str]:
    return sorted(set(BUILTIN) | set(_entry_points()))


def get(name: str) -> Kind:
    if name in _cache:
        return _cache[name]
    module_name = BUILTIN.get(name) or _entry_points().get(name)
    if module_name is None:
        raise UnknownKind(name)
    module = importlib.import_module(module_name)
    kind = Kind(
        name=name,
        module=module_name,
        params=module.Params,
        inputs=tuple(getattr(module, "INPUTS", ())),
        optional_inputs=tuple(getattr(module, "OPTIONAL_INPUTS", ())),
        packages=_tuple_or_callable(getattr(module, "PACKAGES", ())),
        code=tuple(getattr(module, "CODE", ())),
        device_sensitive=bool(getattr(module, "DEVICE_SENSITIVE", False)),
        resources=getattr(module, "resources", lambda params: {}),
        validate=getattr(module, "validate", None),
        summary=getattr(module, "summary", None),
        code_files=getattr(module, "code_files", None),
    )
    _cache[name] = kind
    return kind


_eps: dict[str, str] | None = None


def _entry_points() -> dict[str, str]:
    global _eps
    if _eps is None:
        from importlib.metadata import entry_points

        _eps = {ep.name: ep.value.split(":")[0] for ep in entry_points(group="tunemake.kinds")}
    return _eps


def _package_files(name: str) -> list[str]:
    """A module's file, or every .py file of a package, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise UnknownKind(f"code module {name!r} not found")
    if spec.submodule_search_locations:
        root = Path(spec.origin).parent
        return sorted(str(p) for p in root.rglob("*.py"))
    return [spec.origin]
