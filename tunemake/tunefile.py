"""tunefile.toml -> validated targets.

Everything the user can get wrong in the tunefile or in `--set` is caught here
and reported as one line naming the file, line, target and field.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunemake import kinds
from tunemake.errors import UserError, located
from tunemake.hashing import digest_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TUNEFILE = "tunefile.toml"
PARSE_CACHE = ".tunecache/tunefile.parsed.json"
PARSE_FORMAT = 4
MAX_NAME = 120  # target names become folder names
MAX_DEPTH = 64  # nesting of TOML values: deeper ones would overflow the recursive code that walks them
TOO_DEEP = f"nested too deeply (more than {MAX_DEPTH} levels)"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")  # use with fullmatch: `$` would let a final newline pass
INTERP_RE = re.compile(r"\$\{(vars|matrix)\.([A-Za-z0-9_\-]+)\}")


def _cache_config_model():
    """The [cache] table's model, built on first use: pydantic is not imported on the no-op path."""
    from pydantic import BaseModel, ConfigDict

    class CacheConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dir: str = ".tunecache"
        # auto: reflink where the filesystem can, else read-only hardlinks for large
        # files and copies for small ones (small outputs are the ones people edit).
        link: Literal["auto", "reflink", "hardlink", "copy"] = "auto"
        remote: str | None = None  # a shared cache: s3://bucket/prefix, file:///ci/cache, any fsspec URL
        read_only: bool = False  # pull from the remote but never publish (untrusted writers, e.g. PR CI)
        remote_options: dict[str, Any] = {}  # passed to fsspec, e.g. {endpoint_url = "http://minio:9000"}

    return CacheConfig


@dataclass
class Target:
    """A validated target, as plain data: cheap to cache, so a no-op build needs no pydantic."""

    name: str
    kind: str
    module: str  # the kind's module, run in the step's child process
    line: int | None
    target_deps: list[str] = field(default_factory=list)  # in declaration order, unique
    sources: list[str] = field(default_factory=list)  # paths relative to the project dir
    key_params: dict = field(default_factory=dict)  # canonical params: inputs as "target:X" / "path:Y"
    # per input field, each value as the step will get it: "target:NAME[/inside]", "path:REL" or
    # "value:V"; resolved to absolute paths only when the step starts (tunemake.executor)
    input_refs: dict = field(default_factory=dict)
    packages: list[str] = field(default_factory=list)  # versions of these go into the key
    device_sensitive: bool = False
    code_files: list[str] = field(default_factory=list)  # their content goes into the key
    gpus: int = 0


@dataclass
class Project:
    file: Path
    dir: Path
    targets: dict[str, Target]
    default: list[str]
    groups: dict[str, list[str]]  # matrix family -> member targets
    cache_subdir: str
    link: str
    vars: dict[str, Any]
    remote: dict = field(default_factory=dict)  # url, read_only, options (from [cache])

    @property
    def cache_dir(self) -> Path:
        return self.dir / self.cache_subdir

    @property
    def targets_dir(self) -> Path:
        return self.dir / "targets"

    def output_dir(self, name: str) -> Path:
        return self.targets_dir / name

    def expand(self, names: list[str], origin: str = "command line") -> list[str]:
        """Target names and matrix family names -> target names."""
        out: list[str] = []
        for name in names:
            if name in self.targets:
                out.append(name)
            elif name in self.groups:
                out.extend(self.groups[name])
            else:
                hint = _did_you_mean(name, list(self.targets) + list(self.groups))
                raise UserError(f"{self.file.name}: unknown target '{name}' ({origin}){hint}")
        return list(dict.fromkeys(out))


def find_tunefile(directory: Path, file: str | None = None) -> Path:
    path = directory / (file or TUNEFILE)  # -f is relative to -C, as with make; an absolute -f stands alone
    if not path.is_file():
        raise UserError(f"{path}: no tunefile here (create {TUNEFILE}, or point at one with -C DIR or -f FILE)")
    return path.resolve()


def load(path: Path, overrides: list[str] = ()) -> Project:
    """Parse and validate, or reuse the last parse of the same bytes: a no-op build then needs
    neither pydantic nor the kind modules (their import dominates start-up)."""
    text = _read(path)
    cache_file = path.parent / PARSE_CACHE
    # the folder is part of it: a copied project must not reuse the parse (or stats) of the original
    signature = digest_json([PARSE_FORMAT, sys.prefix, str(path), text, list(overrides)])
    project = _cached_parse(cache_file, signature, path)
    if project is None:
        project = _parse(path, text, list(overrides))
        _save_parse(cache_file, signature, project)
    return project


