"""Reference galleries and pHash, s30/D: flat (blank, one-colour) pictures match nothing, one label's many copies no
longer crowd another label's match out of the search, and collage panels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import jpeg_bytes, photo, shared_dataset

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "wildcheck-ivory.onnx"  # has an embedding output
SIZE = (320, 240)


def _cli(*args):
    from training.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _blank_jpeg(colour, size=(400, 400), noise: float = 3.0, seed: int = 0) -> Image.Image:
    """A blank picture as a camera/JPEG delivers it: one colour plus sensor noise, JPEG-compressed."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, np.float32) + rng.normal(0, noise, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.open(io.BytesIO(jpeg_bytes(Image.fromarray(arr)))).convert("RGB")


# ---- 1: flat pictures -------------------------------------------------------------------------------------------

def test_one_colour_pictures_share_a_phash_and_are_flat_while_photos_are_not():
    """Every one-colour picture hashed to nearly the same 64 bits (white and grey 6 bits apart: a gallery
    "duplicate"); the hash of a flat picture is rounding noise. ``view_hash`` says so (``flat``)."""
    from serving.phash import hamming, phash, view_hash

    white, grey = Image.new("RGB", (300, 300), "white"), Image.new("RGB", (500, 200), (128, 128, 128))
    assert int(hamming(phash(white), np.array([phash(grey)], np.uint64))[0]) <= 6  # why flat pictures must not match
    for blank in (white, grey, Image.new("RGB", (64, 64), "black"), _blank_jpeg((255, 255, 255)),
                  _blank_jpeg((230, 220, 200), seed=1)):
        h = view_hash(blank)
        assert h.flat and h == phash(blank), (h.structure, blank)
    for seed in range(6):
        h = view_hash(photo(seed, SIZE))
        assert not h.flat and h == phash(photo(seed, SIZE)) and f"{h:016x}" == f"{phash(photo(seed, SIZE)):016x}"


def test_real_photos_have_structure_well_above_the_flat_limit():
    from serving.phash import MIN_STRUCTURE, structure

    paths = [p for name in ("met-ivory", "listings-everyday", "generic-products")
             for p in sorted((shared_dataset(name) / "val").rglob("*.jpg"))[::30]]
    values = [structure(Image.open(p).convert("RGB")) for p in paths]
    assert len(values) > 20 and min(values) > 1.5 * MIN_STRUCTURE, sorted(values)[:5]


@pytest.fixture(scope="module")
def blank_refs(tmp_path_factory) -> dict:
    """References of two labels, one of them with a blank picture among its photos (a failed scan)."""
    root = tmp_path_factory.mktemp("s30_flat")
    refs = root / "refs"
    for label, seeds in (("kind_a", (0, 2)), ("kind_b", (1,))):
        (refs / label).mkdir(parents=True)
        for seed in seeds:
            (refs / label / f"r{seed}.jpg").write_bytes(jpeg_bytes(photo(seed, SIZE)))
    (refs / "kind_b" / "blank.png").write_bytes(_png(Image.new("RGB", SIZE, "white")))
    neg = root / "neg"
    neg.mkdir()
    for seed in range(50, 58):
        (neg / f"n{seed}.jpg").write_bytes(jpeg_bytes(photo(seed, SIZE)))
    out = root / "g.npz"
    built = _cli("gallery", "build", refs, "--model", SHIPPED, "--out", out, "--negatives", neg)
    return {"root": root, "refs": refs, "gallery": out, "built": built}


