"""Paired statistics of a variant against the baseline on the same documents (the report kind).

An eval's per-sample log gives one value per document and metric (acc 0/1, or a score). Two
evals of the same documents are paired data: the question is whether the variant's answers
differ from the baseline's more than chance would make them, document by document.

- accuracy-type metrics (every value 0 or 1): the flips (right -> wrong, wrong -> right) and
  McNemar's exact test, a two-sided binomial test on the discordant pairs;
- any metric: the mean delta with a paired bootstrap 95% interval, and for non-binary metrics a
  paired sign-flip permutation p-value;
- a Holm correction over all rows of one report, and a verdict per row at `ALPHA`.

Everything random is seeded, so a report is byte-stable. Plain Python and numpy only.
"""

from __future__ import annotations

import math

ALPHA = 0.05
RESAMPLES = 2000
SEED = 20241201


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | the discordant pairs
    are equally likely to go either way). The binomial tail is summed in floating point from
    its largest term down (exact integers grow as 2**n: 20,000 flips took minutes)."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
    # terms i = k, k-1, ..., 0 shrink by i / (n - i + 1) each step; stop once they no longer count
    total, term = 0.0, 1.0
    for i in range(k, 0, -1):
        total += term
        term *= i / (n - i + 1)
        if term < 1e-17 * total:
            break
    else:
        total += term
    return min(1.0, 2 * math.exp(log_term) * total)


def bootstrap_interval(deltas, level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED):
    """Percentile interval of the mean of paired deltas over documents resampled with replacement.

    A resample's mean depends only on how often each distinct value is drawn, so the draws are
    multinomial counts over the distinct values: the same distribution as drawing documents,
    and for 0/1 metrics (deltas -1, 0, 1) three counts per resample instead of n indices."""
    import numpy as np

    values = np.asarray(deltas, dtype=np.float64)
    distinct, counts = np.unique(values, return_counts=True)
    rng = np.random.default_rng(seed)
    if len(distinct) * 4 <= len(values):
        draws = rng.multinomial(len(values), counts / len(values), size=resamples)
        means = draws @ distinct / len(values)
    else:
        means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def sign_flip_p(deltas, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided paired permutation p-value: each document's delta keeps or flips its sign at random
    (no difference means either sign is as likely); the share of means at least as far from 0."""
    import numpy as np

    values = np.asarray(deltas, dtype=np.float64)
    observed = abs(values.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, len(values)))
    extreme = np.count_nonzero(np.abs((signs * values).mean(axis=1)) >= observed - 1e-12)
    return float((extreme + 1) / (resamples + 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compare(baseline: dict, variant: dict, higher_is_better: bool = True) -> dict:
    """One row: a variant's per-document values against the baseline's ({doc_id: value}, the same
    documents; the caller has checked that)."""
    docs = sorted(baseline)
    base = [float(baseline[d]) for d in docs]
    other = [float(variant[d]) for d in docs]
    deltas = [o - b for o, b in zip(other, base)]
    binary = all(v in (0.0, 1.0) for v in base + other)
    row = {"n": len(docs), "baseline": sum(base) / len(base), "variant": sum(other) / len(other),
           "delta": sum(deltas) / len(deltas), "binary": binary}
    row["ci95"] = list(bootstrap_interval(deltas))
    if binary:
        right_to_wrong = sum(1 for b, o in zip(base, other) if b == 1.0 and o == 0.0)
        wrong_to_right = sum(1 for b, o in zip(base, other) if b == 0.0 and o == 1.0)
        row.update(right_to_wrong=right_to_wrong, wrong_to_right=wrong_to_right,
                   agreement=1 - (right_to_wrong + wrong_to_right) / len(docs),
                   p=mcnemar_exact(right_to_wrong, wrong_to_right), test="McNemar exact")
    else:
        row.update(right_to_wrong=None, wrong_to_right=None,
                   agreement=sum(1 for d in deltas if d == 0) / len(docs),
                   p=sign_flip_p(deltas), test="paired sign-flip")
    row["higher_is_better"] = higher_is_better
    return row


def verdicts(rows: list[dict], alpha: float = ALPHA) -> None:
    """Holm-adjust the p-values of one report's rows and give each its verdict (in place)."""
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
        if adjusted >= alpha or row["delta"] == 0:
            row["verdict"] = "no detectable change"
        else:
            better = (row["delta"] > 0) == row["higher_is_better"]
            row["verdict"] = "better" if better else "worse"
