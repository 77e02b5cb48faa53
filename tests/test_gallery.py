"""Reference galleries: the embedding output, gallery files, thresholds, matching, and the service's answers."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from tests.conftest import jpeg_bytes, photo, shared_dataset


def _cli(*args):
    from training.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _folder(root: Path, label: str, images: list[Image.Image]) -> Path:
    (root / label).mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(root / label / f"{label}_{i}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def synth_gallery(onnx_model, tmp_path_factory) -> Path:
    """Two labels of synthetic pictures (and one unreadable file), negatives from other seeds."""
    root = tmp_path_factory.mktemp("gal")
    ref = _folder(root / "ref", "pangolin_scales", [photo(s) for s in range(3)])
    _folder(ref, "tiger_skin", [photo(s) for s in range(10, 12)])
    (ref / "tiger_skin" / "broken.jpg").write_bytes(jpeg_bytes(photo(99))[:200])
    neg = _folder(root / "neg", "other", [photo(s) for s in range(50, 62)])
    out = root / "g.npz"
    result = _cli("gallery", "build", ref, "--model", onnx_model, "--out", out, "--negatives", neg)
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "broken.jpg" in result.output
    return out


# ---- the contract's embedding output ---------------------------------------------------------------

def test_export_adds_a_normalised_embedding_after_logits(onnx_model):
    from serving.runtime import OnnxModel

    model = OnnxModel(onnx_model)
    assert model.output_names == ["logits", "cam", "embedding"]  # logits first
    spec = model.contract.embedding
    assert spec.output == "embedding" and spec.size == 1280 and "fine-tuned" in spec.producer
    batch = np.stack([model.preprocessing(photo(s)) for s in range(3)])
    probs, emb = model.predict_with_embedding(batch)
    assert emb.shape == (3, 1280) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert np.allclose(probs, model.predict_proba(batch), atol=1e-6)  # logits unchanged by the extra output


def test_phash_is_imagehash_phash_without_the_dependency():
    imagehash = pytest.importorskip("imagehash")
    from serving.phash import phash

    for seed in range(8):
        im = photo(seed, size=(200, 150))
        assert phash(im) == int(str(imagehash.phash(im)), 16)


# ---- gallery files -----------------------------------------------------------------------------------

def test_build_reports_skipped_images_and_add_remove_resolve_thresholds(synth_gallery, onnx_model, tmp_path):
    from serving.gallery import Gallery

    g = Gallery.load(synth_gallery)
    assert g.describe()["labels"] == {"pangolin_scales": 3, "tiger_skin": 2}
    assert g.header.negatives["count"] == 12 and len(g.negatives) == 12
    copy = tmp_path / "g.npz"
    shutil.copy(synth_gallery, copy)
    more = _folder(tmp_path / "more", "rhino_horn", [photo(s) for s in range(20, 22)])
    assert _cli("gallery", "add", copy, more, "--model", onnx_model).exit_code == 0
    g2 = Gallery.load(copy)
    assert g2.describe()["labels"]["rhino_horn"] == 2 and set(g2.thresholds) == {"pangolin_scales", "tiger_skin", "rhino_horn"}
    # the same ids again are refused, nothing written
    again = _cli("gallery", "add", copy, more, "--model", onnx_model)
    assert again.exit_code == 2 and "already in" in again.output
    removed = _cli("gallery", "remove", copy, "--reference", "rhino_horn/rhino_horn_0.jpg", "--reference", "rhino_horn/rhino_horn_1.jpg")
    assert removed.exit_code == 0, removed.output
    assert set(Gallery.load(copy).header.labels) == {"pangolin_scales", "tiger_skin"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    info = _cli("gallery", "info", copy)
    assert info.exit_code == 0 and "pangolin_scales: 3 refs" in info.output and g.header.model_version in info.output


def test_build_refuses_an_out_among_the_references_or_over_a_file_that_is_not_a_gallery(onnx_model, tmp_path):
    """`--out REFS/s/a.jpg` replaced a reference photo with the gallery (exit 0); any existing non-gallery file went
    the same way. Refused before any work, the file untouched; rebuilding over a gallery still works."""
    ref = _folder(tmp_path / "ref", "s", [photo(s) for s in range(2)])
    photo_file, model_copy = ref / "s" / "s_0.jpg", tmp_path / "model-copy.onnx"
    shutil.copy(onnx_model, model_copy)
    kept = {p: p.read_bytes() for p in (photo_file, model_copy)}
    cases = {photo_file: "inside the references folder", ref / "g.npz": "inside the references folder",
             model_copy: "is not a wildcheck gallery", tmp_path: "is a folder"}
    for out, words in cases.items():
        result = _cli("gallery", "build", ref, "--model", onnx_model, "--out", out)
        assert result.exit_code == 2 and words in result.output.replace("\n", ""), (out, result.output)
        assert result.output.startswith("error: ")
    assert {p: p.read_bytes() for p in kept} == kept and not (ref / "g.npz").exists()
    assert sorted(p.name for p in (ref / "s").iterdir()) == ["s_0.jpg", "s_1.jpg"]
    out = tmp_path / "g.npz"
    for _ in range(2):  # a new file, then a rebuild over the gallery
        assert _cli("gallery", "build", ref, "--model", onnx_model, "--out", out).exit_code == 0


def test_an_edit_while_another_holds_the_gallery_is_refused_and_loses_nothing(synth_gallery, onnx_model, tmp_path):
    """Two `gallery add` at once each saved its own copy: both said "added 8" and the gallery kept 11 of 19."""
    import fcntl

    from serving.gallery import Gallery

    copy = tmp_path / "g.npz"
    shutil.copy(synth_gallery, copy)
    before = copy.read_bytes()
    more = _folder(tmp_path / "more", "rhino_horn", [photo(s) for s in range(30, 32)])
    with open(tmp_path / "g.npz.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running add holds
        for args in (("add", copy, more, "--model", onnx_model), ("remove", copy, "--reference", "tiger_skin/x.jpg"),
                     ("build", more, "--model", onnx_model, "--out", copy)):
            result = _cli("gallery", *args)
            assert result.exit_code == 2 and "another gallery" in result.output, result.output
        assert copy.read_bytes() == before
    assert _cli("gallery", "add", copy, more, "--model", onnx_model).exit_code == 0  # released: the edit goes through
    assert Gallery.load(copy).describe()["labels"]["rhino_horn"] == 2


def test_gallery_writes_are_readable_by_a_server_running_as_another_user(synth_gallery, onnx_model, tmp_path):
    """build/add/remove wrote 0600 (their own mkstemp) and remove turned a 0644 gallery into 0600; like
    training.fileio.atomic_path they now get 0666 less the umask."""
    from serving.gallery import Gallery

    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    ref = _folder(tmp_path / "ref", "s", [photo(s) for s in range(30, 32)])
    previous = os.umask(0o022)
    try:
        built = tmp_path / "built.npz"
        assert _cli("gallery", "build", ref, "--model", onnx_model, "--out", built).exit_code == 0
        assert mode(built) == 0o644
        copy = tmp_path / "g.npz"
        shutil.copy(synth_gallery, copy)
        copy.chmod(0o644)
        assert _cli("gallery", "add", copy, ref, "--model", onnx_model).exit_code == 0
        assert mode(copy) == 0o644
        assert _cli("gallery", "remove", copy, "--reference", "s/s_0.jpg").exit_code == 0
        assert mode(copy) == 0o644
        os.umask(0o077)  # the umask still decides
        Gallery.load(copy).save(copy)
        assert mode(copy) == 0o600
    finally:
        os.umask(previous)


def test_an_exact_copy_is_a_duplicate_and_thresholds_hold_back_the_negatives(synth_gallery, onnx_model):
    from serving.checker import ImageChecker

    checker = ImageChecker(str(onnx_model), gallery=str(synth_gallery))
    ref = jpeg_bytes(photo(1))
    result = checker.check(ref)
    assert result["matches"][0] == {**result["matches"][0], "label": "pangolin_scales",
                                    "reference": "pangolin_scales/pangolin_scales_1.jpg", "kind": "duplicate"}
    assert result["decision"] == "block" and "gallery:pangolin_scales" in result["triggered_by"]
    # at fpr 0.01 with 12 negatives none of them may reach `similar`
    negatives = sorted((synth_gallery.parent / "neg" / "other").glob("*.jpg"))
    assert [checker.check(p.read_bytes())["matches"] for p in negatives] == [[]] * 12


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    for key, value in changes.items():
        if key in arrays:
            arrays[key] = value
        else:
            header[key] = value
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)
    return dst


def test_bad_galleries_are_refused_naming_the_file(synth_gallery, onnx_model, tmp_path):
    from serving.checker import ImageChecker
    from serving.gallery import GalleryError

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(synth_gallery.read_bytes()[:5000])
    empty = _rewrite(synth_gallery, tmp_path / "empty.npz", embeddings=np.zeros((0, 1280), np.float32),
                     labels=np.zeros(0, np.int32), hashes=np.zeros(0, np.uint64), reference_ids=[], sources=[])
    future = _rewrite(synth_gallery, tmp_path / "future.npz", version=99)
    other = _rewrite(synth_gallery, tmp_path / "other.npz", model_version="1.0.0+abcdef123456")
    with np.load(synth_gallery) as npz:
        stored, hashes = npz["embeddings"], npz["hashes"]
    # each of these loaded: zero rows never match, scaled rows matched every photo, text hashes gave a ValueError
    zeros = _rewrite(synth_gallery, tmp_path / "zeros.npz", embeddings=np.zeros_like(stored))
    scaled = _rewrite(synth_gallery, tmp_path / "scaled.npz", embeddings=stored * 1000)
    text = _rewrite(synth_gallery, tmp_path / "text.npz", hashes=np.array([format(int(h), "x") for h in hashes]))
    cases = {truncated: "truncated", empty: "no references", future: "version 99", other: r"1\.0\.0\+abcdef123456",
             tmp_path / "missing.npz": "not found", zeros: "length 0, not 1", scaled: "length 1e\\+03, not 1",
             text: "wrong type"}
    for path, words in cases.items():
        with pytest.raises(GalleryError, match=words) as err:
            ImageChecker(str(onnx_model), gallery=str(path))
        assert str(path) in str(err.value)
        served = _cli("serve", onnx_model, "--gallery", path)  # refuses before starting any worker
        assert served.exit_code == 2 and str(path) in served.output.replace("\n", "")
    with pytest.raises(GalleryError, match=r"9\.9\.9\+"):  # both versions named
        ImageChecker(str(onnx_model), gallery=str(other))


def test_model_info_names_the_gallery_file_without_its_server_path(synth_gallery, onnx_model):
    from serving.checker import ImageChecker

    info = ImageChecker(str(onnx_model), gallery=str(synth_gallery)).describe()
    assert info["gallery"]["source"] == synth_gallery.name and str(synth_gallery.parent) not in json.dumps(info)


def test_policy_overrides_gallery_thresholds(synth_gallery, onnx_model, tmp_path):
    from serving.checker import ImageChecker
    from serving.policy import PolicyError

    policy = tmp_path / "policy.yaml"
    policy.write_text("gallery:\n  pangolin_scales: {block: false}\n")
    checker = ImageChecker(str(onnx_model), gallery=str(synth_gallery))
    checker.apply_policy(str(policy))
    from serving.gallery import GalleryMatch

    result = checker.check(jpeg_bytes(photo(1)))
    found = [GalleryMatch(**m) for m in result["matches"]]
    assert found[0].kind == "duplicate" and checker.gallery.decide(found) == ("review", ["gallery:pangolin_scales"])
    assert checker.describe()["gallery"]["thresholds"]["pangolin_scales"]["block"] is False
    policy.write_text("gallery:\n  rhino_horn: {similar: 0.5}\n")
    with pytest.raises(PolicyError, match="rhino_horn"):
        checker.apply_policy(str(policy))
    with pytest.raises(PolicyError, match="no gallery"):
        ImageChecker(str(onnx_model)).apply_policy(str(policy))


def test_approximate_search_agrees_with_exact_search():
    from serving.search import ExactIndex, FaissIndex

    rng = np.random.default_rng(0)
    refs = rng.standard_normal((4000, 64)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries = refs[:200] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_s, exact_i = ExactIndex(refs).search(queries, 5)
    ann_s, ann_i = FaissIndex(refs).search(queries, 5)
    assert (exact_i[:, 0] == np.arange(200)).mean() > 0.99
    assert (ann_i[:, 0] == exact_i[:, 0]).mean() >= 0.98
    assert np.allclose(ann_s[:, 0], exact_s[:, 0], atol=2e-3)  # float16 vectors in the index


# ---- real photos ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Path:
    """The ImageNet-pretrained backbone as a wildcheck ONNX (what benchmarks/gallery_bench.py chose)."""
    from training.export import export_embedder

    out = tmp_path_factory.mktemp("embedder") / "embedder.onnx"
    export_embedder(out)
    return out


def test_an_embedder_beside_the_classifier_matches_the_gallery_while_the_classifier_decides(
        onnx_model, embedder, synth_gallery, tmp_path):
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.gallery import GalleryError

    ref = _folder(tmp_path / "ref", "pangolin_scales", [photo(s) for s in range(3)])
    out = tmp_path / "embedder_gallery.npz"
    built = _cli("gallery", "build", ref, "--model", embedder, "--out", out)
    assert built.exit_code == 0, built.output
    both = ImageChecker(str(onnx_model), gallery=str(out), embedder=str(embedder))
    data = jpeg_bytes(photo(1))
    result, plain = both.check(data), ImageChecker(str(onnx_model)).check(data)
    assert result["scores"] == plain["scores"] and result["model"] == plain["model"]  # the classifier decides as before
    top = result["matches"][0]
    assert (top["reference"], top["kind"]) == ("pangolin_scales/pangolin_scales_1.jpg", "duplicate")
    assert top["similarity"] >= 0.99  # the embedder's embedding of the same picture, not the classifier's
    assert result["decision"] == "block" and "gallery:pangolin_scales" in result["triggered_by"]
    batch = both.check_many([(data, "image/jpeg"), (b"not an image", None), (jpeg_bytes(photo(40)), None)])
    assert batch[0]["matches"] == result["matches"] and "error" in batch[1]
    assert not [m for m in batch[2]["matches"] if m["kind"] == "duplicate"]
    described, e = both.describe(), read_contract(embedder)
    assert described["version"] == read_contract(onnx_model).model_version
    assert described["embedder"]["version"] == e.model_version == described["gallery"]["model_version"]
    assert described["embedder"]["preprocessing"]["input_size"] == 224

    classifier_v, embedder_v = read_contract(onnx_model).model_version, e.model_version
    with pytest.raises(GalleryError, match="embedder loaded") as err:  # a gallery of the classifier's embedding
        ImageChecker(str(onnx_model), gallery=str(synth_gallery), embedder=str(embedder))
    assert classifier_v in str(err.value) and embedder_v in str(err.value) and str(synth_gallery) in str(err.value)
    with pytest.raises(GalleryError, match="--embedder") as err:  # an embedder's gallery without the embedder
        ImageChecker(str(onnx_model), gallery=str(out))
    assert classifier_v in str(err.value) and embedder_v in str(err.value)
    with pytest.raises(GalleryError, match="give the gallery"):
        ImageChecker(str(onnx_model), embedder=str(embedder))
    served = _cli("serve", onnx_model, "--embedder", embedder, "--gallery", synth_gallery)  # refused before any worker
    text = served.output.replace("\n", "")
    assert served.exit_code == 2 and classifier_v in text and embedder_v in text, served.output
    served = _cli("serve", onnx_model, "--embedder", embedder)
    assert served.exit_code == 2 and "--gallery" in served.output


def _listing_copy(im: Image.Image) -> bytes:
    """Cropped ~12%, a price banner across the bottom, re-compressed at JPEG quality 30."""
    w, h = im.size
    im = im.crop((int(w * 0.06), int(h * 0.04), int(w * 0.96), int(h * 0.94)))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, im.height * 0.86, im.width, im.height), fill=(200, 30, 30))
    draw.text((6, im.height * 0.88), "$450 FREE SHIPPING - DM NOW", fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=30)
    return buf.getvalue()


@pytest.mark.realdata
def test_listing_copies_of_known_photos_are_duplicates_and_unrelated_photos_match_nothing(embedder, tmp_path):
    from serving.checker import ImageChecker

    met, generic, caltech = shared_dataset("met-ivory"), shared_dataset("generic-products"), shared_dataset("caltech101-negatives")
    refs = sorted((met / "val" / "ivory").glob("*.jpg"))[:6]
    ref_root = tmp_path / "ref" / "seized_ivory"
    ref_root.mkdir(parents=True)
    for p in refs:
        shutil.copy(p, ref_root / p.name)
    neg = tmp_path / "neg"
    neg.mkdir()
    # negatives must look like the photos the service sees: everyday objects, clothing, other museum objects
    broad = (sorted((caltech / "train" / "other").glob("*.jpg"))[::50] + sorted((generic / "train" / "other").glob("*.jpg"))[::60]
             + sorted((met / "train" / "other").glob("*.jpg"))[::40])
    for p in broad:
        shutil.copy(p, neg / p.name)
    out = tmp_path / "known.npz"
    # fpr 0.005 on ~140 negatives: `similar` sits above every negative
    built = _cli("gallery", "build", tmp_path / "ref", "--model", embedder, "--out", out, "--negatives", neg, "--fpr", 0.005)
    assert built.exit_code == 0, built.output
    checker = ImageChecker(str(embedder), gallery=str(out))
    for p in refs:
        result = checker.check(_listing_copy(Image.open(p).convert("RGB")))
        top = result["matches"][0]
        assert (top["label"], top["reference"], top["kind"]) == ("seized_ivory", f"seized_ivory/{p.name}", "duplicate"), result
        assert result["decision"] == "block" and result["triggered_by"] == ["gallery:seized_ivory"]
    unrelated = sorted((caltech / "val" / "other").glob("*.jpg"))[::40] + sorted((generic / "val" / "other").glob("*.jpg"))[::40]
    for p in unrelated:
        result = checker.check(p.read_bytes())
        assert result["matches"] == [] and result["decision"] == "allow", (p.name, result["matches"])


FEW_SHOT_CATEGORY = "watch"  # a Caltech-101 category standing in for a product type; 23 held-out val photos


@pytest.fixture(scope="module")
def watch_gallery(embedder, tmp_path_factory) -> Path:
    """A few-shot label, ``wristwatch``, from 5 Caltech-101 train photos of one category, built with the embedder
    (once per module: the in-process and the `bentoml serve` tests share it)."""
    caltech, generic = shared_dataset("caltech101-negatives"), shared_dataset("generic-products")
    root = tmp_path_factory.mktemp("fewshot")
    ref = root / "ref" / "wristwatch"
    ref.mkdir(parents=True)
    for p in sorted((caltech / "train" / "other").glob(f"{FEW_SHOT_CATEGORY}_image_*.jpg"))[:5]:
        shutil.copy(p, ref / p.name)
    neg = root / "neg"
    neg.mkdir()
    others = [p for p in sorted((caltech / "train" / "other").glob("*.jpg")) if not p.name.startswith(FEW_SHOT_CATEGORY)]
    for p in others[::30] + sorted((generic / "train" / "other").glob("*.jpg"))[:40]:
        shutil.copy(p, neg / p.name)
    out = root / "fewshot.npz"
    built = _cli("gallery", "build", root / "ref", "--model", embedder, "--out", out, "--negatives", neg)
    assert built.exit_code == 0, built.output
    return out


def _held_out(category: str = FEW_SHOT_CATEGORY) -> list[Path]:
    return sorted((shared_dataset("caltech101-negatives") / "val" / "other").glob(f"{category}_image_*.jpg"))


@pytest.mark.realdata
def test_few_shot_label_from_five_references_catches_held_out_photos_through_the_service(embedder, watch_gallery):
    """Through the checker the service runs for /v1/check_batch, on every held-out photo; the real `bentoml serve`
    test below sends a few of them to a running server."""
    from serving.checker import ImageChecker

    checker = ImageChecker(str(embedder), gallery=str(watch_gallery))
    described = checker.describe()["gallery"]
    assert described["labels"] == {"wristwatch": 5} and described["source"] == watch_gallery.name  # never the server path
    held_out = _held_out()
    caught = 0
    for i in range(0, len(held_out), 8):
        for item in checker.check_many([(p.read_bytes(), "image/jpeg") for p in held_out[i:i + 8]]):
            hit = [m for m in item["matches"] if m["label"] == "wristwatch"]
            if hit:
                assert item["decision"] in ("review", "block") and "gallery:wristwatch" in item["triggered_by"]
                caught += 1
    assert caught / len(held_out) >= 0.6, f"{caught} of {len(held_out)} held-out {FEW_SHOT_CATEGORY} photos caught"


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "wildcheck-ivory.onnx"


@pytest.mark.slow
@pytest.mark.realdata
def test_bentoml_serve_with_the_ivory_classifier_and_an_embedder_catches_a_few_shot_label(embedder, watch_gallery,
                                                                                        tmp_path):
    """`wildcheck serve ivory.onnx --embedder E --gallery G` (a real `bentoml serve`): held-out photos of the few-shot
    label are matched through the embedder's embedding and sent to review; an unrelated photo matches nothing;
    /v1/model describes both models."""
    import httpx

    from tests.test_e2e_serve import _serve

    held_out = _held_out()[:4]
    unrelated = sorted((shared_dataset("generic-products") / "val" / "other").glob("*.jpg"))[0]
    with _serve(SHIPPED, tmp_path, ["--embedder", str(embedder), "--gallery", str(watch_gallery), "--workers", "1"]) as (base, auth):
        r = httpx.post(base + "/v1/check_batch", headers=auth, timeout=60,
                       files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in held_out])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        caught = [x for x in results if x["matches"] and x["matches"][0]["label"] == "wristwatch"]
        assert len(caught) >= 3, [x["matches"] for x in results]
        for x in caught:  # the classifier (ivory vs other) allows a watch; the gallery sends it to review
            assert x["decision"] == "review" and "gallery:wristwatch" in x["triggered_by"], x
            assert x["model"]["name"] == "wildcheck-ivory" and "ivory" in x["scores"]
        r = httpx.post(base + "/v1/check", headers=auth, timeout=60,
                       files={"image": (unrelated.name, unrelated.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["matches"] == [], r.text
        assert not [t for t in r.json()["triggered_by"] if t.startswith("gallery:")]
        described = httpx.get(base + "/v1/model", headers=auth, timeout=30).json()
    assert described["name"] == "wildcheck-ivory" and described["embedder"]["version"] == described["gallery"]["model_version"]
    assert described["embedder"]["name"].startswith("wildcheck-embedder") and described["gallery"]["labels"] == {"wristwatch": 5}


def test_a_large_gallery_stores_its_search_index_and_loads_it_without_rebuilding(tmp_path):
    """The IVF index is stored and loaded; a gallery saved with the HNSW graph galleries stored before still loads."""
    from serving.gallery import Gallery, GalleryHeader, solve_thresholds
    from serving.search import FaissIndex

    rng = np.random.default_rng(1)
    refs = rng.standard_normal((3000, 32)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    labels = np.zeros(3000, np.int32)
    header = GalleryHeader(model_name="m", model_version="1", contract_hash="h", embedding={"size": 32, "producer": "test"},
                           labels=["known"], reference_ids=[f"r{i}" for i in range(3000)], sources=[""] * 3000,
                           thresholds=solve_thresholds(refs, labels, ["known"], np.zeros((0, 32), np.float32), 0.01),
                           created_at="", updated_at="")
    for kind in ("ivf", "hnsw"):
        gallery = Gallery(header, refs, labels, np.zeros(3000, np.uint64), np.zeros((0, 32), np.float32), exact_max=1000)
        gallery._index = FaissIndex(refs, kind=kind)
        gallery.save(tmp_path / f"{kind}.npz")
        loaded = Gallery.load(tmp_path / f"{kind}.npz", exact_max=1000)
        assert isinstance(loaded._index, FaissIndex) and len(loaded._index) == 3000
        assert loaded.describe()["search"].startswith(kind)
        top = loaded.match(refs[1234])[0]
        assert top.reference == "r1234" and top.similarity == pytest.approx(1.0, abs=2e-3), kind  # a cosine either way


@pytest.mark.realdata
def test_a_known_photo_posted_as_one_tile_of_a_collage_matches_through_the_contracts_tiles(embedder, tmp_path):
    import onnx

    from serving.checker import ImageChecker

    met, generic = shared_dataset("met-ivory"), shared_dataset("generic-products")
    tiled = tmp_path / "tiled.onnx"  # the same graph, its contract asking for the whole picture + 2x2 tiles
    model = onnx.load(str(embedder))
    next(p for p in model.metadata_props if p.key == "wildcheck.tiling").value = json.dumps({"grid": 2})
    onnx.save(model, str(tiled))
    refs = sorted((met / "val" / "other").glob("*.jpg"))[:4]
    _folder(tmp_path / "ref", "known", [Image.open(p).convert("RGB") for p in refs])
    neg = _folder(tmp_path / "neg", "other", [Image.open(p).convert("RGB") for p in sorted((generic / "train" / "other").glob("*.jpg"))[:30]])
    out = tmp_path / "g.npz"
    assert _cli("gallery", "build", tmp_path / "ref", "--model", tiled, "--out", out, "--negatives", neg).exit_code == 0
    others = [Image.open(p).convert("RGB").resize((256, 256)) for p in sorted((generic / "val" / "other").glob("*.jpg"))[:3]]
    collage = Image.new("RGB", (512, 512), "white")
    for i, im in enumerate([others[0], Image.open(refs[2]).convert("RGB").resize((256, 256)), *others[1:]]):
        collage.paste(im, ((i % 2) * 256, (i // 2) * 256))
    result = ImageChecker(str(tiled), gallery=str(out)).check(jpeg_bytes(collage))
    assert result["matches"][0]["reference"] == "known/known_2.jpg" and result["matches"][0]["kind"] == "duplicate", result


def test_a_large_gallery_is_served_from_its_index_without_a_full_precision_copy_and_still_edits(tmp_path):
    """Above the exact-search size the loaded gallery holds the faiss index (its float16 re-rank vectors) and small
    per-reference arrays, never the (n, d) float32 embeddings; it finds the same duplicates and similar photos as
    the full-precision exact search, a pHash hit outside the nearest gets its similarity from the index, and
    add/remove still work (the file's float16 embeddings are read when an edit needs them)."""
    from serving.gallery import Gallery, GalleryError, GalleryHeader

    rng = np.random.default_rng(3)
    n, d, kinds = 3000, 128, 30
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    centres = unit(rng.standard_normal((kinds, d)))
    kind_of = rng.integers(kinds, size=n)
    refs = unit(centres[kind_of] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d))  # ~0.85 to the centre
    negatives = unit(rng.standard_normal((400, d)))  # unrelated photos
    labels = (kind_of % 3).astype(np.int32)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64)

    def header():
        return GalleryHeader(model_name="m", model_version="1", contract_hash="h", embedding={"size": d, "producer": "t"},
                             labels=["a", "b", "c"], reference_ids=[f"r{i}" for i in range(n)], sources=[""] * n,
                             thresholds={}, created_at="", updated_at="")

    exact = Gallery(header(), refs, labels, hashes, negatives, exact_max=10_000)  # as before: float32, exact search
    exact.resolve()
    large = Gallery(header(), refs, labels, hashes, negatives, exact_max=1000)
    large.resolve()
    large.save(tmp_path / "large.npz")
    loaded = Gallery.load(tmp_path / "large.npz", exact_max=1000)

    held = {k: v for k, v in vars(loaded).items() if isinstance(v, np.ndarray)}
    assert loaded._embeddings is None and not any(v.ndim == 2 and len(v) == n for v in held.values()), held.keys()
    assert sum(v.nbytes for v in held.values()) < n * 16 + negatives.nbytes  # labels, hashes (+ the negatives)
    assert loaded.describe()["search"].startswith("ivf") and loaded.describe()["references"] == n

    near = unit(refs[:60] + 0.25 * rng.standard_normal((60, d)) / np.sqrt(d))  # re-posted copies
    new = unit(centres[kind_of[60:120]] + 0.6 * rng.standard_normal((60, d)) / np.sqrt(d))  # new photos of a kind
    probe_hash = [int(hashes[i]) for i in range(200, 220)]  # a pHash hit on an unrelated query vector
    queries = [(q, None) for q in np.concatenate([near, new])] + [(negatives[i], h) for i, h in enumerate(probe_hash)]
    kinds_seen = set()
    for q, h in queries:
        want, got = exact.match(q, h), loaded.match(q, h)
        assert [(m.reference, m.kind, m.hamming) for m in got] == [(m.reference, m.kind, m.hamming) for m in want]
        assert np.allclose([m.similarity for m in got], [m.similarity for m in want], atol=2e-3)
        kinds_seen |= {m.kind for m in got}
    assert kinds_seen == {"duplicate", "similar"}
    assert loaded.match(near[0])[0].reference == "r0" and loaded.match(near[0])[0].kind == "duplicate"
    assert loaded.match(negatives[0], probe_hash[0])[0].reference == "r200"  # found by pHash, scored from the index

    extra = unit(rng.standard_normal((5, d)))
    loaded.add(extra, ["d"] * 5, rng.integers(0, 2**63, 5, dtype=np.uint64), [f"new{i}" for i in range(5)], [""] * 5)
    assert loaded.embeddings.dtype == np.float16 and loaded.embeddings.shape == (n + 5, d)
    assert loaded.remove(["r0"]) == 1
    loaded.save(tmp_path / "large.npz")
    edited = Gallery.load(tmp_path / "large.npz", exact_max=1000)
    assert edited._embeddings is None and len(edited) == n + 4
    top = edited.match(extra[2])[0]
    assert (top.reference, top.label, top.kind) == ("new2", "d", "duplicate")
    assert all(m.reference != "r0" for m in edited.match(refs[0]))

    (tmp_path / "large.npz").write_bytes((tmp_path / "large.npz").read_bytes() + b"\0")  # replaced after loading
    with pytest.raises(GalleryError, match="changed since it was loaded"):
        edited.remove(["r1"])


