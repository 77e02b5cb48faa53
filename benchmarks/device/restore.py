"""A device run's fp16 best.pt -> RUN/best.pt in fp32 whose data roots are this machine's originals
(../shared met-ivory and the shipped pools, as benchmarks/met_ivory.py names them), ready for calibrate/export.

    python benchmarks/device/restore.py NAME.pt16 RUN_DIR [SHARED_DATASETS]
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.met_ivory import SHIPPABLE_POOLS, pool_root
from training.fileio import atomic_torch_save

pt16, run = Path(sys.argv[1]), Path(sys.argv[2]).resolve()  # manifests name absolute paths
shared = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parents[3] / "shared" / "datasets"
run.mkdir(parents=True, exist_ok=True)
ck = torch.load(pt16, map_location="cpu", weights_only=True)
ck["model"] = {k: v.float() if v.is_floating_point() else v for k, v in ck["model"].items()}
ck["data_roots"] = [str(shared / "met-ivory")]
ck["config"]["data"]["negatives"] = [pool_root(p, shared, run) for p in SHIPPABLE_POOLS]
atomic_torch_save(ck, run / "best.pt")
print(run, ck["epoch"], ck["val_metrics"].get("balanced_accuracy"))