def _watched_files(project: Project) -> list[str]:
    """Files whose change may change the parse: the parser, the kinds' code, source paths."""
    files = {__file__, kinds.__file__}
    for target in project.targets.values():
        files.update(str(project.dir / f) for f in target.code_files)
        # an optional input that names no existing path (a task name, a missing prompts file)
        # becomes a source the moment such a path appears: that must re-parse
        files.update(str(project.dir / ref[len("value:"):]) for refs in target.input_refs.values()
                     for ref in refs if ref.startswith("value:"))
        files.update(str(project.dir / s) for s in target.sources)
    return sorted(files)


def _stat_sig(path: str):
    try:
        st = os.lstat(path)  # lstat: repointing a symlink must invalidate the parse
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _cached_parse(cache_file: Path, signature: str, path: Path) -> Project | None:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("signature") != signature:
        return None
    try:
        if any(_stat_sig(f) != sig for f, sig in data["watched"].items()):
            return None
        p = data["project"]
        targets = {name: Target(**t) for name, t in p["targets"].items()}
        return Project(path, path.parent, targets, p["default"], p["groups"], p["cache_subdir"], p["link"],
                       p["vars"], p["remote"])
    except (KeyError, TypeError, AttributeError):
        return None  # a damaged cache file: parse again


def _save_parse(cache_file: Path, signature: str, project: Project) -> None:
    watched = {f: _stat_sig(f) for f in _watched_files(project)}
    data = {"signature": signature, "watched": watched, "project": {
        "targets": {name: asdict(t) for name, t in project.targets.items()}, "default": project.default,
        "groups": project.groups, "cache_subdir": project.cache_subdir, "link": project.link,
        "vars": project.vars, "remote": project.remote}}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache_file)
    except (OSError, TypeError, ValueError):
        pass  # only a speed-up: a read-only project still builds