def _met_refs(root: Path) -> Path:
    """Two real Met ivory photos as references of one label."""
    ivory = sorted((shared_dataset("met-ivory") / "val" / "ivory").glob("*.jpg"))[:2]
    return _folder(root, "seized_ivory", [Image.open(p).convert("RGB") for p in ivory])


def test_build_into_a_new_folder_and_edits_of_a_missing_gallery_leave_no_lock(onnx_model, tmp_path):
    """`build --out newdir/sub/g.npz` was a FileNotFoundError traceback (the lock was opened before the folder
    existed); `remove missing.npz` left an empty missing.npz.lock behind, as did a build that failed."""
    from serving.gallery import Gallery

    ref = _met_refs(tmp_path / "ref")
    out = tmp_path / "newdir" / "sub" / "g.npz"
    built = _cli("gallery", "build", ref, "--model", onnx_model, "--out", out)
    assert built.exit_code == 0, built.output
    assert Gallery.load(out).describe()["labels"] == {"seized_ivory": 2}
    missing = tmp_path / "missing.npz"
    for args in (("remove", missing, "--reference", "x"), ("add", missing, ref, "--model", onnx_model)):
        result = _cli("gallery", *args)
        assert result.exit_code == 2 and result.output.startswith("error: ") and "not found" in result.output, result.output
    unreadable = tmp_path / "broken"
    (unreadable / "seized_ivory").mkdir(parents=True)
    (unreadable / "seized_ivory" / "cut.jpg").write_bytes((ref / "seized_ivory" / "seized_ivory_0.jpg").read_bytes()[:300])
    failed = _cli("gallery", "build", unreadable, "--model", onnx_model, "--out", tmp_path / "failed.npz")
    assert failed.exit_code == 2 and "could be read" in failed.output, failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "newdir", "ref"]  # no .lock, no gallery


