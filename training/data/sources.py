"""Find labelled images: ``ROOT/<split>/<label>/<image>``, ``ROOT/<label>/<image>`` or a CSV manifest.

Several roots combine: samples are concatenated and labels united per split, so Met ivory plus a folder
of generic product photos labelled ``other`` is one training set.
"""

from __future__ import annotations

import hashlib
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from serving.csvio import read_rows
from serving.errors import InvalidInput, MissingInput
from serving.imageio import IMAGE_EXTENSIONS, files_under, images_under, is_image_file, label_folders

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
    """A manifest's rows. An empty split is ``train`` as soon as any row names a split, whatever ``default_split``
    the command passes (as a root with split folders ignores it): before, ``evaluate --split test`` took the
    unsplit rows, which training had used, for test images. A manifest without any split takes the default."""
    samples, bad_splits, backslashed = [], [], []
    rows, _ = read_rows(csv_path, {"path", "label"}, "a manifest needs at least the columns path,label (and optionally split)")
    for line_no, row in enumerate(rows, start=2):
        if not row.get("path") or not (row.get("label") or "").strip():  # a label of spaces was the label ''
            raise InvalidInput(f"{csv_path}:{line_no}: empty path or label")
        path = Path(row["path"])
        if not path.is_absolute():
            path = csv_path.parent / path
        if "\\" in row["path"] and not path.exists():
            backslashed.append(f"line {line_no}: {row['path']!r}")
        split = (row.get("split") or "").strip()
        if split and split not in KNOWN_SPLITS:
            bad_splits.append(f"line {line_no}: {split!r}")
        source = (row.get("source") or "").strip()
        samples.append(Sample(path, row["label"].strip(), split, source))
    _check_splits(csv_path, bad_splits)
    if backslashed:  # a Windows export: every row failed on its own with "No such file", saying nothing of why
        raise InvalidInput(f"{csv_path}: {len(backslashed)} path(s) with backslashes name no file: "
                           + "; ".join(backslashed[:10]) + ". Manifest paths use forward slashes on every system "
                           "(train/ivory/a.jpg, /data/a.jpg): replace the backslashes in the path column and run again.")
    fill = "train" if any(s.split for s in samples) else default_split
    return [s if s.split else replace(s, split=fill) for s in samples]


def _check_splits(csv_path: Path, bad_splits: list[str]) -> None:
    """A misspelt split (``vali``) would otherwise leave its images out of both training and validation, silently."""
    if bad_splits:
        raise InvalidInput(f"{csv_path}: {len(bad_splits)} row(s) with an unknown split: " + "; ".join(bad_splits[:10])
                           + f". A split must be one of {', '.join(KNOWN_SPLITS)} (or empty: train, or the command's "
                           "default when no row names a split); fix the split column and run again.")


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
    """Combine several roots. A root without split folders (a manifest without any split) counts as ``default_split``."""
    samples: list[Sample] = []
    seen: set[Path] = set()
    for root in roots:
        if Path(root).resolve() in seen:  # ``--data d --data ./d/``: each image once, not twice
            continue
        seen.add(Path(root).resolve())
        found = discover(root, default_split)
        if not found:
            raise InvalidInput(f"no images found under {root}; expected ROOT/<split>/<label>/<image> or ROOT/<label>/<image>")
        samples += found
    return samples


def overlooked(root: str | Path) -> list[dict]:
    """What ``discover`` leaves out of ``root`` although it looks meant as data: folders beside the split folders
    (``Test/``, ``ivory/`` next to ``train/``), images outside any label folder, files whose names are not an
    image's (``.jfif``, no extension, a trailing space), label folders without an image, and images under a
    ``manifest.csv``'s folder that it does not list. No command reads them, and none said so: ``data check``
    reports them (each ``{path, code, count, examples, message}``); what trains does not change."""
    root = Path(root)
    if root.is_file():
        return _not_in_manifest(root) if root.name in MANIFEST_NAMES else []
    if not root.is_dir():
        return []
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return _not_in_manifest(root / name)
    found: list[dict] = []
    split_dirs = [root / s for s in KNOWN_SPLITS if (root / s).is_dir()]
    for folder in label_folders(root) if split_dirs else []:
        images = images_under(folder) if folder.name not in KNOWN_SPLITS else []
        if images:
            hint = (f"rename it to {folder.name.lower()}/" if folder.name.lower() in KNOWN_SPLITS else
                    "move its label folders under train/, val/ or test/, or pass it as a root of its own")
            found.append(_item(folder, "ignored_folder", images, f"a folder beside the split folders "
                               f"({', '.join(d.name for d in split_dirs)}): its images are not read; {hint}"))
    for parent in [root] + split_dirs:
        loose = sorted(p for p in parent.iterdir() if is_image_file(p))
        if loose:
            found.append(_item(parent, "loose_images", loose, "images outside any label folder are not read: move "
                               f"them into {parent.name}/<label>/"))
    for parent in split_dirs or [root]:
        for label_dir in label_folders(parent):
            files = files_under(label_dir)
            others = [f for f in files if not is_image_file(f)]
            if len(others) == len(files):
                found.append(_item(label_dir, "empty_label", [], "a label folder without any image: the label is "
                                   "in no count and trains nothing; add its images, or remove the folder"))
            if others:
                found.append(_item(label_dir, "not_an_image_name", others, "files whose names do not end in an "
                                   f"image extension are not read ({'; '.join(map(_why_unlisted, others[:5]))}); "
                                   f"rename the images among them to end in one of {', '.join(sorted(IMAGE_EXTENSIONS))} "
                                   "(.jfif is a JPEG: .jpg)", named=False))
    return found


