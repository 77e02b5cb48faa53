"""Near-duplicates of a dataset's images: one hash, one distance, one vectorised search.

``data check`` (pairs within a dataset) and ``data ingest`` (each new image against the dataset) both use it.
The hash is serving/phash.py's pHash, the one reference galleries use; it gives the same 64 bits as
``imagehash.phash`` (so manifests written before keep matching), as a 16-digit hex string in manifests/reports.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from serving.phash import hamming, phash

# Bits two pHashes may differ in and still be the same picture (resized, re-compressed): a few;
# unrelated photos differ in about 32. data check's --near-distance and ingest's default.
NEAR_DISTANCE = 4


def image_hash(img: Image.Image) -> str:
    """The pHash of a decoded picture as stored in manifests and reports (16 hex digits)."""
    return f"{phash(img):016x}"


class HashIndex:
    """Perceptual hashes (packed uint64) searchable by Hamming distance: one numpy popcount over the whole array per
    query, instead of a Python loop over the dataset. Grows in place as images are added (amortised doubling)."""

    def __init__(self, hashes: Iterable[str] = (), max_distance: int = NEAR_DISTANCE):
        values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
        self._values = np.empty(max(16, 2 * len(values)), dtype=np.uint64)
        self._values[: len(values)] = values
        self._n = len(values)
        self.max_distance = max_distance

    def __len__(self) -> int:
        return self._n

    def add(self, value: str) -> int:
        """Append a hash; returns its position."""
        if self._n == len(self._values):
            self._values = np.concatenate([self._values, np.empty_like(self._values)])
        self._values[self._n] = np.uint64(int(value, 16))
        self._n += 1
        return self._n - 1

    def first_within(self, value: str) -> tuple[int, int] | None:
        """(position, distance) of the earliest hash within ``max_distance`` of ``value``, or None."""
        if not self._n:
            return None
        dist = hamming(int(value, 16), self._values[: self._n])
        hits = np.flatnonzero(dist <= self.max_distance)
        return (int(hits[0]), int(dist[hits[0]])) if len(hits) else None


def near_pairs(hashes: list[str], max_distance: int = NEAR_DISTANCE, limit: int | None = None) -> list[tuple[int, int, int]]:
    """All (i, j, distance), i < j, with at most ``max_distance`` bits between hashes i and j; with ``limit``, the
    first ``limit`` of them (at a large distance nearly every pair matches: n images, n^2/2 pairs)."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        dist = hamming(int(values[i]), values[i + 1 :])
        pairs.extend((i, i + 1 + int(j), int(dist[j])) for j in np.flatnonzero(dist <= max_distance))
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    return pairs
