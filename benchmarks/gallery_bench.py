"""Reference-gallery benchmark: few-shot product types, known photos posted again, and search at scale.

    nice -n 10 python benchmarks/gallery_bench.py fewshot --model MODEL.onnx      # or --pretrained tf_efficientnet_lite0
    nice -n 10 python benchmarks/gallery_bench.py known --model MODEL.onnx
    nice -n 10 python benchmarks/gallery_bench.py scale --model EMBEDDER.onnx --sizes 10000 100000 1000000
    python benchmarks/gallery_bench.py serve --model MODEL.onnx --embedder EMBEDDER.onnx --sizes 10000   # added time per request
    nice -n 10 python benchmarks/gallery_bench.py memory-build --model EMBEDDER.onnx --sizes 1000000 --gallery G.npz
    python benchmarks/gallery_bench.py memory-load --gallery G.npz --json out.json     # a worker's RSS and load time
    nice -n 10 python benchmarks/gallery_bench.py memory-edit --gallery G.npz     # `gallery remove` at that size
    python benchmarks/gallery_bench.py memory-compare --json before.json --against after.json   # same matches?
    python benchmarks/gallery_bench.py precision --model EMBEDDER.onnx     # float16 reference vectors vs float32

fewshot: 20 Caltech-101 categories of caltech101-negatives (the 20 with most val images, clutter excluded)
stand in for product types; k references each from train; queries = their val images; distractors =
generic-products val + the other categories' val. Per category the threshold lets 1% of distractors
through; reported: mean recall over categories for k = 1, 3, 5, 10 (3 draws of references each).

known: references = every other Met val image; queries = each reference under six transformations;
distractors = the other Met val images + val of generic-products, caltech101-negatives, listings-everyday
and art-antiques. The gallery's thresholds are solved by ``serving.gallery`` on 1,500 *train* negatives
(as ``wildcheck gallery build --negatives``), then reported: duplicate recall (of the right reference)
per transformation and the false-duplicate rate on the distractors, for embedding-only, pHash-only
and both; collage tiles also with the four 2 x 2 tiles as extra query views.

scale: references drawn around real embeddings (``Mixture``: the --model embedder's embeddings of the
shared val photos as centres, Gaussian noise with their covariance); queries = 300 near-copies of
references (cosine ~0.93) and 300 new photos of the same kinds. For the IVF index serving uses above its
exact-search size (``serving.search.FaissIndex``, IVF) and the HNSW graph it used before, each built block
by block so 1M x 1,280 floats are never in memory at once: build time, index size, query latency p50/p99
on one core (one faiss thread, the process pinned to one CPU) and recall@1 against exact search
(computed block by block), per nprobe / efSearch; exact numpy search up to 100k references.

memory-build / memory-load: a gallery file of ``Mixture`` references (20 labels, thresholds solved on 1,000
new-photo draws) with 500 queries beside it (200 near-copies, 200 new photos, 100 pHash hits on unrelated vectors);
memory-load loads it as a worker does and answers them: load time, RSS after load, steady and peak, the arrays the
gallery holds, every match (--json: to compare two versions of the code on one file).

Embeddings are cached under --cache (per embedder and image list) so reruns are cheap.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("WILDCHECK_SHARED", REPO.parent / "shared")) / "datasets"

from serving.gallery import Gallery, GalleryHeader, solve_thresholds  # noqa: E402
from serving.gallery import preprocess_and_hash  # noqa: E402
from serving.imageio import images_under  # noqa: E402
from serving.preprocess import Preprocessing  # noqa: E402
from training.fileio import atomic_savez  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# embedders


class OnnxEmbedder:
    """A wildcheck model's ``embedding`` output, or a bare embedder graph (``export_pretrained``)."""

    def __init__(self, path: str, threads: int = int(os.environ.get("BENCH_THREADS", "2"))):
        import onnxruntime as ort

        from serving.contract import ContractError, read_contract

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        try:
            contract = read_contract(path)
            self.pre, self.name = contract.preprocessing, f"onnx-{contract.model_version}"
        except ContractError:
            self.pre, self.name = Preprocessing(), f"onnx-{Path(path).stem}"
        with open(path, "rb") as fh:  # the cache's key: a version or a file name outlives the weights it named
            self.fingerprint = f"{self.name}-{hashlib.file_digest(fh, 'sha256').hexdigest()[:16]}"
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["embedding"], {self.input: batch})[0]


def export_pretrained(arch: str, out: Path) -> None:
    """The ImageNet-pretrained backbone as a bare ``image -> embedding`` graph (for the comparison)."""
    import torch
    import torch.nn.functional as F

    from training.embedding import pooled_features
    from training.models import create_model

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = create_model(arch, num_classes=1000, pretrained="offline").eval()

        def forward(self, x):
            return F.normalize(pooled_features(self.model, x), dim=1)

    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(Embedder().eval(), (torch.randn(2, 3, 224, 224),), str(out), input_names=["image"],
                      output_names=["embedding"], opset_version=18, dynamo=True, external_data=False,
                      dynamic_shapes=({0: batch},))