def test_a_blank_reference_is_skipped_and_named_so_a_blank_upload_is_not_blocked(blank_refs):
    """Before: the white reference was kept, and a grey PNG upload was blocked as its duplicate (pHash 4 bits), a
    white JPEG at similarity 1.0: any blank listing photo "was" a known seized photo."""
    from serving.checker import ImageChecker
    from serving.gallery import Gallery

    built = blank_refs["built"]
    assert built.exit_code == 0, built.output
    assert "blank.png: blank or one colour" in built.output and "1 image(s) skipped" in built.output, built.output
    assert sorted(Gallery.load(blank_refs["gallery"]).header.reference_ids) == ["kind_a/r0.jpg", "kind_a/r2.jpg",
                                                                                "kind_b/r1.jpg"]
    checker = ImageChecker(str(SHIPPED), gallery=str(blank_refs["gallery"]))
    for upload in (_png(Image.new("RGB", (800, 600), (200, 200, 200))), jpeg_bytes(Image.new("RGB", (1000, 1000), "white")),
                   jpeg_bytes(_blank_jpeg((240, 240, 240), size=(900, 700)))):
        result = checker.check(upload)
        assert result["matches"] == [] and not any(t.startswith("gallery:") for t in result["triggered_by"]), result
    copy = checker.check(jpeg_bytes(photo(1, SIZE).resize((480, 360))))  # a photo still matches
    assert copy["matches"] and copy["matches"][0]["reference"] == "kind_b/r1.jpg", copy["matches"]


def test_only_blank_references_is_a_clear_refusal_and_nothing_is_written(tmp_path):
    refs = tmp_path / "refs" / "kind_a"
    refs.mkdir(parents=True)
    (refs / "white.png").write_bytes(_png(Image.new("RGB", SIZE, "white")))
    (refs / "black.jpg").write_bytes(jpeg_bytes(Image.new("RGB", SIZE, "black")))
    out = tmp_path / "g.npz"
    built = _cli("gallery", "build", refs.parent, "--model", SHIPPED, "--out", out)
    assert built.exit_code == 2 and "none of the 2 reference images could be read or used" in built.output, built.output
    assert "white.png: blank or one colour" in built.output and "Traceback" not in built.output
    assert not out.exists()


def test_a_gallery_that_already_holds_a_blank_reference_matches_no_blank_upload(blank_refs, tmp_path):
    """A gallery written before the rule (its blank reference kept) is safe at query time: a flat view is never
    matched, by pHash or by embedding; a blank panel of a collage neither."""
    from serving.checker import ImageChecker
    from serving.gallery import Gallery, preprocess_and_hash
    from serving.runtime import OnnxModel

    model = OnnxModel(SHIPPED, threads=1)
    array, hashed = preprocess_and_hash(model.preprocessing, Image.new("RGB", SIZE, "white"))
    old = Gallery.load(blank_refs["gallery"])
    old.add(model.embed(array[None]), ["kind_b"], np.array([hashed], np.uint64), ["kind_b/old_blank.png"], [""])
    path = tmp_path / "old.npz"
    old.save(path)
    checker = ImageChecker(str(SHIPPED), gallery=str(path))
    for upload in (_png(Image.new("RGB", (800, 600), (200, 200, 200))), jpeg_bytes(Image.new("RGB", (640, 640), "white"))):
        result = checker.check(upload)
        assert result["matches"] == [] and result["decision"] != "block", result
    # views: a flat view (whole picture's hash flat) is left out, the others are matched as before
    emb = model.embed(np.stack([array, preprocess_and_hash(model.preprocessing, photo(1, SIZE))[0]]))
    flat_hash = preprocess_and_hash(model.preprocessing, Image.new("RGB", SIZE, (90, 90, 90)))[1]
    photo_hash = preprocess_and_hash(model.preprocessing, photo(1, SIZE))[1]
    assert flat_hash.flat and not photo_hash.flat
    got = Gallery.load(path).match(emb, [flat_hash, photo_hash])
    assert [(m.reference, m.kind) for m in got] == [("kind_b/r1.jpg", "duplicate")], got
    assert Gallery.load(path).match(emb[:1], [flat_hash]) == []


# ---- 2: one label's copies crowding the search ------------------------------------------------------------------

