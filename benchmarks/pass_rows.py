"""Rows per forward pass (``serving.runtime.MAX_ROWS_PER_PASS``): peak memory and time of the robustness report.

    python benchmarks/pass_rows.py [--model models/wildcheck-ivory.onnx] [--data ../shared/datasets/met-ivory]
        [--limit 192] [--rows 0,16,32,64] [--repeats 2]

The report scores 32 pictures at a time; with tiling a picture is several views (a collage's panels), so
one pass took up to 320 rows, and onnxruntime's arena keeps the memory of the biggest pass. Each variant
runs ``training.robustness.robustness`` in a fresh process (``--rows 0``: one pass per 32-picture batch,
as before the cap) and reports its own peak RSS (``ru_maxrss``) and wall time; variants alternate over
repeats. Prints medians and the ratios to the uncapped run, and checks every variant gives the same report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import serving.runtime as runtime
from training.robustness import robustness
rows = int(sys.argv[1])
runtime.MAX_ROWS_PER_PASS = rows or 10**9
t = time.perf_counter()
report = robustness(sys.argv[2], [sys.argv[3]], limit=int(sys.argv[4]), out_dir=None)
seconds = time.perf_counter() - t
metrics = {name: r.model_dump(mode="json") for name, r in report.conditions.items()}
print("RESULT " + json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "seconds": seconds, "conditions": metrics}))
"""


def run_variant(rows: int, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(rows), args.model, args.data, str(args.limit)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"rows={rows} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/wildcheck-ivory.onnx"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/met-ivory"))
    parser.add_argument("--limit", type=int, default=192)
    parser.add_argument("--rows", default="0,16,32,64", help="rows per pass to compare; 0 = uncapped")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    variants = [int(r) for r in args.rows.split(",")]
    results: dict[int, list[dict]] = {r: [] for r in variants}
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
        for rows in order:
            results[rows].append(run_variant(rows, args))
            print(f"repeat {repeat + 1}: rows {rows or 'uncapped'}: {results[rows][-1]['rss_mb']:.0f} MB, "
                  f"{results[rows][-1]['seconds']:.1f} s", flush=True)
    base = variants[0]
    reference = results[base][0]["conditions"]
    print(f"\n{args.limit} photos, {args.repeats} repeats, medians; ratios to rows {base or 'uncapped'}")
    print("| rows per pass | peak RSS (MB) | ratio | seconds | ratio | same report |")
    print("|---|---|---|---|---|---|")
    base_rss = statistics.median(r["rss_mb"] for r in results[base])
    base_s = statistics.median(r["seconds"] for r in results[base])
    for rows in variants:
        rss = statistics.median(r["rss_mb"] for r in results[rows])
        secs = statistics.median(r["seconds"] for r in results[rows])
        same = all(_close(r["conditions"], reference) for r in results[rows])
        print(f"| {rows or 'uncapped'} | {rss:.0f} | {rss / base_rss:.2f} | {secs:.1f} | {secs / base_s:.2f} | {same} |")


def _close(a, b, tol: float = 1e-6) -> bool:
    """Same metrics up to float noise (a pass's batch size may change the last bits of a score)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