def _why_unlisted(path: Path) -> str:
    if path.name != path.name.rstrip():
        return f"{path.name!r} ends with a space"
    return f"{path.name!r}: {f'extension {path.suffix}' if path.suffix else 'no extension'}"


def _not_in_manifest(csv_path: Path) -> list[dict]:
    """Images copied into a manifest's folder after ``data ingest`` wrote it: the manifest alone says what is read."""
    listed = {s.path.resolve() for s in _read_manifest(csv_path, "train")}
    missing = [p for p in images_under(csv_path.parent) if p.resolve() not in listed]
    if not missing:
        return []
    return [_item(csv_path.parent, "not_in_manifest", missing, f"images {csv_path.name} does not list are not read "
                  f"(a folder with a {csv_path.name} is read from it alone): add them with wildcheck data ingest "
                  f"LABELS.csv --into {csv_path.parent} (a CSV path,label naming them), or as rows of {csv_path.name}")]


def _item(path: Path, code: str, files: list[Path], message: str, shown: int = 5, named: bool = True) -> dict:
    examples = [str(f.relative_to(path)) if f.is_relative_to(path) else str(f) for f in files[:shown]]
    count = f"{len(files)} file(s)" + (f", e.g. {', '.join(map(repr, examples))}" if named else "") if files else ""
    return {"path": str(path), "code": code, "count": len(files), "examples": examples,
            "message": f"{count}: {message}" if count else message}


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    return [s for s in samples if s.split == split]


def label_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for s in samples:
        out.setdefault(s.split, Counter())[s.label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(out.items())}


FINGERPRINT_METHOD = "content"  # training_data["method"]: each image's bytes are hashed (absent: names and sizes only)


def _file_stamp(path: Path, content: bool) -> str:
    try:
        if not content:
            return f"{path.stat().st_size}"
        if not stat.S_ISREG(path.stat().st_mode):  # a device or pipe listed in a manifest: never read (a pipe hung)
            return "missing"
        h, size = hashlib.sha256(), 0
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        return f"{size}\t{h.hexdigest()}"
    except OSError:
        return "missing"


def name_bytes(text: str) -> bytes:
    """``text`` as UTF-8, with a file or folder name that is not UTF-8 (``os.fsdecode``'s surrogates) as its own
    bytes, as ``os.fsencode`` gives them: the same bytes as ``str.encode()`` for every UTF-8 name (fingerprints and
    seeds recorded before are unchanged), where that raised UnicodeEncodeError after all the caching."""
    return text.encode("utf-8", "surrogateescape")


def fingerprint(samples: list[Sample], content: bool = True, workers: int = 4) -> dict:
    """A hash of the sorted (split, label, file name, size, sha256 of the bytes) list: identifies the training data
    in the model contract, and lets ``--resume`` refuse other data. The folder is left out, so the same files
    moved elsewhere are the same data; a file replaced by another one of the same size is not (a hash of names
    and sizes alone took it). ``method`` says so; ``content=False`` is that older hash, which last.pt files
    written before recorded (without a ``method``), for resuming them. The bytes are read once more per run
    (``workers`` threads); the cache has just read them, so they are usually in the page cache."""
    ordered = sorted(samples, key=lambda s: (s.split, s.label, str(s.path)))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        stamps = list(pool.map(lambda s: _file_stamp(s.path, content), ordered))
    h = hashlib.sha256()
    for s, stamp in zip(ordered, stamps):
        h.update(name_bytes(f"{s.split}\t{s.label}\t{s.path.name}\t{stamp}\n"))
    out = {"sha256": h.hexdigest(), "counts": label_counts(samples)}
    if content:
        out["method"] = FINGERPRINT_METHOD
    return out
