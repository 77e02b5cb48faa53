"""``wildcheck data ingest``: add moderators' labelled images to a dataset, with provenance.

Images are copied under content-addressed names (``ROOT/<split>/<label>/<sha256[:20]>.<ext>``) and
``ROOT/manifest.csv`` records every image's provenance (it is written only when an image was added). Exact
and near-duplicates of images already in the dataset are skipped and reported; an image already labelled
differently is a *conflict*: the ingest stops and writes nothing. The manifest is replaced atomically, last: a
crash leaves at most unreferenced copies, never a half-written dataset. A folder dataset (no manifest yet) gets a
manifest of what it holds before anything is copied: copies an interrupted ingest left in its folders would
otherwise be read as data without provenance (and a rerun skip them as duplicates), and a ``ROOT/<label>/`` dataset's
own images be hidden behind the new ``ROOT/train/``. One ingest at a time per dataset (``manifest.csv.lock``): two
at once would each rewrite the manifest without the other's rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from serving.csvio import read_rows
from serving.errors import InvalidInput, MissingInput, WildcheckError
from serving.imageio import DEFAULT_MAX_DECODE_BYTES, FORMATS, ImageError, decode_image, is_image_file, size_text
from serving.locking import exclusive
from training.data.neardup import NEAR_DISTANCE, HashIndex, image_hash
from training.data.sources import KNOWN_SPLITS, discover
from training.fileio import atomic_write_text
from training.outputs import out_folder

MANIFEST_FIELDS = ["path", "label", "split", "sha256", "phash", "source", "listing_id", "labeled_by", "labeled_at",
                   "ingested_at"]
PROVENANCE = ("source", "listing_id", "labeled_by", "labeled_at")
# A label becomes a folder name: nothing that can climb out of ROOT/split (.., /), hide (.x) or run in a
# spreadsheet (=1+1). Checked for every row before anything is copied.
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LABEL_RULE = "labels must match [A-Za-z0-9][A-Za-z0-9_-]* (at most 64 characters)"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# a file larger than the decoder would accept decoded is no photo (a video, a disk image): not read into memory
MAX_SOURCE_BYTES = DEFAULT_MAX_DECODE_BYTES


def spreadsheet_safe(value: str) -> str:
    """A value Excel/Sheets would run as a formula gets a leading apostrophe (OWASP CSV injection advice)."""
    return "'" + value if value.startswith(FORMULA_START) else value


class IngestConflict(WildcheckError, ValueError):
    """Labels disagree with what the dataset (or the CSV itself) already says; nothing was written."""

    exit_code = 1

    def __init__(self, conflicts: list[dict], report: dict):
        super().__init__(f"{len(conflicts)} conflict(s): " + "; ".join(c["message"] for c in conflicts[:5]))
        self.conflicts = conflicts
        self.report = report


@dataclass
class IngestReport:
    added: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    new_labels: list[str] = field(default_factory=list)
    dataset_unreadable: list[dict] = field(default_factory=list)  # images already there that could not be hashed

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("added", "duplicates", "near_duplicates", "unreadable", "conflicts",
                                              "new_labels", "dataset_unreadable")}


def read_source(path: Path) -> bytes:
    """The bytes of a regular file no larger than ``MAX_SOURCE_BYTES``; anything else is an OSError saying why: a
    device (``/dev/zero``) was read until memory ran out, a named pipe hung the ingest."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError("not a file (a folder, device, pipe or socket): list image files only")
    if info.st_size > MAX_SOURCE_BYTES:
        raise OSError(f"{size_text(info.st_size)}, over the {size_text(MAX_SOURCE_BYTES)} any image could be: "
                      "not a photo")
    return path.read_bytes()


def _fingerprint(data: bytes) -> tuple[str, str]:
    return _decode_fingerprint(data)[:2]


def _decode_fingerprint(data: bytes) -> tuple[str, str, str]:
    """sha256, perceptual hash and the format the bytes really are."""
    img, info = decode_image(data, min_side=1)
    return hashlib.sha256(data).hexdigest(), image_hash(img), info.format


def _check_labels(rows: list[dict], labels_csv: Path) -> None:
    """Every label is a safe folder name, or nothing is ingested."""
    bad = []
    for line, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip()
        if label and not LABEL_RE.fullmatch(label):
            shown = label if len(label) <= 40 else label[:40] + "..."
            bad.append(f"line {line}: {shown!r}")
    if bad:
        raise InvalidInput(f"{labels_csv}: {len(bad)} label(s) not allowed ({LABEL_RULE}): " + "; ".join(bad[:10])
                         + ". Nothing was ingested.")


