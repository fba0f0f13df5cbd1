"""The report step on 3 variants x 1,000 documents: how long it takes, matplotlib import included.

    python bench/bench_report.py [--docs 1000] [--repeat 3]

Writes three eval outputs in the eval kind's layout (lm-eval's results.json and per-sample logs
of a 4-way multiple-choice task) and two generate speed files, then times `tunemake build -B
report` end to end and the step's own time as the build record keeps it (a fresh Python
process: imports, statistics, six figures, the HTML page). The issue's bar is 2 s for the step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
VARIANTS = {"base": (0.80, 0.0), "int8": (0.79, 0.02), "int4": (0.76, 0.08)}  # accuracy, flip rate


def write_eval(folder: Path, name: str, docs: int, truth: list[int], flip: float, rng: random.Random) -> None:
    (folder / "samples").mkdir(parents=True)
    lines, right = [], 0
    for doc in range(docs):
        correct = truth[doc] if rng.random() >= flip else 1 - truth[doc]
        right += correct
        target = doc % 4
        best = target if correct else (target + 1) % 4
        lls = [-rng.uniform(2, 8) for _ in range(4)]
        lls[best] = -rng.uniform(0.01, 1.5)
        question = f"question {doc}: which of these is right?"
        lines.append(json.dumps({
            "doc_id": doc, "doc": {"question": question}, "target": target,
            "arguments": [[question, f" choice {c}"] for c in range(4)],
            "resps": [[[ll, False]] for ll in lls], "filtered_resps": [[ll, False] for ll in lls],
            "filter": "none", "metrics": ["acc"], "doc_hash": hashlib.sha256(question.encode()).hexdigest(),
            "acc": float(correct),
        }))
    (folder / "samples" / "mc.jsonl").write_text("\n".join(lines) + "\n")
    acc = right / docs
    stderr = (acc * (1 - acc) / (docs - 1)) ** 0.5
    (folder / "results.json").write_text(json.dumps({
        "results": {"mc": {"alias": "mc", "acc,none": acc, "acc_stderr,none": stderr}},
        "higher_is_better": {"mc": {"acc": True}}}))
    scheme = None if name == "base" else f"{name}_weight_only"
    (folder / "checkpoint.json").write_text(json.dumps({
        "model": name, "weight_bytes": {"base": 270_000_000, "int8": 140_000_000, "int4": 80_000_000}[name],
        "quantization": {"scheme": scheme} if scheme else None}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        project = Path(tmp)
        truth = [int(rng.random() < 0.8) for _ in range(args.docs)]
        for name, (_, flip) in VARIANTS.items():
            write_eval(project / "ev" / name, name, args.docs, truth, flip, rng)
        for name, speed in (("base", 40.0), ("int4", 75.0)):
            (project / "gen" / name).mkdir(parents=True)
            (project / "gen" / name / "speed.json").write_text(json.dumps(
                {"model": name, "decode_tokens_per_s": speed, "time_to_first_token_s": 0.05}))
        (project / "tunefile.toml").write_text(
            '[target.report]\nkind = "report"\nevals = ["ev/base", "ev/int8", "ev/int4"]\n'
            'samples = ["gen/base", "gen/int4"]\n')
        walls, steps = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunemake", "build", "-B", "--plain", "report"], cwd=project,
                           check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
            shown = subprocess.run([sys.executable, "-m", "tunemake", "show", "report"], cwd=project, check=True,
                                   capture_output=True, text=True).stdout
            steps.append(float(shown.split(" in ", 1)[1].split("s", 1)[0]))
        files = sorted(p.name for p in (project / "targets" / "report").iterdir())
    result = {"docs": args.docs, "variants": len(VARIANTS), "step_s": steps, "build_wall_s": walls,
              "step_median_s": statistics.median(steps), "build_wall_median_s": statistics.median(walls),
              "files": files}
    OUT.mkdir(exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"report step, {len(VARIANTS)} variants x {args.docs} docs: median {result['step_median_s']:.2f} s "
          f"(runs {', '.join(f'{s:.2f}' for s in steps)}); whole `tunemake build -B report` "
          f"{result['build_wall_median_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
