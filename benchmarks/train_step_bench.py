"""CPU training step: what bf16 autocast and frozen early stages buy, as ratios measured in one run.

    python benchmarks/train_step_bench.py [--size 256] [--batch 32] [--steps 4]

Times forward + backward + AdamW on random data for the default model with the training loop's settings
(channels_last, frozen modules in eval mode), each variant after one warm-up step. The baseline is fp32
with everything trainable.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from training.models import create_model, freeze_modules
from training.train import autocast_setting

EARLY = ["conv_stem", "bn1", "blocks.0", "blocks.1"]


def step_seconds(size: int, batch: int, steps: int, bf16: bool, freeze: list[str]) -> float:
    model = create_model("tf_efficientnet_lite0", 2, "none", 0.2, 0.05).train()
    frozen = freeze_modules(model, freeze)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    use_amp, dtype = autocast_setting(False, bf16, torch.device("cpu"))
    times = []
    for _ in range(steps + 1):
        for module in frozen:
            module.eval()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=use_amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.size < 32:
        parser.error("--steps and --batch must be at least 1 and --size at least 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = autocast_setting(False, True, torch.device("cpu"))[0]
    print(f"{torch.get_num_threads()} threads, native CPU bf16: {native_bf16}, {args.size} px, batch {args.batch}")
    variants = [("fp32, all trainable", False, []), ("bf16 autocast", True, []),
                (f"fp32, frozen {EARLY}", False, EARLY), ("bf16 + frozen", True, EARLY)]
    base = None
    print("\n| variant | s/step | img/s | speed-up |\n|---|---|---|---|")
    for name, bf16, freeze in variants:
        seconds = step_seconds(args.size, args.batch, args.steps, bf16, freeze)
        base = base or seconds
        print(f"| {name} | {seconds:.2f} | {args.batch / seconds:.1f} | {base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