def _hash_existing(root: Path, row: dict, where: str, unreadable: list[dict]) -> dict:
    """Fill in a dataset row's sha256/phash so a new image can be matched against it; a file that cannot be read
    or decoded is reported (its duplicates cannot be found), not fatal: the ingest adds images, it does not repair."""
    path = root / row["path"]
    try:
        data = read_source(path)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["phash"] = _fingerprint(data)[1]
    except (OSError, ImageError) as exc:
        unreadable.append({"where": where, "path": str(path), "reason": getattr(exc, "message", str(exc))})
    return row


def _load_manifest(root: Path, unreadable: list[dict]) -> tuple[list[dict], list[str]]:
    """The dataset's rows and the manifest's columns beyond MANIFEST_FIELDS (kept on rewrite). A plain
    ``path,label,split`` manifest or a folder dataset without one has no hashes: they are computed here, or
    duplicates and conflicts with those images would go unnoticed."""
    manifest = root / "manifest.csv"
    if manifest.exists():
        rows, header = read_rows(manifest, {"path", "label"}, "a manifest needs at least the columns path,label; fix "
                                 "its header and run again. Nothing was ingested.")
        extra = [f for f in header if f not in MANIFEST_FIELDS]
        for line, row in enumerate(rows, start=2):
            if not (row.get("sha256") and row.get("phash")):
                _hash_existing(root, row, f"manifest.csv line {line}", unreadable)
        return rows, extra
    rows = []
    if root.exists():
        for s in discover(root):
            row = {"path": str(s.path.relative_to(root)), "label": s.label, "split": s.split, "source": "existing"}
            rows.append(_hash_existing(root, row, "dataset", unreadable))
    return rows, []


def ingest(labels_csv: str | Path, root: str | Path, split: str = "train", near_distance: int = NEAR_DISTANCE) -> dict:
    """Validate everything first, then copy and rewrite the manifest. Raises IngestConflict on conflicts.

    A new image within ``near_distance`` pHash bits of one already there (or earlier in the CSV) is a near-duplicate.
    """
    root, labels_csv = Path(root), Path(labels_csv)
    if split not in ("train", "val", "test"):
        raise InvalidInput(f"split must be train, val or test, not {split!r}")
    if not labels_csv.is_file():
        raise MissingInput(f"{labels_csv} not found: give the CSV of labelled images (path,label,...)")
    out_folder(root, option="--into", what="dataset folder")
    _check_dataset_root(root, split)
    with _one_ingest(root):
        return _ingest(labels_csv, root, split, near_distance)


def _is_dataset_root(folder: Path) -> bool:
    """A folder a dataset is read from with splits: it holds a manifest or a split folder (train/, val/, test/)."""
    return folder.is_dir() and ((folder / "manifest.csv").is_file() or
                                any((folder / s).is_dir() for s in KNOWN_SPLITS))


def _check_dataset_root(root: Path, split: str) -> None:
    """``--into`` is a dataset's root, not one of its split folders (``ds/train``) or label folders
    (``ds/train/ivory``): the ingest then wrote ``ds/train/manifest.csv`` and ``ds/train/train/ivory/...``, compared
    the new images with that folder alone, and the next ``train --data ds`` learnt a class ``train``."""
    if _is_dataset_root(root):
        return
    full = root.absolute()
    if full.name in KNOWN_SPLITS and _is_dataset_root(full.parent):
        what, dataset = f"the {full.name} split folder", root.parent
        harm = f"training on {dataset} would read {full.name!r} as a label"
    elif (full.parent.name in KNOWN_SPLITS and _is_dataset_root(full.parent.parent) and full.is_dir()
          and any(is_image_file(p) for p in full.iterdir())):
        what, dataset = f"a label folder of the {full.parent.name} split", root.parent.parent
        harm = f"training on {dataset} would not read them as {full.name!r} images"
    else:
        return
    raise InvalidInput(f"--into {root} is {what} of the dataset {dataset}: the ingest would check duplicates against "
                       f"that folder alone and write a manifest and a {split}/<label>/ tree inside it, and {harm}. "
                       f"Give the dataset root: --into {dataset} --split {split} (the CSV's label column names the label "
                       "folders). Nothing was ingested.")


@contextmanager
def _one_ingest(root: Path):
    """Hold ``ROOT/manifest.csv.lock`` from reading the dataset to writing its manifest. An ingest that wrote no
    manifest leaves no lock, nor the folders it made for it (an ingest of duplicates only changes nothing)."""
    made = [p for p in (root, *root.absolute().parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "manifest.csv.lock"
    had_lock = lock.exists()
    try:
        with exclusive(root / "manifest.csv", "data ingest", "wait for it to finish, then run this ingest again"):
            yield
    finally:
        if not (root / "manifest.csv").exists():
            if not had_lock:
                lock.unlink(missing_ok=True)
            for folder in made:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break


def _write_manifest(root: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) or "" for k in columns})
    atomic_write_text(root / "manifest.csv", buf.getvalue())


