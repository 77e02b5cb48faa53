"""Nearest references by cosine similarity, behind one interface: exact numpy search, ANN above a size.

Embeddings are L2-normalised, so cosine similarity is a dot product. Exact search costs one
matrix-vector product (10,000 x 1,280 floats: ~2 ms on one core, more when the cache is cold); above
``EXACT_MAX`` references an HNSW index (faiss) answers in well under a millisecond with recall@1 close to
exact (benchmarks/gallery_bench.py scale).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

EXACT_MAX = 5_000  # 10,000 x 1,280 floats scanned per request cost ~8 ms beside the model (cache-cold); HNSW ~0.3 ms


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (n_queries, k), best first; -1 pads when k > size."""
        ...


def single_threaded_blas() -> None:
    """One BLAS thread for this process. A multi-threaded matrix-vector product beside onnxruntime's threads
    was 100x slower on a busy 2-core machine (158 ms vs 1.7 ms for 10,000 references)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class ExactIndex:
    def __init__(self, vectors: np.ndarray, limit_blas: bool = True):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if limit_blas:
            single_threaded_blas()

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = np.atleast_2d(queries).astype(np.float32) @ self.vectors.T
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1)


class FaissIndex:
    """HNSW (faiss-cpu) over float16-quantised vectors; inner product = cosine on normalised vectors.

    faiss over usearch: usearch 2.26 crashed the process when imported before onnxruntime (numkong),
    and faiss built and searched faster here (benchmarks/gallery_bench.py scale).
    """

    def __init__(self, vectors: np.ndarray | None, connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 64, serialized: np.ndarray | None = None):
        import faiss

        if serialized is not None:  # built by `gallery build/add/remove` and stored in the gallery file
            self.index = faiss.deserialize_index(np.asarray(serialized, dtype=np.uint8))
            self.index.hnsw.efSearch = expansion_search
            faiss.omp_set_num_threads(1)
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, connectivity, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = expansion_add
        self.index.train(vectors[: min(len(vectors), 10_000)])
        self.index.add(vectors)  # all cores while building
        self.index.hnsw.efSearch = expansion_search
        faiss.omp_set_num_threads(1)  # one query, one core: the request's thread

    def __len__(self) -> int:
        return self.index.ntotal

    def serialize(self) -> np.ndarray:
        import faiss

        return faiss.serialize_index(self.index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = self.index.search(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32), k)
        sims[idx < 0] = -np.inf
        return sims, idx.astype(np.int64)


def make_index(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> VectorIndex:
    """Exact up to ``exact_max`` references, HNSW above."""
    if len(vectors) <= exact_max:
        return ExactIndex(vectors)
    return FaissIndex(vectors)
