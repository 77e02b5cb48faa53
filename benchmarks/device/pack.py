"""Pack a device call's runs for the trip back (8 files of <= 16 MiB): each best.pt with its weights in fp16,
two per tar, and the small reports of every run in results.tgz."""
import io, sys, tarfile
from pathlib import Path
import torch

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
done = sorted(p.parent for p in runs.glob("*/best.pt"))
with tarfile.open(out / "results.tgz", "w:gz") as tar:
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        for f in run.glob("*"):
            if f.is_file() and f.suffix in (".json", ".csv", ".yaml", ".png", ".txt") and f.stat().st_size < 2_000_000:
                tar.add(f, arcname=f"{run.name}/{f.name}")
    for log in Path("logs").glob("*.log"):
        tar.add(log, arcname=f"logs/{log.name}")
for i in range(0, len(done), 2):
    with tarfile.open(out / f"ckpt{i // 2}.tar", "w") as tar:
        for run in done[i:i + 2]:
            ck = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
            ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
            buf = io.BytesIO(); torch.save(ck, buf); data = buf.getvalue()
            info = tarfile.TarInfo(f"{run.name}.pt16"); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
print("packed", [r.name for r in done])