def _ingest(labels_csv: Path, root: Path, split: str, near_distance: int) -> dict:
    report = IngestReport()
    existing, extra_columns = _load_manifest(root, report.dataset_unreadable)
    by_sha = {r["sha256"]: r for r in existing if r.get("sha256")}
    hashed = [r for r in existing if r.get("phash")]
    known = HashIndex((r["phash"] for r in hashed), near_distance)  # built once; each row is one numpy search
    known_labels = {r["label"] for r in existing}
    staged: list[tuple[bytes, dict]] = []
    rows, _ = read_rows(labels_csv, {"path", "label"}, "needs columns path,label[,source,listing_id,labeled_by,labeled_at]")
    _check_labels(rows, labels_csv)
    split_dir = (root / split).resolve()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for line, row in enumerate(rows, start=2):
        src = Path(row["path"])
        src = src if src.is_absolute() else labels_csv.parent / src
        label = (row.get("label") or "").strip()
        if not label:
            report.unreadable.append({"line": line, "path": str(src), "reason": "empty label"})
            continue
        try:
            data = read_source(src)
            sha, ph, fmt = _decode_fingerprint(data)
        except (OSError, ImageError) as exc:
            report.unreadable.append({"line": line, "path": str(src), "reason": getattr(exc, "message", str(exc))})
            continue
        prior = by_sha.get(sha)
        hit = None if prior else known.first_within(ph)
        near = hashed[hit[0]] if hit else None
        match, kind, verb = (prior, "duplicates", "is") if prior else (near, "near_duplicates", "looks like")
        if match is not None:  # the same picture again: skip it, or stop when its label disagrees
            if match["label"] != label:
                report.conflicts.append({"line": line, "path": str(src), "sha256": sha, "message":
                                         f"{src.name} {verb} {match['path']} labelled {match['label']!r}, CSV says {label!r}"})
            else:
                getattr(report, kind).append({"line": line, "path": str(src), "same_as": match["path"]})
            continue
        extension = FORMATS[fmt].extensions[0] if fmt in FORMATS else ".img"  # the format decoded, not the name
        dest = f"{split}/{label}/{sha[:20]}{extension}"
        if not (root / dest).resolve().is_relative_to(split_dir):  # belt and braces after LABEL_RE
            raise InvalidInput(f"line {line}: {dest} would be written outside {split_dir}. Nothing was ingested.")
        entry = {"path": dest, "label": label, "split": split, "sha256": sha, "phash": ph,
                 **{k: spreadsheet_safe(row.get(k) or "") for k in PROVENANCE}, "ingested_at": now}
        entry["source"] = entry["source"] or spreadsheet_safe(labels_csv.name)
        by_sha[sha] = entry  # later rows of the same CSV see this one
        known.add(ph)
        hashed.append(entry)
        staged.append((data, entry))
        report.added.append({"line": line, "path": str(src), "to": dest, "label": label})
        if label not in known_labels:
            known_labels.add(label)
            report.new_labels.append(label)
    if report.conflicts:
        raise IngestConflict(report.conflicts, report.as_dict())
    if not staged:  # nothing new: a folder dataset must not become a manifest one (which reads nothing added later)
        return report.as_dict()
    columns = MANIFEST_FIELDS + extra_columns  # a manifest's own columns (notes, ...) are provenance too
    if not (root / "manifest.csv").exists():  # a folder dataset: what it holds now, before any copy lands in it
        _write_manifest(root, existing, columns)
    for data, entry in staged:  # content-addressed: rewriting the same bytes is harmless
        target = root / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    _write_manifest(root, existing + [e for _, e in staged], columns)
    return report.as_dict()


def format_ingest(report: dict) -> str:
    lines = [f"added {len(report['added'])}, duplicates {len(report['duplicates'])}, near-duplicates "
             f"{len(report['near_duplicates'])}, unreadable {len(report['unreadable'])}, conflicts {len(report['conflicts'])}"]
    if report["new_labels"]:
        lines.append(f"NEW LABELS: {', '.join(report['new_labels'])} (a model must be retrained to know them)")
    if not report["added"] and not report["conflicts"]:
        lines.append("nothing added: the dataset and its manifest were left as they were")
    for kind, one in (("duplicates", "duplicate"), ("near_duplicates", "near-duplicate"), ("unreadable", "unreadable"),
                      ("conflicts", "conflict")):
        for item in report[kind][:20]:
            detail = item.get("same_as") or item.get("reason") or item.get("message")
            lines.append(f"  {one}: line {item['line']} {item['path']}: {detail}")
    if report.get("dataset_unreadable"):
        lines.append(f"DATASET IMAGES UNREADABLE: {len(report['dataset_unreadable'])}: copies of them cannot be "
                     "recognised; run wildcheck data check on the dataset and fix or remove them")
        for item in report["dataset_unreadable"][:20]:
            lines.append(f"  {item['where']} {item['path']}: {item['reason']}")
    return "\n".join(lines)

