"""Nearest references by cosine similarity, behind one interface: exact numpy search, ANN above a size.

Embeddings are L2-normalised, so cosine similarity is a dot product. Exact search costs one
matrix-vector product (10,000 x 1,280 floats: ~1-3 ms on one core); above ``EXACT_MAX`` references an
HNSW index answers in well under a millisecond with recall@1 close to exact (benchmarks/gallery_bench.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

EXACT_MAX = 50_000


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (n_queries, k), best first; -1 pads when k > size."""
        ...


class ExactIndex:
    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = np.atleast_2d(queries).astype(np.float32) @ self.vectors.T
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1)


class UsearchIndex:
    """HNSW (usearch) over the same vectors; cosine on normalised vectors = inner product."""

    def __init__(self, vectors: np.ndarray, dtype: str = "f16", connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 64, threads: int = 0):
        from usearch.index import Index

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = Index(ndim=vectors.shape[1], metric="ip", dtype=dtype, connectivity=connectivity,
                           expansion_add=expansion_add, expansion_search=expansion_search)
        self.index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(queries).astype(np.float32)
        found = self.index.search(queries, k, threads=1)
        keys = np.asarray(found.keys, dtype=np.int64).reshape(len(queries), -1)
        dist = np.asarray(found.distances, dtype=np.float32).reshape(len(queries), -1)
        # one query gives Matches (no .counts), several BatchMatches
        counts = np.asarray(getattr(found, "counts", [keys.shape[1]])).reshape(len(queries))
        mask = np.arange(keys.shape[1])[None, :] >= counts[:, None]
        keys[mask] = -1
        sims = 1.0 - dist  # usearch's ip distance is 1 - dot
        sims[mask] = -np.inf
        return sims, keys


def make_index(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> VectorIndex:
    """Exact up to ``exact_max`` references, HNSW above."""
    if len(vectors) <= exact_max:
        return ExactIndex(vectors)
    return UsearchIndex(vectors)