class PretrainedEmbedder:
    """The ImageNet-pretrained backbone (offline weights), pooled features, L2-normalised."""

    def __init__(self, arch: str):
        import torch
        import torch.nn.functional as F

        from training.embedding import pooled_features
        from training.models import create_model

        torch.set_num_threads(2)
        self.torch, self.F, self.pooled = torch, F, pooled_features
        self.model = create_model(arch, num_classes=1000, pretrained="offline").eval()
        self.pre = Preprocessing()  # lite0's data config: 224, bicubic, crop 0.875, mean = std = 0.5
        self.name = f"pretrained-{arch}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.F.normalize(self.pooled(self.model, self.torch.from_numpy(batch)), dim=1).numpy()


def embed_images(embedder, images: list[Image.Image], cache: Path, key: str, batch_size: int = 32) -> np.ndarray:
    """Embeddings of PIL images, cached by the embedder (an ONNX file's contents, not only its version or name:
    two exports of version 1.0.0 are two models) + key; written atomically, so an interrupted run leaves no half file
    for the next one to load."""
    from training.fileio import atomic_path

    cache.mkdir(parents=True, exist_ok=True)
    file = cache / f"{getattr(embedder, 'fingerprint', embedder.name)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
    if file.exists():
        return np.load(file)
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=f"embed {len(images)}", leave=False):
        out.append(embedder(np.stack([embedder.pre(im) for im in images[i:i + batch_size]])))
    emb = np.concatenate(out).astype(np.float32)
    with atomic_path(file) as tmp, open(tmp, "wb") as fh:
        np.save(fh, emb)
    return emb


def load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


LIMIT = int(os.environ.get("BENCH_LIMIT", "0"))  # smoke runs: at most this many files per folder


