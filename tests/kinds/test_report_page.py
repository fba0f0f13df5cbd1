"""The report's figures, its flipped-questions list and report.html (checked in headless Chromium)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from engine_helpers import Project

from tunemake.kinds.report_plots import pareto_front

HOSTILE_PROMPT = 'q: <img src="http://127.0.0.1:9/leak.png"> </pre><script>fetch("http://127.0.0.1:9/")</script> a:'
CHOICES = [" west", " coast", " hills", " south"]


def write_mc_eval(folder, correct: dict[int, bool], weight_bytes: int, prompts: dict[int, str] | None = None) -> None:
    """An eval output in the eval kind's layout, with lm-eval's per-sample logs of a 4-way task."""
    (folder / "samples").mkdir(parents=True)
    lines = []
    for doc, right in correct.items():
        prompt = (prompts or {}).get(doc, f"q: question {doc}? a:")
        target = doc % 4
        lls = [-5.0 - c for c in range(4)]
        lls[target if right else (target + 1) % 4] = -0.1
        lines.append(json.dumps({
            "doc_id": doc, "doc": {"question": prompt}, "target": target,
            "arguments": [[prompt, c] for c in CHOICES], "resps": [[[ll, False]] for ll in lls],
            "filtered_resps": [[ll, False] for ll in lls], "filter": "none", "metrics": ["acc"],
            "doc_hash": hashlib.sha256(prompt.encode()).hexdigest(), "acc": float(right)}))
    (folder / "samples" / "mc.jsonl").write_text("\n".join(lines) + "\n")
    acc = sum(correct.values()) / len(correct)
    (folder / "results.json").write_text(json.dumps({
        "results": {"mc": {"acc,none": acc, "acc_stderr,none": 0.01}}, "higher_is_better": {"mc": {"acc": True}}}))
    (folder / "checkpoint.json").write_text(json.dumps({"model": folder.name, "weight_bytes": weight_bytes,
                                                        "quantization": None}))


@pytest.fixture
def built(tmp_path):
    """Three variants of 200 documents: int8 flips 3 answers each way, int4 loses 30; doc 0's
    prompt tries to load a remote image and run a script."""
    rng = np.random.default_rng(1)
    base = {d: bool(rng.random() < 0.8) for d in range(200)}
    base[0] = True
    right, wrong = [d for d, v in base.items() if v], [d for d, v in base.items() if not v]
    int8 = {**base, **{d: not base[d] for d in right[1:4] + wrong[:3]}}
    int4 = {**base, **{d: False for d in [0] + right[10:39]}}
    prompts = {0: HOSTILE_PROMPT}
    write_mc_eval(tmp_path / "ev/base", base, 8_000_000, prompts)
    write_mc_eval(tmp_path / "ev/int8", int8, 4_000_000, prompts)
    write_mc_eval(tmp_path / "ev/int4", int4, 2_000_000, prompts)
    for name, speed in (("base", 50.0), ("int4", 90.0)):
        (tmp_path / "gen" / name).mkdir(parents=True)
        (tmp_path / "gen" / name / "speed.json").write_text(json.dumps(
            {"model": name, "decode_tokens_per_s": speed, "time_to_first_token_s": 0.01}))
    project = Project(tmp_path)
    project.tunefile("""
        [target.report]
        kind = "report"
        title = "Toy <b>report</b>"
        evals = ["ev/base", "ev/int8", "ev/int4"]
        samples = ["gen/base", "gen/int4"]
        """)
    project.build("report")
    return project, tmp_path / "targets" / "report"


def test_pareto_front_by_hand():
    points = [("a", 8.0, 0.90), ("b", 4.0, 0.90), ("c", 2.0, 0.80), ("d", 4.0, 0.85), ("e", 1.0, 0.70)]
    # b has a's accuracy at half the size, so a is dominated; d is dominated by b
    assert pareto_front(points, lower_x_is_better=True, higher_y_is_better=True) == ["b", "c", "e"]
    # for a lower-is-better metric (perplexity) the smallest values win instead
    assert pareto_front(points, lower_x_is_better=True, higher_y_is_better=False) == ["e"]
    # against speed, higher x is better: the fastest with the best value
    assert pareto_front(points, lower_x_is_better=False, higher_y_is_better=True) == ["a"]
    assert pareto_front([("x", 1.0, 0.5), ("y", 1.0, 0.5)], True, True) == ["x", "y"]  # ties dominate nothing


def test_report_json_keeps_flips_intervals_and_fronts(built):
    _, out = built
    report = json.loads((out / "report.json").read_text())
    rows = {row["eval"]: row for row in report["paired"]}
    int8, int4 = rows["ev/int8"], rows["ev/int4"]
    assert (int8["right_to_wrong"], int8["wrong_to_right"]) == (3, 3) and int8["verdict"] == "no detectable change"
    assert (int4["right_to_wrong"], int4["wrong_to_right"]) == (30, 0) and int4["verdict"] == "worse"
    assert [f["direction"] for f in int4["flips"]] == ["right_to_wrong"] * 30
    assert int4["flips"][0]["doc_id"] == "0" and len(int8["flips"]) == 6
    metrics = {row["eval"]: row["metrics"]["mc acc"] for row in report["rows"]}
    for entry in metrics.values():  # each eval's own interval, from its documents
        low, high = entry["ci95"]
        assert entry["ci_from"] == "bootstrap" and low < entry["value"] < high
    front = report["pareto"]["mc acc"]
    assert front["weight_bytes"] == ["ev/int8", "ev/int4"]  # int8 keeps base's accuracy at half the size
    assert front["decode_tokens_per_s"] == ["ev/base", "ev/int4"]  # int8 was not timed
    assert report["figures"] == ["tradeoff_size", "tradeoff_speed", "deltas"]


def test_figures_are_png_and_svg_and_byte_stable(built):
    project, out = built
    names = [f"{name}.{kind}" for name in ("tradeoff_size", "tradeoff_speed", "deltas") for kind in ("png", "svg")]
    first = {name: (out / name).read_bytes() for name in names + ["report.html", "report.json", "report.md"]}
    for name in names:
        data = first[name]
        if name.endswith(".png"):
            import matplotlib.image

            pixels = matplotlib.image.imread(io.BytesIO(data))
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and pixels.shape[0] > 100 and pixels.shape[1] > 300
            assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.01  # something is drawn, not a blank page
        else:
            root = ET.fromstring(data)
            assert root.tag == "{http://www.w3.org/2000/svg}svg"
            assert b"<script" not in data and b"http://127" not in data
    project.build("-B", "report")
    assert {name: (out / name).read_bytes() for name in first} == first


def test_html_is_self_contained_and_lists_flipped_questions(built):
    _, out = built
    html = (out / "report.html").read_text()
    assert "<script" not in html and 'src="http' not in html  # the hostile prompt is text, escaped
    assert "&lt;script&gt;fetch(&quot;http://127.0.0.1:9/&quot;)&lt;/script&gt;" in html
    assert "default-src 'none'" in html  # and the page may fetch nothing even if something slipped through
    assert html.count('<img alt="') == 3 and html.count('src="data:image/png;base64,') == 3
    assert "Toy &lt;b&gt;report&lt;/b&gt;" in html
    assert "ev/int4 · mc acc: 30 right → wrong, 0 wrong → right" in html
    # doc 0, right -> wrong under int4: the target, the baseline's answer and int4's answer
    row = html[html.index("<tr><td>0</td><td>right → wrong</td>"):]
    row = row[:row.index("</tr>")]
    assert row.count("<pre> west</pre>") == 2 and "<pre> coast</pre>" in row


def test_html_renders_in_headless_chromium_with_nothing_fetched(built):
    import browser

    binary = browser.chromium()
    if binary is None:
        if os.environ.get("TUNEMAKE_REQUIRE_BROWSER"):
            pytest.fail("TUNEMAKE_REQUIRE_BROWSER is set but there is no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    _, out = built
    page = browser.open_page(out / "report.html", binary)
    assert page["failed"] == []
    assert {url.split(":", 1)[0] for url in page["requests"]} <= {"file", "data"}
    assert page["requests"][0] == (out / "report.html").resolve().as_uri()
    assert len(page["images"]) == 3
    for alt, complete, width, height in page["images"]:
        assert complete and width > 300 and height > 100, alt
    text = page["text"]
    assert "Toy <b>report</b>" in text and "worse" in text and "Flipped questions" in text
    assert 'fetch("http://127.0.0.1:9/")' in text  # shown as text, never run
    import matplotlib.image

    shot = matplotlib.image.imread(io.BytesIO(page["screenshot"]))
    assert shot.shape[0] > 1000 and (shot[..., :3] < 0.5).any(axis=-1).mean() > 0.005


def test_same_doc_ids_with_other_documents_are_refused(tmp_path):
    project = Project(tmp_path)
    write_mc_eval(tmp_path / "ev/a", {d: True for d in range(10)}, 2)
    write_mc_eval(tmp_path / "ev/b", {d: True for d in range(10)}, 1, {3: "q: an edited question? a:"})
    project.tunefile('[target.report]\nkind = "report"\nevals = ["ev/a", "ev/b"]\n')
    proc = project.build(check=False)
    assert proc.returncode == 1
    assert "scored different documents under the same ids for mc acc (1 differ, first doc_id 3)" in proc.stdout


def test_each_filter_shows_its_own_answers_and_nan_metrics_keep_the_json_strict(tmp_path):
    """gsm8k-style logs have one line per document and filter: a flipped strict-match row shows
    the strict-match answers. A NaN in results.json is left out, never written as bare NaN."""
    for name, strict in (("base", {d: True for d in range(10)}), ("v", {d: d >= 3 for d in range(10)})):
        folder = tmp_path / "ev" / name
        (folder / "samples").mkdir(parents=True)
        lines = []
        for doc in range(10):
            for filter_name, right in (("strict-match", strict[doc]), ("flexible-extract", True)):
                lines.append(json.dumps({"doc_id": doc, "arguments": [[f"Q{doc}?", {"until": ["\n"]}]],
                                         "target": "42", "filtered_resps": [f"{filter_name}-{name}-{doc}"],
                                         "filter": filter_name, "metrics": ["exact_match"],
                                         "doc_hash": str(doc), "exact_match": float(right)}))
        (folder / "samples" / "gsm.jsonl").write_text("\n".join(lines) + "\n")
        results = {"gsm": {"exact_match,strict-match": sum(strict.values()) / 10, "exact_match,flexible-extract": 1.0,
                           "bleu,none": float("nan")}}
        (folder / "results.json").write_text(json.dumps({"results": results}))  # json writes NaN bare
        (folder / "checkpoint.json").write_text(json.dumps({"model": name, "weight_bytes": 10}))
    project = Project(tmp_path)
    project.tunefile('[target.report]\nkind = "report"\ntitle = "Cost $5 vs $x^$ b"\nevals = ["ev/base", "ev/v"]\n')
    project.build()
    report = json.loads(project.read("targets/report/report.json"), parse_constant=lambda c: pytest.fail(c))
    assert [row["metric"] for row in report["paired"]] == ["gsm exact_match (strict-match)",
                                                           "gsm exact_match (flexible-extract)"]
    html = project.read("targets/report/report.html")
    row = html[html.index("<tr><td>0</td><td>right → wrong</td>"):]
    row = row[:row.index("</tr>")]
    assert "<pre>strict-match-base-0</pre>" in row and "<pre>strict-match-v-0</pre>" in row
    assert "gsm bleu" not in report["metrics"]


@pytest.mark.parametrize("line, message", [
    ('{"doc_id": 0, "metrics": ["acc"], "acc": 1', "mc.jsonl:1: not a JSON line"),
    ('[1, 2, 3]', "mc.jsonl:1: not an lm-eval sample"),
    ('{"doc_id": 0, "metrics": ["acc"], "acc": null}', "mc.jsonl:1: doc_id 0 has acc = None, not a finite number"),
    ('{"doc_id": 0, "metrics": "acc", "acc": 1}', "mc.jsonl:1: metrics must be a list of names"),
    ('{"doc_id": 0, "metrics": ["acc"], "acc": 1}\n{"doc_id": 0, "metrics": ["acc"], "acc": 0}',
     "mc.jsonl:2: doc_id 0 appears twice for filter none"),
])
def test_a_bad_sample_line_is_named_with_its_file_and_line(tmp_path, line, message):
    write_mc_eval(tmp_path / "ev/a", {0: True}, 1)
    write_mc_eval(tmp_path / "ev/b", {0: True}, 1)
    (tmp_path / "ev/b/samples/mc.jsonl").write_text(line + "\n")
    project = Project(tmp_path)
    project.tunefile('[target.report]\nkind = "report"\nevals = ["ev/a", "ev/b"]\n')
    proc = project.build(check=False)
    assert proc.returncode == 1 and message in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_other_num_fewshot_is_refused_and_direction_comes_from_any_eval(tmp_path):
    write_mc_eval(tmp_path / "ev/a", {d: True for d in range(5)}, 2)
    write_mc_eval(tmp_path / "ev/b", {d: True for d in range(5)}, 1)
    for name, shots in (("a", 0), ("b", 5)):
        results = json.loads((tmp_path / "ev" / name / "results.json").read_text())
        (tmp_path / "ev" / name / "results.json").write_text(json.dumps({**results, "n-shot": {"mc": shots}}))
    project = Project(tmp_path)
    project.tunefile('[target.report]\nkind = "report"\nevals = ["ev/a", "ev/b"]\n')
    proc = project.build(check=False)
    assert proc.returncode == 1 and "scored mc with different num_fewshot (5 and 0)" in proc.stdout, proc.stdout

    # a perplexity only the variants report: lower is better, as they say, not the default
    from tunemake.kinds.report import direction

    rows = [{"higher_is_better": {}}, {"higher_is_better": {"wiki word_perplexity": False}}]
    assert direction("wiki word_perplexity", rows) is False and direction("other", rows) is True
