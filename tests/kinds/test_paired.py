"""Paired statistics of the report kind, against independent computations (scipy as reference)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from engine_helpers import Project
from tunemake.kinds import paired


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (3, 7), (10, 10), (2, 15), (40, 61), (0, 12), (2500, 2600), (20000, 21000)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert math.isclose(paired.mcnemar_exact(b, c), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_holm_by_hand():
    assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert paired.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert paired.holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # 3 x 0.7 is capped at 1
    assert paired.holm([0.02, 0.03]) == pytest.approx([0.04, 0.04])  # monotone


def test_bootstrap_interval_covers_the_true_change_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        base = rng.random(300) < 0.7
        flip = rng.random(300) < 0.1
        variant = np.where(flip, ~base, base)
        true_delta = 0.1 * (1 - 2 * 0.7)  # E[variant - base] for these flip rates
        low, high = paired.bootstrap_interval((variant.astype(float) - base.astype(float)).tolist(),
                                              seed=trial)
        covered += low <= true_delta <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_sign_flip_p_matches_the_exact_permutation_distribution():
    deltas = [0.3, -0.1, 0.5, 0.2, 0.0, 0.4, -0.2, 0.1, 0.6, 0.25]
    observed = abs(sum(deltas) / len(deltas))
    exact = sum(abs(sum(s * d for s, d in zip(signs, deltas)) / len(deltas)) >= observed - 1e-12
                for signs in itertools.product((-1, 1), repeat=len(deltas))) / 2 ** len(deltas)
    assert paired.sign_flip_p(deltas, resamples=20000) == pytest.approx(exact, abs=0.01)


def test_compare_counts_flips_and_agreement():
    base = {str(i): v for i, v in enumerate([1, 1, 1, 0, 0, 1, 0, 1])}
    variant = {str(i): v for i, v in enumerate([1, 0, 1, 0, 1, 0, 0, 1])}
    row = paired.compare(base, variant)
    assert (row["n"], row["right_to_wrong"], row["wrong_to_right"]) == (8, 2, 1)
    assert row["agreement"] == pytest.approx(5 / 8) and row["delta"] == pytest.approx(-1 / 8)
    assert row["p"] == pytest.approx(stats.binomtest(1, 3, 0.5).pvalue)


# -- the report kind end to end ------------------------------------------------------------------
def _eval_output(folder, answers, acc_stderr=0.01):
    folder.mkdir(parents=True, exist_ok=True)
    acc = sum(answers.values()) / len(answers)
    (folder / "results.json").write_text(json.dumps({"results": {"t": {"acc,none": acc, "acc_stderr,none": acc_stderr}},
                                                     "higher_is_better": {"t": {"acc": True}}}))
    (folder / "checkpoint.json").write_text(json.dumps({"model": folder.name, "weight_bytes": 1}))
    (folder / "samples").mkdir(exist_ok=True)
    lines = [json.dumps({"doc_id": d, "filter": "none", "metrics": ["acc"], "acc": v}) for d, v in answers.items()]
    (folder / "samples" / "t.jsonl").write_text("\n".join(lines) + "\n")


def test_report_says_whether_a_variant_is_really_worse(tmp_path):
    p = Project(tmp_path)
    rng = np.random.default_rng(0)
    base = {i: int(rng.random() < 0.8) for i in range(400)}
    ones, zeros = [i for i, v in base.items() if v][:6], [i for i, v in base.items() if not v][:6]
    same = {i: 1 - v if i in ones + zeros else v for i, v in base.items()}  # 6 flips each way
    worse = {i: v if rng.random() > 0.25 else 0 for i, v in base.items()}  # right -> wrong only
    _eval_output(tmp_path / "ev/base", base)
    _eval_output(tmp_path / "ev/same", same)
    _eval_output(tmp_path / "ev/worse", worse)
    p.tunefile("""
        [target.report]
        kind = "report"
        evals = ["ev/base", "ev/same", "ev/worse"]
        """)
    p.build()
    report = json.loads(p.read("targets/report/report.json"))
    rows = {row["eval"]: row for row in report["paired"]}
    assert rows["ev/same"]["verdict"] == "no detectable change"
    assert (rows["ev/same"]["right_to_wrong"], rows["ev/same"]["wrong_to_right"]) == (6, 6)
    assert rows["ev/worse"]["verdict"] == "worse" and rows["ev/worse"]["wrong_to_right"] == 0
    assert rows["ev/worse"]["ci95"][1] < 0 and rows["ev/worse"]["n"] == 400
    assert "| ev/worse | t acc | 400 |" in p.read("targets/report/report.md")
    assert "| ev/worse | t acc | 400 |" in p.run("show", "report", check=True).stdout
    first = p.read("targets/report/report.json")
    p.build("-B", "report")
    assert p.read("targets/report/report.json") == first  # seeded: byte-stable


def test_report_refuses_evals_of_different_documents(tmp_path):
    p = Project(tmp_path)
    _eval_output(tmp_path / "ev/a", {i: 1 for i in range(20)})
    _eval_output(tmp_path / "ev/b", {i: 1 for i in range(40)})
    p.tunefile("""
        [target.report]
        kind = "report"
        evals = ["ev/a", "ev/b"]
        """)
    proc = p.build(check=False)
    assert proc.returncode == 1
    assert "scored different documents for t acc (40 and 20, 20 in common)" in proc.stdout, proc.stdout


def test_divergence_of_multiple_choice_answers(tmp_path):
    p = Project(tmp_path)
    base_lls = {0: [-1.0, -2.0, -3.0], 1: [-0.5, -0.6, -4.0]}
    variant_lls = {0: [-1.0, -2.0, -3.0], 1: [-0.7, -0.4, -4.0]}  # doc 1's top choice moves
    for name, lls in (("base", base_lls), ("var", variant_lls)):
        folder = tmp_path / "ev" / name
        _eval_output(folder, {d: int(v[0] == max(v)) for d, v in lls.items()})
        lines = [json.dumps({"doc_id": d, "filter": "none", "metrics": ["acc"], "acc": int(v[0] == max(v)),
                             "filtered_resps": [[ll, False] for ll in v]}) for d, v in lls.items()]
        (folder / "samples" / "t.jsonl").write_text("\n".join(lines) + "\n")
    p.tunefile('[target.report]\nkind = "report"\nevals = ["ev/base", "ev/var"]\n')
    p.build()
    [row] = json.loads(p.read("targets/report/report.json"))["divergence"]
    softmax = lambda v: np.exp(v) / np.exp(v).sum()  # noqa: E731
    expected = np.mean([stats.entropy(softmax(np.array(base_lls[d])), softmax(np.array(variant_lls[d])))
                        for d in (0, 1)])
    assert row["mean_kl"] == pytest.approx(expected, rel=1e-9)
    assert row["top_choice_agreement"] == 0.5 and row["n"] == 2
