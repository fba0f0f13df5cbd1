"""Run every benchmark, one after another, and gather their JSON into bench/out/all.json.

    python bench/run_all.py [--quick]

Each benchmark measures tunemake side by side with what users would otherwise pick
(DVC, transformers, lm-eval's HF model, torchao's naive load-then-quantize) in the same run
and reports ratios. Benchmarks run one at a time: they would only slow each other down on a
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ["bench_engine.py", "bench_models.py", "bench_gemma3.py", "bench_quantize.py", "bench_eval.py",
           "bench_eval_scale.py", "bench_report.py"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that take it")
    parser.add_argument("only", nargs="*", help="a subset of " + ", ".join(SCRIPTS))
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
               "python": platform.python_version(), "runs": {}}
    failed = []
    for script in args.only or SCRIPTS:
        path = BENCH / script
        cmd = [sys.executable, str(path)]
        if args.quick and "--quick" in path.read_text():
            cmd.append("--quick")
        print(f"\n=== {script} ===", flush=True)
        started = time.perf_counter()
        code = subprocess.call(cmd, cwd=BENCH.parent)
        results["runs"][script] = {"exit_code": code, "seconds": round(time.perf_counter() - started, 1)}
        if code != 0:
            failed.append(script)
    for out in sorted((BENCH / "out").glob("*.json")):
        if out.name != "all.json":
            results[out.stem] = json.loads(out.read_text())
    (BENCH / "out" / "all.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote bench/out/all.json; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