def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _crowded(n_copies: int, exact_max: int, extra: int = 0, dim: int = 64):
    """Label "a" (review only) holds ``n_copies`` near-copies of one photo at similarity ~0.97 to the query; label
    "b" (blocks) one reference at ~0.93, above its duplicate threshold 0.9; ``extra`` unrelated references."""
    from serving.contract import EmbeddingSpec
    from serving.gallery import Gallery, GalleryHeader, LabelThresholds

    rng = np.random.default_rng(0)
    q = _unit(rng.standard_normal(dim))

    def around(sim: float, n: int) -> np.ndarray:
        noise = rng.standard_normal((n, dim))
        noise -= (noise @ q)[:, None] * q  # orthogonal to q
        return _unit(sim * q + np.sqrt(1 - sim ** 2) * _unit(noise))

    emb = np.concatenate([around(0.97, n_copies), around(0.93, 1), _unit(rng.standard_normal((extra, dim)))])
    labels = np.array([0] * n_copies + [1] + [2] * extra, np.int32)
    names = ["a", "b", "c"]
    ids = [f"a/{i}" for i in range(n_copies)] + ["b/0"] + [f"c/{i}" for i in range(extra)]
    thresholds = {"a": LabelThresholds(similar=0.8, duplicate=0.99, block=False),
                  "b": LabelThresholds(similar=0.8, duplicate=0.9, block=True),
                  "c": LabelThresholds(similar=0.8, duplicate=0.9, block=True)}
    used = names[: 3 if extra else 2]
    header = GalleryHeader(model_name="m", model_version="1", contract_hash="x",
                           embedding=EmbeddingSpec(output="embedding", size=dim, normalized=True, producer="test"),
                           labels=used, reference_ids=ids, sources=[""] * len(ids),
                           thresholds={k: thresholds[k] for k in used}, created_at="", updated_at="")
    hashes = rng.integers(0, 2 ** 63, len(ids), dtype=np.uint64)
    return Gallery(header, emb, labels, hashes, np.zeros((0, dim), np.float32), exact_max=exact_max), q


@pytest.mark.parametrize("n_copies", [16, 40])
def test_many_copies_of_one_label_do_not_hide_another_labels_duplicate_exact_search(n_copies):
    """Before: the 16 nearest references were all label a's copies, so b's duplicate (which blocks) went unseen and
    the photo went to review instead of being blocked."""
    gallery, q = _crowded(n_copies, exact_max=5000)
    found = gallery.match(q[None])
    assert {(m.label, m.kind) for m in found} == {("a", "similar"), ("b", "duplicate")}, found
    assert [m.reference for m in found if m.label == "b"] == ["b/0"]
    assert gallery.decide(found)[0] == "block"


def test_many_copies_of_one_label_do_not_hide_another_labels_duplicate_ann_search():
    """The same above the exact-search size (faiss IVF): the search widens while a label not yet seen could match."""
    gallery, q = _crowded(60, exact_max=100, extra=2500)
    assert type(gallery.index).__name__ == "FaissIndex"
    found = gallery.match(q[None])
    assert {(m.label, m.kind) for m in found} == {("a", "similar"), ("b", "duplicate")}, found
    assert gallery.decide(found)[0] == "block"


# ---- 3: many files sharing one pHash in `data check` ------------------------------------------------------------

def test_many_different_files_of_one_picture_are_one_group_and_do_not_push_a_leakage_pair_past_the_cap(tmp_path):
    """330 placeholder files (one picture, different bytes: identical pHash) made 54,285 pairs, past the 50,000 cap:
    the report was cut, blamed the distance ("lower --near-distance", at the default 4) and dropped the leakage pair
    listed after them. Now the placeholder is one group (first file + 329 pairs) and the leakage pair is reported."""
    from PIL import PngImagePlugin

    from training.data.check import check_dataset
    from training.data.neardup import near_pairs

    placeholder = photo(7, (64, 64))
    folder = tmp_path / "data" / "train" / "a_other"
    folder.mkdir(parents=True)
    for i in range(330):
        info = PngImagePlugin.PngInfo()
        info.add_text("n", str(i))  # same pixels, different bytes (sha256)
        placeholder.save(folder / f"noimage_{i:03d}.png", pnginfo=info)
    leaked = photo(3, (200, 150))
    (tmp_path / "data" / "train" / "ivory").mkdir()
    (tmp_path / "data" / "train" / "ivory" / "z_copy.jpg").write_bytes(jpeg_bytes(leaked.resize((180, 135))))
    (tmp_path / "data" / "val" / "ivory").mkdir(parents=True)
    (tmp_path / "data" / "val" / "ivory" / "z.jpg").write_bytes(jpeg_bytes(leaked))

    report = check_dataset([tmp_path / "data"], workers=1)
    summary = report["summary"]
    assert not summary["near_duplicates_truncated"] and summary["cross_split_near"] == 1, summary
    assert summary["near_duplicate_pairs"] == 329 + 1, summary
    leak = [e for e in report["near_duplicates"] if e["cross_split"]]
    assert sorted(Path(p).name for p in leak[0]["paths"]) == ["z.jpg", "z_copy.jpg"]
    group = [e for e in report["near_duplicates"] if not e["cross_split"]]
    assert len({e["paths"][0] for e in group}) == 1  # one file of the group paired with each other one
    assert {Path(e["paths"][1]).name for e in group} == {f"noimage_{i:03d}.png" for i in range(330)} - {
        Path(group[0]["paths"][0]).name}
    assert near_pairs(["00ff"] * 4 + ["00fe"], 4) == [(0, 1, 0), (0, 2, 0), (0, 3, 0), (0, 4, 1)]


