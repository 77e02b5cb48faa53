"""What explain costs: a /v1/check's work (decode + preprocess + model + decision) with explain=false/true/png.

    python benchmarks/explain_bench.py --model models/wildcheck-ivory.onnx [--repeats 7] [--images 24]

In-process (``ImageChecker.check``, one onnxruntime thread like a server worker) on ~1000x1000 listing
JPEGs (benchmarks/serve_bench.py's photos). Each repeat times every mode over all images, modes in rotating
order; prints the median per-image time over repeats and explain's share of the request. Also:
- whether onnxruntime computes the cam-only nodes when only ``logits`` is fetched (its profiler, on the
  optimised graph), and the model call alone with and without the ``cam`` fetch.
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
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_bench import listing_photos  # noqa: E402
from serving.checker import ImageChecker  # noqa: E402


def cam_only_nodes(model: onnx.ModelProto, logits: str = "logits") -> set[str]:
    """Names of the nodes that the ``logits`` output does not depend on."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, stack = set(), [logits]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    return {node.name for node in model.graph.node} - needed


def profile_logits_only(path: Path, batch: np.ndarray, runs: int = 20) -> dict:
    """Profile the optimised graph fetching only ``logits``: do the cam-only nodes run, and for how long?"""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # writes the optimised graph
        cam_nodes = cam_only_nodes(onnx.load(opts.optimized_model_filepath))
        prof = ort.SessionOptions()
        prof.intra_op_num_threads = 1
        prof.enable_profiling = True
        prof.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(opts.optimized_model_filepath, prof, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(["logits"], {"image": batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cam_us = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
              and e["name"].removesuffix("_kernel_time") in cam_nodes]
    ran = {e["name"].removesuffix("_kernel_time") for e in events if e.get("cat") == "Node"} & cam_nodes
    return {"cam_only_nodes": sorted(cam_nodes), "ran_when_fetching_logits": sorted(ran),
            "cam_us_per_run": sum(cam_us) / runs, "model_run_us": statistics.median(run_us)}


def median_ms(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/wildcheck-ivory.onnx")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    checker = ImageChecker(args.model, threads=args.threads)
    if not checker.model.has_cam:
        sys.exit(f"{args.model} has no cam output; export it with this version of `wildcheck export`")
    checker.warm_up()
    photos = listing_photos(args.images)
    print(f"model {checker.contract.model_name} {checker.contract.model_version}, input {checker.pre.input_size} px, "
          f"cam {checker.contract.cam.shape}, {len(photos)} photos of ~{np.mean([len(p) for p in photos]) / 1e3:.0f} KB, "
          f"{args.threads} onnxruntime thread(s), {args.repeats} repeats")

    batch = checker.prepare(photos[0], "image/jpeg")[0]  # the views of one photo (1 + tiles)
    report = profile_logits_only(Path(args.model), batch)
    print(f"cam-only nodes in the optimised graph: {report['cam_only_nodes']}; run when fetching only logits: "
          f"{report['ran_when_fetching_logits'] or 'none'}; their kernel time {report['cam_us_per_run']:.0f} us of a "
          f"{report['model_run_us'] / 1000:.2f} ms model run ({100 * report['cam_us_per_run'] / report['model_run_us']:.2f}%)")

    model = checker.model
    logits_ms = median_ms(lambda: model.predict_logits(batch), args.repeats, 20)
    cam_ms = median_ms(lambda: model.predict_with_cam(batch), args.repeats, 20)
    print(f"model call, one photo ({len(batch)} view(s)): logits only {logits_ms:.2f} ms, logits + cam {cam_ms:.2f} ms "
          f"({100 * (cam_ms / logits_ms - 1):+.1f}%)")

    modes = ["false", "true", "png"]
    totals = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes[r % 3:] + modes[: r % 3]:
            t0 = time.perf_counter()
            for data in photos:
                checker.check(data, "image/jpeg", explain=mode)
            totals[mode].append((time.perf_counter() - t0) / len(photos) * 1000)
    per_image = {m: statistics.median(v) for m, v in totals.items()}
    base = per_image["false"]
    for mode in modes:
        share = 100 * (per_image[mode] - base) / per_image[mode]
        print(f"explain={mode:<5} {per_image[mode]:7.2f} ms/request (median of {args.repeats})"
              + ("" if mode == "false" else f"  +{per_image[mode] - base:.2f} ms = {share:.1f}% of the request"))
    sample = checker.check(photos[0], "image/jpeg", explain="png")["explanation"]
    print(f"explanation: {sample['rows']} x {sample['cols']} grid, {len(json.dumps(sample['grid'])) / 1e3:.1f} KB of JSON; "
          f"png {len(sample['png']) / 1e3:.0f} KB base64")


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
