"""Collage rules replayed on the same views: how `whole_with_panels` and `collage_rate` trade collage-tile
ivory recall against collages of negatives flagged.

    python benchmarks/collage_rule.py models/wildcheck-ivory.onnx [--shared ../shared/datasets] [--rates 1 2 3]

Builds the robustness report's `collage` condition (same seed, same photos: Met val in full, a seeded 400
of the four pools' val splits), scores every view once (the whole composite and each panel the detector
finds), then decides each picture under each rule with `serving.tiling.ViewRule` at the model's thresholds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
POOLS = ["generic-products", "caltech101-negatives", "art-antiques", "listings-everyday"]


def main() -> int:
    from serving.decision import decide
    from serving.tiling import Tiling, ViewRule, combine, draft_size, view_boxes, views
    from training.conditions import condition_rng, default_conditions
    from training.predict import load_predictor
    from training.robustness import _Decoder, _others, gather, image_key, seeded_subset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 3.0])
    ap.add_argument("--limit", type=int, default=400, help="pool photos (seeded, as `wildcheck robustness --limit`)")
    args = ap.parse_args()
    predictor = load_predictor(args.model)
    spec = predictor.spec
    labels, negative = list(spec.labels), spec.negative_label
    condition = default_conditions()["collage"]
    sets = {"met": ([args.shared / "met-ivory"], None), "pools": ([args.shared / p for p in POOLS], args.limit)}
    pictures: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, (roots, limit) in sets.items():
        samples, _, _ = gather([str(r) for r in roots], [], "val", labels, negative)
        samples = [samples[i] for i in seeded_subset(len(samples), limit, 0)]
        pool = np.array([i for i, s in enumerate(samples) if s.label == negative], dtype=np.int64)
        decoder = _Decoder(draft_size(spec.preprocessing, spec.tiling))
        rows = pictures[name] = []
        for i, sample in enumerate(tqdm(samples, desc=f"collages ({name})", unit="img")):
            img = decoder(sample, i)
            if img is None:
                continue
            rng = condition_rng(0, "collage", image_key(sample))
            collage = condition.apply(img, rng, _others(condition, rng, i, pool, samples, decoder))
            boxes = view_boxes(collage, Tiling(mode="panels"))
            rows.append((sample.label, predictor.predict_proba(views(collage, spec.preprocessing, None, boxes))))
    rules = {"whole + panels": dict(whole_with_panels=True, collage_rate=None),
             "panels only": dict(whole_with_panels=False, collage_rate=None)}
    rules.update({f"panels only, collage_rate {r:g}": dict(whole_with_panels=False, collage_rate=r) for r in args.rates})
    protected = [label for label in labels if label != negative]
    print(f"\n{args.model}: thresholds {({k: v.model_dump() for k, v in spec.thresholds.items()})}")
    print("| collage rule | " + " | ".join(f"{c} flagged" for c in protected) + " | Met negatives flagged | pool photos flagged |")
    print("|---" * (len(protected) + 3) + "|")
    for name, fields in rules.items():
        tiling = Tiling(mode="panels", **fields)
        rule = ViewRule.of(spec.model_copy(update={"tiling": tiling}))
        cells = []
        for cls in protected + [None]:
            for key in (("met",) if cls is not None else ("met", "pools")):
                want = negative if cls is None else cls
                combined = [combine(p, rule) for label, p in pictures[key] if label == want]
                flagged = [decide(dict(zip(labels, map(float, probs))), spec.thresholds, spec.never_block)[0] != "allow"
                           for probs in combined]
                cells.append(f"{np.mean(flagged):.3f}" if cls is not None else f"{np.mean(flagged):.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
