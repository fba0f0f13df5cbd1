"""The README's demo pipeline end to end (short training), then a no-op, then an override."""

from __future__ import annotations

import json
import shutil

from engine_helpers import REPO, Project


def test_demo_pipeline_builds_then_noop_then_rebuilds_only_the_int4_branch(tmp_path):
    demo = Project(tmp_path / "demo")
    shutil.copytree(REPO / "examples", demo.root / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tunefile.toml", demo.root / "tunefile.toml")
    short = ("--set", "vars.train_steps=30")

    first = demo.build(*short, timeout=900)
    assert "12 built" in first.stdout, first.stdout
    report = json.loads((demo.root / "targets/report/report.json").read_text())
    assert [row["eval"] for row in report["rows"]] == ["eval@base", "eval@int8", "eval@int4"]
    # int8 and int4 paired with the baseline on the same held-out documents, each with a verdict
    assert [(row["eval"], row["metric"]) for row in report["paired"]] == [
        ("eval@int8", "toyfacts acc"), ("eval@int4", "toyfacts acc")]
    for row in report["paired"]:
        assert row["n"] == report["paired"][0]["n"] > 100
        assert row["verdict"] in ("no detectable change", "worse", "better")
        assert len(row["flips"]) == row["right_to_wrong"] + row["wrong_to_right"]
    assert report["figures"] == ["tradeoff_size", "tradeoff_speed", "deltas"]
    html = demo.read("targets/report/report.html")
    assert html.count('src="data:image/png;base64,') == 3 and "Flipped questions" in html
    text = demo.read("targets/report/report.md")
    for variant in ("eval@base", "eval@int8", "eval@int4"):
        assert variant in text
    quant = json.loads(demo.read("targets/int4/quantization.json"))
    assert quant["groupsize"] == 256

    assert "nothing to do: 12 targets up to date" in demo.build(*short).stdout

    override = demo.build(*short, "--set", "int4.groupsize=64", timeout=900).stdout
    assert "4 built" in override and "8 up to date" in override, override
    for name in ("int4", "eval@int4", "samples@int4", "report"):
        assert f"done  {name}" in override
    assert json.loads(demo.read("targets/int4/quantization.json"))["groupsize"] == 64
