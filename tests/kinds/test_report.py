"""The report kind on eval and generate outputs (written here in their documented layout)."""

import json
from pathlib import Path

import pydantic
import pytest

from tunemake.kinds import report
from tunemake.step import StepContext


def write_eval(folder: Path, model: str, acc: float, weight_bytes: int, scheme: str | None = None) -> Path:
    folder.mkdir(parents=True)
    results = {
        "results": {
            "toyfacts": {"alias": "toyfacts", "acc,none": acc, "acc_stderr,none": 0.01, "sample_len": 8},
        },
        "n-shot": {"toyfacts": 0},
    }
    (folder / "results.json").write_text(json.dumps(results))
    quantization = {"scheme": scheme, "groupsize": 64, "dtype": "bfloat16"} if scheme else None
    checkpoint = {"model": model, "weight_files": {}, "weight_bytes": weight_bytes, "quantization": quantization}
    (folder / "checkpoint.json").write_text(json.dumps(checkpoint))
    return folder


def write_speed(folder: Path, model: str, tokens_per_s: float) -> Path:
    folder.mkdir(parents=True)
    speed = {"model": model, "decode_tokens_per_s": tokens_per_s, "time_to_first_token_s": 0.02}
    (folder / "speed.json").write_text(json.dumps(speed))
    return folder


@pytest.fixture
def outputs(tmp_path):
    deps = {
        "eval_bf16": write_eval(tmp_path / "t/eval_bf16", "base", 0.75, 4_000_000),
        "eval_int8": write_eval(tmp_path / "t/eval_int8", "int8", 0.625, 2_000_000, "int8_weight_only"),
        "eval_int4": write_eval(tmp_path / "t/eval_int4", "int4", 0.5, 1_000_000, "int4_weight_only"),
        "gen_base": write_speed(tmp_path / "t/gen_base", "base", 100.0),
        "gen_int4": write_speed(tmp_path / "t/gen_int4", "int4", 180.0),
    }
    return tmp_path, deps


def run_report(project: Path, deps: dict, **params) -> Path:
    out = project / "out"
    out.mkdir()
    # the engine hands INPUTS over as absolute paths and lists each dependency target's folder
    resolved = {key: [str(deps[name]) for name in value] if key in report.INPUTS else value for key, value in params.items()}
    ctx = StepContext(target="report", out=out, project_dir=project, deps={k: Path(v) for k, v in deps.items()})
    report.run(report.Params(**resolved), ctx)
    return out


def test_deltas_sizes_and_speed_against_the_baseline(outputs):
    project, deps = outputs
    out = run_report(
        project,
        deps,
        evals=["eval_bf16", "eval_int8", "eval_int4"],
        baseline="eval_int8",
        samples=["gen_int4", "gen_base"],
    )
    data = json.loads((out / "report.json").read_text())
    assert data["baseline"] == "eval_int8"
    rows = {row["eval"]: row for row in data["rows"]}
    assert list(rows) == ["eval_bf16", "eval_int8", "eval_int4"]
    assert rows["eval_bf16"]["metrics"]["toyfacts acc"]["delta"] == pytest.approx(0.125)
    assert rows["eval_int8"]["metrics"]["toyfacts acc"]["delta"] == 0.0
    assert rows["eval_int4"]["metrics"]["toyfacts acc"]["delta"] == pytest.approx(-0.125)
    assert rows["eval_int4"]["quantization"] == "int4_weight_only"
    assert rows["eval_bf16"]["quantization"] is None
    assert rows["eval_int4"]["decode_tokens_per_s"] == 180.0 and rows["eval_int4"]["speed_from"] == "gen_int4"
    assert rows["eval_int8"]["decode_tokens_per_s"] is None  # no generate target ran int8

    md = (out / "report.md").read_text()
    assert "| eval_int4 | int4 | int4_weight_only | 1.0 | 0.50x | 180.0 | – | 20.0 |" in md
    assert "| eval_bf16 | 0.7500 | 0.0100 | +0.1250 |" in md
    assert report.summary(out) == md

    # no per-sample logs here: no paired rows, so no delta chart; the trade-offs have every eval's point
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.html", "report.json", "report.md"] + [f"tradeoff_{axis}.{kind}" for axis in ("size", "speed")
                                                        for kind in ("png", "svg")])
    assert data["figures"] == ["tradeoff_size", "tradeoff_speed"]
    assert data["pareto"]["toyfacts acc"] == {"weight_bytes": ["eval_bf16", "eval_int8", "eval_int4"],
                                              "decode_tokens_per_s": ["eval_bf16", "eval_int4"]}
    # without per-sample logs, the trade-off error bars come from lm-eval's stderr
    assert rows["eval_int4"]["metrics"]["toyfacts acc"]["ci95"] == pytest.approx([0.5 - 0.0196, 0.5 + 0.0196])
    assert rows["eval_int4"]["metrics"]["toyfacts acc"]["ci_from"] == "stderr"


