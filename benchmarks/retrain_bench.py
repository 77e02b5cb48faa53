"""Retraining benchmark on Met ivory: warm start on new labels vs. training from scratch on everything.

    python benchmarks/retrain_bench.py --out runs/retrain [--scratch runs/met_ivory]

The loop a platform runs when moderators label new images, with the real CLI:
1. `data ingest` half of met-ivory train (stratified, fixed seed) and met-ivory val into a fresh dataset;
2. `train` v1 from scratch on it (configs/met_ivory.yaml, negatives pool as in benchmarks/met_ivory.py);
3. `data ingest` the other half as "new labels" (duplicates of what is there are reported and skipped);
4. `train --init-from v1` (half the epochs, the CLI's warm-start default) = v2;
5. `compare v1 v2` on val (the champion/challenger gate);
6. evaluate v1, v2 and a from-scratch run on everything on met-ivory val, with wall times.

``--scratch RUN`` takes the from-scratch run from an earlier ``benchmarks/met_ivory.py`` run with the same
config (its wall time from its benchmark.json); without it the scratch run is trained here too.
The ingested dataset lives under --out (images are copied: the way ingest works), never in the repo.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def _labels_csv(samples: list[tuple[str, str]], path: Path, batch: str) -> Path:
    """A moderation-tool export: path,label plus provenance columns."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "source", "listing_id", "labeled_by", "labeled_at"])
        for i, (image, label) in enumerate(samples):
            writer.writerow([image, label, "met-open-access", f"{batch}-{i}", "benchmark", "2026-11-29T00:00:00Z"])
    return path


def _split_half(met: Path, seed: int) -> tuple[list, list]:
    first, second = [], []
    rng = random.Random(seed)
    for label_dir in sorted((met / "train").iterdir()):
        images = sorted(str(p) for p in label_dir.iterdir() if p.is_file())
        rng.shuffle(images)
        half = len(images) // 2
        first += [(p, label_dir.name) for p in images[:half]]
        second += [(p, label_dir.name) for p in images[half:]]
    return first, second


