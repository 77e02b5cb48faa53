"""``wildcheck gallery build/add/remove/info``: reference photos -> gallery file (no torch: the ONNX model embeds).

REF is a folder of ``<label>/<image>`` or a CSV ``path,label[,reference_id,source]``. Images are decoded
exactly as the server decodes uploads; unreadable ones, and blank or one-colour references (``serving.phash``:
they would match every blank photo), are skipped and reported, never fatal.
"""

from __future__ import annotations

import math
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from serving.client import list_images
from serving.csvio import read_rows
from serving.errors import InvalidInput, MissingInput, printable
from serving.gallery import (DEFAULT_FPR, DEFAULT_SIMILAR, DUPLICATE_FLOOR, Gallery, GalleryError, is_gallery_file,
                             new_header, preprocess_and_hash, require_gallery_file)
from serving.locking import exclusive
from serving.phash import MIN_STRUCTURE
from serving.imageio import ImageError, decode_image, images_under, label_folders
from serving.runtime import OnnxModel

MAX_NEGATIVES = 3000
LISTED = 10  # unreadable files and left-out negatives named in a message; the rest counted


@dataclass
class RefItem:
    path: Path
    label: str
    reference_id: str
    source: str = ""


def listed(skipped: list[tuple[str, str]], limit: int = LISTED) -> str:
    """``path: reason`` lines (indented) for at most ``limit`` files, then how many more."""
    lines = [f"  {path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def check_label(label: str, where: str) -> None:
    """Refuse a label no reference id can carry unambiguously: ids are ``<label>/<file>``, so a label ``a/b`` makes
    ``a/b/x.jpg`` read as label ``a``; ``..``, backslashes and control characters are paths or terminal tricks."""
    bad = [c for c in label if unicodedata.category(c) == "Cc"]
    if bad or "/" in label or "\\" in label or label in (".", ".."):
        what = (f"contains control character(s) {''.join(bad)!r}" if bad else "is a path component ('.' or '..')"
                if label in (".", "..") else "contains a path separator ('/' or '\\')")
        safe = "".join("_" if c in "/\\" or unicodedata.category(c) == "Cc" else c for c in label).strip(". ") or "label"
        raise InvalidInput(f"{where}: label {label!r} {what}; reference ids are <label>/<file>, so such a label "
                           f"is ambiguous: name it without them, e.g. {safe!r}")


def read_references(ref: str | Path) -> list[RefItem]:
    """``<label>/<image>`` folders or a CSV ``path,label[,reference_id,source]`` (paths relative to the CSV)."""
    ref = Path(ref)
    items: list[RefItem] = []
    if ref.is_file() and ref.suffix.lower() == ".csv":
        rows, _ = read_rows(ref, {"path", "label"}, "the CSV needs 'path' and 'label' columns (optional: reference_id, source)")
        for row in rows:
            path = Path(row["path"] or "")
            path = path if path.is_absolute() else ref.parent / path
            label = (row.get("label") or "").strip()
            if not label:
                raise InvalidInput(f"{ref}: row for {row['path']} has no label")
            check_label(label, f"{ref}: row for {row['path']}")
            items.append(RefItem(path, label, (row.get("reference_id") or "").strip() or f"{label}/{path.name}",
                                 (row.get("source") or "").strip()))
    elif ref.is_dir():
        for folder in label_folders(ref):
            check_label(folder.name, f"{ref}: folder {folder.name!r}")
            for path in images_under(folder):
                items.append(RefItem(path, folder.name, f"{folder.name}/{path.relative_to(folder).as_posix()}", str(ref)))
    else:
        raise MissingInput(f"{ref} is neither a folder of <label>/<image> nor a CSV file")
    if not items:
        raise InvalidInput(f"{ref} holds no images (expected <label>/<image> folders or CSV rows)")
    return items


def embed_paths(model: OnnxModel, paths: list[Path], batch_size: int = 16, desc: str = "embedding",
                skip_flat: bool = False):
    """Embeddings and pHashes of the readable images; (kept indices, skipped [(path, reason)]). ``skip_flat``
    (references): a blank or one-colour picture is skipped, since it would match every other blank picture."""
    pre = model.preprocessing
    embs, hashes, kept, skipped, batch = [], [], [], [], []

    def flush():
        if batch:
            embs.append(model.embed(np.stack(batch)))
            batch.clear()

    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        try:
            img, _ = decode_image(path, draft_size=pre.draft_size)
        except (ImageError, OSError) as exc:
            skipped.append((printable(str(path)), getattr(exc, "message", str(exc))))
            continue
        array, hashed = preprocess_and_hash(pre, img)
        if skip_flat and hashed.flat:
            skipped.append((printable(str(path)), f"blank or one colour (structure {hashed.structure:.1f} grey levels, under "
                                       f"{MIN_STRUCTURE:g}): it would match every blank photo; give a photo of the item"))
            continue
        batch.append(array)
        hashes.append(hashed)
        kept.append(i)
        if len(batch) == batch_size:
            flush()
    flush()
    dim = model.contract.embedding.size
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    return emb, np.array(hashes, dtype=np.uint64), kept, skipped


@dataclass
class Negatives:
    embeddings: np.ndarray
    hashes: np.ndarray
    names: list[str]
    info: dict
    skipped: list[tuple[str, str]]


def _negatives(model: OnnxModel, roots: list[Path], max_images: int) -> Negatives:
    """The negatives' embeddings, pHashes and names (copies of a reference among them are left out when thresholds
    are solved). ``--negatives`` given but no readable image in it is refused: the default thresholds it would fall
    back to are much looser than solved ones."""
    paths = [p for root in roots for p in list_images(root)]
    if len(paths) > max_images:
        paths = sorted(random.Random(0).sample(paths, max_images))
    emb, hashes, kept, skipped = embed_paths(model, paths, desc="negatives")
    if not kept:
        given = " ".join(f"--negatives {r}" for r in roots)
        found = (f"none of the {len(paths)} images there could be read; nothing written:\n{listed(skipped)}" if paths
                 else "no images there; nothing written")
        raise InvalidInput(f"{given}: {found}\nGive negatives that are readable ordinary photos, or leave out "
                           "--negatives to use the default thresholds")
    return Negatives(emb, hashes, [printable(str(paths[i])) for i in kept], {"roots": [str(r) for r in roots], "count": len(emb)},
                     skipped)


def _load_model(model_path: str | Path) -> OnnxModel:
    model = OnnxModel(model_path, threads=2)
    if model.embedding_output is None:
        raise GalleryError(f"{model_path} has no embedding output; re-export it with this wildcheck version (`wildcheck export`)")
    return model


GALLERY_SUFFIX = ".npz"  # what a gallery is (a numpy zip archive); the help, README and bento name it so


def check_out(ref: str | Path, out: str | Path, negatives: list[str | Path] = ()) -> None:
    """Refuse, before any work, an ``--out`` that would land among the reference photos or the negatives (the next
    build would read it as a photo there, and a rebuild would write among its own inputs), that is not named
    ``.npz`` (``--out g.txt`` wrote a zip archive under a text file's name), or that would replace a file that is
    not a gallery (a photo, the model, a CSV): rebuilding over an existing gallery is the only overwrite allowed.
    As ``training.outputs.out_file`` refuses an output inside the data a command reads (serving cannot import it)."""
    ref, out = Path(ref), Path(out)
    if ref.is_dir() and out.resolve().is_relative_to(ref.resolve()):
        raise InvalidInput(f"--out {out} is inside the references folder {ref}: the gallery would be written among "
                           f"(or over) the reference photos; write it outside, e.g. --out {ref.resolve().parent / ref.resolve().name}.npz")
    for root in map(Path, negatives):
        if root.is_dir() and out.resolve().is_relative_to(root.resolve()):
            raise InvalidInput(f"--out {out} is inside the negatives folder {root}, which this command reads: the "
                               "gallery would be written among the negatives; write it outside, e.g. --out "
                               f"{root.resolve().parent / 'gallery.npz'}")
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a folder; name the gallery file to write, e.g. --out {out / 'gallery.npz'}")
    if out.exists() and not is_gallery_file(out):
        raise InvalidInput(f"--out {out} exists and is not a wildcheck gallery; refusing to write over it: "
                           "choose a new file name, or delete it first if it is meant to go")
    if out.suffix.lower() != GALLERY_SUFFIX:
        raise InvalidInput(f"--out {out} is not named {GALLERY_SUFFIX}: a gallery is an {GALLERY_SUFFIX} archive, and "
                           f"another name hides what it is; name it e.g. --out {out.with_suffix(GALLERY_SUFFIX)}")


def editing(gallery_path: str | Path):
    """Held while a gallery is read, changed and written: two edits at once each saved their own copy, and the
    second silently dropped the first's references (both said "added 8"; 11 of 19 were kept)."""
    return exclusive(gallery_path, "gallery build/add/remove", "wait for it to finish and run this again")


def check_fpr(fpr: float) -> None:
    """Refuse, before any embedding, an ``--fpr`` no threshold can be solved for (0, negative, 1 or more, nan): it
    used to end in a validation traceback after all the work."""
    if not 0.0 < fpr < 1.0:  # nan fails this too
        raise InvalidInput(f"--fpr {fpr} is not a share of negatives between 0 and 1 (exclusive): give e.g. --fpr "
                           f"{DEFAULT_FPR} (1% of the negatives may reach `similar`)")


def build(ref: str | Path, model_path: str | Path, out: str | Path, negatives: list[Path] = (),
          fpr: float = DEFAULT_FPR, max_negatives: int = MAX_NEGATIVES) -> dict:
    check_fpr(fpr)
    check_out(ref, out, list(negatives))
    parent = Path(out).parent
    try:  # the lock file lives beside the gallery: its folder must exist before the lock is taken
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create the folder {parent} for --out {out}: {exc.strerror or exc}") from exc
    with editing(out):
        return _build(ref, model_path, out, list(negatives), fpr, max_negatives)


def _build(ref: str | Path, model_path: str | Path, out: str | Path, negatives: list[Path], fpr: float,
           max_negatives: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        version = package_version("wildcheck")
    except PackageNotFoundError:
        version = ""
    items = read_references(ref)
    model = _load_model(model_path)
    neg = _negatives(model, list(negatives), max_negatives) if negatives else Negatives(
        np.zeros((0, model.contract.embedding.size), np.float32), np.zeros(0, np.uint64), [], {"roots": [], "count": 0}, [])
    emb, hashes, kept, skipped = embed_paths(model, [it.path for it in items], desc="references", skip_flat=True)
    if not kept:
        raise GalleryError(f"none of the {len(items)} reference images could be read or used; nothing written:\n"
                           f"{listed(skipped)}")
    header = new_header(model.contract, fpr, neg.info, version)
    gallery = Gallery(header, np.zeros((0, emb.shape[1]), np.float32), np.zeros(0, np.int32), np.zeros(0, np.uint64),
                      neg.embeddings, source=str(out), negative_hashes=neg.hashes, negative_names=neg.names)
    kept_items = [items[i] for i in kept]
    gallery.add(emb, [it.label for it in kept_items], hashes, [it.reference_id for it in kept_items],
                [it.source for it in kept_items])
    gallery.save(out)
    return {"added": len(kept), "skipped": skipped, "negatives_skipped": neg.skipped,
            "negatives_left_out": gallery.left_out, **gallery.describe()}


def add(gallery_path: str | Path, ref: str | Path, model_path: str | Path) -> dict:
    require_gallery_file(gallery_path)  # before the lock: no stray .lock beside a gallery that does not exist
    model = _load_model(model_path)
    with editing(gallery_path):
        gallery = Gallery.load(gallery_path, model.contract, served_as="--model")
        items = read_references(ref)
        emb, hashes, kept, skipped = embed_paths(model, [it.path for it in items], desc="references", skip_flat=True)
        if not kept:  # "added 0 references", exit 0: a script could not tell that nothing happened
            raise GalleryError(f"none of the {len(items)} new reference images could be read or used; {gallery_path} is "
                               f"unchanged:\n{listed(skipped)}")
        kept_items = [items[i] for i in kept]
        gallery.add(emb, [it.label for it in kept_items], hashes, [it.reference_id for it in kept_items],
                    [it.source for it in kept_items])
        gallery.save(gallery_path)
    return {"added": len(kept), "skipped": skipped, "negatives_left_out": gallery.left_out, **gallery.describe()}


def remove(gallery_path: str | Path, reference_ids: list[str]) -> dict:
    require_gallery_file(gallery_path)  # before the lock: no stray .lock beside a gallery that does not exist
    with editing(gallery_path):
        gallery = Gallery.load(gallery_path)
        removed = gallery.remove(reference_ids)
        gallery.save(gallery_path)
    return {"removed": removed, "negatives_left_out": gallery.left_out, **gallery.describe()}


def format_info(info: dict) -> str:
    negatives = info["negatives"]
    count, left_out = negatives.get("count", 0), negatives.get("left_out", 0)
    lines = [f"gallery {info['source']}: {info['references']} references, model {info['model_name']} {info['model_version']}",
             f"embedding: {info['embedding']['size']} floats ({info['embedding']['producer']}); search: {info['search']}",
             (f"thresholds solved on {count - left_out} negatives at fpr {info['fpr']}" if count - left_out else
              "thresholds not solved: no negatives")
             + (f" ({left_out} more left out: copies of references)" if left_out else "")]
    solved, fpr = count - left_out, info["fpr"]
    if solved == 0:  # said "solved on 0 negatives" and nothing more: unmeasured defaults, quieter than too few negatives
        lines.append(f"  warning: no negatives, so the thresholds are unmeasured defaults (similar >= {DEFAULT_SIMILAR}, "
                     f"duplicate >= {DUPLICATE_FLOOR}): how often they match ordinary photos is unknown; build it again "
                     f"with --negatives FOLDER of ordinary photos (at least {math.ceil(1 / fpr - 1e-9)} for fpr {fpr})")
    elif solved < math.ceil(1 / fpr - 1e-9):  # fewer than 1/fpr negatives cannot show a rate of fpr
        lines.append(f"  warning: {solved} negatives cannot resolve fpr {fpr} (it takes at least "
                     f"{math.ceil(1 / fpr - 1e-9)}): `similar` sits above every negative, so how often it matches "
                     "ordinary photos is unmeasured; build it again with more ordinary photos in --negatives")
    for label, count in info["labels"].items():
        t = info["thresholds"][label]
        lines.append(f"  {label}: {count} refs, similar >= {t['similar']:.4f}, duplicate >= {t['duplicate']:.4f} "
                     f"or pHash <= {t['duplicate_hamming']} bits, duplicate {'blocks' if t['block'] else 'goes to review'}")
        if max(t["similar"], t["duplicate"]) > 1.0:  # written before such thresholds were refused
            lines.append(f"  warning: {label}'s thresholds are above 1, so it never matches by embedding (a copy of "
                         "its references was among the negatives); rebuild the gallery with this wildcheck version")
    copies = info.get("negatives_left_out") or []
    if copies:
        names = [f"{name} (a {label} reference)" for name, label in copies]
        more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
        lines.append(f"{len(copies)} negatives are copies of references and were left out: {', '.join(names[:LISTED])}{more}")
    for path, reason in info.get("skipped", []):
        lines.append(f"skipped {path}: {reason}")
    bad = info.get("negatives_skipped") or []
    if bad:
        lines.append(f"{len(bad)} unreadable negative(s) skipped (the thresholds were solved without them):")
        lines.append(listed(bad))
    return printable("\n".join(lines))  # a path that is not UTF-8 (a skipped file, --out) failed the print
