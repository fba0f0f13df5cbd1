"""report.html: one self-contained page (no network, no scripts) with the report's tables, its
figures inlined as data: URIs, and per variant the questions whose answer flipped, with the
prompt, the target and both models' answers. A Content-Security-Policy forbids every fetch, so
the page stays offline even if a label or a prompt holds a URL."""

from __future__ import annotations

import base64
from html import escape

MAX_FLIPS_SHOWN = 100  # per variant and metric; report.json lists every flipped doc_id

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.worse { background: #f6d5d6; } td.better { background: #d7ecdc; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { white-space: pre-wrap; max-height: 12em; overflow: auto; margin: 0; font-size: 0.85em; }
details { margin: 0.4em 0 1em; } summary { cursor: pointer; font-weight: 600; }
p.note { color: #555; font-size: 0.9em; }
"""
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def page(report: dict, baseline: dict, figures: dict[str, dict[str, bytes]]) -> str:
    # report.py holds the tables report.md renders too (and imports this module)
    from tunemake.kinds.report import (DIVERGENCE_NOTE, PAIRED_NOTE, divergence_table, metric_table,
                                       overview_table, paired_table)

    parts = [f"<h1>{escape(report['title'])}</h1>",
             f"<p>Baseline: <b>{escape(report['baseline'])}</b>. Changes are against it.</p>",
             _table(*overview_table(report))]
    parts.append("<h2>Paired against the baseline</h2>")
    if report["paired"]:
        parts += [f'<p class="note">{escape(PAIRED_NOTE.format(alpha=report["alpha"]))}</p>',
                  _table(*paired_table(report), verdict_column=9)]
    else:
        parts.append('<p class="note">No per-sample logs to pair (the evals need log_samples = true, the default).</p>')
    if report["divergence"]:
        parts += ["<h2>Divergence from the baseline</h2>", f'<p class="note">{escape(DIVERGENCE_NOTE)}</p>',
                  _table(*divergence_table(report))]
    for name, caption in (("deltas", "Paired change per metric"), ("tradeoff_size", "Metric against weight size"),
                          ("tradeoff_speed", "Metric against decode speed")):
        if name in figures:
            data = base64.b64encode(figures[name]["png"]).decode("ascii")
            note = f"Also {name}.png and {name}.svg beside this page."
            if name != "deltas":
                note += " Orange points are on the Pareto front; the dashed line joins them."
            parts += [f"<h2>{caption}</h2>", f'<img alt="{escape(caption)}" src="data:image/png;base64,{data}">',
                      f'<p class="note">{note}</p>']
    for note in report.get("figure_notes", []):
        parts.append(f'<p class="note">{escape(note)}</p>')
    parts.append("<h2>Metrics</h2>")
    for metric in report["metrics"]:
        parts += [f"<h3>{escape(metric)}</h3>", _table(*metric_table(report, metric))]
    parts += _flipped(report, baseline)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
            f"<title>{escape(report['title'])}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _table(header: list[str], cells: list[list[str]], verdict_column: int | None = None) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for row in cells:
        tds = []
        for i, cell in enumerate(row):
            css = ""
            if i == verdict_column and cell in ("worse", "better"):
                css = f' class="{cell}"'
            tds.append(f"<td{css}>{escape(cell)}</td>")
        lines.append("<tr>" + "".join(tds) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _flipped(report: dict, baseline: dict) -> list[str]:
    rows = {row["eval"]: row for row in report["rows"]}
    parts = ["<h2>Flipped questions</h2>",
             '<p class="note">Per variant and 0/1 metric, the documents it answered differently from the '
             "baseline: right → wrong first.</p>"]
    shown = False
    for entry in report["paired"]:
        flips = entry.get("flips")
        if not flips:
            continue
        shown = True
        variant_docs = rows[entry["eval"]]["docs"].get(entry["metric"], {})
        base_docs = baseline["docs"].get(entry["metric"], {})
        ordered = sorted(flips, key=lambda f: f["direction"] != "right_to_wrong")
        listed = ordered[:MAX_FLIPS_SHOWN]
        more = "" if len(listed) == len(ordered) else f" (the first {len(listed)}; report.json lists all)"
        parts.append(f"<details><summary>{escape(entry['eval'])} · {escape(entry['metric'])}: "
                     f"{entry['right_to_wrong']} right → wrong, {entry['wrong_to_right']} wrong → right{more}"
                     "</summary>")
        parts.append(f"<table><tr><th>doc</th><th>flip</th><th>prompt</th><th>target</th>"
                     f"<th>{escape(report['baseline'])}</th><th>{escape(entry['eval'])}</th></tr>")
        for flip in listed:
            doc = flip["doc_id"]
            base_doc, doc_view = base_docs.get(doc, {}), variant_docs.get(doc, {})
            arrow = "right → wrong" if flip["direction"] == "right_to_wrong" else "wrong → right"
            parts.append(
                f"<tr><td>{escape(doc)}</td><td>{arrow}</td><td><pre>{escape(base_doc.get('prompt', ''))}</pre></td>"
                f"<td><pre>{escape(base_doc.get('target', ''))}</pre></td>"
                f"<td><pre>{escape(base_doc.get('answer', ''))}</pre></td>"
                f"<td><pre>{escape(doc_view.get('answer', ''))}</pre></td></tr>")
        parts.append("</table></details>")
    if not shown:
        parts.append('<p class="note">No answers flipped.</p>')
    return parts
