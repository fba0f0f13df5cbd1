"""kind = "report": several eval targets (say bf16, int8, int4) side by side.

For each eval: its metrics and their change against the baseline eval, the checkpoint's
weight size and quantization scheme (from the eval's checkpoint.json), and decode speed
from the generate targets in `samples` that used the same model. Reads only its inputs;
imports nothing heavy but matplotlib. Outputs report.json (every number), report.md (the tables),
report.html (one self-contained page: tables, figures, the flipped questions) and the figures as
PNG and SVG (report_plots).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunemake.kinds import paired, report_html, report_plots

INPUTS = ("evals", "samples")
PACKAGES = ("python", "matplotlib")
CODE = ("tunemake.kinds.model_inputs", "tunemake.kinds.paired", "tunemake.kinds.report_plots",
        "tunemake.kinds.report_html")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    evals: list[str] = Field(min_length=1, description="eval targets (or their output folders)")
    baseline: str | None = Field(default=None, description="one of evals; default the first")
    samples: list[str] = Field(default_factory=list, description="generate targets giving decode speed per model")
    title: str = "Evaluation report"


def validate(params: Params, project_dir) -> None:
    # evals here lack paths inside other targets' outputs (`e2/sub`): such a baseline is checked at run time
    if params.baseline is not None and params.baseline not in params.evals and "/" not in params.baseline:
        raise ValueError(f"baseline: {params.baseline!r} is not one of evals {params.evals}")
    if len({os.path.normpath(e) for e in params.evals}) != len(params.evals):
        raise ValueError("evals: an eval is listed twice")


def summary(out_dir) -> str:
    return (Path(out_dir) / "report.md").read_text(encoding="utf-8")


def run(params: Params, ctx) -> None:
    from tunemake.kinds.model_inputs import dependency_name

    project_dir = Path(ctx.project_dir)

    def label(path: str) -> str:  # as the tunefile names it: never the step's private folders
        return dependency_name(ctx, project_dir / path)

    rows = [read_eval(Path(project_dir / path), label(path)) for path in params.evals]
    if params.baseline is None:
        baseline = rows[0]
    else:
        # params.evals arrive as paths, labelled as the tunefile names them; baseline is such a name
        matches = [row for row in rows if row["eval"] == os.path.normpath(params.baseline)]
        if not matches:
            raise ValueError(f"baseline: {params.baseline!r} is not one of evals ({', '.join(r['eval'] for r in rows)})")
        baseline = matches[0]

    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    timed: dict[str, str] = {}
    for path in params.samples:
        speed = read_speed(project_dir / path, label(path))
        if speed["model"] not in by_model:
            raise ValueError(
                f"samples: {label(path)} ran model {speed['model']!r}, which none of the evals used "
                f"({', '.join(sorted(by_model))})"
            )
        if speed["model"] in timed:
            raise ValueError(f"samples: {label(path)} and {timed[speed['model']]} both timed model "
                             f"{speed['model']!r}; give one generate target per model")
        timed[speed["model"]] = label(path)
        for row in by_model[speed["model"]]:  # every eval of that model
            row["decode_tokens_per_s"] = speed["decode_tokens_per_s"]
            row["time_to_first_token_s"] = speed["time_to_first_token_s"]
            row["speed_from"] = label(path)

    metrics = list(dict.fromkeys(key for row in rows for key in row["metrics"]))
    for row in rows:
        for key, entry in row["metrics"].items():
            base = baseline["metrics"].get(key)
            entry["delta"] = None if base is None else entry["value"] - base["value"]

    for row in rows:
        for key, entry in row["metrics"].items():
            entry["ci95"], entry["ci_from"] = value_interval(entry, row["samples"].get(key))

    out = Path(ctx.out)
    report = {"title": params.title, "baseline": baseline["eval"], "metrics": metrics,
              "higher_is_better": {m: direction(m, [baseline, *rows]) for m in metrics}, "rows": rows,
              "alpha": paired.ALPHA, "paired": paired_rows(rows, baseline),
              "divergence": divergence_rows(rows, baseline)}
    report["pareto"] = pareto(report)
    report["figure_notes"] = report_plots.notes(report)
    figures = report_plots.write_all(report, out)
    report["figures"] = list(figures)
    # backslashreplace: a lone surrogate in a prompt from a foreign log must not fail the page
    (out / "report.html").write_text(report_html.page(report, baseline, figures), encoding="utf-8",
                                     errors="backslashreplace")
    for row in rows:
        for key in ("samples", "metric_task", "choices", "docs"):
            row.pop(key)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")  # strict JSON for CI
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report), flush=True)


def value_interval(entry: dict, per_document: dict | None) -> tuple[list[float] | None, str | None]:
    """An eval's own 95% interval of a metric (for the trade-off plots' error bars): a bootstrap over
    its documents where the metric is their mean, else lm-eval's stderr, else none."""
    if per_document:
        values = list(per_document.values())
        if math.isclose(sum(values) / len(values), entry["value"], rel_tol=1e-9, abs_tol=1e-12):
            return list(paired.bootstrap_interval(values)), "bootstrap"
    if entry["stderr"] is not None and math.isfinite(entry["stderr"]):
        return [entry["value"] - 1.96 * entry["stderr"], entry["value"] + 1.96 * entry["stderr"]], "stderr"
    return None, None


