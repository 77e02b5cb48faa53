"""benchmarks/backbone_probe.py: frozen ImageNet features and a linear probe rank backbones before a training arm."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _probe(run: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "backbone_probe.py"), "--run", str(run),
                           "--out", str(out), "--backbones", "tf_efficientnet_lite0", "--conditions", "crop",
                           "--size", "96", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_probe_reads_ivory_from_frozen_features_and_caches_them(tmp_path, trained_run, synth_root):
    """Real offline Lite0 weights on the synthetic photos: the probe finds the drawn ivory as is (chance would
    catch about 1% at a 1% budget) and scores the crop too; a second call reads the embeddings it cached, and a
    run with other training photos (a negatives pool) is embedded again, not read from that cache."""
    from training.checkpoint import Checkpoint

    out = tmp_path / "probe"
    first = _probe(trained_run, out)
    assert "tf_efficientnet_lite0: embedded" in first
    row = next(line for line in first.splitlines() if line.startswith("| tf_efficientnet_lite0 |"))
    clean, crop = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert float(clean.split(" / ")[0]) >= 0.75
    assert 0.0 <= float(crop.split(" / ")[0]) <= 1.0
    with np.load(out / "tf_efficientnet_lite0_96.npz") as cached:
        assert {"train", "clean", "crop"} <= set(cached.files) and cached["clean"].shape[1] == 1280
        embedded_train = len(cached["train"])
    second = _probe(trained_run, out)
    assert "embedded" not in second and row in second  # the same numbers, from the cache

    with_pool = tmp_path / "with_pool"
    with_pool.mkdir()
    ckpt = Checkpoint.load(trained_run / "best.pt")
    ckpt.config.data.negatives = [str(synth_root)]  # its training photos now include a pool's
    ckpt.save(with_pool / "best.pt")
    shutil.copy(trained_run / "labels.json", with_pool / "labels.json")
    third = _probe(with_pool, out)
    assert "tf_efficientnet_lite0: embedded" in third
    with np.load(out / "tf_efficientnet_lite0_96.npz") as cached:
        assert len(cached["train"]) > embedded_train
