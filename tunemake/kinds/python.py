"""kind = "python": call `function(ctx, **args)` from the user's own code, in the step's process."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

INPUTS = ("deps",)
FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    function: str = Field(description='"package.module:function", called as function(ctx, **args)')
    args: dict[str, Any] = Field(default_factory=dict)
    deps: list[str] = Field(default_factory=list, description="targets and/or source paths")
    packages: list[str] = Field(default_factory=list, description="packages whose versions belong in the key")
    gpus: int = Field(default=0, ge=0)

    @field_validator("function")
    @classmethod
    def _shape(cls, value: str) -> str:
        if not FUNCTION_RE.fullmatch(value):  # match() would let a final newline pass `$`
            raise ValueError(f"{value!r} is not of the form package.module:function")
        return value


def PACKAGES(params: Params) -> tuple[str, ...]:
    return ("python", *params.packages)


def resources(params: Params) -> dict:
    return {"gpus": params.gpus}


def _module_file(module: str, project_dir) -> str | None:
    if str(project_dir) not in sys.path:
        sys.path.insert(0, str(project_dir))
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # noqa: BLE001 - a broken parent package (SyntaxError, ...) is the user's error
        return None
    return spec.origin if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def validate(params: Params, project_dir) -> None:
    module = params.function.split(":")[0]
    if _module_file(module, project_dir) is None:
        raise ValueError(f"function: module '{module}' not found or its package fails to import "
                         f"(looked in {project_dir} and the installed packages)")


def code_files(params: Params, project_dir) -> list[str]:
    """The user's module is the recipe here: editing it invalidates the target."""
    origin = _module_file(params.function.split(":")[0], project_dir)
    return [origin] if origin else []


def run(params: Params, ctx) -> None:
    sys.path.insert(0, str(ctx.project_dir))
    module_name, fn_name = params.function.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name, None)
    if fn is None:
        raise ValueError(f"function: {module_name} has no function {fn_name}")
    fn(ctx, **params.args)
