"""kind = "eval": lm-evaluation-harness tasks on a checkpoint, through tunemake.lmeval_adapter.

Tasks are lm-eval task names and/or local task YAML files or folders. Local tasks are
staged as one-line wrapper YAMLs that `include` the original (so its own includes and
`!function` helpers resolve as written) and override `dataset_kwargs` with data_files
made absolute against the folder of the YAML that names them: lm-eval would resolve
them against the working directory. lm-eval's built-in task index (~7 s to build) is
loaded only when a name is not found among the local tasks.

Outputs: results.json (lm-eval's results; per-sample logs in samples/TASK.jsonl with
log_samples), checkpoint.json (weight bytes and quantization scheme, for the report
kind) and report.md. All are the same bytes for the same inputs, so targets depending on an
eval are not rebuilt when it is re-run to the same result; dates, timings and lm-eval's
environment report go to the step's log instead.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunemake.kinds.model_inputs import check_device, check_model_folder, dependency_name

INPUTS = ("model",)
OPTIONAL_INPUTS = ("tasks",)
PACKAGES = ("python", "torch", "torchao", "lm_eval")
CODE = ("tunemake.models", "tunemake.lmeval_adapter", "tunemake.request_cache", "tunemake.kinds.model_inputs")
DEVICE_SENSITIVE = True

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# lm-eval result fields that change on every run: printed to the log, kept out of results.json
VOLATILE_RESULT_KEYS = (
    "date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash", "pretty_env_info"
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a target or a path giving a checkpoint folder")
    tasks: list[str] = Field(min_length=1, description="lm-eval task names, task YAML files or folders of them")
    num_fewshot: int | None = Field(default=None, ge=0, description="default: each task's own")
    limit: int | float | None = Field(default=None, gt=0, description="documents per task, or a fraction below 1")
    batch_size: int = Field(default=8, ge=1)
    max_seq_length: int | None = Field(default=None, ge=2, description="default: the model's max_position_embeddings")
    max_gen_toks: int = Field(default=256, ge=1, description="for generation tasks that do not set their own")
    seed: int = 1234
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(default=None, description="default: the checkpoint's")
    apply_chat_template: bool = False
    log_samples: bool = True  # per-document results: what the report's paired statistics need

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.limit, float) and self.limit >= 1:
            raise ValueError(f"limit: a fraction of the documents must be below 1, got {self.limit}")
        for task in self.tasks:
            if not task.strip():
                raise ValueError("tasks: empty task name")
        return self


def resources(params: Params) -> dict:
    return {"gpus": 1} if params.device == "cuda" else {}


def validate(params: Params, project_dir) -> None:
    """Checks what exists now: a source model folder, local task files (targets are checked when built)."""
    check_model_folder(Path(project_dir) / params.model)
    for task in params.tasks:
        path = Path(project_dir) / task
        if path.is_file() and path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"tasks: {task} is not a YAML task file")
        if path.is_dir() and not any(path.rglob("*.yaml")):
            raise ValueError(f"tasks: folder {task} holds no .yaml task files")
        if not path.exists() and looks_like_path(task):
            raise ValueError(f"tasks: {task} does not exist (relative paths are taken from the tunefile's folder)")


def code_files(params: Params, project_dir) -> list[str]:
    """Local task files outside the params' own paths (data files, includes, helpers) belong in the key."""
    local = [task for task in params.tasks if (Path(project_dir) / task).exists()]
    return task_files(local, Path(project_dir)) if local else []


def looks_like_path(task: str) -> bool:
    # lm-eval task names have neither slashes nor a .yaml suffix
    return "/" in task or os.sep in task or task.endswith((".yaml", ".yml"))


def summary(out_dir) -> str:
    return (Path(out_dir) / "report.md").read_text(encoding="utf-8")