def files(*parts: str) -> list[Path]:
    root = SHARED.joinpath(*parts)
    found = images_under(root)
    return found[:: max(1, len(found) // LIMIT)][:LIMIT] if LIMIT else found


# ---------------------------------------------------------------------------------------------------
# few-shot


def category(path: Path) -> str:
    return path.name.split("_image_")[0]


def fewshot(embedder, cache: Path, ks=(1, 3, 5, 10), draws: int = 3, fpr: float = 0.01) -> dict:
    val = files("caltech101-negatives", "val")
    train = files("caltech101-negatives", "train")
    counts: dict[str, int] = {}
    for p in val:
        counts[category(p)] = counts.get(category(p), 0) + 1
    cats = sorted((c for c in counts if c != "background_google"), key=lambda c: (-counts[c], c))[:20]
    # references are drawn from the first 20 train images of each category (fewer images to embed)
    train = [p for c in cats for p in [q for q in train if category(q) == c][:20]]
    generic = files("generic-products", "val")
    pool = val + generic + train
    emb = embed_images(embedder, [load(p) for p in pool], cache, "fewshot:" + ",".join(map(str, pool)))
    e_val, e_gen, e_train = emb[:len(val)], emb[len(val):len(val) + len(generic)], emb[len(val) + len(generic):]
    val_cat = np.array([category(p) for p in val])
    train_cat = np.array([category(p) for p in train])
    result = {"categories": cats, "queries": int(sum(counts[c] for c in cats)), "distractors_generic": len(generic)}
    for k in ks:
        recalls = []
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            per_cat = []
            for c in cats:
                idx = np.nonzero(train_cat == c)[0]
                if len(idx) == 0 or not (val_cat == c).any():
                    continue
                refs = e_train[rng.choice(idx, size=min(k, len(idx)), replace=False)]
                distract = np.concatenate([e_gen, e_val[val_cat != c]])
                d_scores = np.sort((distract @ refs.T).max(1))[::-1]
                t = np.nextafter(d_scores[int(np.floor(fpr * len(d_scores)))], 2.0)
                q_scores = (e_val[val_cat == c] @ refs.T).max(1)
                per_cat.append(float((q_scores >= t).mean()))
            recalls.append(float(np.mean(per_cat)))
        result[f"k={k}"] = {"recall_mean": round(float(np.mean(recalls)), 4), "per_draw": [round(r, 4) for r in recalls]}
        print(f"few-shot k={k}: recall at {fpr:.0%} distractors {np.mean(recalls):.3f} (draws {recalls})", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------
# known photos

BANNER_TEXTS = ["$450 FREE SHIPPING", "SALE 30% OFF - DM NOW", "EUR 1200 obo WhatsApp +44 7700 900123", "ANTIQUE - BEST PRICE"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def t_resize(im, rng):
    w, h = im.size
    return im.resize((max(8, round(w * 0.3)), max(8, round(h * 0.3))), Image.Resampling.BILINEAR)


def t_jpeg(im, rng):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(20, 41)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def t_crop(im, rng):
    w, h = im.size
    frac = rng.uniform(0.10, 0.30)  # of the area removed
    side = np.sqrt(1.0 - frac)
    cw, ch = round(w * side), round(h * side)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def t_banner(im, rng):
    im = im.copy()
    w, h = im.size
    bh = max(12, round(h * rng.uniform(0.10, 0.18)))
    y = 0 if rng.random() < 0.5 else h - bh
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, y, w, y + bh), fill=colour)
    text_colour = (255, 255, 255) if sum(colour) < 384 else (0, 0, 0)
    draw.text((6, y + bh * 0.15), BANNER_TEXTS[int(rng.integers(len(BANNER_TEXTS)))], fill=text_colour, font=_font(int(bh * 0.6)))
    return im


def t_frame(im, rng):
    """A screenshot: status bar on top, app chrome at the bottom, coloured margins."""
    w, h = im.size
    mx, top, bottom = round(w * rng.uniform(0.04, 0.12)), round(h * rng.uniform(0.10, 0.18)), round(h * rng.uniform(0.08, 0.16))
    bg = (245, 245, 245) if rng.random() < 0.5 else (24, 24, 24)
    canvas = Image.new("RGB", (w + 2 * mx, h + top + bottom), bg)
    canvas.paste(im, (mx, top))
    draw = ImageDraw.Draw(canvas)
    fg = (0, 0, 0) if bg[0] > 128 else (255, 255, 255)
    draw.text((mx, top * 0.2), "9:41   seller_shop   Follow", fill=fg, font=_font(max(8, int(top * 0.4))))
    draw.text((mx, h + top + bottom * 0.2), "♡ 1,204 likes  Message seller", fill=fg, font=_font(max(8, int(bottom * 0.4))))
    return canvas


def collage(im, others: list[Image.Image], rng) -> tuple[Image.Image, int]:
    """2 x 2 grid; the reference in a random cell. Returns the collage and the reference's cell."""
    side = 256
    cell = int(rng.integers(4))
    tiles = list(others[:3])
    tiles.insert(cell, im)
    canvas = Image.new("RGB", (2 * side, 2 * side), (255, 255, 255))
    for i, t in enumerate(tiles):
        canvas.paste(t.resize((side, side), Image.Resampling.BILINEAR), ((i % 2) * side, (i // 2) * side))
    return canvas, cell


def tiles_2x2(im: Image.Image) -> list[Image.Image]:
    w, h = im.size
    return [im.crop((x, y, x + w // 2, y + h // 2)) for y in (0, h // 2) for x in (0, w // 2)]


TRANSFORMS = {"resize_30": t_resize, "jpeg_q20_40": t_jpeg, "crop_10_30": t_crop, "banner": t_banner, "frame": t_frame}


def known(embedder, cache: Path, negatives: int = 1500) -> dict:
    def phash(im):  # as serving hashes: after the model's resize
        return preprocess_and_hash(embedder.pre, im)[1]

    met = files("met-ivory", "val")
    refs, met_distract = met[0::2], met[1::2]
    neg_val = (files("generic-products", "val") + files("caltech101-negatives", "val")
               + files("listings-everyday", "val") + files("art-antiques", "val"))
    train_pool = (files("met-ivory", "train") + files("generic-products", "train") + files("caltech101-negatives", "train")
                  + files("listings-everyday", "train") + files("art-antiques", "train"))
    neg_train = sorted(random.Random(0).sample(train_pool, min(negatives, len(train_pool))))
    ref_imgs = [load(p) for p in refs]
    rng = np.random.default_rng(0)
    queries: dict[str, list[Image.Image]] = {name: [fn(im, rng) for im in ref_imgs] for name, fn in TRANSFORMS.items()}
    distract_imgs = [load(p) for p in met_distract + neg_val]
    collages, cells = [], []
    for i, im in enumerate(ref_imgs):
        others = [distract_imgs[j] for j in rng.choice(len(distract_imgs), 3, replace=False)]
        made, cell = collage(im, others, rng)
        collages.append(made)
        cells.append(cell)
    queries["collage_tile"] = collages
    # only the tile that holds the reference is embedded: recall of the right reference over the whole
    # collage + its 4 tiles is decided by that tile (the others hold distractors)
    tiles = [tiles_2x2(c)[cell] for c, cell in zip(collages, cells)]

    def emb(name, images, paths_key):
        return embed_images(embedder, images, cache, f"known:{name}:{paths_key}")

    key = ",".join(map(str, refs))
    e_ref = emb("refs", ref_imgs, key)
    e_q = {name: emb(name, ims, key) for name, ims in queries.items()}
    e_tiles = emb("tiles", tiles, key).reshape(len(collages), 1, -1)
    e_dis = emb("distract", distract_imgs, ",".join(map(str, met_distract + neg_val)))
    e_neg = emb("negtrain", [load(p) for p in neg_train], ",".join(map(str, neg_train)))
    h_ref = np.array([phash(im) for im in ref_imgs], np.uint64)
    h_q = {name: [phash(im) for im in ims] for name, ims in queries.items()}
    h_dis = [phash(im) for im in distract_imgs]
    h_tiles = [phash(im) for im in tiles]

    thresholds = solve_thresholds(e_ref, np.zeros(len(refs), np.int32), ["known"], e_neg, 0.01)
    header = GalleryHeader(model_name="bench", model_version="bench", contract_hash="-",
                           embedding={"size": e_ref.shape[1], "producer": embedder.name}, labels=["known"],
                           reference_ids=[str(i) for i in range(len(refs))], sources=[""] * len(refs),
                           thresholds=thresholds, created_at="", updated_at="")
    gallery = Gallery(header, e_ref, np.zeros(len(refs), np.int32), h_ref, e_neg)
    solved = gallery.thresholds["known"]
    modes = {
        "both": solved,
        "embedding_only": solved.model_copy(update={"duplicate_hamming": -1}),
        "phash_only": solved.model_copy(update={"duplicate": 2.0}),
    }
    result = {"references": len(refs), "distractors": len(distract_imgs), "negatives_for_thresholds": len(neg_train),
              "thresholds": solved.model_dump(), "modes": {}}
    for mode, rule in modes.items():
        gallery.thresholds = {"known": rule}

        def is_dup(views, h, want=None):
            ms = gallery.match(views, h)
            return any(m.kind == "duplicate" and (want is None or m.reference == want) for m in ms)

        false = sum(is_dup(e_dis[i], h_dis[i]) for i in range(len(distract_imgs)))
        row = {"false_duplicate_rate": round(false / len(distract_imgs), 5), "false_duplicates": int(false)}
        for name in queries:
            hits = sum(is_dup(e_q[name][i], h_q[name][i], str(i)) for i in range(len(refs)))
            row[name] = round(hits / len(refs), 4)
        hits = sum(is_dup(np.vstack([e_q["collage_tile"][i][None], e_tiles[i]]), [h_q["collage_tile"][i], h_tiles[i]], str(i))
                   for i in range(len(refs)))
        row["collage_tile+2x2_views"] = round(hits / len(refs), 4)
        # false duplicates when every distractor is also looked at as 2x2 tiles would need their tiles' embeddings;
        # the tiles of the collages that do not hold a reference stand in (3 of 4 tiles are distractors)
        result["modes"][mode] = row
        print(mode, json.dumps(row), flush=True)
    # margins: the right reference's similarity / pHash distance per transformation vs the distractors' best
    from serving.phash import hamming

    d_best = (e_dis @ e_ref.T).max(1)
    d_ham = np.array([hamming(h, h_ref).min() for h in h_dis])
    diag = {"distractors": {"similarity_max": round(float(d_best.max()), 4),
                            "similarity_p99.9": round(float(np.quantile(d_best, 0.999)), 4),
                            "hamming_min": int(d_ham.min()), "hamming_p0.1": float(np.quantile(d_ham, 0.001))}}
    q = lambda a, ps: [round(float(np.quantile(a, p)), 4) for p in ps]  # noqa: E731
    for name in queries:
        own = np.einsum("ij,ij->i", e_q[name], e_ref)
        if name == "collage_tile":
            tiles_own = np.einsum("ivj,ij->iv", e_tiles, e_ref).max(1)
            diag[name + "+2x2_views"] = {"similarity_p5_p10_p50": q(np.maximum(own, tiles_own), (0.05, 0.1, 0.5))}
        ham = np.array([hamming(h, h_ref[i:i + 1])[0] for i, h in enumerate(h_q[name])])
        diag[name] = {"similarity_p5_p10_p50": q(own, (0.05, 0.1, 0.5)), "hamming_p50_p90_p95": q(ham, (0.5, 0.9, 0.95))}
    result["margins"] = diag
    # the issue's operating point: the similarity threshold at which <= 0.1% of the distractors are duplicates
    # (pHash <= the gallery's bits counts too); recall = the right reference reaches it, per transformation
    bits = solved.duplicate_hamming
    d_sims = np.sort(d_best[d_ham > bits])[::-1]
    allowed = int(np.floor(0.001 * len(d_best))) - int((d_ham <= bits).sum())
    t = float(np.nextafter(np.float32(d_sims[max(allowed, 0)]), np.float32(2.0))) if allowed >= 0 else 2.0
    point = {"similarity_threshold": round(t, 4), "pHash_bits": bits}
    for name in queries:
        own = np.einsum("ij,ij->i", e_q[name], e_ref)
        ham = np.array([hamming(h, h_ref[i:i + 1])[0] for i, h in enumerate(h_q[name])])
        point[name] = round(float(((own >= t) | (ham <= bits)).mean()), 4)
        if name == "collage_tile":
            tile_own = np.einsum("ivj,ij->iv", e_tiles, e_ref).max(1)
            tile_ham = np.array([hamming(h, h_ref[i:i + 1])[0] for i, h in enumerate(h_tiles)])
            point[name + "+2x2_views"] = round(float(((np.maximum(own, tile_own) >= t) | (ham <= bits) | (tile_ham <= bits)).mean()), 4)
    result["at_0.1pct_false_duplicates"] = point
    print("at 0.1% false duplicates", json.dumps(point), flush=True)
    print(json.dumps(diag), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------
# scale


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak) in MB; NaN where there is none."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def real_centres(model: str, cache: Path) -> np.ndarray:
    """Embeddings of the shared datasets' val photos (every product kind the service sees)."""
    paths = [p for name in ("met-ivory", "generic-products", "caltech101-negatives", "listings-everyday", "art-antiques")
             for p in files(name, "val")]
    return embed_images(OnnxEmbedder(model), [load(p) for p in paths], cache, "centres:" + ",".join(map(str, paths)))


class Mixture:
    """Synthetic references around real embeddings: ``normalize(c + a * noise)``, c a real photo's embedding,
    a ~ U(0.5, 1.0), noise Gaussian with the real embeddings' covariance (their top ``rank`` principal
    components exactly, the remaining variance spread evenly over all dimensions). A reference's cosine to its
    centre is ~0.8-0.9, two references of one centre ~0.7 (what photos of one kind of object look like)."""

    def __init__(self, centres: np.ndarray, rank: int = 256, seed: int = 0):
        self.centres, self.seed, self.dim = centres.astype(np.float32), seed, centres.shape[1]
        x = centres - centres.mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        var = s**2 / len(x)
        self.basis = (np.sqrt(var[:rank])[:, None] * vt[:rank]).astype(np.float32)
        self.residual = float(np.sqrt(max(var[rank:].sum(), 0.0) / self.dim))
        self.total_variance = float(var.sum())

    def noise(self, rng, n: int) -> np.ndarray:
        out = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32) @ self.basis
        out += self.residual * rng.standard_normal((n, self.dim), dtype=np.float32)
        return out

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunk(self, j: int, n: int) -> np.ndarray:
        """The j-th block of references (the same every time: seeded by j)."""
        rng = np.random.default_rng([self.seed, j])
        c = self.centres[rng.integers(len(self.centres), size=n)]
        return self._unit(c + rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32) * self.noise(rng, n))

    def near_copy(self, x: np.ndarray, seed: int) -> np.ndarray:
        """A re-posted copy: cosine ~0.93 to the reference (measured transformations: 0.85-0.91 median)."""
        return self._unit(x + 0.45 * self.noise(np.random.default_rng([self.seed, seed, 1]), len(x)))


def scale(sizes, centres: np.ndarray, kinds=("ivf", "hnsw"), sweeps=None, queries: int = 300, chunk: int = 50_000,
          exact_max: int = 100_000, seed: int = 0) -> dict:
    """Per size and index kind: build time, index size, p50/p99 of one query on one core and recall@1 vs exact
    search, per search setting (IVF: nprobe; HNSW: efSearch)."""
    from serving.search import ExactIndex, FaissIndex, single_threaded_blas

    sweeps = sweeps or {"ivf": (8, 16, 32, 64), "hnsw": (16, 32, 64, 128)}
    single_threaded_blas()
    mix = Mixture(centres, seed=seed)
    cpu = sorted(os.sched_getaffinity(0))
    out = {"centres": len(centres), "dim": mix.dim, "total_variance": round(mix.total_variance, 4)}
    for n in sizes:
        rng = np.random.default_rng([seed, n])
        blocks = [(j, min(chunk, n - j * chunk)) for j in range((n + chunk - 1) // chunk)]
        res: dict = {}
        first = mix.chunk(*blocks[0])  # near-copies are of references in the first block (no order in an index)
        q = {"near_copy": mix.near_copy(first[rng.choice(len(first), queries, replace=False)], n),
             "new_photo": mix.chunk(10**6 + n, queries)}  # a new photo of a kind in the gallery
        allq = np.concatenate(list(q.values()))
        best_s, best_i = np.full(len(allq), -np.inf, np.float32), np.zeros(len(allq), np.int64)

        def exact_block(j: int, data: np.ndarray) -> None:
            """Exact search, block by block (while the first index is built): 1M x 1,280 floats never in memory."""
            sims = allq @ data.T
            arg = sims.argmax(1)
            top = sims[np.arange(len(allq)), arg]
            better = top > best_s
            best_s[better], best_i[better] = top[better], arg[better] + j * chunk

        def timed(search) -> dict:
            """Wall time and the thread's CPU time per query: on a shared machine the wall time's tail is other
            processes holding the core, the CPU time is what the search itself costs."""
            truth = {name: best_i[i * queries:(i + 1) * queries] for i, name in enumerate(q)}
            row, lat_all, cpu_all = {}, [], []
            os.sched_setaffinity(0, {cpu[-1]})  # one core
            try:
                for name in q:
                    top = []
                    for one in q[name]:
                        t, c = time.perf_counter(), time.thread_time()
                        _, idx = search(one[None], 16)  # serving.gallery.SEARCH_K
                        cpu_all.append((time.thread_time() - c) * 1000)
                        lat_all.append((time.perf_counter() - t) * 1000)
                        top.append(int(idx[0, 0]))
                    row[f"recall@1_{name}"] = round(float((np.array(top) == truth[name]).mean()), 4)
            finally:
                os.sched_setaffinity(0, cpu)
            for key, values in (("", lat_all), ("cpu_", cpu_all)):
                row[f"{key}p50_ms"] = round(float(np.percentile(values, 50)), 3)
                row[f"{key}p99_ms"] = round(float(np.percentile(values, 99)), 3)
            return row

        truth_done = False
        for kind in kinds:  # build time: train + add only (not making the vectors, not the exact search)
            index = FaissIndex.empty(mix.dim, n, kind)
            train_n = min(n, index.train_points)
            sample = np.concatenate([first] + [mix.chunk(j, m) for j, m in blocks[1:(train_n + chunk - 1) // chunk]])[:train_n]
            t0 = time.perf_counter()
            index.train(sample)
            train_s = build_s = time.perf_counter() - t0
            del sample
            for j, m in blocks:
                data = first if j == 0 else mix.chunk(j, m)
                t = time.perf_counter()
                index.add(data)
                build_s += time.perf_counter() - t
                if not truth_done:
                    exact_block(j, data)
                print(n, kind, f"added block {j + 1}/{len(blocks)}, build {build_s:.0f} s so far", flush=True)
            truth_done = True
            row = {"describe": index.describe(), "build_s": round(build_s, 1), "train_s": round(train_s, 1),
                   "index_mb": round(index.memory_bytes() / 2**20), "settings": {}}
            for setting in sweeps[kind]:
                index.configure(**({"nprobe": setting} if kind == "ivf" else {"ef_search": setting}))
                row["settings"][setting] = timed(index.search)
                print(n, kind, setting, json.dumps(row["settings"][setting]), flush=True)
            index.configure()
            res[kind] = row
            print(n, kind, json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
            del index
            gc.collect()
        if n <= exact_max:
            data = np.concatenate([mix.chunk(j, m) for j, m in blocks])
            res["exact"] = {"index_mb": round(data.nbytes / 2**20), **timed(ExactIndex(data).search)}
            print(n, "exact", json.dumps(res["exact"]), flush=True)
            del data
        res["peak_rss_mb"] = round(_peak_rss_mb())
        print(n, "peak RSS (MB, whole process so far)", res["peak_rss_mb"], flush=True)
        out[n] = res
    return out


# ---------------------------------------------------------------------------------------------------
# memory of a served gallery


def memory_build(refs: int, centres: np.ndarray, out: Path, dtype: str = "float16", labels: int = 20,
                 negatives: int = 1000, chunk: int = 50_000, seed: int = 0) -> dict:
    """A ``refs``-reference gallery file of ``Mixture`` vectors (``labels`` labels, random pHashes, thresholds solved
    on ``negatives`` new-photo draws), made block by block into one ``dtype`` array, plus its queries beside it
    (``OUT.queries.npz``): near-copies, new photos, and pHash-only probes (a new photo carrying a reference's
    pHash: that reference is rarely among the nearest, so its similarity is computed apart)."""
    mix = Mixture(centres, seed=seed)
    rng = np.random.default_rng([seed, refs, 7])
    emb = np.empty((refs, mix.dim), np.dtype(dtype))
    for j in range(0, refs, chunk):
        emb[j:j + chunk] = mix.chunk(j // chunk, min(chunk, refs - j))
    label_idx = (np.arange(refs) % labels).astype(np.int32)
    hashes = rng.integers(0, 2**63, refs, dtype=np.uint64)
    neg = mix.chunk(10**7, negatives)
    names = [f"kind_{i:02d}" for i in range(labels)]
    header = GalleryHeader(model_name="bench", model_version="1", contract_hash="bench",
                           embedding={"size": mix.dim, "producer": "gallery_bench memory"}, labels=names,
                           reference_ids=[f"r{i}" for i in range(refs)], sources=[""] * refs, thresholds={},
                           created_at="", updated_at="")
    t0 = time.perf_counter()
    gallery = Gallery(header, emb, label_idx, hashes, neg, source=str(out))
    del emb
    gallery.resolve()
    solve_s = time.perf_counter() - t0
    gallery.save(out)
    picked = rng.choice(refs, 300, replace=False)
    near = mix.near_copy(np.asarray(gallery.embeddings[picked[:200]], np.float32), refs)
    new = mix.chunk(10**6 + refs, 200)
    probe = mix.chunk(10**6 + refs + 1, 100)
    atomic_savez(str(out) + ".queries.npz", views=np.concatenate([near, new, probe]).astype(np.float32),
             phash=np.concatenate([rng.integers(0, 2**63, 400, dtype=np.uint64),
                                   hashes[picked[200:]]]))
    result = {"references": refs, "dtype": dtype, "resolve_s": round(solve_s, 1),
              "build_and_save_s": round(time.perf_counter() - t0, 1), "file_mb": round(out.stat().st_size / 2**20),
              "peak_rss_mb": round(_peak_rss_mb())}
    print(json.dumps(result), flush=True)
    return result


def precision(centres: np.ndarray, gallery: Path | None = None) -> dict:
    """Similarity error of float16 reference vectors vs float32, on real embeddings (every pair of the shared val
    photos): as a pHash hit is scored (q . fp16(r)) and as the IVF index re-ranks (1 - |q - fp16(r)|^2 / 2).
    ``gallery`` (a file with float32 embeddings): its thresholds solved on them vs on them rounded to float16."""
    from serving.search import FaissIndex

    e = np.ascontiguousarray(centres, np.float32)
    exact = e @ e.T
    dot = e @ e.astype(np.float16).astype(np.float32).T
    index = FaissIndex(e)  # as a large gallery stores it; its re-rank vectors, reconstructed
    rerank = e @ index.reconstruct(np.arange(len(e))).T
    sq = (index.reconstruct(np.arange(len(e))) ** 2).sum(1)
    l2 = 1.0 - ((e**2).sum(1)[:, None] + sq[None, :] - 2 * rerank) / 2.0
    band = (exact >= 0.8) & (exact <= 0.98)
    out = {"photos": len(e), "pairs": int(exact.size), "pairs_0.8_0.98": int(band.sum())}
    for name, approx in (("fp16_dot", dot), ("index_dot", rerank), ("index_l2", l2)):
        err = np.abs(approx - exact)
        out[name] = {"max_abs": float(f"{err.max():.2e}"), "p99.9_abs": float(f"{np.percentile(err, 99.9):.2e}"),
                     "max_abs_0.8_0.98": float(f"{err[band].max():.2e}")}
    if gallery is not None:
        with np.load(gallery) as npz:
            emb, labels, neg = npz["embeddings"], npz["labels"], npz["negatives"]
        names = [str(i) for i in range(int(labels.max()) + 1)]
        t32 = solve_thresholds(emb.astype(np.float32), labels, names, neg, 0.01)
        t16 = solve_thresholds(emb.astype(np.float16), labels, names, neg, 0.01)
        out["thresholds_fp16_vs_fp32_max_abs"] = {
            key: float(f"{max(abs(getattr(t16[n], key) - getattr(t32[n], key)) for n in names):.2e}")
            for key in ("similar", "duplicate")}
    print(json.dumps(out), flush=True)
    return out


def memory_edit(path: Path) -> dict:
    """``wildcheck gallery remove`` on a large gallery (load, remove one reference, save beside it): time and peak
    RSS (the embeddings are read from the file and the index rebuilt)."""
    t0 = time.perf_counter()
    gallery = Gallery.load(path)
    gallery.remove([gallery.header.reference_ids[0]])
    removed_s = time.perf_counter() - t0
    out = Path(str(path) + ".edited.npz")
    gallery.save(out)
    result = {"references": len(gallery.header.reference_ids), "load_and_remove_s": round(removed_s, 1),
              "total_s": round(time.perf_counter() - t0, 1), "embeddings": str(gallery.embeddings.dtype),
              "peak_rss_mb": round(_peak_rss_mb()), "file_mb": round(out.stat().st_size / 2**20)}
    print(json.dumps(result), flush=True)
    return result


def memory_compare(before: Path, after: Path) -> dict:
    """Two ``memory-load --json`` outputs on one file: do the matches (reference, kind, pHash distance) agree, and
    by how much do their similarities differ."""
    a, b = (json.loads(p.read_text())["matches"] for p in (before, after))
    key = lambda ms: [(m["reference"], m["kind"], m["hamming"]) for m in ms]  # noqa: E731
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if key(x) != key(y)]
    gaps = [(i, abs(m["similarity"] - o["similarity"])) for i, (x, y) in enumerate(zip(a, b)) if key(x) == key(y)
            for m, o in zip(x, y)]
    result = {"queries": len(a), "queries_with_other_matches": len(differ), "differing_queries": differ[:20],
              "matches_before": {k: sum(m["kind"] == k for ms in a for m in ms) for k in ("duplicate", "similar")},
              "max_abs_similarity_diff": round(max((g for _, g in gaps), default=0.0), 5),
              "queries_with_a_similarity_diff": sorted({i for i, g in gaps if g > 0})}
    print(json.dumps(result), flush=True)
    return result


def memory_load(path: Path, out: Path | None = None) -> dict:
    """Load a gallery file as a worker does and answer its queries (``memory_build``): load time, RSS after load,
    after the queries (steady) and peak (VmHWM), what the gallery holds in numpy arrays, and every match (``out``:
    written as JSON, to compare two versions of the code on the same file)."""
    import faiss  # noqa: F401  (imported before the baseline: every worker imports it)

    q = np.load(str(path) + ".queries.npz")
    views, hashes = q["views"], q["phash"]
    base = _rss_mb()
    t0 = time.perf_counter()
    gallery = Gallery.load(path)
    load_s = time.perf_counter() - t0
    after_load = _rss_mb()
    matches, times = [], []
    for v, h in zip(views, hashes):
        t = time.perf_counter()
        found = gallery.match(v[None], [int(h)])
        times.append((time.perf_counter() - t) * 1000)
        matches.append([m.model_dump() for m in found])
    held = {k: (str(v.dtype), round(v.nbytes / 2**20, 1)) for k, v in vars(gallery).items() if isinstance(v, np.ndarray)}
    result = {"file": str(path), "references": len(gallery.header.reference_ids), "load_s": round(load_s, 1),
              "rss_baseline_mb": round(base), "rss_after_load_mb": round(after_load), "rss_steady_mb": round(_rss_mb()),
              "peak_rss_mb": round(_peak_rss_mb()), "arrays_held_mb": held, "search": gallery.index.describe(),
              "queries": len(views), "match_p50_ms": round(float(np.percentile(times, 50)), 2),
              "match_p99_ms": round(float(np.percentile(times, 99)), 2)}
    print(json.dumps(result), flush=True)
    if out:
        out.write_text(json.dumps({**result, "matches": matches}))
    return result


def _random_gallery(contract, refs: int, path: Path) -> None:
    """``refs`` random unit vectors as one label (search time does not depend on what the vectors show)."""
    from serving.gallery import new_header

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((refs, contract.embedding.size), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    g = Gallery(new_header(contract, 0.01, {}), np.zeros((0, emb.shape[1]), np.float32), np.zeros(0, np.int32),
                np.zeros(0, np.uint64), np.zeros((0, emb.shape[1]), np.float32))
    g.add(emb, ["bench"] * refs, rng.integers(0, 2**63, refs, dtype=np.uint64), [str(i) for i in range(refs)], [""] * refs)
    g.save(path)


def serve_overhead(model: str, refs: int, embedder: str | None = None, rounds: int = 3) -> dict:
    """Per-request time of ImageChecker.check on real Met photos: without a gallery, with a ``refs``-reference
    gallery matched on the model's own embedding, and (``embedder``) with one matched on a separate embedder's
    embedding of the same views. Interleaved per photo, so load changes hit every variant alike."""
    import statistics
    import tempfile

    from serving.checker import ImageChecker
    from serving.contract import read_contract

    photos = [p.read_bytes() for p in files("met-ivory", "val")[:40]]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        own, separate = Path(tmp) / "own.npz", Path(tmp) / "embedder.npz"
        _random_gallery(read_contract(model), refs, own)
        checkers = {"without": ImageChecker(model), "own_embedding": ImageChecker(model, gallery=str(own))}
        if embedder:
            _random_gallery(read_contract(embedder), refs, separate)
            checkers["embedder"] = ImageChecker(model, gallery=str(separate), embedder=embedder)
        for c in checkers.values():
            c.warm_up()
            c.check(photos[0])  # builds nothing: the index came with the file
        times = {k: [] for k in checkers}
        for _ in range(rounds):
            for data in photos:
                for name, c in checkers.items():
                    t = time.perf_counter()
                    c.check(data)
                    times[name].append((time.perf_counter() - t) * 1000)
        for name, ts in times.items():
            out[name] = {"median_ms": round(statistics.median(ts), 2), "p90_ms": round(float(np.percentile(ts, 90)), 2)}
            if name != "without":
                out[name]["added_median_pct"] = round(100 * (out[name]["median_ms"] / out["without"]["median_ms"] - 1), 1)
        out["search"] = checkers["own_embedding"].gallery.index.describe()
    out["references"], out["requests_per_variant"] = refs, len(photos) * rounds
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["fewshot", "known", "scale", "serve", "export-pretrained", "memory-build", "memory-load", "memory-edit", "memory-compare", "precision"])
    ap.add_argument("--model", help="ONNX model with an embedding output")
    ap.add_argument("--embedder", help="serve: also measure a gallery matched with this separate embedder (--embedder)")
    ap.add_argument("--pretrained", help="timm architecture: its ImageNet-pretrained backbone (offline weights)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/wildcheck-gallery-bench"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], help="scale: faiss index kinds to measure")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--gallery", type=Path, help="memory-build: the gallery file to write; memory-load: to load")
    ap.add_argument("--against", type=Path, help="memory-compare: the second memory-load --json output")
    ap.add_argument("--dtype", default="float16", help="memory-build: the references' dtype as handed to Gallery")
    args = ap.parse_args()
    for option in ("model", "embedder", "gallery") if args.what not in ("export-pretrained", "memory-build") else ():
        if getattr(args, option) and not Path(getattr(args, option)).is_file():
            ap.error(f"--{option} {getattr(args, option)}: no such file")
    if args.what == "export-pretrained":
        export_pretrained(args.pretrained, Path(args.model))
        return
    if args.what == "memory-build":
        result = memory_build(args.sizes[0], real_centres(args.model, args.cache), args.gallery, args.dtype)
    elif args.what == "memory-compare":
        result = memory_compare(args.json, args.against)
        return
    elif args.what == "memory-edit":
        result = memory_edit(args.gallery)
    elif args.what == "precision":
        result = precision(real_centres(args.model, args.cache), args.gallery)
    elif args.what == "memory-load":
        result = memory_load(args.gallery, args.json)
        return
    elif args.what == "scale":
        if not args.model:
            sys.exit("give --model EMBEDDER.onnx: its embeddings of the shared val photos are the mixture's centres")
        result = scale(args.sizes, real_centres(args.model, args.cache), tuple(args.kinds))
    elif args.what == "serve":
        result = serve_overhead(args.model, args.sizes[0], args.embedder)
    else:
        if not SHARED.is_dir():
            sys.exit(f"{SHARED} not found (set WILDCHECK_SHARED)")
        if bool(args.model) == bool(args.pretrained):
            sys.exit("give --model MODEL.onnx or --pretrained ARCH")
        embedder = OnnxEmbedder(args.model) if args.model else PretrainedEmbedder(args.pretrained)
        result = (fewshot if args.what == "fewshot" else known)(embedder, args.cache)
        result["embedder"] = embedder.name
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