def pareto(report: dict) -> dict[str, dict[str, list[str]]]:
    """Per metric, the evals on the Pareto front of the metric against weight size (smaller is
    better) and against decode tokens/s (faster is better, among the evals a generate target timed)."""
    fronts = {}
    for metric in report["metrics"]:
        higher = report["higher_is_better"][metric]
        scored = [r for r in report["rows"] if metric in r["metrics"]]
        by_size = [(r["eval"], r["weight_bytes"], r["metrics"][metric]["value"]) for r in scored]
        by_speed = [(r["eval"], r["decode_tokens_per_s"], r["metrics"][metric]["value"])
                    for r in scored if r["decode_tokens_per_s"] is not None]
        fronts[metric] = {"weight_bytes": report_plots.pareto_front(by_size, True, higher),
                          "decode_tokens_per_s": report_plots.pareto_front(by_speed, False, higher)}
    return fronts


def paired_rows(rows: list[dict], baseline: dict) -> list[dict]:
    """Each variant against the baseline, metric by metric, on the documents both scored (they
    must be the same documents: unpaired data compared as paired would be a wrong answer)."""
    found = []
    for row in rows:
        if row is baseline:
            continue
        for metric, values in row["samples"].items():
            base = baseline["samples"].get(metric)
            if base is None:
                continue
            task = row["metric_task"][metric]
            if set(base) != set(values):
                common = len(set(base) & set(values))
                raise ValueError(
                    f"evals: {row['eval']} and {baseline['eval']} scored different documents for {metric} "
                    f"({len(values)} and {len(base)}, {common} in common); paired statistics need the same "
                    "documents (the same tasks, limit and num_fewshot)")
            base_docs, docs = baseline["docs"].get(metric, {}), row["docs"].get(metric, {})
            changed = [d for d in sorted(values, key=_doc_order)
                       if (base_docs.get(d) or {}).get("hash") != (docs.get(d) or {}).get("hash")]
            if changed:
                raise ValueError(
                    f"evals: {row['eval']} and {baseline['eval']} scored different documents under the same "
                    f"ids for {metric} ({len(changed)} differ, first doc_id {changed[0]}): the task's data "
                    "changed between them; paired statistics need the same documents")
            if row["n_shot"].get(task) != baseline["n_shot"].get(task):
                raise ValueError(
                    f"evals: {row['eval']} and {baseline['eval']} scored {task} with different num_fewshot "
                    f"({row['n_shot'].get(task)} and {baseline['n_shot'].get(task)}): the same documents under "
                    "other prompts are not paired data")
            higher = direction(metric, [baseline, row])
            entry = {"eval": row["eval"], "metric": metric, "task": task, **paired.compare(base, values, higher)}
            if entry["binary"]:
                entry["flips"] = [{"doc_id": d, "direction": "right_to_wrong" if base[d] else "wrong_to_right"}
                                  for d in sorted(values, key=_doc_order) if base[d] != values[d]]
            found.append(entry)
    for row in rows:
        if row is not baseline and row["samples"] and baseline["samples"] and not set(row["samples"]) & set(baseline["samples"]):
            raise ValueError(f"evals: {row['eval']} and {baseline['eval']} share no metric ({', '.join(sorted(row['samples']))} "
                             f"against {', '.join(sorted(baseline['samples']))}): nothing to pair")
    paired.verdicts(found)
    return found


def direction(metric: str, rows: list[dict]) -> bool:
    """Whether higher is better for metric, as the first eval that reports it says (default: yes)."""
    return next((row["higher_is_better"][metric] for row in rows if metric in row["higher_is_better"]), True)


