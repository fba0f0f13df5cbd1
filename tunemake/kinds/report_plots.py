"""The report's figures, drawn with matplotlib (imported here only, inside the report step).

- tradeoff_size: each metric against the checkpoint's weight size, one point per eval, with its
  95% interval and the Pareto front (no other eval is both smaller and better) marked;
- tradeoff_speed: the same against decode tokens/s, for the evals a generate target timed;
- deltas: each variant's paired change against the baseline per metric, with its paired
  bootstrap interval, coloured by verdict.

Each is written as PNG and SVG, byte-stable for the same inputs and matplotlib version (no dates
in the metadata, a fixed salt for SVG ids).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

MAX_PANELS = 8  # metrics drawn in a trade-off figure; the tables keep every metric
MAX_DELTA_ROWS = 80
VERDICT_COLOURS = {"worse": "#c44e52", "better": "#55a868", "no detectable change": "#8c8c8c"}
POINT, FRONT = "#4c72b0", "#dd8452"


def pareto_front(points: list[tuple[str, float, float]], lower_x_is_better: bool, higher_y_is_better: bool) -> list[str]:
    """Labels of the points no other point dominates (at least as good on both axes, better on one)."""
    def better_or_equal(a, b, lower):
        return a <= b if lower else a >= b

    front = []
    for label, x, y in points:
        dominated = any(
            better_or_equal(ox, x, lower_x_is_better) and better_or_equal(oy, y, not higher_y_is_better)
            and (ox != x or oy != y)
            for other, ox, oy in points if other != label
        )
        if not dominated:
            front.append(label)
    return front


def text(value) -> str:
    """Label text without control characters (they would make the SVG invalid XML)."""
    return CONTROL.sub(" ", str(value))


CONTROL = re.compile("[\x00-\x1f\x7f]")


def notes(report: dict) -> list[str]:
    """What the figures leave out, said in report.md and report.html."""
    found = []
    if len(report["metrics"]) > MAX_PANELS:
        found.append(f"The trade-off figures show the first {MAX_PANELS} of {len(report['metrics'])} metrics; "
                     "the tables have all of them.")
    if len(report["paired"]) > MAX_DELTA_ROWS:
        found.append(f"The paired-change figure shows the {MAX_DELTA_ROWS} rows with the smallest p-values of "
                     f"{len(report['paired'])}; the table has all of them.")
    return found


def write_all(report: dict, out: Path) -> dict[str, dict[str, bytes]]:
    """Draw every figure that has data; returns {name: {"png": bytes, "svg": bytes}} (also written)."""
    import matplotlib

    # text.parse_math off: a "$" in a title or label is a dollar sign, not mathtext
    settings = {"svg.hashsalt": "tunemake", "svg.fonttype": "path", "font.size": 9, "axes.grid": True,
                "grid.alpha": 0.3, "figure.dpi": 100, "text.parse_math": False}
    figures = {}
    with matplotlib.rc_context(settings):
        for name, draw in (("tradeoff_size", _tradeoff_size), ("tradeoff_speed", _tradeoff_speed), ("deltas", _deltas)):
            figure = draw(report)
            if figure is None:
                continue
            figures[name] = {"png": _render(figure, "png")}
            figure.set_layout_engine("none")  # the layout found for the PNG serves the SVG: half the layout cost
            figures[name]["svg"] = _render(figure, "svg")
            for kind, data in figures[name].items():
                (out / f"{name}.{kind}").write_bytes(data)
    return figures


def _render(figure, kind: str) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Date": None} if kind == "svg" else {"Software": None}
    figure.savefig(buffer, format=kind, metadata=metadata)
    return buffer.getvalue()


def _grid(count: int):
    from matplotlib.figure import Figure

    columns = min(count, 2)
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes


def _tradeoff(report: dict, x_of, x_label: str, lower_x_is_better: bool, front_key: str):
    metrics = [m for m in report["metrics"] if any(x_of(r) is not None and m in r["metrics"] for r in report["rows"])]
    if not metrics:
        return None
    metrics = metrics[:MAX_PANELS]
    figure, axes = _grid(len(metrics))
    for ax, metric in zip(axes, metrics):
        rows = [r for r in report["rows"] if x_of(r) is not None and metric in r["metrics"]]
        front = set(report["pareto"][metric][front_key])
        for row in rows:
            entry = row["metrics"][metric]
            x, y = x_of(row), entry["value"]
            error = None
            if entry.get("ci95"):
                low, high = entry["ci95"]
                error = [[max(y - low, 0.0)], [max(high - y, 0.0)]]
            on_front = row["eval"] in front
            ax.errorbar([x], [y], yerr=error, fmt="o", capsize=3, color=FRONT if on_front else POINT,
                        markersize=7 if on_front else 5)
            ax.annotate(text(row["eval"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        line = sorted((x_of(r), r["metrics"][metric]["value"]) for r in rows if r["eval"] in front)
        if len(line) > 1:
            ax.step([p[0] for p in line], [p[1] for p in line], where="post", color=FRONT, linestyle="--",
                    linewidth=1, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        direction = "higher is better" if report["higher_is_better"].get(metric, True) else "lower is better"
        ax.set_title(text(metric), fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"value ({direction}), 95% interval")
        ax.margins(x=0.2, y=0.15)
    figure.suptitle(text(f"{report['title']}: {x_label}"), fontsize=11)
    return figure


def _tradeoff_size(report: dict):
    return _tradeoff(report, lambda row: row["weight_bytes"] / 1e6, "weight size (MB)", True, "weight_bytes")


def _tradeoff_speed(report: dict):
    return _tradeoff(report, lambda row: row["decode_tokens_per_s"], "decode tokens/s", False, "decode_tokens_per_s")


def _deltas(report: dict):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = report["paired"]
    if len(rows) > MAX_DELTA_ROWS:  # keep the rows most likely to matter, in the table's order
        kept = sorted(range(len(rows)), key=lambda i: (rows[i]["p_holm"], i))[:MAX_DELTA_ROWS]
        rows = [rows[i] for i in sorted(kept)]
    if not rows:
        return None
    figure = Figure(figsize=(7.5, 1.2 + 0.32 * len(rows)), layout="constrained")
    ax = figure.subplots()
    for i, row in enumerate(rows):
        low, high = row["ci95"]
        ax.errorbar([row["delta"]], [i], xerr=[[row["delta"] - low], [high - row["delta"]]], fmt="o", capsize=3,
                    color=VERDICT_COLOURS[row["verdict"]])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # long tick labels must not run into each other
    ax.set_yticks(range(len(rows)), [text(f"{row['eval']} · {row['metric']}") for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(text(f"change against {report['baseline']} (paired bootstrap 95% interval)"))
    handles = [ax.plot([], [], "o", color=colour, label=verdict)[0] for verdict, colour in VERDICT_COLOURS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title=f"verdict (Holm, alpha {report['alpha']})", title_fontsize=8)
    shown = "" if len(rows) == len(report["paired"]) else f" ({len(rows)} of {len(report['paired'])} rows)"
    ax.set_title(text(f"{report['title']}: paired change per metric{shown}"), fontsize=10)
    return figure
