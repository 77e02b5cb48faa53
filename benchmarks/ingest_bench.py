"""Near-duplicate search of `wildcheck data ingest`: the old per-row Python scan against the vectorised index.

    python benchmarks/ingest_bench.py [--rows 500] [--dataset 5000] [--repeat 3]

Before (commit c2b2256), ingest compared each new image's pHash with every hash of the dataset in a Python
generator (``bin(a ^ b).count("1")`` per pair): O(rows x dataset) interpreter steps. Now
training/data/neardup.HashIndex is built once per dataset and answers each row with one numpy popcount over the
packed uint64 array. Both are run on the same random 64-bit hashes (almost none within 4 bits of another, the
common case: a full scan per row), new rows added to the dataset as ingest does; prints the times and the ratio,
after checking that both find the same matches. Then an end-to-end ``ingest()`` of ROWS small synthetic photos
into a dataset whose manifest holds DATASET rows, for scale (decoding and copying dominate it).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from training.data.neardup import NEAR_DISTANCE, HashIndex


def old_scan(dataset: list[str], rows: list[str]) -> list[int | None]:
    """The loop ingest ran before: first dataset hash within NEAR_DISTANCE, in pure Python."""
    known = [(h, i) for i, h in enumerate(dataset)]
    found = []
    for ph in rows:
        value = int(ph, 16)
        hit = next((i for h, i in known if bin(int(h, 16) ^ value).count("1") <= NEAR_DISTANCE), None)
        found.append(hit)
        if hit is None:
            known.append((ph, len(known)))
    return found


def new_scan(dataset: list[str], rows: list[str]) -> list[int | None]:
    index = HashIndex(dataset)
    found = []
    for ph in rows:
        hit = index.first_within(ph)
        found.append(hit[0] if hit else None)
        if hit is None:
            index.add(ph)
    return found


def best_of(fn, repeat: int, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def end_to_end(rows: int, dataset: int) -> float:
    from training.data.ingest import MANIFEST_FIELDS, ingest
    from training.data.synth import make_image

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, src = tmp / "data", tmp / "in"
        root.mkdir()
        src.mkdir()
        with (root / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            for i in range(dataset):
                writer.writerow({"path": f"train/other/{i}.jpg", "label": "other", "split": "train",
                                 "sha256": f"{i:064x}", "phash": f"{int(rng.integers(0, 2**64, dtype=np.uint64)):016x}"})
        with (tmp / "labels.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label"])
            writer.writeheader()
            for i in range(rows):
                make_image("other", 1000 + i, 64).save(src / f"{i}.jpg", quality=85)
                writer.writerow({"path": str(src / f"{i}.jpg"), "label": "other"})
        start = time.perf_counter()
        report = ingest(tmp / "labels.csv", root)
        elapsed = time.perf_counter() - start
    print(f"end to end: ingest() of {rows} photos into a {dataset}-row manifest: {elapsed:.2f} s "
          f"({len(report['added'])} added, {len(report['near_duplicates'])} near-duplicates)")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--dataset", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dataset = [f"{int(h):016x}" for h in rng.integers(0, 2**64, args.dataset, dtype=np.uint64, endpoint=False)]
    rows = [f"{int(h):016x}" for h in rng.integers(0, 2**64, args.rows, dtype=np.uint64, endpoint=False)]
    rows[::50] = dataset[: len(rows[::50])]  # a few copies of dataset images, so both must find matches
    old_s, old_found = best_of(old_scan, args.repeat, dataset, rows)
    new_s, new_found = best_of(new_scan, args.repeat, dataset, rows)
    assert old_found == new_found, "the two searches disagree"
    print(f"near-duplicate search, {args.rows} rows into {args.dataset} hashes (best of {args.repeat}): "
          f"before {old_s * 1000:.0f} ms, now {new_s * 1000:.1f} ms, {old_s / new_s:.0f}x faster "
          f"({sum(f is not None for f in new_found)} matches)")
    end_to_end(args.rows, args.dataset)


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