def _doc_order(doc_id: str):
    return (0, int(doc_id), "") if doc_id.isdigit() else (1, 0, doc_id)


def read_samples(folder: Path) -> dict[str, dict]:
    """From an eval's per-sample logs: samples {metric (named as in the metrics table): {doc_id:
    value}}, metric_task {metric: its task}, for multiple-choice tasks choices {task: {doc_id:
    [log-likelihood of each choice]}}, and docs {metric: {doc_id: what the report shows of a
    document (its prompt, target, this model's answer, the document's hash)}}. lm-eval writes a
    line per document and filter, so the answers shown belong to the metric's own filter."""
    values: dict[str, dict] = {}
    metric_task: dict[str, str] = {}
    choices: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    for path in sorted((folder / "samples").glob("*.jsonl")):
        task = path.stem  # the eval kind writes samples/TASK.jsonl
        seen: set[tuple[str, str]] = set()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                sample = json.loads(line)
            except ValueError as error:
                raise ValueError(f"evals: {where}: not a JSON line ({error})") from None
            if not isinstance(sample, dict) or "doc_id" not in sample:
                raise ValueError(f"evals: {where}: not an lm-eval sample (an object with doc_id)")
            if not isinstance(sample["doc_id"], (int, str)) or isinstance(sample["doc_id"], bool):
                raise ValueError(f"evals: {where}: doc_id must be an integer or a string, got {sample['doc_id']!r}")
            doc = str(sample["doc_id"])
            filter_name = sample.get("filter") or "none"
            if not isinstance(filter_name, str):
                raise ValueError(f"evals: {where}: filter must be a string, got {filter_name!r}")
            if (doc, filter_name) in seen:
                raise ValueError(f"evals: {where}: doc_id {doc} appears twice for filter {filter_name}")
            seen.add((doc, filter_name))
            names = sample.get("metrics", [])
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ValueError(f"evals: {where}: metrics must be a list of names, got {names!r}")
            lls = _choice_loglikelihoods(sample.get("filtered_resps"))
            for metric in names:
                value = sample.get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"evals: {where}: doc_id {doc} has {metric} = {value!r}, not a finite number")
                name = metric_name(task, metric, filter_name)
                values.setdefault(name, {})[doc] = float(value)
                metric_task[name] = task
                docs.setdefault(name, {})[doc] = _shown(sample, lls, normalized=metric == "acc_norm")
            if lls is not None and len(lls) > 1 and all(math.isfinite(v) for v in lls):
                choices.setdefault(task, {})[doc] = lls
    return {"samples": values, "metric_task": metric_task, "choices": choices, "docs": docs}


def _arguments(sample: dict) -> list[list]:
    """A sample's request arguments as [context, continuation-or-kwargs] pairs, from lm-eval's own
    logs: lists, or {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}."""
    arguments = sample.get("arguments")
    if isinstance(arguments, dict):
        arguments = [[a.get("arg_0"), a.get("arg_1")] if isinstance(a, dict) else a for a in arguments.values()]
    return [a for a in arguments if isinstance(a, list) and a] if isinstance(arguments, list) else []


def _shown(sample: dict, lls: list[float] | None, normalized: bool = False) -> dict:
    """A document as the flipped-questions list shows it: the prompt, the target and the model's
    answer (for multiple choice the continuation it scored highest, per character for acc_norm
    as lm-eval does, else its filtered output)."""
    if "prompt" in sample:  # the eval kind's compact log
        prompt = str(sample["prompt"])
        listed = sample.get("continuations")
        continuations = [str(c) for c in listed] if isinstance(listed, list) else []
    else:
        pairs = _arguments(sample)
        prompt = str(pairs[0][0]) if pairs else ""
        continuations = [str(a[1]) for a in pairs if len(a) > 1 and isinstance(a[1], str)]
    target = sample.get("target")
    if lls is not None and len(lls) > 1 and len(continuations) == len(lls):
        scores = [ll / max(len(c.removeprefix(" ")), 1) for ll, c in zip(lls, continuations)] if normalized else lls
        answer = continuations[scores.index(max(scores))]
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(continuations):
            target = continuations[target]
    else:
        responses = sample.get("filtered_resps")
        answer = responses[0] if isinstance(responses, list) and responses else responses
    return {"prompt": prompt, "target": "" if target is None else str(target),
            "answer": "" if answer is None else str(answer), "hash": sample.get("doc_hash")}


