"""Nearest references by cosine similarity, behind one interface: exact numpy search, ANN above a size.

Embeddings are L2-normalised, so cosine similarity is a dot product. Exact search costs one
matrix-vector product (10,000 x 1,280 floats: ~2 ms on one core, more when the cache is cold). Above
``EXACT_MAX`` references a faiss IVF index answers: the vectors projected by PCA to ``PCA_DIM`` dimensions,
clustered into inverted lists (8-bit codes), ``NPROBE`` lists scanned per query, and the best
``REFINE_FACTOR`` x k candidates re-ranked on the float16 vectors, so similarities are near-exact.
Chosen over HNSW by benchmarks/gallery_bench.py scale (benchmarks/README.md "Search at scale"): at 1M
references it builds in minutes on 2 cores (HNSW: hours), recall@1 and p99 meet the targets.
Galleries written with the HNSW index (before) still load: faiss reads either.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

EXACT_MAX = 5_000  # 10,000 x 1,280 floats scanned per request cost ~8 ms beside the model (cache-cold)
PCA_DIM = 256  # the coarse search's dimensions; re-ranking uses all of them
NPROBE = 32  # inverted lists scanned per query
REFINE_FACTOR = 8  # candidates re-ranked on float16 vectors: REFINE_FACTOR x k
ADD_CHUNK = 50_000  # vectors converted to float32 and added at a time: 1M x 1,280 float32 is never in memory


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (n_queries, k), best first; -1 pads when k > size."""
        ...

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` as float32 (n, d): what ``search`` compares queries with."""
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

    def describe(self) -> str:
        return "exact"

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        """(n_queries, size): every reference's similarity to each query."""
        return np.atleast_2d(queries).astype(np.float32) @ self.vectors.T

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = self.similarities(queries)
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(ids, np.int64)]


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` references: a power of two near 2 sqrt(n), with >= 39 training points each
    (faiss's k-means minimum), at most 4,096."""
    want = 2 ** round(np.log2(max(2.0 * np.sqrt(n), 1.0)))
    most = 2 ** int(np.floor(np.log2(max(n // 39, 1))))
    return int(max(1, min(want, most, 4096)))


class FaissIndex:
    """A faiss index over unit vectors; similarities are cosines whatever the index's metric.

    ``FaissIndex(vectors)`` builds the IVF index (``kind="hnsw"``: the HNSW graph galleries used before,
    kept for the benchmark); ``FaissIndex.empty_ivf`` + ``train`` + ``add`` build it chunk by chunk.
    faiss over usearch: usearch 2.26 crashed the process when imported before onnxruntime (numkong).
    """

    def __init__(self, vectors: np.ndarray | None = None, kind: str = "ivf", serialized: np.ndarray | None = None,
                 index=None):
        import faiss

        if serialized is not None:  # built by `gallery build/add/remove` and stored in the gallery file
            index = faiss.deserialize_index(np.asarray(serialized, dtype=np.uint8))
        elif index is None:  # vectors may be float16 (large galleries): converted ADD_CHUNK at a time
            built = FaissIndex.empty(vectors.shape[1], len(vectors), kind)
            built.train(vectors)
            for start in range(0, len(vectors), ADD_CHUNK):
                built.add(vectors[start:start + ADD_CHUNK])
            index = built.index
        self.index = index
        self.configure()

    @classmethod
    def empty(cls, dim: int, n: int, kind: str = "ivf", pca_dim: int = PCA_DIM, lists: int | None = None) -> "FaissIndex":
        """An index to ``train`` and ``add`` to. ``ivf``: PCA -> IVF (8-bit codes) for the candidates, re-ranked
        on float16 vectors (L2 on unit vectors ranks as cosine does, and unlike inner product it is unchanged by
        PCA's centring). ``hnsw``: an HNSW graph over float16 vectors (M 16, efConstruction 128)."""
        import faiss

        if kind == "hnsw":
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, 16, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 128
            return cls(index=index)
        lists = lists or ivf_lists(n)
        coarse = f"PCA{pca_dim}," if dim > pca_dim else ""
        base = faiss.index_factory(dim, f"{coarse}IVF{lists},SQ8", faiss.METRIC_L2)
        refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        index = faiss.IndexRefine(base, refine)
        faiss.extract_index_ivf(base).cp.niter = 10  # k-means iterations: 10 vs 25 changed recall by < 0.01
        return cls(index=index)

    def train(self, sample: np.ndarray) -> None:
        import faiss

        faiss.omp_set_num_threads(os.cpu_count())  # all cores while building
        most = self.train_points
        if len(sample) > most:  # a row subset first: the whole sample is never converted to float32
            sample = sample[np.sort(np.random.default_rng(0).choice(len(sample), most, replace=False))]
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        self.index.train(sample)
        self.configure()

    @property
    def train_points(self) -> int:
        """At most this many vectors train the index: k-means gains little from more than 64 per list."""
        import faiss

        return max(faiss.extract_index_ivf(self.index.base_index).nlist * 64 if self.is_ivf else 0, 20_000)

    def memory_bytes(self) -> int:
        """The index's data in memory: codes, ids and re-rank vectors (IVF); vectors and links (HNSW)."""
        import faiss

        n = self.index.ntotal
        if self.is_ivf:
            ivf = faiss.extract_index_ivf(self.index.base_index)
            return n * (ivf.code_size + 8) + n * faiss.downcast_index(self.index.refine_index).sa_code_size()
        return n * faiss.downcast_index(self.index.storage).sa_code_size() + self.index.hnsw.neighbors.size() * 4 + self.index.hnsw.levels.size() * 4 + n * 8

    def add(self, vectors: np.ndarray) -> None:
        import faiss

        faiss.omp_set_num_threads(os.cpu_count())
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.configure()

    @property
    def is_ivf(self) -> bool:
        import faiss

        return isinstance(self.index, faiss.IndexRefine)

    def configure(self, nprobe: int = NPROBE, refine_factor: int = REFINE_FACTOR, ef_search: int = 64) -> None:
        """Search parameters (not all are stored in the file) and one thread: one query, one core."""
        import faiss

        if self.is_ivf:
            faiss.extract_index_ivf(self.index.base_index).nprobe = nprobe
            self.index.k_factor = refine_factor
        elif hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = ef_search
        faiss.omp_set_num_threads(1)

    def __len__(self) -> int:
        return self.index.ntotal

    def describe(self) -> str:
        import faiss

        if self.is_ivf:
            ivf = faiss.extract_index_ivf(self.index.base_index)
            pca = f"PCA {ivf.d}, " if isinstance(faiss.downcast_index(self.index.base_index), faiss.IndexPreTransform) else ""
            return f"ivf (faiss: {pca}{ivf.nlist} lists, nprobe {ivf.nprobe}, float16 re-rank x{self.index.k_factor:g})"
        return "hnsw (faiss)"

    def serialize(self) -> np.ndarray:
        import faiss

        return faiss.serialize_index(self.index)

    def serialized_size(self) -> int:
        """Bytes ``write`` will write (one pass through faiss's writer, nothing kept)."""
        import faiss

        total = 0

        def count(chunk: bytes) -> None:
            nonlocal total
            total += len(chunk)

        faiss.write_index(self.index, faiss.PyCallbackIOWriter(count))
        return total

    def write(self, write) -> None:
        """Stream the index to ``write(bytes)`` in 1 MB chunks: no second copy of a 2.7 GB index in memory."""
        import faiss

        faiss.write_index(self.index, faiss.PyCallbackIOWriter(write))

    @classmethod
    def read(cls, read) -> "FaissIndex":
        """Read an index streamed by ``read(n) -> bytes`` (a gallery file's zip member): only the index itself
        is held, never its serialized bytes beside it (``serialized=`` holds both: 2 x 2.7 GB at 1M)."""
        import faiss

        return cls(index=faiss.read_index(faiss.PyCallbackIOReader(read)))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The re-rank vectors (float16 in the IVF index, as stored) as float32: a pHash hit's similarity is
        computed on the same vectors as every searched match's."""
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.index.d), np.float32)
        return self.index.reconstruct_batch(ids).astype(np.float32, copy=False)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        scores, idx = self.index.search(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32), k)
        if self.index.metric_type == faiss.METRIC_L2:  # squared distance of unit vectors -> cosine
            scores = 1.0 - scores / 2.0
        scores[idx < 0] = -np.inf
        return scores, idx.astype(np.int64)


def make_index(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> VectorIndex:
    """Exact up to ``exact_max`` references, IVF above."""
    if len(vectors) <= exact_max:
        return ExactIndex(vectors)
    return FaissIndex(vectors)
