"""Reference galleries: product types from a handful of photos, and known photos posted again.

A gallery file (``.npz``, no pickles) holds, per reference, the model's L2-normalised embedding (float32;
float16 above the exact-search size, where the search index holds them for serving), a
64-bit perceptual hash, its label, id and source, never the image; plus the embeddings of the negatives
it was calibrated on, so thresholds can be re-solved after ``add``/``remove``, the model
version and contract hash it was built with, and per-label thresholds:

- ``similar``: cosine similarity above which at most ``fpr`` of the negatives match the label -> review;
- ``duplicate``: a near-copy: cosine >= ``duplicate`` or pHash distance <= ``duplicate_hamming``
  -> block when the label blocks (default), else review.

A flat picture (blank, one colour: ``serving.phash.ViewHash.flat``) identifies nothing: ``gallery build/add`` skip it
as a reference and ``match`` matches no flat view (every blank picture has nearly the same pHash and embedding).

Memory: a large gallery (above ``exact_max``, with its stored faiss index) is served from the index alone (2.7 GB
at 1M references, its float16 re-rank vectors included) plus small per-reference arrays: the file's embeddings
are read only when ``add``/``remove`` need them, and the index is streamed from the file, never held twice.

numpy only: serving imports this, training builds with it (``training.gallery``).
"""

from __future__ import annotations

import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.atomic import atomic_path
from serving.contract import EmbeddingSpec, ModelContract, contract_hash
from serving.errors import WildcheckError, printable
from serving.phash import ViewHash, hamming, view_hash
from serving.search import EXACT_MAX, ExactIndex, VectorIndex, make_index

GALLERY_FORMAT = "wildcheck-gallery"
GALLERY_VERSION = 1
# Defaults measured by benchmarks/gallery_bench.py (README "Reference galleries").
DEFAULT_FPR = 0.01
DEFAULT_SIMILAR = 0.80  # used only when the gallery was built without negatives
DUPLICATE_FLOOR = 0.80  # a near-copy is at least this similar, whatever the negatives say
DUPLICATE_FPR_RATIO = 0.1  # duplicate: a tenth of the negatives `similar` lets through (0.1% at --fpr 0.01)
DUPLICATE_HAMMING = 6  # pHash bits; unrelated photos differ in ~32
SCORE_MARGIN = 1e-4  # above the negative's score: onnxruntime differs by ~1e-6 between batch sizes
# A negative at least this similar to a reference is a copy of it, left out of threshold solving (as one within
# DUPLICATE_HAMMING pHash bits is: the rule `match` calls a duplicate by). 0.99: above every different photo measured,
# the closest distractor scored 0.988 on the shipped model's embedding, 0.842 on the pretrained embedder
# (benchmarks/README.md, "Known photos posted again"); re-encoded or resized copies of Met photos scored 0.86-0.97
# but sit within 0-8 pHash bits. A copy left in could only push its label's thresholds up to its similarity (at 1.0 it would
# never match by embedding): `solve_thresholds` refuses a threshold above 1 instead.
COPY_SIMILARITY = 0.99
MAX_MATCHES = 3
SEARCH_K = 16  # nearest references looked at per query view (an ANN-searched gallery; exact search takes each label's best)
SEARCH_K_MAX = 1024  # ... more while a label not among them could still match: one label's many copies crowd the rest out
THRESHOLD_BLOCK = 20_000  # references compared with the negatives at a time (3,000 x 20,000 float32: 240 MB)
READ_BLOCK = 50_000  # rows of a file's embeddings read at a time


def storage_dtype(n: int, exact_max: int = EXACT_MAX) -> np.dtype:
    """float32 for exactly searched galleries (as before: their thresholds were solved on float32); float16 above,
    the vectors the IVF index re-ranks on, so thresholds are solved on what is served (vs float32: at most 1.1e-4
    similarity on real embeddings, benchmarks/README.md "Memory of a served gallery")."""
    return np.dtype(np.float32 if n <= exact_max else np.float16)


class GalleryError(WildcheckError, ValueError):
    """The gallery file is unusable (missing, truncated, empty, unknown version, another model's)."""


class LabelThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    similar: float = Field(ge=-1.0, le=1.0001)
    duplicate: float = Field(ge=-1.0, le=1.0001)
    duplicate_hamming: int = Field(DUPLICATE_HAMMING, ge=-1, le=64, description="-1: pHash never decides")
    block: bool = Field(True, description="a duplicate blocks; false: it goes to review")
    notes: list[str] = []


class GalleryHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["wildcheck-gallery"] = GALLERY_FORMAT
    version: int = GALLERY_VERSION
    model_name: str
    model_version: str
    contract_hash: str
    embedding: EmbeddingSpec
    labels: list[str]
    reference_ids: list[str]
    sources: list[str]
    thresholds: dict[str, LabelThresholds]
    fpr: float = Field(DEFAULT_FPR, gt=0.0, lt=1.0)
    negatives: dict = Field(default_factory=dict, description="roots and count the thresholds were solved on")
    created_at: str
    updated_at: str
    wildcheck_version: str = ""


class GalleryMatch(BaseModel):
    label: str
    reference: str
    similarity: float
    kind: Literal["duplicate", "similar"]
    hamming: int | None = None


def preprocess_and_hash(pre, img) -> tuple[np.ndarray, ViewHash]:
    """Model input and pHash of one picture; the hash is taken from the model's resize (cheaper than the
    full picture, and the same at build and query time). A ``flat`` hash's picture matches nothing."""
    resized = pre.resize_image(img)
    return pre.crop_and_normalize(np.asarray(resized)), view_hash(resized)


def views_and_hashes(img, pre, tiling, boxes=None) -> tuple[np.ndarray, list[int]]:
    """``serving.tiling.views`` (the whole picture, then the contract's tiles or panels), with each view's pHash:
    a known photo posted as one tile of a collage matches through its tile. ``boxes``: ``view_boxes`` if known."""
    from serving.tiling import view_boxes

    boxes = view_boxes(img, tiling) if boxes is None else boxes
    crops = [img] + [img.crop(box) for box in boxes[1:]]
    pairs = [preprocess_and_hash(pre, crop) for crop in crops]
    return np.stack([a for a, _ in pairs]), [h for _, h in pairs]