def _choice_loglikelihoods(responses) -> list[float] | None:
    """A multiple-choice sample's [log-likelihood, is_greedy] per choice -> the log-likelihoods."""
    if not isinstance(responses, list):
        return None
    lls = []
    for response in responses:
        if not (isinstance(response, list) and response and isinstance(response[0], (int, float))):
            return None
        lls.append(float(response[0]))
    return lls


def divergence_rows(rows: list[dict], baseline: dict) -> list[dict]:
    """How far each variant's answers moved from the baseline's, at no model cost: for
    multiple-choice tasks the mean KL divergence of the choice distributions (softmax of the
    logged log-likelihoods) and how often the top choice agrees; for perplexities their ratio."""
    found = []
    for row in rows:
        if row is baseline:
            continue
        for task, docs in sorted(row["choices"].items()):
            base = baseline["choices"].get(task)
            if base is None or set(base) != set(docs):
                continue  # paired_rows has refused different documents already
            kls, agree = [], 0
            for doc, lls in docs.items():
                p, q = _softmax(base[doc]), _softmax(lls)
                kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))
                agree += p.index(max(p)) == q.index(max(q))
            found.append({"eval": row["eval"], "task": task, "n": len(docs), "mean_kl": sum(kls) / len(kls),
                          "top_choice_agreement": agree / len(docs)})
        for metric, entry in row["metrics"].items():
            base = baseline["metrics"].get(metric)
            if "perplexity" in metric and base and base["value"]:
                found.append({"eval": row["eval"], "metric": metric, "perplexity_ratio": entry["value"] / base["value"]})
    return found


def _softmax(lls: list[float]) -> list[float]:
    top = max(lls)
    weights = [math.exp(v - top) for v in lls]
    total = sum(weights)
    return [max(w / total, 1e-300) for w in weights]


def metric_name(task: str, metric: str, filter_name: str) -> str:
    return f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")


def read_eval(folder: Path, label: str) -> dict:
    results_file, checkpoint_file = folder / "results.json", folder / "checkpoint.json"
    if not results_file.is_file() or not checkpoint_file.is_file():
        raise ValueError(f"evals: {label} is not an eval output (no results.json and checkpoint.json in {folder})")
    results, checkpoint = _json_object(results_file), _json_object(checkpoint_file)
    tasks = results.get("results")
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise ValueError(f"evals: {results_file}: field 'results' must map each task to its metrics")
    if not isinstance(checkpoint.get("model"), str):
        raise ValueError(f"evals: {checkpoint_file}: field 'model' must be a string")
    size = checkpoint.get("weight_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"evals: {checkpoint_file}: field 'weight_bytes' must be a byte count, got {size!r}")
    quantization = checkpoint.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise ValueError(f"evals: {checkpoint_file}: field 'quantization' must be an object or null")
    metrics, higher_is_better = {}, {}
    directions = results.get("higher_is_better") if isinstance(results.get("higher_is_better"), dict) else {}
    for task, values in tasks.items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):  # lm-eval writes NaN for a metric it could not compute
                continue
            metric, filter_name = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            finite = isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr)
            name = metric_name(task, metric, filter_name)
            metrics[name] = {"value": value, "stderr": stderr if finite else None}
            higher = (directions.get(task) or {}).get(metric) if isinstance(directions.get(task), dict) else None
            if isinstance(higher, bool):
                higher_is_better[name] = higher
    shots = results.get("n-shot") if isinstance(results.get("n-shot"), dict) else {}
    return {
        "eval": label,
        "model": checkpoint["model"],
        "quantization": (quantization or {}).get("scheme"),
        "weight_bytes": size,
        "decode_tokens_per_s": None,
        "time_to_first_token_s": None,
        "speed_from": None,
        "metrics": metrics,
        "higher_is_better": higher_is_better,
        "n_shot": shots,
        **read_samples(folder),
    }


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_speed(folder: Path, label: str) -> dict:
    speed_file = folder / "speed.json"
    if not speed_file.is_file():
        raise ValueError(f"samples: {label} is not a generate output (no speed.json in {folder})")
    speed = _json_object(speed_file)
    if not isinstance(speed.get("model"), str):
        raise ValueError(f"samples: {speed_file}: field 'model' must be a string")
    for key in ("decode_tokens_per_s", "time_to_first_token_s"):
        value = speed.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"samples: {speed_file}: field {key!r} must be a non-negative number, got {value!r}")
    return {"model": speed["model"], "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
            "time_to_first_token_s": speed.get("time_to_first_token_s")}


