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
    if len(set(params.evals)) != len(params.evals):
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

    by_model = {row["model"]: row for row in rows}
    for path in params.samples:
        speed = read_speed(project_dir / path)
        row = by_model.get(speed["model"])
        if row is None:
            raise ValueError(
                f"samples: {label(path)} ran model {speed['model']!r}, which none of the evals used "
                f"({', '.join(sorted(by_model))})"
            )
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
              "higher_is_better": {m: baseline["higher_is_better"].get(m, True) for m in metrics}, "rows": rows,
              "alpha": paired.ALPHA, "paired": paired_rows(rows, baseline),
              "divergence": divergence_rows(rows, baseline)}
    report["pareto"] = pareto(report)
    figures = report_plots.write_all(report, out)
    report["figures"] = list(figures)
    (out / "report.html").write_text(report_html.page(report, baseline, figures), encoding="utf-8")
    for row in rows:
        for key in ("samples", "metric_task", "choices", "docs"):
            row.pop(key)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
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
            base_docs, docs = baseline["docs"].get(task, {}), row["docs"].get(task, {})
            changed = [d for d in sorted(values, key=_doc_order)
                       if (base_docs.get(d) or {}).get("hash") != (docs.get(d) or {}).get("hash")]
            if changed:
                raise ValueError(
                    f"evals: {row['eval']} and {baseline['eval']} scored different documents under the same "
                    f"ids for {metric} ({len(changed)} differ, first doc_id {changed[0]}): the task's data "
                    "changed between them; paired statistics need the same documents")
            higher = baseline["higher_is_better"].get(metric, True)
            entry = {"eval": row["eval"], "metric": metric, "task": task, **paired.compare(base, values, higher)}
            if entry["binary"]:
                entry["flips"] = [{"doc_id": d, "direction": "right_to_wrong" if base[d] else "wrong_to_right"}
                                  for d in sorted(values, key=_doc_order) if base[d] != values[d]]
            found.append(entry)
    paired.verdicts(found)
    return found


def _doc_order(doc_id: str):
    return (0, int(doc_id), "") if doc_id.isdigit() else (1, 0, doc_id)


def read_samples(folder: Path) -> dict[str, dict]:
    """From an eval's per-sample logs: samples {metric (named as in the metrics table): {doc_id:
    value}}, metric_task {metric: its task}, for multiple-choice tasks choices {task: {doc_id:
    [log-likelihood of each choice]}}, and docs {task: {doc_id: what the report shows of a document
    (its prompt, target, this model's answer, the document's hash)}}."""
    values: dict[str, dict] = {}
    metric_task: dict[str, str] = {}
    choices: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    for path in sorted((folder / "samples").glob("*.jsonl")):
        task = path.stem  # the eval kind writes samples/TASK.jsonl
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            doc = str(sample["doc_id"])
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (bool, int, float)) and math.isfinite(value):
                    name = metric_name(task, metric, sample.get("filter", "none"))
                    values.setdefault(name, {})[doc] = float(value)
                    metric_task[name] = task
            lls = _choice_loglikelihoods(sample.get("filtered_resps"))
            if lls is not None and len(lls) > 1:
                choices.setdefault(task, {})[doc] = lls
            docs.setdefault(task, {})[doc] = _shown(sample, lls)
    return {"samples": values, "metric_task": metric_task, "choices": choices, "docs": docs}


def _shown(sample: dict, lls: list[float] | None) -> dict:
    """A document as the flipped-questions list shows it: the prompt, the target and the model's
    answer (for multiple choice the continuation it scored highest, else its filtered output)."""
    arguments = sample.get("arguments")
    pairs = [a for a in arguments if isinstance(a, list) and a] if isinstance(arguments, list) else []
    prompt = str(pairs[0][0]) if pairs else ""
    continuations = [str(a[1]) for a in pairs if len(a) > 1 and isinstance(a[1], str)]
    target = sample.get("target")
    if lls is not None and len(lls) > 1 and len(continuations) == len(lls):
        answer = continuations[lls.index(max(lls))]
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
    results = json.loads(results_file.read_text())
    checkpoint = json.loads(checkpoint_file.read_text())
    metrics, higher_is_better = {}, {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            name = metric_name(task, metric, filter_name)
            metrics[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
            higher = (results.get("higher_is_better", {}).get(task) or {}).get(metric)
            higher_is_better[name] = higher if isinstance(higher, bool) else True
    return {
        "eval": label,
        "model": checkpoint["model"],
        "quantization": (checkpoint.get("quantization") or {}).get("scheme"),
        "weight_bytes": checkpoint["weight_bytes"],
        "decode_tokens_per_s": None,
        "time_to_first_token_s": None,
        "speed_from": None,
        "metrics": metrics,
        "higher_is_better": higher_is_better,
        **read_samples(folder),
    }


def read_speed(folder: Path) -> dict:
    speed_file = folder / "speed.json"
    if not speed_file.is_file():
        raise ValueError(f"samples: {folder} is not a generate output (no speed.json)")
    return json.loads(speed_file.read_text())


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


def markdown(report: dict) -> str:
    def table(header: list[str], cells: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(row) + " |" for row in cells]

    lines = [f"# {report['title']}", "", f"Baseline: {report['baseline']}. Changes are against it.", "",
             *table(*overview_table(report))]
    for metric in report["metrics"]:
        lines += ["", f"## {metric}", "", *table(*metric_table(report, metric))]
    lines += ["", "## Paired against the baseline", ""]
    if report["paired"]:
        lines += [PAIRED_NOTE.format(alpha=report["alpha"]), "", *table(*paired_table(report))]
    else:
        lines.append("No per-sample logs to pair (the evals need `log_samples = true`, the default).")
    if report["divergence"]:
        lines += ["", "## Divergence from the baseline", "", DIVERGENCE_NOTE, "", *table(*divergence_table(report))]
    if report["figures"]:
        lines += ["", "Figures: " + ", ".join(f"{name}.png" for name in report["figures"]) + " (and .svg); "
                  "everything in report.html."]
    return "\n".join(lines) + "\n"
