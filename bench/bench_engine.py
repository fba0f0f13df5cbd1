"""Engine benchmarks: tunemake against DVC, and the engine's own scaling.

    python bench/bench_engine.py [--quick]

Every row is measured in this one run, side by side, and reported as a ratio:
absolute times on a shared 2-core machine are noise, ratios taken together are not.
Writes bench/out/engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = dict(os.environ, PYTHONPATH=str(REPO), GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b",
           GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")

GEN = """import random, sys
rng = random.Random(0)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(rng.randbytes(1 << 20))
"""
READ = """import sys
data = open(sys.argv[1], "rb").read()
open(sys.argv[2], "w").write(str(data.count(b"\\x00")))
"""
SCALE = """import sys
print(int(open(sys.argv[1]).read()) * int(sys.argv[2]), file=open(sys.argv[3], "w"))
"""


def sh(cmd: list[str] | str, cwd: Path, check: bool = True) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, shell=isinstance(cmd, str),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-2000:]}")
    return elapsed


def median_of(fn, n: int) -> float:
    return statistics.median(fn() for _ in range(n))


# -- 1. the same 3-stage pipeline in DVC and in tunemake ------------------------------
def pipeline_tunemake(root: Path, mb: int) -> None:
    for name, src in (("gen.py", GEN), ("read.py", READ), ("scale.py", SCALE)):
        (root / name).write_text(src)
    (root / "tunefile.toml").write_text(f"""
[vars]
scale = 3
[target.big]
kind = "command"
cmd = "python3 gen.py $TUNEMAKE_OUT/big.bin {mb}"
deps = ["gen.py"]
[target.count]
kind = "command"
cmd = "python3 read.py $TUNEMAKE_DEP_BIG/big.bin $TUNEMAKE_OUT/count.txt"
deps = ["big", "read.py"]
[target.scaled]
kind = "command"
cmd = "python3 scale.py $TUNEMAKE_DEP_COUNT/count.txt ${{vars.scale}} $TUNEMAKE_OUT/scaled.txt"
deps = ["count", "scale.py"]
""")


def pipeline_dvc(root: Path, mb: int) -> None:
    for name, src in (("gen.py", GEN), ("read.py", READ), ("scale.py", SCALE)):
        (root / name).write_text(src)
    (root / "params.yaml").write_text("scale: 3\n")
    (root / "dvc.yaml").write_text(f"""stages:
  big:
    cmd: python3 gen.py big.bin {mb}
    deps: [gen.py]
    outs: [big.bin]
  count:
    cmd: python3 read.py big.bin count.txt
    deps: [big.bin, read.py]
    outs: [count.txt]
  scaled:
    cmd: python3 scale.py count.txt ${{scale}} scaled.txt
    deps: [count.txt, scale.py]
    params: [scale]
    outs: [scaled.txt]