def run(params: Params, ctx) -> None:
    import tempfile

    model_folder = Path(ctx.project_dir) / params.model
    check_model_folder(model_folder)
    if not model_folder.is_dir():
        raise ValueError(f"model: {params.model} is not a checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="tunemake-tasks-") as staging:
        task_names, task_manager, sources = resolve_tasks(params.tasks, Path(ctx.project_dir), Path(staging))
        evaluate(params, ctx, model_folder, task_names, task_manager, sources)


def evaluate(params: Params, ctx, model_folder: Path, task_names, task_manager, sources: dict) -> None:
    started = time.time()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from tunemake.lmeval_adapter import NativeLM
    from tunemake.models import load_model, load_tokenizer
    from tunemake.request_cache import RequestCache

    device = check_device(params.device, params.dtype)
    dtype = getattr(torch, params.dtype) if params.dtype else None
    model = load_model(model_folder, device=device, dtype=dtype)
    tokenizer = load_tokenizer(model_folder)
    model_name = dependency_name(ctx, model_folder)
    cache = RequestCache(ctx.request_cache, answer_scope(model_folder, model, device))
    lm = NativeLM(
        model,
        tokenizer,
        batch_size=params.batch_size,
        max_length=params.max_seq_length,
        max_gen_toks=params.max_gen_toks,
        seed=params.seed,
        name=model_name,
        progress=ctx.progress,
        cache=cache,
    )
    loaded = time.time()
    results = simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=task_manager,
        num_fewshot=params.num_fewshot,
        limit=params.limit,
        batch_size=params.batch_size,
        device=str(device),
        log_samples=params.log_samples,
        apply_chat_template=params.apply_chat_template,
        random_seed=params.seed,
        numpy_random_seed=params.seed,
        torch_random_seed=params.seed,
        fewshot_random_seed=params.seed,
    )
    finished = time.time()
    cache.close()

    out = Path(ctx.out)
    samples = results.pop("samples", None)
    run_info = {key: results.pop(key) for key in VOLATILE_RESULT_KEYS if key in results}
    restore_task_sources(results, sources, lambda path: dependency_name(ctx, Path(path)))
    results["config"]["model"] = model_name
    (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    if samples:
        (out / "samples").mkdir()
        for task, task_samples in samples.items():
            lines = [json.dumps(compact_sample(s), default=handle_non_serializable, ensure_ascii=False)
                     for s in sorted(task_samples, key=sample_order)]
            (out / "samples" / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    checkpoint = checkpoint_info(model_folder, model_name)
    (out / "checkpoint.json").write_text(json.dumps(checkpoint, indent=2) + "\n")
    run_info.update(load_seconds=round(loaded - started, 3), evaluate_seconds=round(finished - loaded, 3),
                    request_cache={"restored_units": cache.hits, "computed_units": cache.misses})
    print(json.dumps(run_info, indent=2, default=str), flush=True)
    report = markdown_report(results, checkpoint, params)
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report, flush=True)


def answer_scope(model_folder: Path, model, device) -> dict:
    """Everything besides the request that can change a request's answer (tunemake.request_cache):
    the checkpoint's files (weights, tokenizer, config) by content, as tunemake digests a source
    folder, the dtype the model runs in, the device class, the CPU threads, the packages that
    compute or decode answers, and the scoring code itself."""
    import torch

    from tunemake.hashing import StatCache, hash_file
    from tunemake.keys import device_class, package_version

    code = sorted(Path(__file__).resolve().parents[1].glob("models/*.py"))
    code += [Path(__file__).resolve().parents[1] / name for name in ("lmeval_adapter.py", "request_cache.py")]
    return {
        "checkpoint": StatCache(None).source(model_folder),
        "dtype": str(next(model.parameters()).dtype),
        "device": device_class() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        # lm-eval cuts generations at stop strings; the tokenizer libraries decode them
        "packages": {name: package_version(name) for name in ("torch", "torchao", "lm_eval", "tokenizers", "sentencepiece")},
        "code": {path.name: hash_file(path) for path in code},
    }


# lm-eval's per-sample fields the compact log keeps as they are
SAMPLE_FIELDS = ("doc_id", "filter", "metrics", "target", "doc_hash", "prompt_hash", "target_hash")


def compact_sample(sample: dict) -> dict:
    """One line of samples/TASK.jsonl: lm-eval's own fields and metric values, without the document
    itself (`doc_hash` names it) and with the prompt written once: `prompt` is the first request's
    context, `continuations` what each loglikelihood request scored after it (multiple choice),
    `gen_args` a generation's settings. `filtered_resps` are the answers as the metrics saw them;
    `resps`, the raw answers, only where a filter changed them (a regex pulling out a number)."""
    compact = {field: sample[field] for field in SAMPLE_FIELDS if field in sample}
    compact.update({metric: sample[metric] for metric in sample.get("metrics", []) if metric in sample})
    arguments = [list(a) for a in sample.get("arguments") or []]  # simple_evaluate keeps each request's args
    if arguments:
        compact["prompt"] = arguments[0][0]
        if all(len(a) > 1 and isinstance(a[1], str) for a in arguments):
            compact["continuations"] = [a[1] for a in arguments]
        elif len(arguments[0]) > 1:
            compact["gen_args"] = arguments[0][1]
    compact["filtered_resps"] = sample.get("filtered_resps")
    raw = sample.get("resps")
    if isinstance(raw, list):
        unwrapped = [r[0] if isinstance(r, (list, tuple)) and len(r) == 1 else r for r in raw]
        if as_json(unwrapped) != as_json(sample.get("filtered_resps")):
            compact["resps"] = raw
    return compact


def as_json(value) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(value, default=handle_non_serializable)


def sample_order(sample: dict) -> tuple:
    doc_id = sample.get("doc_id")
    return (0, doc_id, str(sample.get("filter"))) if isinstance(doc_id, int) else (1, str(doc_id), str(sample.get("filter")))


def checkpoint_info(folder: Path, model_name: str) -> dict:
    """What the report kind needs about the evaluated checkpoint, so it reads only eval outputs."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    info = {
        "model": model_name,
        "weight_files": {p.name: p.stat().st_size for p in files},
        "weight_bytes": sum(p.stat().st_size for p in files),
        "quantization": None,
    }
    from tunemake.models.quantized import is_quantized, read_quantization_info

    if is_quantized(folder):
        recorded = read_quantization_info(folder)
        info["quantization"] = {key: recorded.get(key) for key in ("scheme", "groupsize", "dtype")}
    return info


# ---- tasks ----------------------------------------------------------------------------------
def resolve_tasks(entries: list[str], project_dir: Path, staging: Path):
    """(names for simple_evaluate, a TaskManager that knows them, wrapper path -> original YAML).

    Raises ValueError naming the `tasks` field for anything missing, before a model is loaded.
    """
    from lm_eval.tasks import TaskManager

    requested: list[str] = []
    bare_names: list[str] = []
    sources: dict[str, dict] = {}
    for entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else project_dir / entry
        if path.is_file():
            yamls = sorted(path.parent.glob("*.yaml"))  # siblings may be the members of a group file
            requested.append(stage_yaml(path, staging, sources, required=True))
        elif path.is_dir():
            # like `lm_eval --tasks FOLDER`: the tasks and groups at the top; the whole tree is indexed
            yamls = sorted(path.rglob("*.yaml"))
            names = [stage_yaml(top, staging, sources, required=False) for top in sorted(path.glob("*.yaml"))]
            if not any(names):
                raise ValueError(f"tasks: folder {entry} has no task or group YAML at its top level")
            requested.extend(name for name in names if name)
        elif looks_like_path(entry):
            raise ValueError(f"tasks: {entry} does not exist")
        else:
            yamls = []
            requested.append(entry)
            bare_names.append(entry)
        for yaml_path in yamls:
            stage_yaml(yaml_path, staging, sources, required=False)

    include = [str(staging)] if sources else None
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(name not in manager.all_tasks for name in bare_names):
        manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [name for name in bare_names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task {unknown[0]!r} (not built in, not in the local task files)")
    return list(dict.fromkeys(requested)), manager, sources


def stage_yaml(path: Path, staging: Path, sources: dict, *, required: bool) -> str | None:
    """Writes a wrapper for one task YAML into staging; returns its task or group name.

    A YAML that is not a task or group (an include-only template, another config) is
    skipped unless required, as lm-eval's own index skips it.
    """
    path = path.resolve()
    for source in sources.values():
        if source["path"] == str(path):
            return source["name"]
    try:
        task = read_task_yaml(path)
    except (OSError, ValueError) as error:
        if required:
            raise ValueError(f"tasks: cannot read {path}: {error}") from None
        return None
    config = task["config"]
    name = config.get("group") or config.get("task")
    if not isinstance(name, str):
        if required:
            raise ValueError(f"tasks: {path} defines neither a task nor a group")
        return None
    wrapper_config = {"include": str(path)}
    dataset_kwargs = config.get("dataset_kwargs")
    if isinstance(dataset_kwargs, dict) and dataset_kwargs.get("data_files") is not None:
        base = task["origins"]["dataset_kwargs"].parent
        data_files = absolute_data_files(dataset_kwargs["data_files"], base, path)
        # a private datasets cache: nothing stale from an earlier edit of the same file path
        wrapper_config["dataset_kwargs"] = {
            **dataset_kwargs,
            "data_files": data_files,
            "cache_dir": str(staging / "datasets-cache"),
        }
    wrapper = staging / f"{len(sources):03d}-{path.stem}.yaml"
    wrapper.write_text(json.dumps(wrapper_config) + "\n")  # JSON is YAML
    sources[str(wrapper)] = {"path": str(path), "name": name, "dataset_kwargs": dataset_kwargs}
    return name


def read_task_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A task YAML with its includes merged as lm-eval merges them (includes in order, then the
    file's own keys), without importing lm-eval: {"config", "origins": key -> defining file,
    "files": every file it depends on (YAMLs, `!function` modules, local data files)}."""
    import yaml

    path = path.resolve()
    if path in seen:
        raise ValueError(f"include cycle at {path}")
    functions: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        functions.append(loader.construct_scalar(node))
        return f"!function {functions[-1]}"

    Loader.add_constructor("!function", function)
    with open(path, encoding="utf-8") as f:
        try:
            own = yaml.load(f, Loader=Loader)  # noqa: S506 - SafeLoader plus one string-only tag
        except yaml.YAMLError as error:
            raise ValueError(f"invalid YAML: {error}") from None
    if not isinstance(own, dict):
        raise ValueError("expected a YAML mapping")
    config, origins, files = {}, {}, [path]
    for qualified in functions:  # lm-eval looks for MODULE.py next to the YAML first
        module_file = path.parent / (qualified.rpartition(".")[0].replace(".", "/") + ".py")
        if module_file.is_file():
            files.append(module_file)
    includes = own.pop("include", None) or []
    for include in includes if isinstance(includes, list) else [includes]:
        included = read_task_yaml(path.parent / include, (*seen, path))  # an absolute include stays absolute
        included["config"].pop("task_list", None)
        config.update(included["config"])
        origins.update(included["origins"])
        files += included["files"]
    config.update(own)
    origins.update(dict.fromkeys(own, path))
    return {"config": config, "origins": origins, "files": files}


def task_files(entries: list[str], project_dir: Path) -> list[str]:
    """Every file the local tasks read: the YAMLs (with siblings and includes), helpers, data files."""
    files = set()
    for entry in entries:
        path = Path(project_dir) / entry
        yamls = sorted(path.parent.glob("*.yaml")) if path.is_file() else sorted(path.rglob("*.yaml"))
        for yaml_path in yamls:
            try:
                task = read_task_yaml(yaml_path)
                files.update(str(f) for f in task["files"])
                dataset_kwargs = task["config"].get("dataset_kwargs")
                if isinstance(dataset_kwargs, dict) and dataset_kwargs.get("data_files") is not None:
                    base = task["origins"]["dataset_kwargs"].parent
                    files.update(local_data_files(dataset_kwargs["data_files"], base))
            except (OSError, ValueError):
                continue  # reported when the step stages its tasks
    return sorted(files)


def local_data_files(data_files, base: Path) -> list[str]:
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in local_data_files(files, base)]
    if isinstance(data_files, list):
        return [f for files in data_files for f in local_data_files(files, base)]
    if not isinstance(data_files, str) or "://" in data_files or any(c in data_files for c in "*?["):
        return []
    path = (base / data_files).resolve()
    return [str(path)] if path.is_file() else []


