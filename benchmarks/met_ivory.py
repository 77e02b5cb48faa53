"""Met ivory benchmark: train a config on real photos, report Met val metrics, false positives and robustness.

    python benchmarks/met_ivory.py [--out runs/met] [--config configs/met_ivory.yaml] [--seed N]
        [--set SECTION.KEY=VALUE ...] [--init-from RUN] [--pool NAME[:SOURCES] ...]
        [--eval-pool NAME[:SOURCES] ...] [--robustness] [--no-negatives]

Trains on met-ivory train plus the negatives pools (default: those whose licences allow shipping the
model -- generic-products, caltech101-negatives, art-antiques:artbreaker,byzart2k and
listings-everyday:grocerystore), picks the best epoch on val, then evaluates on Met val alone (the number
the target is stated in) and on every pool's val split (false positives). ``NAME:SRC1,SRC2`` keeps only
those source folders of a pool (written as a CSV manifest into the run dir). ``--robustness`` adds the
listing-conditions report (``wildcheck robustness``) on Met val + all pools' val, with the model's tiling
and, for comparison, without it (re-calibrated). Ends with the flag and block rate of every pool's source
folders at the model's thresholds (PNGs of each source's most confident negatives in
OUT/eval_<pool>/false_positives_by_source/). ``--no-train`` evaluates the run in --out (or --model FILE.onnx).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from serving.errors import InvalidInput, MissingInput

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
# pools whose licences allow training a model that is redistributed (PROVENANCE.txt of each pool)
SHIPPABLE_POOLS = ["generic-products", "caltech101-negatives", "art-antiques:artbreaker,byzart2k",
                   "listings-everyday:grocerystore"]
ALL_POOLS = ["generic-products", "caltech101-negatives", "art-antiques", "listings-everyday"]


def source_table(rows: dict) -> str:
    """Markdown: flag and block rate per pool/source of negatives (evaluate's per_source)."""
    lines = ["| negatives source | images | flagged (review+block) | blocked | top score |", "|---|---|---|---|---|"]
    for name, metrics in rows.items():
        for origin, r in (metrics.get("per_source") or {}).items() if name != "met_val" else ():
            top = r["top"][0] if r["top"] else None
            lines.append(f"| {origin} | {r['n']} | {r['flag_rate']:.2%} | {r['block_rate']:.2%} | "
                         + (f"{top['score']:.3f} {top['label']} |" if top else "- |"))
    return "\n".join(lines)


def pool_root(spec: str, shared: Path, run_dir: Path) -> str:
    """``NAME`` -> its folder; ``NAME:SRC1,SRC2`` -> a manifest of only those sources (split/label/source/...)."""
    name, _, sources = spec.partition(":")
    root = shared / name
    if not root.is_dir():
        raise MissingInput(f"pool {root} not found: name a folder under {shared} (--pool NAME[:SOURCES])")
    if not sources:
        return str(root)
    from training.data.sources import discover
    from training.fileio import atomic_write_text

    keep = set(sources.split(","))
    rows = [s for s in discover(root) if s.path.relative_to(root).parts[2] in keep]
    if not rows:
        raise InvalidInput(f"no images of sources {sorted(keep)} in {root}: its sources are the folders under "
                           "SPLIT/LABEL/")
    manifest = run_dir / f"pool_{name}_{'+'.join(sorted(keep))}.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, "path,label,split,source\n"
                      + "".join(f"{s.path.resolve()},{s.label},{s.split},{s.source}\n" for s in rows))
    return str(manifest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "met_ivory"))
    parser.add_argument("--config", default=str(REPO / "configs" / "met_ivory.yaml"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config setting as `wildcheck train --set` does, e.g. train.lr=0.0002")
    parser.add_argument("--shared", default=str(SHARED), help="folder holding met-ivory and the pools")
    parser.add_argument("--met", default=None, help="the met-ivory folder (default: SHARED/met-ivory)")
    parser.add_argument("--pool", action="append", default=None, help="training negatives pool (repeat)")
    parser.add_argument("--eval-pool", action="append", default=None, help="pools whose val split is evaluated")
    parser.add_argument("--no-negatives", action="store_true", help="train on met-ivory alone")
    parser.add_argument("--robustness", action="store_true", help="also the listing-conditions report")
    parser.add_argument("--robustness-limit", type=int, default=None,
                        help="a seeded random subset of this many val images for the report (CPU budgets)")
    parser.add_argument("--no-train", action="store_true", help="evaluate the run in --out (or --model) without training")
    parser.add_argument("--model", default=None, help="with --no-train: an ONNX file or run dir to evaluate")
    parser.add_argument("--init-from", default=None,
                        help="warm start from this run's best.pt (`wildcheck train --init-from`)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last.pt with its saved config (--epochs extends it)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="pause after N epochs of this call (continue with --resume): a long CPU run in slots")
    parser.add_argument("--epoch-time-baseline", action="store_true",
                        help="afterwards, time one epoch on met-ivory alone (the negatives pool's cost per epoch)")
    args = parser.parse_args()
    shared = Path(args.shared)
    met = Path(args.met) if args.met else shared / "met-ivory"
    out = Path(args.out)
    if not met.is_dir():
        print(f"{met} not found: this benchmark needs ../shared/datasets", file=sys.stderr)
        return 2

    from training.config import resolve_config
    from training.evaluate import evaluate as run_evaluation, format_evaluation
    from training.fileio import atomic_write_text
    from training.train import after_training, train

    def evaluate(*args, **kwargs) -> dict:  # printed as `wildcheck evaluate` prints it; the tables read the dict
        report = run_evaluation(*args, **kwargs)
        print(format_evaluation(report))
        return report.model_dump()

    sets = args.set + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    pools = [] if args.no_negatives else (args.pool or SHIPPABLE_POOLS)
    if args.resume:  # the saved config is the run (its pools included); only --epochs may extend it
        config = resolve_config(None, run_dir=out, resume=True, epochs=args.epochs, sets=sets).config
    else:
        config = resolve_config(args.config, epochs=args.epochs, sets=sets).config  # the config's epochs, warm or not
        config.data.negatives = [pool_root(p, shared, out) for p in pools]
    eval_pools = [p for p in (args.eval_pool or ALL_POOLS) if (shared / p.partition(":")[0]).is_dir()]
    if args.no_train:
        model = args.model or out
        rows = {"met_val": evaluate(model, [str(met)], split="val", out_dir=out / "eval_met_val")}
        for spec in eval_pools:
            name = spec.replace(":", "_").replace(",", "+")
            rows[name] = evaluate(model, [pool_root(spec, shared, out)], split="val", out_dir=out / f"eval_{name}")
        d = rows["met_val"]["decisions"]["per_class"]["ivory"]
        print(f"\nMet val ivory recall at the model's thresholds: review {d['flag_recall']:.4f}, block {d['block_recall']:.4f}")
        print("\n" + source_table(rows))
        return 0
    t0 = time.time()  # a resumed run's wall time is this call's; history.csv has every epoch's
    summary = train([str(met)], out, config, init_from=args.init_from, resume=args.resume, stop_after=args.stop_after)
    if summary.get("paused"):
        print(f"paused after epoch {summary['epochs_run']} of {config.train.epochs}: continue with --resume --out {out}")
        return 0
    report = after_training(out, config)  # what `wildcheck train` does after training: grey head, calibration
    if report is not None:
        from training.calibrate import format_report

        print(format_report(report))
    wall = time.time() - t0
    print("\n== Met val (met-ivory/val only) ==")
    met_val = evaluate(out, [str(met)], split="val", out_dir=out / "eval_met_val")
    rows = {"met_val": met_val}
    for spec in eval_pools:
        name = spec.replace(":", "_").replace(",", "+")
        print(f"\n== {name} val (all 'other') ==")
        rows[name] = evaluate(out, [pool_root(spec, shared, out)], split="val", out_dir=out / f"eval_{name}")
    robust = {}
    robust_args = (out, met, [pool_root(p, shared, out) for p in eval_pools], args.robustness_limit) \
        if args.robustness else None
    import csv

    with open(out / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    speed = sum(float(r["train_images_per_s"]) for r in history) / len(history)
    epoch_seconds = sum(float(r["epoch_seconds"]) for r in history) / len(history)
    alone_seconds = None
    if not args.no_negatives and args.epoch_time_baseline:
        # one epoch on met-ivory alone, same config: what the negatives pool costs per epoch
        alone = config.model_copy(deep=True)
        alone.data.negatives, alone.train.epochs, alone.decision.calibrate = [], 1, False
        train([str(met)], out / "met_only_epoch", alone)
        with open(out / "met_only_epoch" / "history.csv") as fh:
            alone_seconds = float(next(csv.DictReader(fh))["epoch_seconds"])
    print("\n| metric | value |\n|---|---|")
    print(f"| Met val balanced accuracy | {met_val['balanced_accuracy']:.4f} |")
    print(f"| Met val accuracy | {met_val['accuracy']:.4f} |")
    print(f"| Met val macro-F1 | {met_val['macro_f1']:.4f} |")
    print(f"| Met val ivory PR-AUC | {met_val['per_class']['ivory']['pr_auc']:.4f} |")
    d = met_val["decisions"]["per_class"]["ivory"]  # at the model's thresholds (targets, then budgets)
    print(f"| Met val ivory recall at review / block (the model's thresholds) | {d['flag_recall']:.4f} / {d['block_recall']:.4f} |")
    for name in rows:
        if name != "met_val" and "false_positives" in rows[name]:
            fp = rows[name]["false_positives"]["per_class"]["ivory"]
            print(f"| {name} val ({rows[name]['n']}): ivory false-positive rate at 0.5 | {fp['at_0.5']:.4f} |")
            print(f"| {name} val: ivory FPR at the review threshold ({fp['review']:.3f}) | {fp['at_review']:.4f} |")
            if fp["block"] is not None:
                print(f"| {name} val: ivory FPR at the block threshold ({fp['block']:.3f}) | {fp['at_block']:.4f} |")
    print(f"| best epoch / epochs run | {summary['best_epoch']} / {len(history)} |")
    print(f"| training wall time (incl. caching, validation) | {wall / 60:.1f} min |")
    print(f"| training images/s (mean over epochs) | {speed:.1f} |")
    print(f"| epoch wall time (mean) | {epoch_seconds:.0f} s |")
    if alone_seconds:
        print(f"| epoch wall time on met-ivory alone | {alone_seconds:.0f} s (ratio {epoch_seconds / alone_seconds:.2f}x) |")
    print("\n" + source_table(rows))
    def write(robust: dict) -> None:
        atomic_write_text(out / "benchmark.json", json.dumps(
            {"met_val": {k: met_val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix")},
             "wall_seconds": wall, "train_images_per_s": speed, "epoch_seconds": epoch_seconds,
             "met_only_epoch_seconds": alone_seconds, "seed": config.train.seed,
             "negatives": list(config.data.negatives),  # from the run's config: a resumed run's too
             "false_positives": {k: v["false_positives"]["per_class"] for k, v in rows.items()
                                 if k != "met_val" and "false_positives" in v},
             "robustness": robust}, indent=2))

    write({})  # the numbers so far, in case the robustness report is cut short
    if robust_args:
        write(run_robustness(*robust_args))
    return 0


def run_robustness(run: Path, met: Path, pools: list[str], limit: int | None = None) -> dict:
    """The listing-conditions report with the run's tiling and, re-calibrated, without it."""
    import shutil

    from training.calibrate import calibrate
    from training.checkpoint import Checkpoint
    from training.robustness import robustness

    def summary(report) -> dict:
        return {name: {"ivory_flag": c.per_class["ivory"].flag_recall, "ivory_block": c.per_class["ivory"].block_recall,
                       "negatives_flagged": c.negatives.flagged, "negatives_blocked": c.negatives.blocked,
                       "balanced_accuracy": c.balanced_accuracy,
                       "per_source_flagged": {k: v.flagged for k, v in c.negatives.per_source.items()}}
                for name, c in report.conditions.items()}

    out = {}
    best = run / "best.pt"
    checkpoint = Checkpoint.load(best)
    variants = [("tiled" if checkpoint.spec.tiling else "whole", best)]
    if checkpoint.spec.tiling:
        (run / "whole").mkdir(exist_ok=True)
        checkpoint.spec = checkpoint.spec.model_copy(update={"tiling": None})
        checkpoint.save(run / "whole" / "best.pt")
        calibrate(run / "whole" / "best.pt")
        variants.append(("whole", run / "whole" / "best.pt"))
    for name, ckpt in variants:
        report = robustness(ckpt, [str(met)], pools, split="val", limit=limit, out_dir=run / f"robustness_{name}",
                            workers=3)
        out[name] = summary(report)
    return out


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