def test_build_refuses_a_bad_fpr_before_any_embedding(onnx_model, tmp_path, monkeypatch):
    """`--fpr 0` (or -1, 1.5, nan) embedded every reference and negative, then ended in a pydantic traceback."""
    import serving.gallery_build

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before refusing the --fpr")

    monkeypatch.setattr(serving.gallery_build, "embed_paths", no_embedding)
    ref = _met_refs(tmp_path / "ref")
    for fpr in ("0", "-1", "1.5", "nan"):
        result = _cli("gallery", "build", ref, "--model", onnx_model, "--out", tmp_path / "g.npz", f"--fpr={fpr}")
        assert result.exit_code == 2 and result.output.startswith("error: --fpr "), (fpr, result.output)
        assert "between 0 and 1" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]


def test_info_on_a_model_or_a_folder_says_what_it_is(onnx_model, tmp_path):
    """`gallery info m1.onnx` quoted numpy's advice to load it with `allow_pickle=` (unsafe); `gallery info refs/`
    said "not found"."""
    ref = _met_refs(tmp_path / "ref")
    model = _cli("gallery", "info", onnx_model)
    assert model.exit_code == 2 and "is not a gallery file" in model.output and "pickle" not in model.output, model.output
    folder = _cli("gallery", "info", ref)
    assert folder.exit_code == 2 and "is a folder, not a gallery file" in folder.output, folder.output
