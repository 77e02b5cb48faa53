"""Find labelled images: ``ROOT/<split>/<label>/<image>``, ``ROOT/<label>/<image>`` or a CSV manifest.

Several roots combine: samples are concatenated and labels united per split, so Met ivory plus a folder
of generic product photos labelled ``other`` is one training set.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from serving.errors import InvalidInput, MissingInput
from serving.imageio import images_under, label_folders

KNOWN_SPLITS = ("train", "val", "test")
MANIFEST_NAMES = ("manifest.csv",)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str
    source: str = ""  # first folder under the label (ROOT/<label>/<source>/...) or a manifest's `source` column
    pool: str = ""  # the root it came from (its folder name): negatives pools are weighted and reported by it

    @property
    def origin(self) -> str:
        """``pool/source`` (or the pool alone): where a false positive came from."""
        return f"{self.pool}/{self.source}" if self.source else self.pool


def _scan_label_dirs(folder: Path, split: str) -> list[Sample]:
    samples = []
    for label_dir in label_folders(folder):
        for path in images_under(label_dir):
            parts = path.relative_to(label_dir).parts
            samples.append(Sample(path, label_dir.name, split, parts[0] if len(parts) > 1 else ""))
    return samples


def _read_manifest(csv_path: Path, default_split: str) -> list[Sample]:
    samples, bad_splits = [], []
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise InvalidInput(f"{csv_path}: a manifest needs at least the columns path,label (and optionally split)")
        for line_no, row in enumerate(reader, start=2):
            if not row.get("path") or not row.get("label"):
                raise InvalidInput(f"{csv_path}:{line_no}: empty path or label")
            path = Path(row["path"])
            if not path.is_absolute():
                path = csv_path.parent / path
            split = (row.get("split") or "").strip()
            if split and split not in KNOWN_SPLITS:
                bad_splits.append(f"line {line_no}: {split!r}")
            source = (row.get("source") or "").strip()
            samples.append(Sample(path, row["label"].strip(), split or default_split, source))
    _check_splits(csv_path, bad_splits)
    return samples


def _check_splits(csv_path: Path, bad_splits: list[str]) -> None:
    """A misspelt split (``vali``) would otherwise leave its images out of both training and validation, silently."""
    if bad_splits:
        raise InvalidInput(f"{csv_path}: {len(bad_splits)} row(s) with an unknown split: " + "; ".join(bad_splits[:10])
                           + f". A split must be one of {', '.join(KNOWN_SPLITS)} (or empty for the default); "
                           "fix the split column and run again.")


def pool_name(root: str | Path) -> str:
    """A root's name in reports and ``negative_weights``: its folder name (a manifest: its file stem, or its
    folder's name for ``manifest.csv``)."""
    root = Path(root).resolve()
    if root.suffix.lower() == ".csv":
        return root.parent.name if root.name in MANIFEST_NAMES else root.stem
    return root.name


def discover(root: str | Path, default_split: str = "train") -> list[Sample]:
    """All labelled images under one root (folder layout or CSV manifest), tagged with the root's pool name."""
    pool = pool_name(root)
    return [replace(s, pool=pool) for s in _discover(Path(root), default_split)]


def _discover(root: Path, default_split: str) -> list[Sample]:
    if root.is_file() and root.suffix.lower() == ".csv":
        return _read_manifest(root, default_split)
    if not root.is_dir():
        raise MissingInput(f"dataset {root} not found (expected a folder or a CSV manifest)")
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return _read_manifest(root / name, default_split)
    split_dirs = [root / s for s in KNOWN_SPLITS if (root / s).is_dir()]
    if split_dirs:
        samples = []
        for split_dir in split_dirs:
            samples += _scan_label_dirs(split_dir, split_dir.name)
        return samples
    return _scan_label_dirs(root, default_split)


def load_samples(roots: list[str | Path] | tuple[str | Path, ...], default_split: str = "train") -> list[Sample]:
    """Combine several roots. A root without split folders counts as ``default_split``."""
    samples: list[Sample] = []
    for root in roots:
        found = discover(root, default_split)
        if not found:
            raise InvalidInput(f"no images found under {root}; expected ROOT/<split>/<label>/<image> or ROOT/<label>/<image>")
        samples += found
    return samples


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    return [s for s in samples if s.split == split]


def label_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for s in samples:
        out.setdefault(s.split, Counter())[s.label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(out.items())}


def fingerprint(samples: list[Sample]) -> dict:
    """A hash of the (path, label, split, size, mtime) list: identifies the training data in the model contract."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.split, s.label, str(s.path))):
        try:
            st = s.path.stat()
            stamp = f"{st.st_size}"
        except OSError:
            stamp = "missing"
        h.update(f"{s.split}\t{s.label}\t{s.path.name}\t{stamp}\n".encode())
    return {"sha256": h.hexdigest(), "counts": label_counts(samples)}
