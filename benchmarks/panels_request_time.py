"""Request time of ``ImageChecker.check`` with and without the ``panels`` tiling mode, on the same weights.

    python benchmarks/panels_request_time.py models/wildcheck-ivory.onnx /tmp/wildcheck-ivory-panels.onnx \
        [--side 1000] [--repeat 20]

Three JPEGs of ``--side`` px built from Met val photos: an ordinary photo (upscaled), a 2x2 collage with a
white gutter, and a 1x2 collage without one. Median milliseconds per check (one thread, as a server
worker runs), the number of views scored, and the detector's own share (``find_panels`` on the decoded
picture).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from serving.checker import ImageChecker
from serving.imageio import decode_image
from serving.panels import find_panels
from serving.tiling import draft_size

REPO = Path(__file__).resolve().parents[1]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pictures(met: Path, side: int) -> dict[str, bytes]:
    photos = [Image.open(p).convert("RGB") for p in sorted((met / "val" / "ivory").glob("*.jpg"))[:2]]
    photos += [Image.open(p).convert("RGB") for p in sorted((met / "val" / "other").glob("*.jpg"))[:3]]
    ordinary = photos[0].resize((side, round(side * photos[0].height / photos[0].width)), Image.Resampling.BICUBIC)
    half, gap = (side - 12) // 2, 12
    grid = Image.new("RGB", (side, side), "white")
    for k, p in enumerate(photos[1:5]):
        grid.paste(p.resize((half, half), Image.Resampling.BICUBIC), ((k % 2) * (half + gap), (k // 2) * (half + gap)))
    pair = Image.new("RGB", (side, side * 3 // 4))
    for k, p in enumerate(photos[:2]):
        pair.paste(p.resize((side // 2, side * 3 // 4), Image.Resampling.BICUBIC), (k * side // 2, 0))
    return {"ordinary photo": _jpeg(ordinary), "2x2 collage, gutter": _jpeg(grid), "1x2 collage, no gutter": _jpeg(pair)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("whole", type=Path, help="the model without tiling")
    ap.add_argument("panels", type=Path, help="the same weights with tiling mode panels")
    ap.add_argument("--met", type=Path, default=REPO.parent / "shared" / "datasets" / "met-ivory",
                    help="the met-ivory folder (default: ../shared/datasets/met-ivory beside the repo)")
    ap.add_argument("--side", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    ivory, other = (list((args.met / "val" / label).glob("*.jpg")) for label in ("ivory", "other"))
    if len(ivory) < 2 or len(other) < 3:  # what pictures() builds its three from
        ap.error(f"--met {args.met}: needs met-ivory's val/ivory (2) and val/other (3) JPEGs; point --met at it")
    checkers = {"whole": ImageChecker(str(args.whole)), "panels": ImageChecker(str(args.panels))}
    for checker in checkers.values():
        checker.warm_up()
    for name, data in pictures(args.met, args.side).items():
        row = []
        for mode, checker in checkers.items():
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                checker.check(data)
                times.append(time.perf_counter() - t)
            views = len(checker.prepare(data)[0])
            row.append(f"{mode} {1000 * np.median(times):6.1f} ms ({views} views)")
        c = checkers["panels"]
        img, _ = decode_image(data, draft_size=draft_size(c.pre, c.contract.tiling))
        t = time.perf_counter()
        for _ in range(args.repeat):
            find_panels(img)
        detector = 1000 * (time.perf_counter() - t) / args.repeat
        print(f"{name:24s} {img.size[0]}x{img.size[1]} decoded: " + ";  ".join(row) + f";  detector {detector:.1f} ms")


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
