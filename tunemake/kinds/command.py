"""kind = "command": any command that writes files, like a make rule or a DVC stage."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

INPUTS = ("deps",)
SUBST_RE = re.compile(r"\{(out|deps\.[A-Za-z0-9_@\-]+)\}")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd: str | list[str] = Field(description="shell command (string) or argv (list)")
    deps: list[str] = Field(default_factory=list, description="targets and/or source paths")
    outs: list[str] = Field(default_factory=list, description="declared outputs, relative to the output folder")
    env: dict[str, str] = Field(default_factory=dict)
    packages: list[str] = Field(default_factory=list, description="packages whose versions belong in the key")
    gpus: int = Field(default=0, ge=0)

    @field_validator("cmd")
    @classmethod
    def _not_empty(cls, value):
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("must not be empty")
        return value

    @field_validator("env")
    @classmethod
    def _shell_names(cls, value):
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # other names do not survive /bin/sh
                raise ValueError(f"{name!r} is not a shell identifier (letters, digits and '_', not a digit first)")
            if name.startswith("TUNEMAKE_"):
                raise ValueError(f"{name!r}: TUNEMAKE_* variables are set by tunemake itself")
        return value

    @field_validator("outs")
    @classmethod
    def _relative(cls, value):
        for out in value:
            parts = out.replace("\\", "/").split("/")
            if out.startswith("/") or ".." in parts or not out.strip() or all(p in ("", ".") for p in parts):
                raise ValueError(f"'{out}' must be a relative path inside the output folder")
        return value


def PACKAGES(params: Params) -> tuple[str, ...]:
    return tuple(params.packages)


def resources(params: Params) -> dict:
    return {"gpus": params.gpus}


def env_name(target: str) -> str:
    """TUNEMAKE_DEP_<NAME>: upper case, anything but letters and digits becomes '_'."""
    return "TUNEMAKE_DEP_" + re.sub(r"[^A-Za-z0-9]", "_", target).upper()


def validate(params: Params, project_dir) -> None:
    """Deps whose environment variable names would collide (`a-b` and `a_b`)."""
    seen: dict[str, str] = {}
    for dep in params.deps:
        if (Path(project_dir) / dep).exists():
            continue  # a source: only dependency targets get a variable
        name = env_name(dep)
        if seen.get(name, dep) != dep:
            raise ValueError(f"deps: '{seen[name]}' and '{dep}' would share ${name}; rename one")
        seen[name] = dep


# The command kind has no Python `run`: the engine execs this command line itself, so a
# step costs a fork and an exec instead of a Python interpreter (see tunemake.run). Variables
# in `env` whose names are not shell identifiers do not survive /bin/sh.
def command_line(params: dict, ctx) -> tuple[list[str], dict[str, str]]:
    """The argv to run and the variables to add to the environment, `{out}`/`{deps.X}` filled in."""
    env = dict(params.get("env") or {})
    env["TUNEMAKE_OUT"] = str(ctx.out)
    for name, path in ctx.deps.items():
        variable = env_name(name)
        if variable in env:  # validate() cannot tell a target from a path of the same name
            raise ValueError(f"deps: two dependency targets would share ${variable}; rename one")
        env[variable] = str(path)

    def substitute(text: str, quote) -> str:
        def repl(m: re.Match) -> str:
            ref = m.group(1)
            if ref == "out":
                return quote(str(ctx.out))
            dep = ref[len("deps."):]
            if dep not in ctx.deps:
                raise ValueError(f"cmd refers to {{{ref}}} but '{dep}' is not a dependency target")
            return quote(str(ctx.deps[dep]))
        return SUBST_RE.sub(repl, text)

    cmd = params["cmd"]
    # In a shell string every substituted path is quoted (a folder named `my proj` or `$(x)` is
    # one word, never code); in an argv list each element already is one argument.
    if isinstance(cmd, str):
        argv = ["/bin/sh", "-c", substitute(cmd, shlex.quote)]
    else:
        argv = [substitute(a, str) for a in cmd]
    return argv, env


def check_outputs(params: dict, out_dir: Path) -> None:
    """After a successful exit: with declared outs, each must exist and nothing else is kept."""
    outs = params.get("outs") or []
    if not outs:
        return
    missing = [o for o in outs if not (out_dir / o).exists()]
    if missing:
        raise ValueError(f"declared output(s) not produced: {', '.join(missing)}")
    _keep_declared_outs(outs, out_dir)


def _keep_declared_outs(outs: list[str], out_dir: Path) -> None:
    """Drop everything the command left behind besides the declared outputs."""
    keep = {os.path.normpath(o) for o in outs}
    for root, dirs, files in os.walk(out_dir, topdown=True):
        for name in list(dirs) + files:
            full = os.path.join(root, name)
            rel = os.path.normpath(os.path.relpath(full, out_dir))
            if rel in keep:
                if name in dirs:
                    dirs.remove(name)  # a declared folder is kept whole
                continue
            if any(k.startswith(rel + os.sep) for k in keep):
                continue  # a parent of a declared output
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
                dirs.remove(name)
            else:
                os.unlink(full)