def is_gallery_file(path: str | Path) -> bool:
    """Whether ``path`` is a wildcheck gallery, from its header alone (a 1M-reference gallery is not read): build may
    replace a gallery, never anything else."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("header.npy") as fh:
            _read_npy_header(fh)
            meta = json.loads(fh.read())
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError):
        return False
    return isinstance(meta, dict) and meta.get("format") == GALLERY_FORMAT


def require_gallery_file(path: str | Path) -> None:
    """Refuse, naming the problem, a path that cannot be a gallery: missing, a folder, or a file of another kind (an
    ONNX model given by mistake got numpy's advice to load it with ``allow_pickle=``)."""
    path = Path(path)
    if path.is_dir():
        raise GalleryError(f"{path} is a folder, not a gallery file: give the .npz file `wildcheck gallery build "
                           "--out` wrote")
    if not path.is_file():
        raise GalleryError(f"gallery {path} not found; build one with `wildcheck gallery build`")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive (a truncated one keeps its start: reported as such later)
        raise GalleryError(f"{path} is not a gallery file (a gallery is the .npz archive `wildcheck gallery build` "
                           "writes); check the path")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _listed(names: list[str], limit: int = 10) -> str:
    """At most ``limit`` names, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def solve_thresholds(ref_emb: np.ndarray, ref_labels: np.ndarray, labels: list[str], negatives: np.ndarray,
                     fpr: float, ref_hashes: np.ndarray | None = None, negative_hashes: np.ndarray | None = None,
                     negative_names: list[str] | None = None) -> dict[str, LabelThresholds]:
    """Per label: ``similar`` lets at most ``fpr`` of the negatives through; ``duplicate`` none of them
    (``solve_leaving_out_copies``; negatives that are copies of a reference are left out)."""
    return solve_leaving_out_copies(ref_emb, ref_labels, labels, negatives, fpr, ref_hashes, negative_hashes,
                                    negative_names)[0]


def solve_leaving_out_copies(ref_emb: np.ndarray, ref_labels: np.ndarray, labels: list[str], negatives: np.ndarray,
                             fpr: float, ref_hashes: np.ndarray | None = None, negative_hashes: np.ndarray | None = None,
                             negative_names: list[str] | None = None
                             ) -> tuple[dict[str, LabelThresholds], list[tuple[str, str]]]:
    """Thresholds per label, and the negatives left out as copies of a reference: ``(name, label of the reference)``.

    A negative is a copy when it is within ``DUPLICATE_HAMMING`` pHash bits of a reference (with ``ref_hashes`` and
    ``negative_hashes``) or at least ``COPY_SIMILARITY`` similar to one: one reference photo among the negatives used
    to push its label's thresholds to 1.0001, so the label silently never matched by embedding again. A threshold
    that still lands above 1 is refused (``GalleryError`` naming the label and the negatives), never stored."""
    negatives = np.asarray(negatives, np.float32)
    names = list(negative_names) if negative_names is not None and len(negative_names) == len(negatives) else [
        f"stored negative #{j}" for j in range(len(negatives))]
    if len(negatives) == 0:
        return {label: LabelThresholds(similar=DEFAULT_SIMILAR, duplicate=DUPLICATE_FLOOR,
                                       notes=[f"no negatives: similar at the default {DEFAULT_SIMILAR}"])
                for label in labels}, []
    # each negative's best similarity to each label's references, block by block: 1M refs x 3,000 negatives is 12 GB;
    # clipped: float32 rounding puts a photo's similarity to itself at up to 1.0000006
    best = np.full((len(labels), len(negatives)), -1.0, np.float32)
    for i in range(len(labels)):
        rows = np.nonzero(ref_labels == i)[0]
        for start in range(0, len(rows), THRESHOLD_BLOCK):
            block = np.asarray(ref_emb[rows[start:start + THRESHOLD_BLOCK]], np.float32)
            np.maximum(best[i], (negatives @ block.T).max(axis=1), out=best[i])
    np.clip(best, -1.0, 1.0, out=best)
    copy_of = np.where(best.max(axis=0) >= COPY_SIMILARITY, best.argmax(axis=0), -1)
    if ref_hashes is not None and negative_hashes is not None and len(ref_hashes) and len(negative_hashes) == len(negatives):
        ref_hashes = np.asarray(ref_hashes, np.uint64)
        for j in np.flatnonzero(copy_of < 0).tolist():
            bits = hamming(int(negative_hashes[j]), ref_hashes)
            if bits.min() <= DUPLICATE_HAMMING:
                copy_of[j] = int(ref_labels[int(bits.argmin())])
    copies = copy_of >= 0
    left_out = [(names[j], labels[copy_of[j]]) for j in np.flatnonzero(copies).tolist()]
    if copies.all():
        raise GalleryError(f"all {len(negatives)} negatives are copies of references ({_listed([n for n, _ in left_out])}): "
                           "no thresholds can be solved on them; nothing written. Give negatives that are ordinary "
                           "photos, not the reference photos")
    out, too_high = {}, []
    for i, label in enumerate(labels):
        scores = np.sort(best[i][~copies])[::-1]

        def lowest_letting_through(rate: float) -> tuple[float, int]:
            """The lowest threshold that at most floor(rate * n) negatives reach."""
            allowed = int(np.floor(rate * len(scores)))
            return float(scores[allowed]) + SCORE_MARGIN if allowed < len(scores) else -1.0, allowed

        similar, allowed = lowest_letting_through(fpr)
        dup_at, dup_allowed = lowest_letting_through(fpr * DUPLICATE_FPR_RATIO)
        duplicate = max(DUPLICATE_FLOOR, dup_at, similar)
        if duplicate > 1.0:  # no similarity reaches it: the label would never match by embedding
            kept = np.flatnonzero(~copies)
            worst = [f"{names[j]} ({best[i][j]:.4f})" for j in kept[np.argsort(-best[i][kept])]
                     if best[i][j] + SCORE_MARGIN > 1.0]
            too_high.append(f"{label!r} (negatives {_listed(worst)})")
            continue
        notes = [f"similar: {allowed} of {len(scores)} negatives reach it (fpr {fpr}); "
                 f"duplicate: {dup_allowed} reach it (fpr {fpr * DUPLICATE_FPR_RATIO:g}, floor {DUPLICATE_FLOOR})"]
        if left_out:
            notes.append(f"{len(left_out)} negatives left out as copies of references")
        if len(scores) < 1.0 / fpr:
            notes.append(f"only {len(scores)} negatives: fpr {fpr} cannot be resolved; similar is above every negative")
        out[label] = LabelThresholds(similar=min(similar, duplicate), duplicate=duplicate, notes=notes)
    if too_high:
        raise GalleryError(f"thresholds above 1 for label(s) {'; '.join(too_high)}: negatives as similar as the "
                           "label's own reference photos, so the label would never match by embedding; nothing "
                           "written. Remove those photos from the negatives (or from the references)")
    return out, left_out


class _LazyEmbeddings:
    """A large gallery file's embeddings, read only when ``add``/``remove`` need them (a served gallery never does);
    refused when the file changed since it was loaded."""

    def __init__(self, path: Path, shape: tuple[int, int], stamp: tuple[int, int]):
        self.path, self.shape, self.stamp = path, shape, stamp

    def read(self, dtype: np.dtype) -> np.ndarray:
        st = self.path.stat()
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise GalleryError(f"{self.path} changed since it was loaded; load it again")
        with zipfile.ZipFile(self.path) as zf, zf.open("embeddings.npy") as fh:
            shape, fortran, stored = _read_npy_header(fh)
            if fortran or len(shape) != 2:
                return np.ascontiguousarray(np.lib.format.read_array(fh, allow_pickle=False), dtype=dtype)
            out = np.empty(shape, dtype)
            for start in range(0, shape[0], READ_BLOCK):  # block by block: a float32 file is not held whole
                rows = min(READ_BLOCK, shape[0] - start)
                data = fh.read(rows * shape[1] * stored.itemsize)
                if len(data) != rows * shape[1] * stored.itemsize:
                    raise GalleryError(f"{self.path}: its embeddings are truncated; rebuild the gallery")
                out[start:start + rows] = np.frombuffer(data, stored).reshape(rows, shape[1])
            return out


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    return (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` member without reading its data."""
    with zf.open(f"{name}.npy") as fh:
        shape, _, dtype = _read_npy_header(fh)
    return shape, dtype


class Gallery:
    """References in memory (embeddings, hashes, ids), searched by ``match``.

    ``embeddings`` are float32 up to ``exact_max`` references, float16 above (``storage_dtype``); a large gallery
    loaded with its index holds none until ``add``/``remove``/``save`` ask (``_LazyEmbeddings``)."""

    def __init__(self, header: GalleryHeader, embeddings: np.ndarray | None, label_idx: np.ndarray, hashes: np.ndarray,
                 negatives: np.ndarray, source: str = "gallery", exact_max: int = EXACT_MAX,
                 lazy: _LazyEmbeddings | None = None, negative_hashes: np.ndarray | None = None,
                 negative_names: list[str] | None = None):
        """``negative_hashes``/``negative_names``: the negatives' pHashes and file names, to leave out (and name)
        negatives that are copies of a reference (galleries written before they were stored have neither)."""
        self.header = header
        self._lazy = lazy
        self._embeddings = None if embeddings is None else np.ascontiguousarray(
            embeddings, dtype=storage_dtype(len(embeddings), exact_max))
        self.label_idx = np.asarray(label_idx, dtype=np.int32)
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        # float32: thresholds sit just above a negative's similarity, rounding must not let it through
        self.negatives = np.asarray(negatives, dtype=np.float32)
        self.negative_hashes = None if negative_hashes is None else np.asarray(negative_hashes, dtype=np.uint64)
        self.negative_names = None if negative_names is None else [str(n) for n in negative_names]
        self.left_out: list[tuple[str, str]] = []  # negatives left out of the last re-solve: (name, label copied)
        self.source = source
        self.thresholds = dict(header.thresholds)
        self.exact_max = exact_max
        self._index: VectorIndex | None = None
        self._groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.label_idx)

    @property
    def embeddings(self) -> np.ndarray:
        """The references' embeddings (``storage_dtype``); read from the file on first use for a large gallery."""
        if self._embeddings is None:
            if self._lazy is None:
                raise GalleryError(f"{self.source}: no embeddings held and no file to read them from")
            self._embeddings = self._lazy.read(storage_dtype(len(self), self.exact_max))
        return self._embeddings

    @embeddings.setter
    def embeddings(self, value: np.ndarray) -> None:
        self._embeddings, self._lazy = np.ascontiguousarray(value, dtype=storage_dtype(len(value), self.exact_max)), None

    def vectors(self, ids: list[int]) -> np.ndarray:
        """float32 embeddings of a few references: from the index when the gallery holds none (what it searches)."""
        if self._embeddings is None and self._index is not None:
            return self._index.reconstruct(np.asarray(ids, np.int64))
        return np.asarray(self.embeddings[np.asarray(ids, np.int64)], np.float32)

    # ---- file ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One rename: a crash mid-write leaves the previous gallery intact. Written member by member as ``np.savez``
        would (a zip of ``.npy``), the index streamed from faiss: nothing large is copied to be written."""
        path = Path(path)
        self.header.updated_at = _now()
        arrays = {
            "header": np.frombuffer(self.header.model_dump_json().encode(), dtype=np.uint8),
            "embeddings": self.embeddings,
            "labels": self.label_idx,
            "hashes": self.hashes,
            "negatives": self.negatives,
        }
        if self.negative_hashes is not None and len(self.negative_hashes) == len(self.negatives):
            arrays["negative_hashes"] = self.negative_hashes
        if self.negative_names is not None and len(self.negative_names) == len(self.negatives):
            arrays["negative_names"] = np.frombuffer(json.dumps(self.negative_names).encode(), dtype=np.uint8)
        index = self.index if len(self) > self.exact_max else None  # travels with the file: no rebuild at load
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, array in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
                if index is not None:
                    with zf.open("index.npy", "w", force_zip64=True) as member:  # a uint8 array, as before
                        np.lib.format.write_array_header_2_0(
                            member, {"descr": "|u1", "fortran_order": False, "shape": (index.serialized_size(),)})
                        index.write(member.write)

    @classmethod
    def load(cls, path: str | Path, contract: ModelContract | None = None, exact_max: int = EXACT_MAX,
             served_as: str = "model") -> "Gallery":
        """Read and validate; with ``contract``, refuse a gallery built with another model (``served_as``: what
        that model is to the service, "model" or "embedder", for the message)."""
        path = Path(path)
        require_gallery_file(path)
        stat = path.stat()
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = {"header", "embeddings", "labels", "hashes", "negatives"} - set(npz.files)
                if missing:
                    raise GalleryError(f"{path} is not a wildcheck gallery: it lacks {sorted(missing)}")
                raw = bytes(npz["header"].tobytes())
                arrays = {k: npz[k] for k in ("labels", "hashes", "negatives")}
                extra = {k: npz[k] for k in ("negative_hashes", "negative_names") if k in npz.files}  # optional
                has_index = "index" in npz.files
                shape, dtype = _member_header(npz.zip, "embeddings")
                lazy = None
                if has_index and len(arrays["labels"]) > exact_max:  # served from the index: read when edited
                    lazy = _LazyEmbeddings(path, shape, (stat.st_size, stat.st_mtime_ns))
                    arrays["embeddings"] = None
                else:
                    arrays["embeddings"] = npz["embeddings"]
                index = cls._read_index(npz.zip, path) if lazy is not None else None
        except GalleryError:
            raise
        except ValueError as exc:
            if "allow_pickle" in str(exc):  # numpy's advice to load it unsafely is no advice for a gallery
                raise GalleryError(f"{path} holds pickled objects, which no wildcheck gallery does (they are never "
                                   "loaded); rebuild the gallery with `wildcheck gallery build`") from None
            raise GalleryError(f"{path} is not a readable gallery file (truncated or corrupt?): {exc}") from exc
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
            raise GalleryError(f"{path} is not a readable gallery file (truncated or corrupt?): {exc}") from exc
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise GalleryError(f"{path} has an unreadable gallery header: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != GALLERY_FORMAT:
            raise GalleryError(f"{path} is not a wildcheck gallery (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != GALLERY_VERSION:
            raise GalleryError(f"{path} has gallery version {meta.get('version')!r}; this wildcheck reads version "
                               f"{GALLERY_VERSION}: rebuild it with `wildcheck gallery build`")
        try:
            header = GalleryHeader.model_validate(meta)
        except ValidationError as exc:
            raise GalleryError(f"{path} has an invalid gallery header: {exc}") from exc
        if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
            raise GalleryError(f"{path}: embeddings of shape {shape} and type {dtype}, expected (n, {header.embedding.size}) floats")
        try:
            names = json.loads(bytes(extra["negative_names"].tobytes())) if "negative_names" in extra else None
            if names is not None and not (isinstance(names, list) and len(names) == len(arrays["negatives"])):
                raise ValueError("its negatives' names do not match its negatives")
            gallery = cls(header, arrays["embeddings"], arrays["labels"], arrays["hashes"], arrays["negatives"],
                          source=str(path), exact_max=exact_max, lazy=lazy, negative_hashes=extra.get("negative_hashes"),
                          negative_names=names)
        except (ValueError, TypeError) as exc:  # e.g. hashes stored as text
            raise GalleryError(f"{path} holds arrays of the wrong type ({exc}); rebuild the gallery") from exc
        gallery.validate(shape)
        if index is not None:
            if len(index) != len(gallery) or index.index.d != header.embedding.size:
                raise GalleryError(f"{path}: its search index holds {len(index)} references of {index.index.d} "
                                   f"dimensions, the file {len(gallery)} of {header.embedding.size}")
            gallery._index = index
        if contract is not None:
            gallery.check_model(contract, served_as)
        return gallery

    @staticmethod
    def _read_index(zf: zipfile.ZipFile, path: Path):
        """The stored faiss index, streamed from its zip member (a uint8 ``.npy``)."""
        from serving.search import FaissIndex

        with zf.open("index.npy") as fh:
            _read_npy_header(fh)
            try:
                return FaissIndex.read(fh.read)
            except RuntimeError as exc:
                raise GalleryError(f"{path}: its search index is unreadable ({exc}); rebuild the gallery") from exc

    def validate(self, shape: tuple[int, ...] | None = None) -> None:
        """``shape``: the stored embeddings' shape, when they are not read (a large gallery served from its index)."""
        n, h = len(self), self.header
        shape = tuple(self._embeddings.shape) if self._embeddings is not None else tuple(shape)
        if n == 0 or shape[0] == 0:
            raise GalleryError(f"{self.source} holds no references; add some with `wildcheck gallery add`")
        if len(shape) != 2 or shape[1] != h.embedding.size or shape[0] != n:
            raise GalleryError(f"{self.source}: embeddings of shape {shape}, expected ({n}, {h.embedding.size})")
        if not (len(self.label_idx) == len(self.hashes) == len(h.reference_ids) == len(h.sources) == n):
            raise GalleryError(f"{self.source}: references, labels, hashes and ids differ in number")
        if self.label_idx.min() < 0 or self.label_idx.max() >= len(h.labels):
            raise GalleryError(f"{self.source}: a reference has a label index outside {h.labels}")
        if set(h.thresholds) != set(h.labels):
            raise GalleryError(f"{self.source}: thresholds for {sorted(h.thresholds)} but labels {sorted(h.labels)}")
        if self._embeddings is not None:
            self._check_unit_length(self._embeddings)

    def _check_unit_length(self, embeddings: np.ndarray, rows: int = 65536) -> None:
        """Similarity is a dot product of L2-normalised embeddings: zero rows never match and long ones match
        everything (a gallery scaled by 1000 made every photo a duplicate). float16 storage keeps ~1e-3."""
        for start in range(0, len(embeddings), rows):
            part = embeddings[start:start + rows]
            norms = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float32))
            if not np.isfinite(norms).all():
                raise GalleryError(f"{self.source}: embeddings contain NaN or infinity")
            bad = np.flatnonzero(np.abs(norms - 1.0) > 0.01)
            if len(bad):
                raise GalleryError(f"{self.source}: reference {self.header.reference_ids[start + bad[0]]!r} has an "
                                   f"embedding of length {norms[bad[0]]:.3g}, not 1 (the file was edited or built "
                                   "by something else); rebuild it with `wildcheck gallery build`")

    def check_model(self, contract: ModelContract, served_as: str = "model") -> None:
        """``served_as``: "model" or "embedder" (served), or "--model" (the model given to ``gallery add``: the fix
        is to give the model the gallery was built with, never to rebuild it with this one)."""
        h = self.header
        if h.model_version != contract.model_version or h.contract_hash != contract_hash(contract):
            built_with_embedder = h.model_name.startswith("wildcheck-embedder")
            if served_as == "--model":
                made_by = ("the .onnx `wildcheck export-embedder` wrote" if built_with_embedder
                           else "the .onnx `wildcheck export` wrote")
                raise GalleryError(
                    f"{self.source} was built with model {h.model_name} {h.model_version} (contract "
                    f"{h.contract_hash[:12]}); --model is {contract.model_name} {contract.model_version} (contract "
                    f"{contract_hash(contract)[:12]}). Embeddings of different models cannot be compared: give --model "
                    f"the model the gallery was built with, {h.model_name} {h.model_version} ({made_by})")
            hint = (" or serve the embedder it was built with beside the classifier (--embedder EMBEDDER.onnx)"
                    if built_with_embedder and served_as == "model" else "")
            raise GalleryError(
                f"{self.source} was built with model {h.model_name} {h.model_version} (contract {h.contract_hash[:12]}); "
                f"the {served_as} loaded is {contract.model_name} {contract.model_version} (contract {contract_hash(contract)[:12]}). "
                f"Embeddings of different models cannot be compared: rebuild the gallery with this {served_as} "
                f"(`wildcheck gallery build REF --model MODEL.onnx --out GALLERY`){hint}"
            )

    # ---- edits ---------------------------------------------------------------------------------
    def add(self, embeddings: np.ndarray, labels: list[str], hashes: np.ndarray, ids: list[str], sources: list[str]) -> None:
        """Labels, ids and sources are stored ``printable``: a file name that is not UTF-8 as ``\\xNN`` escapes, the
        id ``gallery info`` shows and ``gallery remove`` takes."""
        labels, ids, sources = ([printable(t) for t in texts] for texts in (labels, ids, sources))
        taken = set(self.header.reference_ids)
        clash = sorted({i for i in ids if i in taken} | {i for i in ids if ids.count(i) > 1})
        if clash:
            raise GalleryError(f"reference ids already in {self.source} or repeated: {clash[:5]}; remove them first or give new ids")
        for label in labels:
            if label not in self.header.labels:
                self.header.labels.append(label)
        index = {label: i for i, label in enumerate(self.header.labels)}
        old, new = self.embeddings, np.asarray(embeddings, np.float32)
        merged = np.empty((len(old) + len(new), old.shape[1]), storage_dtype(len(old) + len(new), self.exact_max))
        merged[:len(old)], merged[len(old):] = old, new  # no float32 copy of a float16 gallery
        self.embeddings = merged
        self.label_idx = np.concatenate([self.label_idx, np.array([index[l] for l in labels], np.int32)])
        self.hashes = np.concatenate([self.hashes, np.asarray(hashes, np.uint64)])
        self.header.reference_ids += list(ids)
        self.header.sources += list(sources)
        self.resolve()

    def remove(self, reference_ids: list[str]) -> int:
        wanted = {printable(r) for r in reference_ids}  # an id typed with the name's own bytes, or as shown
        unknown = sorted(wanted - set(self.header.reference_ids))
        if unknown:
            raise GalleryError(f"no reference {unknown[:5]} in {self.source}; `wildcheck gallery info` lists them")
        keep = np.array([r not in wanted for r in self.header.reference_ids])
        if not keep.any():
            raise GalleryError(f"removing {len(wanted)} reference(s) would leave {self.source} empty; delete the file instead")
        self.embeddings, self.label_idx, self.hashes = self.embeddings[keep], self.label_idx[keep], self.hashes[keep]
        self.header.reference_ids = [r for r, k in zip(self.header.reference_ids, keep) if k]
        self.header.sources = [s for s, k in zip(self.header.sources, keep) if k]
        used = sorted(set(self.label_idx.tolist()))
        remap = np.full(len(self.header.labels), -1, np.int32)
        remap[used] = np.arange(len(used))
        self.header.labels = [self.header.labels[i] for i in used]
        self.label_idx = remap[self.label_idx]
        self.resolve()
        return int((~keep).sum())

    def resolve(self) -> None:
        """Re-solve every label's thresholds on the stored negatives (after add/remove), leaving out the negatives
        that are copies of a reference (``left_out``; their number kept in the header as ``negatives.left_out``)."""
        thresholds, self.left_out = solve_leaving_out_copies(
            self.embeddings, self.label_idx, self.header.labels, self.negatives, self.header.fpr, self.hashes,
            self.negative_hashes, self.negative_names)
        self.header.thresholds = thresholds
        self.header.negatives = {**self.header.negatives, "left_out": len(self.left_out)}
        self.thresholds = dict(self.header.thresholds)
        self._index = None
        self._groups = None

    # ---- search --------------------------------------------------------------------------------
    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            self._index = make_index(self.embeddings, self.exact_max)
        return self._index

    def match(self, views: np.ndarray, phash: int | list[int] | None = None, k: int = SEARCH_K) -> list[GalleryMatch]:
        """Up to ``MAX_MATCHES`` matches (one per label, duplicates first) for one image.

        ``views``: (n, d) embeddings of the same image (the whole picture, optionally tiles of it);
        ``phash``: the pHash of each view (or just the whole picture's). A view whose hash is ``flat``
        (``serving.phash.ViewHash``: blank, one colour) is not matched at all: every blank picture looks alike, to
        the hash and to the embedding, so a blank upload "duplicated" a blank reference.
        """
        views = np.atleast_2d(views)
        hashes = [] if phash is None else [phash] if isinstance(phash, int) else list(phash)
        flat = [bool(getattr(h, "flat", False)) for h in hashes]
        if any(flat):
            keep = [i for i in range(len(views)) if not (i < len(flat) and flat[i])]
            views, hashes = views[keep], [h for h, f in zip(hashes, flat) if not f]
            if not len(views):
                return []
        best = self._nearest(views, k)
        dist: dict[int, int] = {}
        limit = max(t.duplicate_hamming for t in self.thresholds.values())
        for h in hashes:
            bits = hamming(h, self.hashes)
            for i in np.nonzero(bits <= limit)[0].tolist():
                dist[i] = min(int(bits[i]), dist.get(i, 64))
        unseen = sorted(set(dist) - set(best))
        if unseen:  # pHash hits the search did not return: their similarity from the same stored vectors
            for i, s in zip(unseen, (views @ self.vectors(unseen).T).max(axis=0).tolist()):
                best[i] = float(s)
        per_label: dict[str, GalleryMatch] = {}
        for i, s in best.items():
            label = self.header.labels[self.label_idx[i]]
            rule = self.thresholds[label]
            near_copy = s >= rule.duplicate or (i in dist and 0 <= rule.duplicate_hamming and dist[i] <= rule.duplicate_hamming)
            if not near_copy and s < rule.similar:
                continue
            m = GalleryMatch(label=label, reference=self.header.reference_ids[i], similarity=round(s, 4),
                      kind="duplicate" if near_copy else "similar", hamming=dist.get(i))
            current = per_label.get(label)
            if current is None or (m.kind == "duplicate", m.similarity) > (current.kind == "duplicate", current.similarity):
                per_label[label] = m
        ranked = sorted(per_label.values(), key=lambda m: (m.kind != "duplicate", -m.similarity))
        return ranked[:MAX_MATCHES]

    def _label_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """References ordered by label, where each label's run starts, and its length (labels with references)."""
        if self._groups is None:
            order = np.argsort(self.label_idx, kind="stable")
            _, starts, counts = np.unique(self.label_idx[order], return_index=True, return_counts=True)
            self._groups = order, starts, counts
        return self._groups

    def _nearest(self, views: np.ndarray, k: int) -> dict[int, float]:
        """Candidate references and their best similarity over the views: every label's most similar reference
        (exact search), else the ``k`` nearest per view, more (up to ``SEARCH_K_MAX``) while the last of them could
        still match a label not among them. Before, the 16 nearest were all: 16 copies of one label's photo hid
        another label's match, even an exact copy of its reference."""
        index = self.index
        if isinstance(index, ExactIndex):  # one pass over every reference already: each label's best costs O(n)
            sims = index.similarities(views).max(axis=0)
            order, starts, counts = self._label_groups()
            ranked = sims[order]
            top = np.repeat(np.maximum.reduceat(ranked, starts), counts)
            first = np.flatnonzero(ranked >= top)
            _, pick = np.unique(np.repeat(np.arange(len(starts)), counts)[first], return_index=True)
            ids = order[first[pick]]
            return dict(zip(ids.tolist(), sims[ids].astype(float).tolist()))
        k = min(max(1, k), len(self))
        while True:
            sims, idx = index.search(views, k)
            best: dict[int, float] = {}
            for s_row, i_row in zip(sims, idx):
                for s, i in zip(s_row, i_row):
                    if i >= 0 and s > best.get(int(i), -np.inf):
                        best[int(i)] = float(s)
            seen = {self.header.labels[self.label_idx[i]] for i in best}
            floor = min((min(t.similar, t.duplicate) for label, t in self.thresholds.items() if label not in seen),
                        default=np.inf)  # the least similarity at which a label not among them could match
            if k >= min(SEARCH_K_MAX, len(self)) or not (sims[:, -1] >= floor).any():
                return best
            k = min(4 * k, SEARCH_K_MAX, len(self))

    def decide(self, matches: list[GalleryMatch]) -> tuple[str, list[str]]:
        """``block`` for a duplicate of a blocking label, else ``review`` for any match, else ``allow``."""
        blocking = [m for m in matches if m.kind == "duplicate" and self.thresholds[m.label].block]
        if blocking:
            return "block", [f"gallery:{m.label}" for m in blocking]
        if matches:
            return "review", [f"gallery:{m.label}" for m in matches]
        return "allow", []

    def apply_policy(self, overrides: dict) -> dict:
        """Policy YAML ``gallery:`` section: per label ``similar``, ``duplicate``, ``duplicate_hamming``, ``block``."""
        unknown = sorted(set(overrides) - set(self.header.labels))
        if unknown:
            raise GalleryError(f"policy names gallery labels {unknown} that {self.source} does not have; "
                               f"its labels: {self.header.labels}")
        for label, rule in overrides.items():
            values = {k: v for k, v in rule.model_dump().items() if v is not None}
            merged = self.thresholds[label].model_dump() | values
            merged["notes"] = list(merged["notes"]) + [f"policy: {sorted(values)}"]
            self.thresholds[label] = LabelThresholds.model_validate(merged)
        return {label: sorted(k for k, v in rule.model_dump().items() if v is not None) for label, rule in overrides.items()}

    def describe(self) -> dict:
        h = self.header
        counts = np.bincount(self.label_idx, minlength=len(h.labels))
        return {
            "source": self.source, "references": len(self), "labels": dict(zip(h.labels, counts.tolist())),
            "thresholds": {k: v.model_dump() for k, v in self.thresholds.items()},
            "model_name": h.model_name, "model_version": h.model_version, "contract_hash": h.contract_hash,
            "embedding": h.embedding.model_dump(), "fpr": h.fpr, "negatives": h.negatives,
            "search": self.index.describe(),
            "created_at": h.created_at, "updated_at": h.updated_at,
        }


def new_header(contract: ModelContract, fpr: float, negatives: dict, wildcheck_version: str = "") -> GalleryHeader:
    if contract.embedding is None:
        raise GalleryError(f"model {contract.model_name} {contract.model_version} has no embedding output; "
                           "re-export it with this wildcheck version (`wildcheck export`)")
    now = _now()
    return GalleryHeader(model_name=contract.model_name, model_version=contract.model_version,
                         contract_hash=contract_hash(contract), embedding=contract.embedding, labels=[],
                         reference_ids=[], sources=[], thresholds={}, fpr=fpr, negatives=negatives,
                         created_at=now, updated_at=now, wildcheck_version=wildcheck_version)
