"""``wildcheck data check``: find what would silently spoil a training run before it starts.

Errors (exit 1): unreadable / zero-byte / truncated / unsupported files, the same bytes under two labels,
and exact duplicates shared between splits (leakage inflates validation numbers).
Warnings: images too small, near-duplicates (perceptual hash) across splits or within a split (and whether their
labels differ), files and folders no command reads (``sources.overlooked``: ``Test/`` beside ``train/``, ``.jfif``
names, empty label folders, images a manifest does not list).
Notes: unusual but handled encodings (CMYK, 16-bit, palette, alpha, EXIF rotation, animation).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from serving.errors import printable
from serving.imageio import FORMATS, IMAGE_EXTENSIONS, ImageError, decode_image
from training.data.ingest import read_source
from training.data.neardup import NEAR_DISTANCE, image_hash, near_pairs
from training.data.sources import Sample, label_counts, load_samples, overlooked

# near-duplicate pairs listed at most: a distance where unrelated photos match (--near-distance 32) pairs nearly
# every image with every other, millions of entries and gigabytes of report for a few thousand images
MAX_NEAR_PAIRS = 50_000

UNUSUAL_MODES = {
    "CMYK": "CMYK colour (converted to RGB)",
    "I;16": "16-bit grayscale (scaled to 8 bits)",
    "I;16B": "16-bit grayscale (scaled to 8 bits)",
    "I;16L": "16-bit grayscale (scaled to 8 bits)",
    "I": "32-bit integer pixels (scaled to 8 bits)",
    "P": "palette image (converted to RGB)",
    "RGBA": "alpha channel (composited on white)",
    "LA": "alpha channel (composited on white)",
    "PA": "alpha channel (composited on white)",
    "L": "grayscale (converted to RGB)",
}


@dataclass
class FileResult:
    path: str
    split: str
    label: str
    bytes: int
    sha256: str | None = None
    phash: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: dict | None = None
    notes: list[str] = field(default_factory=list)


def _inspect(sample: Sample, min_side: int) -> FileResult:
    path = sample.path
    try:  # a regular file of at most 256 MiB: a pipe a manifest lists hung the check, /dev/zero filled memory
        data = read_source(path)
    except OSError as exc:
        return FileResult(str(path), sample.split, sample.label, 0, error={"code": "unreadable", "message": str(exc)})
    result = FileResult(str(path), sample.split, sample.label, len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data:
        result.error = {"code": "empty", "message": "zero-byte file"}
        return result
    try:
        img, info = decode_image(data, min_side=1)
    except ImageError as exc:
        result.error = {"code": exc.code, "message": exc.message}
        return result
    result.width, result.height, result.format = info.width, info.height, info.format
    if info.mode in UNUSUAL_MODES:
        result.notes.append(f"mode {info.mode}: {UNUSUAL_MODES[info.mode]}")
    if info.exif_rotated:
        result.notes.append("EXIF orientation applied (pixels stored rotated)")
    if info.frames > 1:
        result.notes.append(f"animated ({info.frames} frames; the first is used)")
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS and suffix not in (FORMATS[info.format].extensions if info.format in FORMATS else ()):
        result.notes.append(f"file extension {suffix} but the content is {info.format}")
    if min(info.width, info.height) < min_side:
        result.notes.append(f"too small: {info.width}x{info.height} (shorter side < {min_side} px)")
    result.phash = image_hash(img)
    return result


def content_hashes(samples: list[Sample], workers: int = 4) -> list[str | None]:
    """The sha256 of each sample's bytes, as ``data check`` hashes them (None: a file that cannot be read, which
    the command reading it reports)."""
    def sha(sample: Sample) -> str | None:
        try:
            return hashlib.sha256(read_source(sample.path)).hexdigest()
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(sha, samples))


def exact_duplicates(files: list, hashes: list[str | None]) -> list[dict]:
    """Groups of files with the same bytes (``hashes[i]`` is ``files[i]``'s sha256; None is left out), each
    ``{sha256, paths, splits, labels, cross_split, label_conflict}``: the same picture in two splits leaks training
    images into validation or test, under two labels it teaches both. ``files``: anything with ``path``, ``split``
    and ``label`` (a ``Sample``, a ``FileResult``). ``data check`` reports them; ``train`` warns of them."""
    by_sha: dict[str, list] = defaultdict(list)
    for f, sha in zip(files, hashes):
        if sha:
            by_sha[sha].append(f)
    exact = []
    for sha, group in by_sha.items():
        if len(group) < 2:
            continue
        splits, labels = sorted({g.split for g in group}), sorted({g.label for g in group})
        exact.append({"sha256": sha, "paths": [str(g.path) for g in group], "splits": splits, "labels": labels,
                      "cross_split": len(splits) > 1, "label_conflict": len(labels) > 1})
    return exact


def check_dataset(
    roots: list[str | Path], min_side: int = 32, near_distance: int = NEAR_DISTANCE, workers: int = 2
) -> dict:
    """Inspect every image under ``roots``; return the JSON-able report."""
    samples = load_samples(roots)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda s: _inspect(s, min_side), samples), total=len(samples),
                            desc="checking", unit="img", leave=False))
    errors, warnings, notes = [], [], []
    for r in results:
        if r.error:
            errors.append({"path": r.path, "split": r.split, "label": r.label, **r.error})
        for note in r.notes:
            target = warnings if note.startswith(("too small", "file extension")) else notes
            target.append({"path": r.path, "split": r.split, "message": note})

    by_sha: dict[str, list[FileResult]] = defaultdict(list)
    for r in results:
        if r.sha256 and not r.error:
            by_sha[r.sha256].append(r)
    exact = exact_duplicates(results, [None if r.error else r.sha256 for r in results])
    for entry in exact:
        labels, splits = entry["labels"], entry["splits"]
        if entry["label_conflict"]:
            errors.append({"path": entry["paths"][0], "code": "label_conflict",
                           "message": f"identical files labelled {labels}: {entry['paths']}"})
        if entry["cross_split"]:
            errors.append({"path": entry["paths"][0], "code": "leakage",
                           "message": f"identical files in splits {splits}: {entry['paths']}"})

    # one picture per content: exact copies are reported above, and pairing each copy with each copy of a near
    # picture made the pairs grow with the square of the copies (4,000 copies of a placeholder: 8 million pairs)
    hashed = [group[0] for group in by_sha.values() if group[0].phash]
    near = []
    pairs = near_pairs([r.phash for r in hashed], near_distance, limit=MAX_NEAR_PAIRS + 1)
    truncated = len(pairs) > MAX_NEAR_PAIRS
    if truncated:
        warnings.append({"path": ", ".join(str(r) for r in roots), "code": "near_duplicates_truncated",
                         "message": f"more than {MAX_NEAR_PAIRS:,} near-duplicate pairs at phash distance "
                                    f"{near_distance}: only the first {MAX_NEAR_PAIRS:,} are listed and counted. At "
                                    "that distance unrelated photos match (they differ in about 32 bits): check again "
                                    f"with a lower --near-distance (default {NEAR_DISTANCE})"})
    for i, j, dist in pairs[:MAX_NEAR_PAIRS]:
        a, b = hashed[i], hashed[j]
        group = by_sha[a.sha256] + by_sha[b.sha256]
        splits, labels = sorted({g.split for g in group}), sorted({g.label for g in group})
        entry = {"paths": [a.path, b.path], "splits": splits, "labels": labels,
                 "distance": dist, "cross_split": len(splits) > 1, "label_conflict": len(labels) > 1}
        if len(group) > 2:
            entry["copies"] = len(group) - 2
        near.append(entry)
        kind = "near-duplicate across splits (possible leakage)" if entry["cross_split"] else "near-duplicate"
        named = (f"{a.label!r} here and {b.label!r} there" if a.label != b.label else f"{labels} among its copies")
        conflict = (f"; labelled {named}: the same picture under two labels is a label conflict (data ingest "
                    "refuses it): fix one label or remove one copy") if entry["label_conflict"] else ""
        copies = (f"; with {len(group) - 2} exact copies of the two (exact_duplicates)" if len(group) > 2 else "")
        warnings.append({"path": a.path, "split": a.split,
                         "message": f"{kind} of {b.path} (phash distance {dist}){conflict}{copies}"})

    # a root given twice (`d ./d/`) is read once (load_samples), so its unread files are counted once too
    once: dict[Path, str | Path] = {}
    for root in roots:
        once.setdefault(Path(root).resolve(), root)
    unread = [item for root in once.values() for item in overlooked(root)]
    warnings += [{"path": item["path"], "code": item["code"], "message": item["message"]} for item in unread]
    counts = label_counts(samples)
    warnings += split_label_warnings(counts, [str(r) for r in once.values()])

    return {
        "roots": [str(r) for r in roots],
        "n_images": len(samples),
        "counts": counts,
        "errors": errors,
        "warnings": warnings,
        "notes": notes,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "not_read": unread,
        "summary": {
            "errors": len(errors), "warnings": len(warnings), "notes": len(notes),
            "exact_duplicate_groups": len(exact), "cross_split_exact": sum(e["cross_split"] for e in exact),
            "near_duplicate_pairs": len(near), "near_duplicates_truncated": truncated,
            "cross_split_near": sum(e["cross_split"] for e in near),
            "near_label_conflicts": sum(e["label_conflict"] for e in near),
            "files_not_read": sum(item["count"] for item in unread),
        },
        "files": [asdict(r) for r in results],
    }


def split_label_warnings(counts: dict[str, dict[str, int]], roots: list[str]) -> list[dict]:
    """Labels the splits do not share: a label with val or test images but no training image is one the model
    never learns (training leaves its images out of validation, evaluation out of the metrics); a trained label
    without validation images is never measured when the best epoch is picked. Only for data that has a train split."""
    trained = set(counts.get("train", {}))
    if not trained:
        return []
    where = ", ".join(roots)
    out = []
    for split in ("val", "test"):
        untrained = sorted(set(counts.get(split, {})) - trained)
        if untrained:
            n = sum(counts[split][label] for label in untrained)
            out.append({"path": where, "split": split, "code": "label_not_in_train",
                        "message": f"label(s) {untrained} have {n} {split} image(s) and no training image: the model "
                                   f"never learns them (training and evaluation leave those images out); add their "
                                   f"training images under train/<label>/, or remove them from {split}"})
    if "val" in counts:
        unvalidated = sorted(trained - set(counts["val"]))
        if unvalidated:
            out.append({"path": where, "split": "val", "code": "label_not_in_val",
                        "message": f"label(s) {unvalidated} have training images and no val image: the best epoch "
                                   "is picked without measuring them; add their val images under val/<label>/"})
    return out


def format_report(report: dict, max_lines: int = 30) -> str:
    """Human-readable summary of ``check_dataset``'s report."""
    out = [f"{report['n_images']} images in {', '.join(report['roots'])}"]
    for split, counts in report["counts"].items():
        out.append(f"  {split:<6} " + "  ".join(f"{label}={n}" for label, n in counts.items()))
    for title, items in (("ERRORS", report["errors"]), ("warnings", report["warnings"]), ("notes", report["notes"])):
        if not items:
            continue
        out.append(f"{title} ({len(items)}):")
        for item in items[:max_lines]:
            code = f"[{item['code']}] " if "code" in item else ""
            out.append(f"  {item['path']}: {code}{item['message']}")
        if len(items) > max_lines:
            out.append(f"  ... {len(items) - max_lines} more in the JSON report")
    s = report["summary"]
    out.append(
        f"summary: {s['errors']} errors, {s['warnings']} warnings, {s['exact_duplicate_groups']} exact-duplicate groups "
        f"({s['cross_split_exact']} across splits), {s['near_duplicate_pairs']}"
        f"{' (the first; lower --near-distance)' if s.get('near_duplicates_truncated') else ''} near-duplicate pairs "
        f"({s['cross_split_near']} across splits, {s['near_label_conflicts']} labelled differently), "
        f"{s['files_not_read']} files no command reads"
    )
    return printable("\n".join(out))


def write_report(report: dict, path: str | Path) -> None:
    from training.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2))