""")
    sh("git init -q && dvc init -q && git add -A && git commit -qm init", root)


def bench_vs_dvc(work: Path, mb: int, repeats: int) -> list[dict]:
    if shutil.which("dvc") is None:
        print("dvc not installed (pip install 'tunemake[bench]'): skipping the DVC comparison")
        return []
    tm_root, dvc_root = work / "tm", work / "dvc"
    tm_root.mkdir()
    dvc_root.mkdir()
    pipeline_tunemake(tm_root, mb)
    pipeline_dvc(dvc_root, mb)
    tm = [sys.executable, "-m", "tunemake", "build", "--plain"]
    rows = []

    def row(what: str, t_tm: float, t_dvc: float) -> None:
        rows.append({"case": what, "tunemake_s": round(t_tm, 4), "dvc_s": round(t_dvc, 4),
                     "speedup": round(t_dvc / t_tm, 2)})
        print(f"  {what:<38} tunemake {t_tm:8.3f}s   dvc {t_dvc:8.3f}s   {t_dvc / t_tm:6.1f}x")

    row("cold build", sh(tm, tm_root), sh("dvc repro -q", dvc_root))
    row("no-op build", median_of(lambda: sh(tm, tm_root), repeats),
        median_of(lambda: sh("dvc repro -q", dvc_root), repeats))
    row("status", median_of(lambda: sh([sys.executable, "-m", "tunemake", "status"], tm_root), repeats),
        median_of(lambda: sh("dvc status -q", dvc_root, check=False), repeats))
    row("param change (small stage reruns)", sh(tm + ["--set", "vars.scale=4"], tm_root),
        _dvc_with_param(dvc_root, 4))
    row("param reverted (cache hit)", sh(tm, tm_root), _dvc_with_param(dvc_root, 3))

    def delete_tm():
        shutil.rmtree(tm_root / "targets")

    def delete_dvc():
        for f in ("big.bin", "count.txt", "scaled.txt"):
            (dvc_root / f).unlink()
    delete_tm()
    delete_dvc()
    row("outputs deleted, restored", sh(tm, tm_root), sh("dvc repro -q", dvc_root))
    return rows


def _dvc_with_param(root: Path, value: int) -> float:
    (root / "params.yaml").write_text(f"scale: {value}\n")
    return sh("dvc repro -q", root)


# -- 2. engine scaling -----------------------------------------------------------------
def bench_noop_scaling(work: Path, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        root = work / f"scale{n}"
        root.mkdir()
        (root / "input.txt").write_text("x\n")
        lines = []
        for i in range(n):
            deps = '["input.txt"]' if i < 10 else f'["t{i - 10}", "t{i - 7}"]'
            lines.append(f'[target.t{i}]\nkind = "command"\ncmd = "echo {i} > $TUNEMAKE_OUT/o"\ndeps = {deps}\n')
        (root / "tunefile.toml").write_text("\n".join(lines))
        cold = sh([sys.executable, "-m", "tunemake", "build", "--plain", "-j", "2"], root)
        noop = median_of(lambda: sh([sys.executable, "-m", "tunemake", "build"], root), repeats)
        status = median_of(lambda: sh([sys.executable, "-m", "tunemake", "status"], root), repeats)
        interp = median_of(lambda: sh([sys.executable, "-c", "pass"], root), repeats)
        row = {"targets": n, "cold_build_s": round(cold, 3), "noop_s": round(noop, 4),
               "status_s": round(status, 4), "python_startup_s": round(interp, 4)}
        row.update(make_and_ninja(root, n, repeats))
        rows.append(row)
        print(f"  {n:>5} targets: no-op {noop:.3f}s, status {status:.3f}s "
              f"(python -c pass alone {interp:.3f}s; cold build {cold:.1f}s); "
              + ", ".join(f"{k} {v}" for k, v in row.items() if k.startswith(("make", "ninja"))))
    return rows


def make_and_ninja(root: Path, n: int, repeats: int) -> dict:
    """The same graph of one-line steps for make and ninja (mtime-based, no content hashing)."""
    deps = ["input.txt" if i < 10 else f"out/t{i - 10} out/t{i - 7}" for i in range(n)]
    make = ["all: " + " ".join(f"out/t{i}" for i in range(n))]
    make += [f"out/t{i}: {deps[i]}\n\t@mkdir -p out && echo {i} > $@" for i in range(n)]
    (root / "Makefile").write_text("\n".join(make) + "\n")
    ninja = ["rule echo\n  command = mkdir -p out && echo $n > $out"]
    ninja += [f"build out/t{i}: echo {deps[i]}\n  n = {i}" for i in range(n)]
    (root / "build.ninja").write_text("\n".join(ninja) + "\n")
    result = {}
    for tool, cmd in (("make", "make -s -j 2"), ("ninja", "ninja -j 2 > /dev/null")):
        if shutil.which(tool) is None:
            continue
        result[f"{tool}_cold_build_s"] = round(sh(cmd, root), 3)
        result[f"{tool}_noop_s"] = round(median_of(lambda cmd=cmd: sh(cmd, root), repeats), 4)
    return result


def bench_hashing(work: Path, mb: int, repeats: int) -> dict:
    from tunemake.hashing import hash_file

    path = work / "hash.bin"
    sh(f"head -c {mb}M /dev/urandom > {path}", work)
    sh(f"cat {path} > /dev/null", work)  # into the page cache
    t_tm = median_of(lambda: _timed(lambda: hash_file(path)), repeats)
    t_sha = median_of(lambda: sh(["sha256sum", str(path)], work), repeats)
    t_cat = median_of(lambda: sh(f"cat {path} > /dev/null", work), repeats)
    gbps = mb / 1024 / t_tm
    print(f"  hash {mb} MB: tunemake (blake3) {gbps:.2f} GB/s; sha256sum {t_sha / t_tm:.1f}x slower; "
          f"plain read (cat) {t_cat:.3f}s vs {t_tm:.3f}s")
    path.unlink()
    return {"mb": mb, "tunemake_s": round(t_tm, 4), "tunemake_gb_per_s": round(gbps, 2),
            "sha256sum_s": round(t_sha, 4), "cat_s": round(t_cat, 4)}


def bench_restore(work: Path, sizes_mb: list[int], repeats: int) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        root = work / f"restore{mb}"
        root.mkdir()
        (root / "tunefile.toml").write_text(
            f'[target.blob]\nkind = "command"\ncmd = "head -c {mb}M /dev/urandom > $TUNEMAKE_OUT/weights.bin"\n')
        sh([sys.executable, "-m", "tunemake", "build"], root)

        def restore_cli() -> float:
            shutil.rmtree(root / "targets")
            return sh([sys.executable, "-m", "tunemake", "build"], root)

        def restore_only() -> float:
            from tunemake import tunefile
            from tunemake.build import Engine

            project = tunefile.load(root / "tunefile.toml")
            engine = Engine(project)
            state = engine.store.get_state("blob")
            entry = engine.store.get_action(state["key"])
            shutil.rmtree(root / "targets")
            t = _timed(lambda: engine.restore("blob", state["key"], state["components"], entry))
            engine.close()
            return t

        def copy() -> float:
            dst = root / "copy.bin"
            t = sh(["cp", str(root / "targets/blob/weights.bin"), str(dst)], root)
            dst.unlink()
            return t

        t_cli = median_of(restore_cli, repeats)
        t_restore = median_of(restore_only, repeats)
        t_cp = median_of(copy, repeats)
        rows.append({"mb": mb, "restore_s": round(t_restore, 4), "build_cli_s": round(t_cli, 4),
                     "cp_s": round(t_cp, 4)})
        print(f"  restore {mb} MB: {t_restore * 1000:.1f} ms (whole `tunemake build` {t_cli:.3f}s); "
              f"cp {t_cp:.3f}s ({t_cp / t_restore:.0f}x slower)")
        shutil.rmtree(root)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller files, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    results = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0],
               "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        work = Path(tmp)
        print("1. the same 3-stage pipeline, tunemake vs DVC")
        results["vs_dvc"] = bench_vs_dvc(work, 20 if args.quick else 200, repeats)
        print("2. engine scaling")
        results["noop_scaling"] = bench_noop_scaling(work, [10, 100] if args.quick else [10, 100, 1000], repeats)
        results["hashing"] = bench_hashing(work, 256 if args.quick else 1024, repeats)
        results["restore"] = bench_restore(work, [100] if args.quick else [100, 1024], repeats)
    out = REPO / "bench/out/engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
