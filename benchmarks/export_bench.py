"""Export benchmark: FP32 vs INT8 ONNX latency, size and accuracy, and the JPEG draft fast path, in one run.

    python benchmarks/export_bench.py RUN_DIR [--out DIR] [--repeats 30]

Exports RUN_DIR (parity-gated) to FP32 and INT8, then prints:
- latency at batch 1 and 16 on 1 and 2 onnxruntime threads, and file sizes;
- val balanced accuracy of both on the run's validation data (the INT8 gate's numbers);
- the JPEG draft fast path: decode+preprocess time and val metrics on ~1000 px JPEG copies of Met val,
  with and without ``Image.draft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def latency(model_path: Path, threads: int, batch: int, repeats: int) -> tuple[float, float]:
    """(median ms per batch, images/s)."""
    from serving.runtime import OnnxModel

    model = OnnxModel(model_path, threads=threads)
    size = model.preprocessing.input_size
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    for _ in range(3):
        model.predict_logits(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict_logits(x)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return med * 1000, batch / med


def upscaled_met_val(folder: Path, side: int = 1000) -> Path:
    """Met val re-encoded as ~1000 px JPEGs (the size of real listing photos) for the draft measurement."""
    from PIL import Image

    for src in sorted((SHARED / "met-ivory" / "val").glob("*/*.jpg")):
        img = Image.open(src).convert("RGB")
        scale = side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        dst = folder / "val" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, "JPEG", quality=88)
    return folder


def draft_effect(model_path: Path, data_root: Path) -> dict:
    from serving.imageio import decode_image
    from serving.runtime import OnnxModel
    from training.data.sources import load_samples, select_split
    from training.predict import predict_samples
    from training.metrics import compute_metrics

    base = OnnxModel(model_path, threads=2)
    samples = select_split(load_samples([data_root]), "val")
    out = {}
    for draft in (False, True):
        pre = base.contract.preprocessing.model_copy(update={"jpeg_draft": draft})
        t = time.perf_counter()
        for s in samples[:150]:
            img, _ = decode_image(s.path, draft_size=pre.draft_size)
            pre(img)
        per_image_ms = (time.perf_counter() - t) / 150 * 1000
        base.contract = base.contract.model_copy(update={"preprocessing": pre})
        probs, kept, _ = predict_samples(base, samples, desc=f"draft={draft}")
        index = {label: i for i, label in enumerate(base.labels)}
        m = compute_metrics(np.array([index[s.label] for s in kept]), probs, base.labels)
        out[draft] = {"decode_preprocess_ms": per_image_ms, "balanced_accuracy": m["balanced_accuracy"],
                      "confusion_matrix": m["confusion_matrix"], "probs": probs}
    out["max_abs_prob_diff"] = float(np.abs(out[True]["probs"] - out[False]["probs"]).max())
    out["top1_changes"] = int((out[True]["probs"].argmax(1) != out[False]["probs"].argmax(1)).sum())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--out", default=None, help="folder for model.onnx / model.int8.onnx (default: RUN/export)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calib-images", type=int, default=300)
    args = parser.parse_args()
    if not Path(args.run).exists():  # before --out (default RUN/export) is made
        parser.error(f"{args.run}: no such run dir or checkpoint")
    from training.export import ExportError, export

    out_dir = Path(args.out or Path(args.run) / "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / "model.onnx"
    try:
        report = export(args.run, fp32, int8=True, calib_images=args.calib_images, int8_max_drop=100.0)
    except ExportError as exc:
        print(f"export failed: {exc}")
        return 1
    int8 = out_dir / "model.int8.onnx"
    q = report["int8"]
    print(f"parity: {report['parity']['images']} images, max |Δp| {report['parity']['max_abs_diff']:.2e}")
    print("\n| model | size MB | val bal. acc | b=1 t=1 ms | b=1 t=2 ms | b=16 t=1 img/s | b=16 t=2 img/s |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, path, acc in (("FP32", fp32, q["fp32_balanced_accuracy"]), ("INT8", int8, q["int8_balanced_accuracy"])):
        r = {"size_mb": path.stat().st_size / 1e6, "acc": acc}
        for threads in (1, 2):
            r[f"b1_t{threads}"] = latency(path, threads, 1, args.repeats)
            r[f"b16_t{threads}"] = latency(path, threads, 16, max(5, args.repeats // 4))
        rows[name] = r
        print(f"| {name} | {r['size_mb']:.1f} | {acc:.4f} | {r['b1_t1'][0]:.1f} | {r['b1_t2'][0]:.1f} | "
              f"{r['b16_t1'][1]:.0f} | {r['b16_t2'][1]:.0f} |")
    f, i = rows["FP32"], rows["INT8"]
    print(f"\nINT8 / FP32 throughput, batch 1, 1 thread: {f['b1_t1'][0] / i['b1_t1'][0]:.2f}x")
    print(f"INT8 / FP32 throughput, batch 16, 1 thread: {i['b16_t1'][1] / f['b16_t1'][1]:.2f}x")
    print(f"INT8 val balanced accuracy drop: {q['drop_points']:.2f} points ({q['val_images']} val images)")

    if (SHARED / "met-ivory").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            root = upscaled_met_val(Path(tmp))
            d = draft_effect(fp32, root)
        print("\nJPEG draft fast path on Met val re-encoded at 1000 px:")
        print("| decode | decode+preprocess ms/img | val bal. acc |\n|---|---|---|")
        for draft in (False, True):
            print(f"| {'draft' if draft else 'full'} | {d[draft]['decode_preprocess_ms']:.1f} | {d[draft]['balanced_accuracy']:.4f} |")
        print(f"max |Δp| draft vs full: {d['max_abs_prob_diff']:.4f}; top-1 changes: {d['top1_changes']} of "
              f"{len(d[True]['probs'])}")
    (out_dir / "export_bench.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items()} for k, v in rows.items()},
                                                          indent=2, default=str))
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
