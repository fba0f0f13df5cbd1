"""kind = "report": several eval targets (say bf16, int8, int4) side by side.

For each eval: its metrics and their change against the baseline eval, the checkpoint's
weight size and quantization scheme (from the eval's checkpoint.json), and decode speed
from the generate targets in `samples` that used the same model. Reads only its inputs;
imports nothing heavy. Outputs report.md, report.json and report.svg (bars drawn by hand).
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunemake.kinds import paired

INPUTS = ("evals", "samples")
PACKAGES = ("python",)
CODE = ("tunemake.kinds.model_inputs", "tunemake.kinds.paired")


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

    out = Path(ctx.out)
    report = {"title": params.title, "baseline": baseline["eval"], "metrics": metrics, "rows": rows,
              "alpha": paired.ALPHA, "paired": paired_rows(rows, baseline),
              "divergence": divergence_rows(rows, baseline)}
    for row in rows:
        row.pop("samples")
        row.pop("choices")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    (out / "report.svg").write_text(svg(report), encoding="utf-8")
    print(markdown(report), flush=True)


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
            if set(base) != set(values):
                common = len(set(base) & set(values))
                raise ValueError(
                    f"evals: {row['eval']} and {baseline['eval']} scored different documents for {metric} "
                    f"({len(values)} and {len(base)}, {common} in common); paired statistics need the same "
                    "documents (the same tasks, limit and num_fewshot)")
            higher = baseline["higher_is_better"].get(metric, True)
            found.append({"eval": row["eval"], "metric": metric, **paired.compare(base, values, higher)})
    paired.verdicts(found)
    return found


def read_samples(folder: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """From an eval's per-sample logs: {metric (named as in the metrics table): {doc_id: value}},
    and for multiple-choice tasks {task: {doc_id: [log-likelihood of each choice]}}."""
    values: dict[str, dict] = {}
    choices: dict[str, dict] = {}
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
                    values.setdefault(metric_name(task, metric, sample.get("filter", "none")), {})[doc] = float(value)
            lls = _choice_loglikelihoods(sample.get("filtered_resps"))
            if lls is not None and len(lls) > 1:
                choices.setdefault(task, {})[doc] = lls
    return values, choices


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
        **dict(zip(("samples", "choices"), read_samples(folder))),
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


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = next(row for row in rows if row["eval"] == report["baseline"])
    lines = [
        f"# {report['title']}",
        "",
        f"Baseline: {report['baseline']}. Changes are against it.",
        "",
        "| eval | model | quantization | weights (MB) | size | decode tokens/s | speed | first token (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        first_token = row["time_to_first_token_s"]
        lines.append(
            f"| {row['eval']} | {row['model']} | {row['quantization'] or 'none'} | {row['weight_bytes'] / 1e6:.1f} | "
            f"{ratio(row['weight_bytes'], base['weight_bytes'])} | {number(row['decode_tokens_per_s'], 1)} | "
            f"{ratio(row['decode_tokens_per_s'], base['decode_tokens_per_s'])} | "
            f"{number(first_token * 1e3 if first_token is not None else None, 1)} |"
        )
    for metric in report["metrics"]:
        lines += ["", f"## {metric}", "", "| eval | value | stderr | change |", "|---|---|---|---|"]
        for row in rows:
            entry = row["metrics"].get(metric)
            if entry is None:
                lines.append(f"| {row['eval']} | – | – | – |")
                continue
            lines.append(
                f"| {row['eval']} | {number(entry['value'])} | {number(entry['stderr'])} | "
                f"{number(entry['delta'], signed=True)} |"
            )
    lines += ["", "## Paired against the baseline", ""]
    if report["paired"]:
        lines += [
            f"Per document, on the documents both scored. p: McNemar's exact test for 0/1 metrics, a "
            f"paired sign-flip test otherwise; Holm-corrected over the rows below; verdicts at alpha "
            f"{report['alpha']}. The interval is a paired bootstrap 95% interval of the change.",
            "",
            "| eval | metric | n | change | 95% interval | right → wrong | wrong → right | agreement | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in report["paired"]:
            flips = ("–", "–") if p["right_to_wrong"] is None else (p["right_to_wrong"], p["wrong_to_right"])
            lines.append(
                f"| {p['eval']} | {p['metric']} | {p['n']} | {number(p['delta'], signed=True)} | "
                f"[{number(p['ci95'][0], signed=True)}, {number(p['ci95'][1], signed=True)}] | {flips[0]} | "
                f"{flips[1]} | {p['agreement']:.3f} | {p['p_holm']:.3g} | {p['verdict']} |"
            )
    else:
        lines.append("No per-sample logs to pair (the evals need `log_samples = true`, the default).")
    if report["divergence"]:
        lines += ["", "## Divergence from the baseline", "",
                  "Multiple-choice tasks: the mean KL divergence of the choice distributions (from the "
                  "logged log-likelihoods) and how often the top choice agrees. Perplexities: their ratio.", "",
                  "| eval | task or metric | n | mean KL | top choice agrees | perplexity ratio |",
                  "|---|---|---|---|---|---|"]
        for d in report["divergence"]:
            if "mean_kl" in d:
                lines.append(f"| {d['eval']} | {d['task']} | {d['n']} | {d['mean_kl']:.4g} | "
                             f"{d['top_choice_agreement']:.3f} | – |")
            else:
                lines.append(f"| {d['eval']} | {d['metric']} | – | – | – | {d['perplexity_ratio']:.4f} |")
    return "\n".join(lines) + "\n"


# ---- plot -----------------------------------------------------------------------------------
LABEL_WIDTH, BAR_WIDTH, VALUE_WIDTH, BAR_HEIGHT, GAP = 160, 360, 90, 16, 4
BASELINE_COLOUR, OTHER_COLOUR = "#4c72b0", "#dd8452"


def svg(report: dict) -> str:
    """One panel of horizontal bars per metric, plus weight size and decode speed."""
    rows = report["rows"]
    panels = [(metric, [row["metrics"].get(metric, {}).get("value") for row in rows]) for metric in report["metrics"]]
    panels.append(("weights (MB)", [row["weight_bytes"] / 1e6 for row in rows]))
    if any(row["decode_tokens_per_s"] is not None for row in rows):
        panels.append(("decode tokens/s", [row["decode_tokens_per_s"] for row in rows]))

    width = LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH
    parts, y = [], 28
    parts.append(f'<text x="8" y="18" font-size="14" font-weight="bold">{escape(report["title"])}</text>')
    for title, values in panels:
        y += 18
        parts.append(f'<text x="8" y="{y}" font-size="12" font-weight="bold">{escape(title)}</text>')
        y += 6
        largest = max((abs(v) for v in values if v is not None), default=0.0) or 1.0
        for row, value in zip(rows, values):
            colour = BASELINE_COLOUR if row["eval"] == report["baseline"] else OTHER_COLOUR
            text_y = y + BAR_HEIGHT - 4
            parts.append(f'<text x="8" y="{text_y}" font-size="11">{escape(row["eval"])}</text>')
            if value is None:
                parts.append(f'<text x="{LABEL_WIDTH}" y="{text_y}" font-size="11">n/a</text>')
            else:
                length = BAR_WIDTH * abs(value) / largest
                parts.append(
                    f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{colour}"/>'
                )
                parts.append(f'<text x="{LABEL_WIDTH + length + 4:.1f}" y="{text_y}" font-size="11">{value:.4g}</text>')
            y += BAR_HEIGHT + GAP
    height = y + 10
    header = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">'
    )
    background = f'<rect width="{width}" height="{height}" fill="white"/>'
    return "\n".join([header, background, *parts, "</svg>"]) + "\n"
