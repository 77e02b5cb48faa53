"""Run under torchrun by test_distributed.py: train() with a callback recording which items each rank trained on.

Usage: torchrun --nproc_per_node=N -m tests.ddp_train DATA OUT CONFIG. Writes OUT/seen/rank{R}_epoch{E}.npy.
"""

import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from training.config import load_config
from training.train import train


def main(data: str, out: str, config: str) -> None:
    seen = defaultdict(list)
    train([data], out, load_config(Path(config), {}), on_batch=lambda epoch, idx: seen[epoch].extend(idx.tolist()))
    folder = Path(out) / "seen"
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, items in seen.items():
        np.save(folder / f"rank{os.environ.get('RANK', '0')}_epoch{epoch}.npy", np.asarray(items, dtype=np.int64))


if __name__ == "__main__":
    main(*sys.argv[1:4])