def number(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def ratio(value, base) -> str:
    return "–" if value is None or not base else f"{value / base:.2f}x"


# ---- tables (report.md and report.html render the same cells) --------------------------------
PAIRED_NOTE = ("Per document, on the documents both scored. p: McNemar's exact test for 0/1 metrics, a paired "
               "sign-flip test otherwise; Holm-corrected over the rows below; verdicts at alpha {alpha}. The "
               "interval is a paired bootstrap 95% interval of the change, per row and not adjusted: with few "
               "flips it can exclude 0 where the exact test finds no detectable change; the verdict follows "
               "the test.")
DIVERGENCE_NOTE = ("Multiple-choice tasks: the mean KL divergence of the choice distributions (from the logged "
                   "log-likelihoods) and how often the top choice agrees. Perplexities: their ratio.")


def overview_table(report: dict) -> tuple[list[str], list[list[str]]]:
    rows = report["rows"]
    base = next(row for row in rows if row["eval"] == report["baseline"])
    header = ["eval", "model", "quantization", "weights (MB)", "size", "decode tokens/s", "speed", "first token (ms)"]
    cells = []
    for row in rows:
        first_token = row["time_to_first_token_s"]
        cells.append([
            row["eval"], row["model"], row["quantization"] or "none", f"{row['weight_bytes'] / 1e6:.1f}",
            ratio(row["weight_bytes"], base["weight_bytes"]), number(row["decode_tokens_per_s"], 1),
            ratio(row["decode_tokens_per_s"], base["decode_tokens_per_s"]),
            number(first_token * 1e3 if first_token is not None else None, 1),
        ])
    return header, cells


def metric_table(report: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    cells = []
    for row in report["rows"]:
        entry = row["metrics"].get(metric)
        if entry is None:
            cells.append([row["eval"], "–", "–", "–"])
        else:
            cells.append([row["eval"], number(entry["value"]), number(entry["stderr"]),
                          number(entry["delta"], signed=True)])
    return ["eval", "value", "stderr", "change"], cells


def paired_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["eval", "metric", "n", "change", "95% interval", "right → wrong", "wrong → right", "agreement",
              "p (Holm)", "verdict"]
    cells = []
    for p in report["paired"]:
        flips = ("–", "–") if p["right_to_wrong"] is None else (str(p["right_to_wrong"]), str(p["wrong_to_right"]))
        cells.append([
            p["eval"], p["metric"], str(p["n"]), number(p["delta"], signed=True),
            f"[{number(p['ci95'][0], signed=True)}, {number(p['ci95'][1], signed=True)}]", *flips,
            f"{p['agreement']:.3f}", f"{p['p_holm']:.3g}", p["verdict"],
        ])
    return header, cells


def divergence_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["eval", "task or metric", "n", "mean KL", "top choice agrees", "perplexity ratio"]
    cells = []
    for d in report["divergence"]:
        if "mean_kl" in d:
            cells.append([d["eval"], d["task"], str(d["n"]), f"{d['mean_kl']:.4g}", f"{d['top_choice_agreement']:.3f}", "–"])
        else:
            cells.append([d["eval"], d["metric"], "–", "–", "–", f"{d['perplexity_ratio']:.4f}"])
    return header, cells


def md_cell(text: str) -> str:
    """Text from labels and task data as inert Markdown: no HTML, no table breaks, one line."""
    text = report_plots.text(text)  # control characters out, as in the figures
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def markdown(report: dict) -> str:
    def table(header: list[str], cells: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in cells]

    lines = [f"# {md_cell(report['title'])}", "", f"Baseline: {md_cell(report['baseline'])}. Changes are against it.", "",
             *table(*overview_table(report))]
    for metric in report["metrics"]:
        lines += ["", f"## {md_cell(metric)}", "", *table(*metric_table(report, metric))]
    lines += ["", "## Paired against the baseline", ""]
    if report["paired"]:
        lines += [PAIRED_NOTE.format(alpha=report["alpha"]), "", *table(*paired_table(report))]
    else:
        lines.append("No per-sample logs to pair (the evals need `log_samples = true`, the default).")
    if report["divergence"]:
        lines += ["", "## Divergence from the baseline", "", DIVERGENCE_NOTE, "", *table(*divergence_table(report))]
    for note in report.get("figure_notes", []):
        lines += ["", md_cell(note)]
    if report["figures"]:
        lines += ["", "Figures: " + ", ".join(f"{name}.png" for name in report["figures"]) + " (and .svg); "
                  "everything in report.html."]
    return "\n".join(lines) + "\n"
