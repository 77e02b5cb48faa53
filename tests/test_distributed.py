"""Training under torchrun (DDP, gloo on CPU): disjoint shards, one checkpoint, a result that evaluates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.sampling import EpochSampler
from training.distributed import DistInfo, ShardedSampler

pytestmark = pytest.mark.slow


def test_sharded_sampler_splits_one_global_order():
    def inner():
        return EpochSampler([0] * 30 + [1] * 7, n_pool=50, n_negatives=10, balance=True,
                            generator=torch.Generator().manual_seed(5))

    full = list(inner())
    shards = [list(ShardedSampler(inner(), DistInfo(rank=r, world=2))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 24  # 47 items padded to 48
    interleaved = [x for pair in zip(*shards) for x in pair]
    assert interleaved[:47] == full  # together the ranks cover the global order exactly once


def test_torchrun_two_processes_on_cpu(synth_root, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("data: {img_size: 64, num_workers: 0, balance: none}\n"
                      "train: {epochs: 2, batch_size: 8, threads: 1, early_stopping_patience: null}\n")
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(  # train() with a callback that records the items each rank trained on
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.ddp_train", str(synth_root), str(out), str(config)],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x batch 8 = effective batch 16" in proc.stdout
    for epoch in (1, 2):
        a = np.load(out / "seen" / f"rank0_epoch{epoch}.npy")
        b = np.load(out / "seen" / f"rank1_epoch{epoch}.npy")
        assert len(a) == len(b) == 32  # 64 images / 2 ranks
        assert not set(a) & set(b) and set(a) | set(b) == set(range(64))  # disjoint, together every image once
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert proc.stdout.count("epoch 2/2:") == 1  # only rank 0 reports
    from training.evaluate import evaluate

    metrics = evaluate(out, [str(synth_root)], split="test")
    assert metrics.n == 16 and json.loads((out / "summary.json").read_text())["best_epoch"] in (1, 2)