def _parse(path: Path, text: str, overrides: list[str]) -> Project:
    fname = path.name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        msg = str(exc).split(" (at line")[0]
        raise located(fname, line, None, None, f"TOML syntax error: {msg}") from None
    except RecursionError:  # tomllib recurses per level of nesting
        raise located(fname, None, None, None, TOO_DEEP) from None
    locate = _Locator(text)
    deep = _too_deep(data)  # before anything recursive walks the data
    if deep is not None:
        raise _nesting_error(fname, locate, deep)

    unknown = set(data) - {"default", "vars", "target", "cache"}
    if unknown:
        key = sorted(unknown)[0]
        raise located(fname, locate.top(key), None, key,
                      "unknown top-level key (expected: default, vars, cache, [target.NAME] tables)")

    sets = _parse_overrides(fname, overrides)
    if not isinstance(data.get("vars", {}), dict):
        raise located(fname, locate.top("vars"), None, "vars", "must be a table of values")
    variables = dict(data.get("vars", {}))
    for name, value in sets.pop("vars", {}).items():
        if name not in variables:  # silently adding it would leave a misspelled override without effect
            hint = _did_you_mean(name, list(variables)) or f" (defined vars: {', '.join(sorted(variables)) or 'none'})"
            raise UserError(f"--set vars.{name}: no var '{name}' in {fname}{hint}")
        variables[name] = value
    variables = _resolve_vars(fname, locate, variables)

    from pydantic import ValidationError

    if not isinstance(data.get("cache", {}), dict):
        raise located(fname, locate.top("cache"), None, "cache", "must be a table")
    cache_model = _cache_config_model()
    try:
        cache = cache_model.model_validate(data.get("cache", {}))
    except ValidationError as exc:
        fld, msg = _first_error(exc, cache_model, other_fields=())
        raise located(fname, locate.key("cache", fld), None, f"cache.{fld}", msg) from None
    problem = _cache_dir_problem(path.parent, cache.dir)
    if problem:
        raise located(fname, locate.key("cache", "dir") or locate.top("cache"), None, "cache.dir", problem)

    tables = data.get("target", {})
    if not isinstance(tables, dict) or not tables:
        raise located(fname, None, None, None, "no targets: declare at least one [target.NAME] table")

    # 1. expand matrices and interpolate vars, keeping each member's source table for line numbers
    raw: dict[str, tuple[str, dict]] = {}
    groups: dict[str, list[str]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise located(fname, locate.top(f"target.{name}"), name, None, "must be a table")
        if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
            raise located(fname, locate.table(name), repr(name)[1:-1], None,  # escaped: the error is one line
                          f"target names may use letters, digits, '_' and '-' only, at most {MAX_NAME} characters")
        for member, member_table in _expand_matrix(fname, locate, name, table):
            if member in raw:
                raise located(fname, locate.key(f"target.{name}", "matrix"), name, "matrix",
                              f"two targets would be named '{member}' (matrix values must give distinct names)")
            raw[member] = (name, _interpolate(fname, locate, name, member_table, variables, {}))
        if "matrix" in table:
            groups[name] = [m for m, (fam, _) in raw.items() if fam == name]

    # 2. command-line overrides: NAME.param=value, NAME may be a matrix family
    for name, params in sets.items():
        members = [name] if name in raw else groups.get(name)
        if not members:
            hint = _did_you_mean(name, list(raw) + list(groups))
            raise UserError(f"--set {name}.…: no target '{name}' in {fname}{hint}")
        for member in members:
            raw[member][1].update(params)

    # 3. validate each target with its kind's params model
    validated = {name: _validate(fname, locate, family, name, table, set(sets.get(name, {})))
                 for name, (family, table) in raw.items()}

    # 4. resolve inputs: target names become dependencies, other values source paths
    project_dir = path.parent
    targets: dict[str, Target] = {}
    for name, (kind, model) in validated.items():
        targets[name] = _resolve(fname, locate, project_dir, name, kind, model, validated, groups, raw[name][0],
                                 cache.dir)

    default = data.get("default", [])
    if isinstance(default, str):
        default = [default]
    if not isinstance(default, list) or not all(isinstance(d, str) for d in default):
        raise located(fname, locate.top("default"), None, "default", "must be a list of target names")
    remote = {"url": cache.remote, "read_only": cache.read_only, "options": cache.remote_options}
    project = Project(path, project_dir, targets, [], groups, cache.dir, cache.link, variables, remote)
    for name in default:
        if name not in targets and name not in groups:
            raise located(fname, locate.top("default"), None, "default",
                          f"unknown target '{name}'{_did_you_mean(name, list(targets))}")
    project.default = project.expand(default) if default else list(targets)
    return project


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no tunefile here (create {TUNEFILE}, or point at one with -C DIR or -f FILE)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None


def _parse_overrides(fname: str, overrides: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        lhs, eq, value = item.partition("=")
        name, dot, param = lhs.strip().partition(".")
        if not eq or not dot or not name or not param:
            raise UserError(f"--set {item!r}: expected NAME.param=value (e.g. --set int4.groupsize=128)")
        try:
            parsed = _parse_value(value.strip())
        except RecursionError:  # tomllib recurses per level of nesting
            raise UserError(f"--set {name}.{param}: {TOO_DEEP}") from None
        if _too_deep(parsed) is not None:
            raise UserError(f"--set {name}.{param}: {TOO_DEEP}")
        out.setdefault(name, {})[param] = parsed
    return out


def _parse_value(text: str) -> Any:
    """A TOML value if it parses as one (64, true, ["a"], "x"), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _expand_matrix(fname: str, locate: "_Locator", name: str, table: dict):
    matrix = table.get("matrix")
    if matrix is None:
        yield name, dict(table)
        return
    if not isinstance(matrix, dict) or not matrix or not all(isinstance(v, list) and v for v in matrix.values()):
        raise located(fname, locate.key(f"target.{name}", "matrix"), name, "matrix",
                      "must be a table of non-empty lists, e.g. matrix = {scheme = [\"int8_weight_only\", \"int4_weight_only\"]}")
    body = {k: v for k, v in table.items() if k != "matrix"}
    axes = list(matrix)
    for combo in itertools.product(*(matrix[a] for a in axes)):
        member = name + "@" + "-".join(str(v) for v in combo)
        if not NAME_RE.fullmatch(member.replace("@", "_")) or len(member) > MAX_NAME:
            raise located(fname, locate.key(f"target.{name}", "matrix"), name, "matrix",
                          f"value {combo!r} does not make a valid target name")
        values = dict(zip(axes, combo))
        yield member, _interpolate(fname, locate, name, body, {}, values, matrix_only=True)


def _resolve_vars(fname, locate, variables: dict) -> dict:
    """Expand ${vars.y} inside vars (after --set, so an override reaches every var built on it)."""
    resolved: dict[str, Any] = {}

    def resolve(name: str, chain: tuple[str, ...]):
        if name in resolved:
            return resolved[name]
        if name in chain:
            cycle = " -> ".join(chain[chain.index(name):] + (name,))
            raise located(fname, locate.key("vars", chain[0]), None, f"vars.{chain[0]}", f"vars refer to each other: {cycle}")

        def lookup(scope: str, key: str, _field):
            if scope == "matrix":  # vars are expanded once for all targets, after the matrix
                raise located(fname, locate.key("vars", name), None, f"vars.{name}",
                              "${matrix.…} cannot be used in vars; use it in the target's own params")
            if key not in variables:
                raise located(fname, locate.key("vars", name), None, f"vars.{name}",
                              f"${{vars.{key}}} is not defined (defined vars: {', '.join(sorted(variables))})")
            return resolve(key, chain + (name,))

        resolved[name] = _substitute(variables[name], lookup)
        return resolved[name]

    for name in variables:
        resolve(name, ())
    return resolved


def _interpolate(fname, locate, target, value, variables, matrix, matrix_only=False):
    """Replace ${vars.x} / ${matrix.x} in a target's table."""

    def lookup(scope: str, key: str, field):
        table = variables if scope == "vars" else matrix
        if scope == "vars" and matrix_only:
            return None  # resolved in the second pass
        if key not in table:
            known = ", ".join(sorted(table)) or "none"
            raise located(fname, locate.key(f"target.{target}", field), target, field,
                          f"${{{scope}.{key}}} is not defined (defined {scope}: {known})")
        return table[key]

    return _substitute(value, lookup)


def _substitute(value, lookup, field=None):
    """Replace ${scope.key} in strings, inside tables and lists too. `lookup(scope, key, field)`
    gives the value (None leaves the reference as written); `field` is the top-level key, for
    errors. A string that is exactly one reference keeps the value's type."""
    if isinstance(value, dict):
        return {k: _substitute(v, lookup, field or k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, lookup, field) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = INTERP_RE.fullmatch(value)
    if whole:
        found = lookup(whole.group(1), whole.group(2), field)
        return value if found is None else found

    def sub(m: re.Match) -> str:
        found = lookup(m.group(1), m.group(2), field)
        return m.group(0) if found is None else str(found)

    return INTERP_RE.sub(sub, value)


def _validate(fname: str, locate: "_Locator", family: str, name: str, table: dict, overridden: set):
    section = f"target.{family}"
    kind_name = table.get("kind")
    if kind_name is not None and not isinstance(kind_name, str):
        raise located(fname, locate.key(section, "kind"), name, "kind", f"must be a string, not {kind_name!r}")
    if kind_name is None:
        raise located(fname, locate.table(family), name, "kind", f"missing (one of: {', '.join(kinds.available())})")
    try:
        kind = kinds.get(kind_name)
    except kinds.UnknownKind:
        raise located(fname, locate.key(section, "kind"), name, "kind",
                      f"unknown kind '{kind_name}' (one of: {', '.join(kinds.available())})") from None
    except ImportError as exc:
        raise located(fname, locate.key(section, "kind"), name, "kind",
                      f"kind '{kind_name}' cannot be loaded: {exc}") from None
    from pydantic import ValidationError

    params = {k: v for k, v in table.items() if k != "kind"}
    try:
        model = kind.params.model_validate(params)
    except ValidationError as exc:
        fld, msg = _first_error(exc, kind.params)
        origin = " (from --set)" if fld.split(".")[0] in overridden else ""
        raise located(fname, locate.key(section, fld.split(".")[0]), name, fld, msg + origin) from None
    return kind, model


def _resolve(fname, locate, project_dir: Path, name: str, kind, model, targets, groups, family: str,
             cache_dir: str) -> Target:
    target = Target(name=name, kind=kind.name, module=kind.module, line=locate.table(family),
                    packages=list(kind.packages_for(model)), device_sensitive=kind.device_sensitive,
                    gpus=int(kind.resources(model).get("gpus", 0) or 0))
    key_params = model.model_dump(mode="json")
    input_refs: dict[str, list[str]] = {}
    # What validate() sees: matrix families expanded to their members, paths inside
    # other targets' outputs left out (they exist only once those targets are built).
    view: dict[str, list] = {}
    for fld in kind.inputs + kind.optional_inputs:
        value = key_params.get(fld)
        if value is None:
            continue
        required = fld in kind.inputs
        values = value if isinstance(value, list) else [value]
        key_vals, ref_vals, view_vals = [], [], []
        for item in values:
            if not isinstance(item, str):
                raise located(fname, locate.key(f"target.{family}", fld), target.name, fld,
                              "must name a target or a path")
            members = [item] if item in targets else groups.get(item, [])
            if members:
                for dep in members:
                    if dep == target.name:
                        raise located(fname, locate.key(f"target.{family}", fld), target.name, fld,
                                      "a target cannot depend on itself")
                    if dep not in target.target_deps:
                        target.target_deps.append(dep)
                    key_vals.append(f"target:{dep}")
                    ref_vals.append(f"target:{dep}")
                    view_vals.append(dep)
                continue
            owner, slash, inside = item.partition("/")
            if slash and owner in targets and inside and ".." not in inside.split("/"):
                # a path inside another target's output, e.g. tasks = ["data/task"]
                if owner == name:
                    raise located(fname, locate.key(f"target.{family}", fld), name, fld,
                                  "a target cannot depend on itself")
                if owner not in target.target_deps:
                    target.target_deps.append(owner)
                key_vals.append(f"target:{item}")
                ref_vals.append(f"target:{owner}/{os.path.normpath(inside)}")
                continue
            managed = _managed_folder(project_dir, item, cache_dir)
            if managed:
                raise located(fname, locate.key(f"target.{family}", fld), target.name, fld,
                              f"'{item}' is inside {managed}/, which tunemake manages: name the target instead")
            source = _source_path(project_dir, item)
            problem = source is not None and _check_source(project_dir, source)
            if problem:
                raise located(fname, locate.key(f"target.{family}", fld), target.name, fld, problem)
            if source is not None:
                if source not in target.sources:
                    target.sources.append(source)
                key_vals.append(f"path:{source}")
                ref_vals.append(f"path:{source}")
                view_vals.append(item)
            elif required:
                hint = _did_you_mean(item, list(targets) + list(groups))
                raise located(fname, locate.key(f"target.{family}", fld), target.name, fld,
                              f"'{item}' is neither a target nor an existing path{hint}")
            else:
                key_vals.append(item)
                ref_vals.append(f"value:{item}")
                view_vals.append(item)
        input_refs[fld] = ref_vals
        if isinstance(value, list):
            key_params[fld] = key_vals
            view[fld] = view_vals
        else:
            key_params[fld] = key_vals[0]
    target.key_params = key_params
    target.input_refs = input_refs
    user_code = kind.code_files(model, project_dir) if kind.code_files else []
    target.code_files = kind.source_files() + [_project_relative(project_dir, f) for f in user_code]

    if kind.validate is not None:
        try:
            # validate() checks what exists now; outputs of targets appear only when built
            kind.validate(model.model_copy(update=view), project_dir)
        except ValueError as exc:
            fld, _, msg = str(exc).partition(": ")
            if not msg:
                fld, msg = None, str(exc)
            raise located(fname, locate.key(f"target.{family}", fld) if fld else target.line,
                          target.name, fld, msg) from None
    return target


def _source_path(project_dir: Path, item: str) -> str | None:
    """The path relative to the project (symlinks kept as written), if it exists."""
    path = Path(item)
    full = Path(os.path.normpath(path if path.is_absolute() else project_dir / path))
    if not os.path.lexists(full):
        return None
    try:
        return full.relative_to(project_dir).as_posix()
    except ValueError:
        return str(full)


def _project_relative(project_dir: Path, path: str) -> str:
    """A path inside the project as relative to it (so a copied or moved project is self-contained)."""
    try:
        return Path(path).relative_to(project_dir).as_posix()
    except ValueError:
        return path


def _check_source(project_dir: Path, source: str) -> str | None:
    """Why a source path cannot be tracked, or None."""
    full = project_dir / source
    if not full.exists():
        return f"'{source}' is a broken symlink"
    if not (full.is_file() or full.is_dir()):
        return f"'{source}' is not a regular file or folder"
    return None


def _first_error(exc, model: type | None = None, other_fields: tuple[str, ...] = ("kind",)) -> tuple[str, str]:
    """The error to report. An unknown field comes first: a misspelled required field is also
    reported missing, and the misspelling is the cause. `other_fields` are valid fields the model
    does not hold (a target's `kind`)."""
    import difflib

    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    fld = ".".join(str(p) for p in err["loc"]) or "?"
    if err["type"] == "extra_forbidden":
        if model is None or len(err["loc"]) != 1:
            return fld, "unknown field"
        valid = [*other_fields, *model.model_fields]
        close = difflib.get_close_matches(fld, valid, n=1)
        hint = f"did you mean '{close[0]}'?; " if close else ""
        return fld, f"unknown field ({hint}valid fields: {', '.join(valid)})"
    if err["type"] == "missing":
        return fld, "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error",):
        msg += f" (got {err['input']!r})"
    return fld, msg


def _did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _line_from_message(msg: str) -> int | None:
    m = re.search(r"at line (\d+)", msg)
    return int(m.group(1)) if m else None


class _Locator:
    """Finds the line of a table or key in the TOML text (tomllib gives no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self._headers: dict[str, int] = {}
        for i, line in enumerate(self.lines, 1):
            m = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
            if m:
                self._headers.setdefault(m.group(1).replace('"', "").replace(" ", ""), i)

    def table(self, target: str) -> int | None:
        return self._headers.get(f"target.{target}")

    def top(self, key: str) -> int | None:
        if key in self._headers:
            return self._headers[key]
        for i, line in enumerate(self.lines, 1):
            if re.match(rf"\s*{re.escape(key)}\s*=", line):
                return i
            if line.lstrip().startswith("["):
                break
        return None

    def key(self, section: str, key: str | None) -> int | None:
        start = self._headers.get(section)
        if start is None:
            return None
        if key:
            for i in range(start, len(self.lines)):
                line = self.lines[i]
                if line.lstrip().startswith("["):
                    break
                if re.match(rf"\s*{re.escape(key)}\s*=", line):
                    return i + 1
        return start


def _too_deep(value) -> list | None:
    """The keys and indexes leading to the first table or list nested more than MAX_DEPTH levels
    (counting `value` itself), or None. A loop, not recursion: deep data is what it guards against."""
    stack = [(value, [], 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth > MAX_DEPTH:
            return path
        stack.extend((child, path + [key], depth + 1) for key, child in children)
    return None


def _nesting_error(fname: str, locate: "_Locator", path: list) -> UserError:
    """The error for data too deep at `path`, located at its target and field, or its table and key."""
    top, second, third = (path + [None, None])[:3]
    if top == "target" and isinstance(second, str) and isinstance(third, str):
        return located(fname, locate.key(f"target.{second}", third), repr(second)[1:-1], third, TOO_DEEP)
    if isinstance(second, str):
        return located(fname, locate.key(top, second) or locate.top(top), None, f"{top}.{second}", TOO_DEEP)
    return located(fname, locate.top(top), None, top, TOO_DEEP)


def _cache_dir_problem(project_dir: Path, cache_dir: str) -> str | None:
    """Why `[cache] dir` would endanger the project, or None: gc empties the cache's tmp/ and
    a build writes cas/, ac/, logs/ ... into it, so it must be a folder of its own."""
    try:
        project = project_dir.resolve()
        folder = (project / cache_dir).resolve()  # an absolute dir replaces the project's
        targets = (project / "targets").resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        return f"'{cache_dir}' cannot be resolved: {exc}"
    if folder == project or folder in project.parents:
        return f"'{cache_dir}' is the project folder or one above it; use a folder of its own, e.g. .tunecache"
    if folder == targets or targets in folder.parents:
        return f"'{cache_dir}' is inside targets/, where tunemake writes outputs; use a folder of its own"
    if folder.exists() and not folder.is_dir():
        return f"'{cache_dir}' exists and is not a folder"
    return None


def _managed_folder(project_dir: Path, item: str, cache_dir: str) -> str | None:
    """'targets' or the cache dir (as written) if the path `item` is it or lies inside it."""
    full = Path(os.path.normpath(project_dir / item))
    for folder in ("targets", cache_dir):
        root = Path(os.path.normpath(project_dir / folder))
        if full == root or root in full.parents:
            return folder.rstrip("/")
    return None
