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
    """(i, j, distance), i < j, with at most ``max_distance`` bits between hashes i and j, in order of i; with ``limit``,
    the first ``limit`` of them (at a large distance nearly every pair matches: n images, n^2/2 pairs).

    Files that share one hash are a group, listed as its first file paired with each of the others (n - 1 pairs, not
    n^2/2: 330 different files of one placeholder picture made 54,285 pairs, past ``data check``'s cap, which then
    dropped every later pair, a leakage pair among them, and blamed the distance); a near pair of two groups is
    listed once, between their first files. Every other pair follows through those (same hash, or the group's), and
    a label or split that differs anywhere in two near groups still shows in one listed pair."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    if not len(values):
        return []
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    by_file = np.argsort(inverse, kind="stable")  # files grouped by hash, each group in file order
    groups = np.split(by_file, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])
    order = np.argsort(first)  # groups in order of their first file
    reps, rep_values = first[order], unique[order]
    pairs: list[tuple[int, int, int]] = []
    for a in range(len(reps)):
        dist = hamming(int(rep_values[a]), rep_values[a + 1:])
        row = [(int(reps[a + 1 + b]), int(dist[b])) for b in np.flatnonzero(dist <= max_distance)]
        row += [(int(j), 0) for j in groups[order[a]][1:]]
        pairs.extend((int(reps[a]), j, d) for j, d in sorted(row))
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    return pairs