def absolute_data_files(data_files, base: Path, yaml_path: Path):
    """data_files (a path, a list, or split -> path(s)) with relative local paths made absolute."""
    if isinstance(data_files, dict):
        return {split: absolute_data_files(files, base, yaml_path) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [absolute_data_files(files, base, yaml_path) for files in data_files]
    if not isinstance(data_files, str) or "://" in data_files or any(c in data_files for c in "*?["):
        return data_files  # URLs and globs are left to datasets
    path = (base / data_files).resolve()
    if not path.exists():
        raise ValueError(f"tasks: {yaml_path} names data file {data_files!r}, but {path} does not exist")
    return str(path)


def restore_task_sources(results: dict, sources: dict, shown) -> None:
    """Puts the user's own YAML path (as `shown` names it) and dataset_kwargs back into the task configs."""
    for config in results.get("configs", {}).values():
        metadata = config.get("metadata")
        if not isinstance(metadata, dict) or metadata.get("config_source") not in sources:
            continue
        source = sources[metadata["config_source"]]
        metadata["config_source"] = shown(source["path"])
        if source["dataset_kwargs"] is not None:
            config["dataset_kwargs"] = source["dataset_kwargs"]


# ---- report ---------------------------------------------------------------------------------
def metric_rows(results: dict) -> list[dict]:
    """One row per (task or group, metric, filter) with its value and standard error."""
    rows = []
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filter_name,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n_shot": results.get("n-shot", {}).get(task),
                    "samples": results.get("n-samples", {}).get(task, {}).get("effective"),
                }
            )
    return rows


def format_number(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_report(results: dict, checkpoint: dict, params: Params) -> str:
    scheme = (checkpoint["quantization"] or {}).get("scheme") or "none"
    lines = [
        f"# eval of {checkpoint['model']}",
        "",
        f"weights {checkpoint['weight_bytes'] / 1e6:.1f} MB, quantization: {scheme}, "
        f"dtype {params.dtype or 'as stored'}, device {params.device}"
        + (f", limit {params.limit}" if params.limit is not None else ""),
        "",
        "| task | metric | filter | n-shot | samples | value | stderr |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in metric_rows(results):
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['filter']} | {format_number(row['n_shot'])} | "
            f"{format_number(row['samples'])} | {format_number(row['value'])} | {format_number(row['stderr'])} |"
        )
    return "\n".join(lines) + "\n"