def test_baseline_defaults_to_the_first_eval(outputs):
    project, deps = outputs
    out = run_report(project, deps, evals=["eval_int4", "eval_bf16"])
    data = json.loads((out / "report.json").read_text())
    assert data["baseline"] == "eval_int4"
    assert data["rows"][1]["metrics"]["toyfacts acc"]["delta"] == pytest.approx(0.25)


def test_same_inputs_give_identical_bytes(outputs):
    project, deps = outputs
    first = run_report(project, deps, evals=["eval_bf16", "eval_int4"], samples=["gen_base"])
    again = first.parent / "again"
    first.rename(again)
    second = run_report(project, deps, evals=["eval_bf16", "eval_int4"], samples=["gen_base"])
    names = sorted(p.name for p in second.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "tradeoff_size.svg" in names
    for name in names:
        assert (again / name).read_bytes() == (second / name).read_bytes(), name


def test_speed_for_a_model_no_eval_used_is_an_error(outputs, tmp_path):
    project, deps = outputs
    deps["gen_other"] = write_speed(tmp_path / "t/gen_other", "other", 1.0)
    with pytest.raises(ValueError, match=r"samples: gen_other ran model 'other', which none of the evals used"):
        run_report(project, deps, evals=["eval_bf16"], samples=["gen_other"])


def test_an_input_that_is_not_an_eval_output_is_an_error(outputs):
    project, deps = outputs
    with pytest.raises(ValueError, match=r"evals: gen_base is not an eval output"):
        run_report(project, deps, evals=["eval_bf16", "gen_base"])


def test_validate_checks_the_baseline_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match=r"baseline: 'eval_x' is not one of evals"):
        report.validate(report.Params(evals=["eval_a"], baseline="eval_x"), tmp_path)
    with pytest.raises(ValueError, match=r"evals: an eval is listed twice"):
        report.validate(report.Params(evals=["eval_a", "eval_a"]), tmp_path)
    with pytest.raises(pydantic.ValidationError, match="evals"):
        report.Params(evals=[])
    with pytest.raises(pydantic.ValidationError, match="extra"):
        report.Params(evals=["a"], baselin="a")


def test_cli_quantize_eval_generate_report(tmp_path):
    """The whole chain through `python -m tunemake build`: a report reads real eval and generate outputs;
    `show` prints each kind's summary; an edited task data file makes its eval stale."""
    from engine_helpers import Project
    from helpers import make_constant_model, write_toyfacts_task

    project = Project(tmp_path)
    make_constant_model(tmp_path / "model")
    write_toyfacts_task(tmp_path / "tasks")
    project.tunefile(
        """
        [target.int8]
        kind = "quantize"
        model = "model"
        scheme = "int8_weight_only"

        [target.eval_base]
        kind = "eval"
        model = "model"
        tasks = ["tasks/toyfacts.yaml"]

        [target.eval_int8]
        kind = "eval"
        model = "int8"
        tasks = ["tasks/toyfacts.yaml"]

        [target.gen_int8]
        kind = "generate"
        model = "int8"
        prompt = "the cat is"
        max_new_tokens = 4

        [target.report]
        kind = "report"
        evals = ["eval_base", "eval_int8"]
        samples = ["gen_int8"]
        """
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    project.build("report", env=offline, timeout=600)
    data = json.loads(project.read("targets/report/report.json"))
    base, int8 = data["rows"]
    assert (base["eval"], int8["eval"]) == ("eval_base", "eval_int8") and data["baseline"] == "eval_base"
    assert (base["model"], int8["model"]) == ("model", "int8")
    assert (base["quantization"], int8["quantization"]) == (None, "int8_weight_only")
    # the constant model's margin survives int8: the same answers, so no change
    assert base["metrics"]["toyfacts acc"]["value"] == int8["metrics"]["toyfacts acc"]["value"] == 0.625
    assert int8["metrics"]["toyfacts acc"]["delta"] == 0.0
    quantized_files = (tmp_path / "targets" / "int8").glob("model.*")
    assert int8["weight_bytes"] == sum(p.stat().st_size for p in quantized_files) < base["weight_bytes"]
    assert int8["speed_from"] == "gen_int8" and int8["decode_tokens_per_s"] > 0
    assert base["decode_tokens_per_s"] is None
    assert "# Evaluation report" in project.run("show", "report", check=True).stdout
    assert "| toyfacts | acc | none | 0 | 8 | 0.6250 |" in project.run("show", "eval_int8", check=True).stdout
    assert "1 prompts, 4 new tokens" in project.run("show", "gen_int8", check=True).stdout
    assert "5 targets up to date" in project.build("report", env=offline).stdout

    # the data file is not a param, yet editing it makes the evals stale
    data = tmp_path / "tasks" / "data" / "toyfacts.jsonl"
    data.write_text(data.read_text().replace('"answer": 1', '"answer": 0'))
    project.build("eval_base", env=offline)
    assert json.loads(project.read("targets/eval_base/results.json"))["results"]["toyfacts"]["acc,none"] == 1.0
