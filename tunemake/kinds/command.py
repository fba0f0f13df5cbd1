"""kind = "command": any command that writes files, like a make rule or a DVC stage."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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


def run(params: Params, ctx) -> None:
    env = dict(os.environ)
    env.update(params.env)
    env["TUNEMAKE_OUT"] = str(ctx.out)
    for name, path in ctx.deps.items():
        env[env_name(name)] = str(path)

    def substitute(text: str) -> str:
        def repl(m: re.Match) -> str:
            ref = m.group(1)
            if ref == "out":
                return str(ctx.out)
            dep = ref[len("deps."):]
            if dep not in ctx.deps:
                raise SystemExit(f"cmd refers to {{{ref}}} but '{dep}' is not a dependency target")
            return str(ctx.deps[dep])
        return SUBST_RE.sub(repl, text)

    if isinstance(params.cmd, str):
        argv = ["/bin/sh", "-c", substitute(params.cmd)]
    else:
        argv = [substitute(a) for a in params.cmd]
    print("$ " + (argv[2] if isinstance(params.cmd, str) else " ".join(argv)), flush=True)
    try:
        code = subprocess.call(argv, cwd=ctx.project_dir, env=env)
    except OSError as exc:
        raise SystemExit(f"cannot run {argv[0]}: {exc}")
    if code != 0:
        print(f"command exited with status {code}", file=sys.stderr, flush=True)
        raise SystemExit(code if 0 < code < 256 else 1)
    _keep_declared_outs(params.outs, ctx.out)


def _keep_declared_outs(outs: list[str], out_dir) -> None:
    """With declared outs, check each exists and drop anything else the command left behind."""
    if not outs:
        return
    missing = [o for o in outs if not (out_dir / o).exists()]
    if missing:
        raise SystemExit(f"declared output(s) not produced: {', '.join(missing)}")
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
    sys.stdout.flush()