# ---- 4: collages of more photos than fit as panels --------------------------------------------------------------

def _grid_collage(rows: int, cols: int, size=(900, 800), gutter: int = 10):
    """A rows x cols collage of generated photos with a white gutter, JPEG-compressed; and each photo's box."""
    from tests.test_panels import _cover, smooth_photo

    W, H = size
    canvas, boxes = Image.new("RGB", size, "white"), []
    pw, ph = (W - gutter * (cols - 1)) / cols, (H - gutter * (rows - 1)) / rows
    for r in range(rows):
        for c in range(cols):
            box = (round(c * (pw + gutter)), round(r * (ph + gutter)), round(c * (pw + gutter) + pw), round(r * (ph + gutter) + ph))
            canvas.paste(_cover(smooth_photo(100 + len(boxes)), box[2] - box[0], box[3] - box[1]), box[:2])
            boxes.append(box)
    return Image.open(io.BytesIO(jpeg_bytes(canvas))).convert("RGB"), boxes


def _photos_per_panel(panels, photos) -> list[int]:
    """How many whole photos each panel holds; every photo must lie in one panel (none cut, none left out)."""
    def inside(p, b):
        w = max(0, min(p[2], b[2]) - max(p[0], b[0]))
        h = max(0, min(p[3], b[3]) - max(p[1], b[1]))
        return w * h >= 0.9 * (b[2] - b[0]) * (b[3] - b[1])

    owner = [[k for k, p in enumerate(panels) if inside(p, b)] for b in photos]
    assert all(len(o) == 1 for o in owner), (panels, owner)
    return [sum(o == [k] for o in owner) for k in range(len(panels))]


@pytest.mark.parametrize("rows,cols,size,want", [
    (6, 6, (900, 800), [4] * 9),  # before: 7 panels of 4 and 8 photos (2 + 4 columns in two bands)
    (4, 4, (900, 800), [4] * 4),  # before: 16 panels > max_panels -> scored whole, each photo at 1/4 size
    (3, 4, (900, 800), [2] * 6),  # before: 12 > 9 -> scored whole
    (1, 6, (1800, 300), [2] * 3),  # before: 3 + 3 (groups larger than the size needs)
])
def test_a_collage_of_more_photos_than_fit_is_grouped_into_even_panels(rows, cols, size, want):
    from serving.panels import find_panels

    collage, photos = _grid_collage(rows, cols, size)
    panels = find_panels(collage)
    assert sorted(_photos_per_panel(panels, photos)) == want, panels


def test_collages_that_fit_and_ordinary_pictures_are_unchanged():
    from serving.panels import find_panels
    from tests.test_panels import smooth_photo

    for rows, cols in ((2, 2), (3, 3), (2, 4), (1, 3)):
        collage, photos = _grid_collage(rows, cols, (300 * cols, 300 * rows) if rows == 1 else (900, 800))
        assert _photos_per_panel(find_panels(collage), photos) == [1] * (rows * cols)
    assert find_panels(smooth_photo(5, (900, 700))) == []
    assert find_panels(Image.new("RGB", (900, 700), "white")) == []
    assert find_panels(Image.new("RGB", (10000, 50), "white")) == [] and find_panels(Image.new("RGB", (1, 1))) == []
