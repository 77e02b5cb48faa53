"""benchmarks/backbone_probe.py: frozen ImageNet features and a linear probe rank backbones before a training arm."""

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


def test_the_probe_reads_ivory_from_frozen_features_and_caches_them(tmp_path, trained_run):
    """Real offline Lite0 weights on the synthetic photos: the probe finds the drawn ivory as is (chance would
    catch about 1% at a 1% budget), scores the crop too, and a second call reads the embeddings it cached."""
    out = tmp_path / "probe"
    first = _probe(trained_run, out)
    assert "tf_efficientnet_lite0: embedded" in first
    row = next(line for line in first.splitlines() if line.startswith("| tf_efficientnet_lite0 |"))
    clean, crop = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert float(clean.split(" / ")[0]) >= 0.75
    assert 0.0 <= float(crop.split(" / ")[0]) <= 1.0
    cached = np.load(out / "tf_efficientnet_lite0_96.npz")
    assert {"train", "clean", "crop"} <= set(cached.files) and cached["clean"].shape[1] == 1280
    second = _probe(trained_run, out)
    assert "embedded" not in second and row in second  # the same numbers, from the cache
