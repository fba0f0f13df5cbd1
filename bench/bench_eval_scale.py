"""Eval end to end: `tunemake build` of an eval target against lm-eval's HF model class, each a fresh
process that imports, loads the model and runs `simple_evaluate`, side by side in one run.

Same random 135M Llama-shaped fp32 checkpoint as bench_eval.py, same local multiple-choice
tasks with answers of several tokens (like ARC or HellaSwag): `mc_words` 5-shot and 0-shot.
tunemake runs in a fresh project with an empty cache each time; lm-eval runs a script that
builds `HFLM(pretrained=FOLDER)` and calls `simple_evaluate` with the same task folder and
seeds (`TaskManager(include_path=..., include_defaults=False)`, as tunemake does, so neither
side pays for lm-eval's built-in task index). Both are timed from process start to exit;
the pairs alternate and each side keeps its best time over the rounds (the machine is shared).
Metrics must be identical.

Then the request cache: an eval target that adds `mc_letters` to a finished `mc_words` eval
of the same checkpoint, against evaluating both from scratch.

    python bench/bench_eval_scale.py [--docs 20] [--rounds 2]   # writes bench/out/eval_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import CHECKPOINT, OUT, TASKS, make_checkpoint, make_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = OUT / "eval_scale"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
SEED = 1234  # what the eval kind passes for every lm-eval seed by default
HFLM_SCRIPT = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
folder, tasks, task, shots, limit, batch = sys.argv[1:7]
lm = HFLM(pretrained=folder, dtype="float32", batch_size=int(batch), device="cpu")
results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=tasks, include_defaults=False),
                          num_fewshot=int(shots), limit=int(limit), batch_size=int(batch), log_samples=False,
                          random_seed={seed}, numpy_random_seed={seed}, torch_random_seed={seed}, fewshot_random_seed={seed})
print("METRICS " + json.dumps(results["results"][task], default=str))
""".format(seed=SEED)


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def project(name: str, tasks: list[str], shots: int, limit: int, batch: int) -> Path:
    """A fresh project: the checkpoint and task folder linked in, one eval target, no cache."""
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "model").symlink_to(CHECKPOINT)
    (root / "tasks").symlink_to(TASKS)
    task_list = ", ".join(f'"tasks/{t}.yaml"' for t in tasks)
    (root / "tunefile.toml").write_text(
        f'[target.e]\nkind = "eval"\nmodel = "model"\ntasks = [{task_list}]\nnum_fewshot = {shots}\n'
        f"limit = {limit}\nbatch_size = {batch}\nlog_samples = false\n")
    return root


def tunemake(root: Path) -> tuple[float, dict]:
    seconds, _ = timed([sys.executable, "-m", "tunemake", "-C", str(root), "build", "--plain"])
    log = subprocess.run([sys.executable, "-m", "tunemake", "-C", str(root), "log", "e"], env=ENV,
                         capture_output=True, text=True).stdout
    found = re.search(r'"load_seconds": ([\d.]+),\s*"evaluate_seconds": ([\d.]+),\s*"request_cache": (\{[^}]*\})', log)
    results = json.loads((root / "targets" / "e" / "results.json").read_text())["results"]
    return seconds, {"results": results, "load_seconds": float(found.group(1)),
                     "evaluate_seconds": float(found.group(2)), "request_cache": json.loads(found.group(3))}


def metrics(values: dict) -> dict:
    return {k: v for k, v in values.items() if k in ("acc,none", "acc_norm,none")}


def compare(task: str, shots: int, limit: int, batch: int, rounds: int) -> dict:
    best = {"tunemake": float("inf"), "hflm": float("inf")}
    ours = theirs = None
    for _ in range(rounds):
        root = project(f"{task}_{shots}shot", [task], shots, limit, batch)
        seconds, ours = tunemake(root)
        best["tunemake"] = min(best["tunemake"], seconds)
        seconds, out = timed([sys.executable, "-c", HFLM_SCRIPT, str(CHECKPOINT), str(TASKS), task, str(shots),
                              str(limit), str(batch)])
        best["hflm"] = min(best["hflm"], seconds)
        theirs = json.loads(out.split("METRICS ", 1)[1])
    row = {
        "task": task, "num_fewshot": shots, "docs": limit, "batch_size": batch,
        "tunemake_seconds": best["tunemake"], "hflm_seconds": best["hflm"],
        "speedup": best["hflm"] / best["tunemake"],
        "tunemake_metrics": metrics(ours["results"][task]), "hflm_metrics": metrics(theirs),
        "tunemake_load_seconds": ours["load_seconds"], "tunemake_evaluate_seconds": ours["evaluate_seconds"],
    }
    row["metrics_identical"] = row["tunemake_metrics"] == row["hflm_metrics"]
    print(f"{task} {shots}-shot, {limit} docs: tunemake {row['tunemake_seconds']:.1f} s, HFLM {row['hflm_seconds']:.1f} s "
          f"({row['speedup']:.2f}x); metrics {row['tunemake_metrics']} vs {row['hflm_metrics']}", flush=True)
    return row


def added_task(shots: int, limit: int, batch: int) -> dict:
    """A finished mc_words eval, then an eval target of mc_words + mc_letters on the same checkpoint."""
    root = project("added", ["mc_words"], shots, limit, batch)
    first, _ = tunemake(root)
    tasks = '["tasks/mc_words.yaml", "tasks/mc_letters.yaml"]'
    text = (root / "tunefile.toml").read_text()
    (root / "tunefile.toml").write_text(re.sub(r"tasks = \[.*\]", f"tasks = {tasks}", text))
    again, info = tunemake(root)
    scratch, scratch_info = tunemake(project("both", ["mc_words", "mc_letters"], shots, limit, batch))
    row = {"first_eval_seconds": first, "after_adding_seconds": again, "from_scratch_seconds": scratch,
           "after_adding_units": info["request_cache"], "from_scratch_units": scratch_info["request_cache"],
           "after_adding_evaluate_seconds": info["evaluate_seconds"],
           "from_scratch_evaluate_seconds": scratch_info["evaluate_seconds"],
           "results_identical": info["results"] == scratch_info["results"]}
    print(f"adding mc_letters to a finished mc_words eval: {again:.1f} s ({info['request_cache']}), "
          f"both from scratch {scratch:.1f} s ({scratch_info['request_cache']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    make_checkpoint()
    make_tasks(max(args.docs, 40))
    report = {"docs": args.docs, "batch_size": args.batch_size, "rounds": args.rounds,
              "load_average_at_start": os.getloadavg(), "rows": []}
    for shots in (5, 0):
        report["rows"].append(compare("mc_words", shots, args.docs, args.batch_size, args.rounds))
    report["added_task"] = added_task(5, args.docs, args.batch_size)
    report["load_average_at_end"] = os.getloadavg()
    (OUT / "eval_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT / 'eval_scale.json'}")


if __name__ == "__main__":
    main()
