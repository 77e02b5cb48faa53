"""Decode and resize every image once, keep the uint8 pixels in memory for all epochs.

JPEG decoding dominates CPU training time; images are resized to the preprocessing's ``resize_size``
(shorter side), which is exactly what evaluation and serving do before their centre crop.
Unreadable images are reported and left out: training never crashes on them.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from serving.imageio import ImageError, decode_image
from serving.preprocess import Preprocessing
from training.data.sources import Sample

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    path: str
    reason: str


def _load(sample: Sample, pre: Preprocessing, min_side: int) -> np.ndarray | str:
    try:
        img, _ = decode_image(sample.path, min_side=min_side, draft_size=pre.draft_size)
        return np.asarray(pre.resize_image(img), dtype=np.uint8)
    except ImageError as exc:
        return f"{exc.code}: {exc.message}"
    except OSError as exc:
        return f"unreadable: {exc}"


def cache_images(
    samples: list[Sample], pre: Preprocessing, min_side: int = 1, workers: int = 2, desc: str = "caching",
    quiet: bool = False,
) -> tuple[list[np.ndarray], list[Sample], list[Skipped]]:
    """Returns (pixels, kept samples, skipped) in the input order. ``quiet``: no progress bar and no warning per
    skipped file (torchrun's other ranks: rank 0 says it, once; the skipped list is the same)."""
    pixels, kept, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: _load(s, pre, min_side), samples)
        for sample, result in tqdm(zip(samples, results), total=len(samples), desc=desc, unit="img", leave=False,
                                   disable=quiet):
            if isinstance(result, str):
                if not quiet:
                    log.warning("skipping %s (%s)", sample.path, result)
                skipped.append(Skipped(str(sample.path), result))
            else:
                pixels.append(result)
                kept.append(sample)
    return pixels, kept, skipped


class CachedImageDataset(torch.utils.data.Dataset):
    """(pixels, target) pairs; ``transform`` turns a cached uint8 HWC array into the model input tensor."""

    def __init__(self, pixels: list[np.ndarray], targets: list[int], transform):
        if len(pixels) != len(targets):
            raise ValueError("pixels and targets differ in length")
        self.pixels = pixels
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        return self.transform(self.pixels[index]), self.targets[index], index