def _run(args: list[str], log: Path) -> float:
    """Run one CLI step, its output to a log file; returns its wall time."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "training.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"step failed ({proc.returncode}): wildcheck {' '.join(args)}\n{tail}")
    return time.time() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "retrain"))
    parser.add_argument("--config", default=str(REPO / "configs" / "met_ivory.yaml"))
    parser.add_argument("--scratch", default=None, help="an earlier benchmarks/met_ivory.py run dir to reuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding met-ivory and the negatives pools")
    args = parser.parse_args()
    # what the last step reads is checked before the first: the trainings take hours
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config} not found")
    if args.scratch:  # its best.pt is evaluated, its benchmark.json's wall time compared
        try:
            json.loads((Path(args.scratch) / "benchmark.json").read_text())["wall_seconds"]
            if not (Path(args.scratch) / "best.pt").is_file():
                raise FileNotFoundError(f"no {Path(args.scratch) / 'best.pt'}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--scratch {args.scratch}: needs the best.pt and benchmark.json (with wall_seconds) that "
                         f"benchmarks/met_ivory.py writes into its --out ({type(exc).__name__}: {exc})")
    met = args.shared / "met-ivory"
    if not met.is_dir():
        print(f"{met} not found: this benchmark needs ../shared/datasets (or --shared)", file=sys.stderr)
        return 2
    out = Path(args.out)
    root = out / "data"
    if root.exists():
        raise SystemExit(f"{root} exists: use a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    negatives = []
    for name in ("generic-products", "caltech101-negatives"):
        if (args.shared / name).is_dir():
            negatives += ["--negatives", str(args.shared / name)]

    first, second = _split_half(met, args.seed)
    val = [(str(p), d.name) for d in sorted((met / "val").iterdir()) for p in sorted(d.iterdir()) if p.is_file()]
    times = {}
    # val first: a train image that near-duplicates a val image is then the one skipped (no leakage)
    times["ingest val"] = _run(["data", "ingest", str(_labels_csv(val, out / "val.csv", "val")), "--into", str(root),
                                "--split", "val", "--report", str(out / "ingest_val.json")], out / "ingest_val.log")
    times["ingest first half"] = _run(["data", "ingest", str(_labels_csv(first, out / "first.csv", "a")), "--into",
                                       str(root), "--report", str(out / "ingest_first.json")], out / "ingest_first.log")
    times["train v1 (first half, scratch)"] = _run(
        ["train", "--data", str(root), *negatives, "--config", args.config, "--out", str(out / "v1")], out / "v1.log")
    times["ingest second half"] = _run(["data", "ingest", str(_labels_csv(second, out / "second.csv", "b")), "--into",
                                        str(root), "--report", str(out / "ingest_second.json")], out / "ingest_second.log")
    times["train v2 (warm start, all)"] = _run(
        ["train", "--data", str(root), *negatives, "--config", args.config, "--out", str(out / "v2"),
         "--init-from", str(out / "v1")], out / "v2.log")
    gate = subprocess.run([sys.executable, "-m", "training.cli", "compare", str(out / "v1"), str(out / "v2"),
                           "--data", str(root), "--split", "val"], capture_output=True, text=True, cwd=REPO)
    (out / "compare.log").write_text(gate.stdout + gate.stderr)

    scratch = Path(args.scratch) if args.scratch else out / "scratch"
    if args.scratch:
        times["train scratch (all)"] = json.loads((scratch / "benchmark.json").read_text())["wall_seconds"]
    else:
        times["train scratch (all)"] = _run(["train", "--data", str(met), *negatives, "--config", args.config,
                                             "--out", str(scratch)], out / "scratch.log")

    from training.evaluate import evaluate, format_evaluation

    rows = {}
    for name, run in (("v1 (first half)", out / "v1"), ("v2 (warm start)", out / "v2"), ("scratch (all)", scratch)):
        report = evaluate(run, [str(met)], split="val", out_dir=out / f"eval_{run.name}")
        print(format_evaluation(report))
        rows[name] = report.model_dump()
    reports = {k: json.loads((out / f"ingest_{k}.json").read_text()) for k in ("val", "first", "second")}

    print("\n| step | wall time |\n|---|---|")
    for step, seconds in times.items():
        print(f"| {step} | {seconds / 60:.1f} min |")
    print("\n| ingest | added | exact dup. | near dup. | unreadable |\n|---|---|---|---|---|")
    for k, r in reports.items():
        print(f"| {k} | {len(r['added'])} | {len(r['duplicates'])} | {len(r['near_duplicates'])} | {len(r['unreadable'])} |")
    print("\n| model | Met val balanced acc. | macro-F1 | ivory recall | ivory precision | confusion |\n|---|---|---|---|---|---|")
    for name, m in rows.items():
        iv = m["per_class"]["ivory"]
        print(f"| {name} | {m['balanced_accuracy']:.4f} | {m['macro_f1']:.4f} | {iv['recall']:.4f} | "
              f"{iv['precision']:.4f} | {m['confusion_matrix']} |")
    print(f"\ncompare v1 -> v2 gate: {'pass' if gate.returncode == 0 else 'FAIL'} (exit {gate.returncode}); "
          f"report {out / 'v2' / 'compare.md'}")
    warm, full = times["train v2 (warm start, all)"], times["train scratch (all)"]
    print(f"warm start / scratch wall time: {warm / full:.2f}x; "
          f"v1 + warm start / scratch: {(times['train v1 (first half, scratch)'] + warm) / full:.2f}x")
    (out / "retrain_bench.json").write_text(json.dumps(
        {"times_s": times, "met_val": {k: {m: v[m] for m in ("balanced_accuracy", "macro_f1", "confusion_matrix")}
                                       for k, v in rows.items()},
         "ingest": {k: {kind: len(r[kind]) for kind in ("added", "duplicates", "near_duplicates", "unreadable")}
                    for k, r in reports.items()},
         "gate": gate.returncode == 0}, indent=2))
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
