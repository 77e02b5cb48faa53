"""Collage-aware views: the seam detector (serving.panels), the `panels` tiling mode in the contract, and
serving/evaluation scoring a collage's panels."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from serving.panels import find_panels
from serving.preprocess import Preprocessing
from serving.tiling import Tiling, ViewRule, combine, view_boxes, views
from tests.conftest import jpeg_bytes, shared_dataset

# rows of a layout: each row is (height weight, number of columns); "big+2" is a large left panel and two
# stacked right panels (a layout no row-major grid describes)
LAYOUTS = {"2x2": [(1, 2), (1, 2)], "1x2": [(1, 2)], "2x1": [(1, 1), (1, 1)], "3x3": [(1, 3)] * 3,
           "1+3": [(2, 1), (1, 3)], "big+2": None}


def smooth_photo(seed: int, size=(300, 240)) -> Image.Image:
    """A generated stand-in for a photo: smooth colour variation and a few soft-edged objects, and (like a
    real photo, unlike a drawing) no straight axis-aligned edges of its own."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(3):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        rx, ry = int(rng.integers(w // 10, w // 3)), int(rng.integers(h // 10, h // 3))
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(field, np.float32) + noise, 0, 255).astype(np.uint8))


def _cover(img: Image.Image, w: int, h: int) -> Image.Image:
    s = max(w / img.width, h / img.height)
    r = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.Resampling.BICUBIC)
    x, y = (r.width - w) // 2, (r.height - h) // 2
    return r.crop((x, y, x + w, y + h))


def make_collage(pictures, layout: str, size=(900, 800), gutter: int = 0, colour=(255, 255, 255)):
    """A collage as a collage app makes it (photos cover their panels), JPEG-compressed; and its panel boxes."""
    W, H = size
    boxes = []
    if LAYOUTS[layout] is None:
        bw, sh = round((W - gutter) * 0.6), (H - gutter) // 2
        boxes = [(0, 0, bw, H), (bw + gutter, 0, W, sh), (bw + gutter, sh + gutter, W, H)]
    else:
        rows = LAYOUTS[layout]
        total, y = sum(r for r, _ in rows), 0
        inner = H - gutter * (len(rows) - 1)
        for k, (weight, cols) in enumerate(rows):
            h = round(inner * weight / total) if k < len(rows) - 1 else H - y
            pw = (W - gutter * (cols - 1)) / cols
            boxes += [(round(j * (pw + gutter)), y, round(j * (pw + gutter) + pw), y + h) for j in range(cols)]
            y += h + gutter
    canvas = Image.new("RGB", size, colour)
    for picture, (l, t, r, b) in zip(pictures, boxes):
        canvas.paste(_cover(picture, r - l, b - t), (l, t))
    return Image.open(io.BytesIO(jpeg_bytes(canvas))).convert("RGB"), boxes


def taken_apart(found, boxes) -> bool:
    """As many panels found as there are, each lying inside its own true panel (uniform margins may be trimmed)."""
    def inside(f, b):
        w = max(0, min(f[2], b[2]) - max(f[0], b[0]))
        h = max(0, min(f[3], b[3]) - max(f[1], b[1]))
        return w * h >= 0.85 * (f[2] - f[0]) * (f[3] - f[1])

    owners = [next((k for k, b in enumerate(boxes) if inside(f, b)), None) for f in found]
    return sorted(o for o in owners if o is not None) == list(range(len(boxes))) and None not in owners


def real_photos(names=("met-ivory", "caltech101-negatives", "generic-products", "art-antiques", "listings-everyday"),
                per_dataset: int = 8, split: str = "val") -> list[Path]:
    out = []
    for name in names:
        files = sorted(p for p in (shared_dataset(name) / split).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        out += files[:: max(1, len(files) // per_dataset)][:per_dataset]
    return out


@pytest.mark.parametrize("layout,gutter,colour", [
    ("2x2", 0, None), ("2x2", 12, (255, 255, 255)), ("1x2", 6, (128, 128, 128)), ("2x1", 0, None),
    ("3x3", 4, (250, 220, 230)), ("1+3", 10, (0, 0, 0)), ("big+2", 0, None), ("big+2", 8, (255, 255, 255)),
])
def test_finds_the_panels_of_generated_collages(layout, gutter, colour):
    pictures = [smooth_photo(seed) for seed in range(20, 29)]
    collage, boxes = make_collage(pictures, layout, gutter=gutter, colour=colour or (255, 255, 255))
    found = find_panels(collage)
    assert taken_apart(found, boxes), (found, boxes)


def test_finds_the_panels_of_real_photo_collages():
    """Collages of real listing/museum photos, several layouts, gutters of several widths/colours and none."""
    paths = real_photos(per_dataset=6, split="train")
    pictures = [Image.open(p).convert("RGB") for p in paths]
    rng = np.random.default_rng(0)
    settings = [(layout, gutter, colour) for layout in LAYOUTS for gutter, colour in
                [(0, (255, 255, 255)), (4, (255, 255, 255)), (16, (30, 30, 30)), (10, (200, 230, 255))]]
    results = []
    for layout, gutter, colour in settings:
        chosen = [pictures[i] for i in rng.choice(len(pictures), 9, replace=False)]
        collage, boxes = make_collage(chosen, layout, size=(int(rng.integers(600, 1100)), int(rng.integers(600, 1000))),
                                      gutter=gutter, colour=colour)
        results.append(taken_apart(find_panels(collage), boxes))
    # not every one (a photo whose own backdrop matches the gutter hides that seam; without a gutter, two
    # photos with similar edges hide it: benchmarks/panels_bench.py measures the rates), but most collages
    # with a gutter, and every layout at least once
    per_layout = np.array(results).reshape(len(LAYOUTS), -1)
    assert per_layout[:, 1:].mean() >= 0.7, dict(zip(LAYOUTS, per_layout.tolist()))
    assert per_layout.any(axis=1).all(), dict(zip(LAYOUTS, per_layout.tolist()))


def test_does_not_fire_on_ordinary_photos():
    paths = real_photos(per_dataset=12)
    fired = [p for p in paths if find_panels(Image.open(p).convert("RGB"))]
    assert fired == []


def test_does_not_split_a_plain_backdrop_a_banner_or_letterboxing():
    # two objects on a plain backdrop: the backdrop between them is uniform top to bottom, but it is bounded
    # by contours, not by straight panel edges
    pair = Image.new("RGB", (600, 400), (236, 236, 232))
    draw = ImageDraw.Draw(pair)
    draw.ellipse([60, 60, 260, 340], fill=(150, 110, 70))
    draw.ellipse([340, 90, 540, 320], fill=(90, 120, 160))
    assert find_panels(pair) == []
    # a price banner across the top of a photo: a full-width straight edge, but the strip is too thin a panel
    bannered = smooth_photo(3, (600, 450))
    ImageDraw.Draw(bannered).rectangle([0, 0, 600, 60], fill=(200, 20, 30))
    assert find_panels(bannered) == []
    # a photo letterboxed in black bars: one picture, not a collage
    boxed = Image.new("RGB", (600, 600), (0, 0, 0))
    boxed.paste(smooth_photo(4, (600, 380)), (0, 110))
    assert find_panels(boxed) == []
    # tiny pictures have no panels worth scoring
    small, _ = make_collage([smooth_photo(s, (60, 60)) for s in range(4)], "2x2", size=(100, 100), gutter=4)
    assert find_panels(small) == []


def test_panels_tiling_views_are_the_whole_picture_then_each_panel():
    pictures = [smooth_photo(seed) for seed in range(40, 44)]
    collage, boxes = make_collage(pictures, "2x2", size=(800, 640), gutter=10)
    tiling, pre = Tiling(mode="panels"), Preprocessing(input_size=64)
    found = view_boxes(collage, tiling)
    assert found[0] == (0, 0, 800, 640) and taken_apart(found[1:], boxes)
    stack = views(collage, pre, tiling)
    assert stack.shape == (5, 3, 64, 64)
    np.testing.assert_allclose(stack[2], pre(collage.crop(found[2])))
    ordinary = smooth_photo(5, (640, 480))
    assert views(ordinary, pre, tiling).shape == (1, 3, 64, 64)  # no collage: the whole photo only


def test_contract_round_trips_the_panels_mode_and_old_grid_contracts_read_as_before():
    from serving.contract import ModelContract

    panels = Tiling(mode="panels", min_tile_side=48, max_panels=6)
    assert Tiling.model_validate(panels.model_dump(mode="json")) == panels
    old = {"grid": 2, "min_tile_side": 64}  # what models exported before panels existed hold
    grid = Tiling.model_validate(old)
    assert grid.mode == "grid" and grid.model_dump(mode="json") == old  # same JSON: same contract hash
    with pytest.raises(ValueError):
        Tiling.model_validate({"mode": "mosaic"})
    assert "tiling" in ModelContract.model_fields


def test_panels_rule_fields_serialise_only_when_set_so_1_1_0_contracts_keep_their_hash():
    old = {"mode": "panels", "grid": 2, "min_tile_side": 64, "min_panel_fraction": 0.2, "max_panels": 9}  # 1.1.0
    assert Tiling.model_validate(old).model_dump(mode="json") == old
    ruled = Tiling(mode="panels", whole_with_panels=False, collage_rate=2)
    dumped = ruled.model_dump(mode="json")
    assert dumped["whole_with_panels"] is False and dumped["collage_rate"] == 2
    assert Tiling.model_validate(dumped) == ruled
    with pytest.raises(ValueError):
        Tiling(mode="panels", collage_rate=0.5)  # a collage cannot be held below one photo's rate


def _spec_with_negatives(tiling: Tiling, review: float = 0.8, block: float = 0.95):
    """A two-class spec whose 100 calibration negatives score 0.00, 0.01, ..., 0.99 on ivory."""
    from serving.contract import ModelSpec
    from serving.decision import ClassThresholds
    from serving.preprocess import Preprocessing
    from serving.thresholds import TrafficScores

    negatives = TrafficScores.from_arrays(["ivory"], np.arange(100)[:, None] / 100, ["pool"] * 100)
    return ModelSpec(labels=["ivory", "other"], preprocessing=Preprocessing(input_size=64), architecture="test",
                     thresholds={"ivory": ClassThresholds(review=review, block=block)}, negative_scores=negatives,
                     tiling=tiling)


def test_collage_rate_holds_each_panel_to_the_stricter_threshold_of_its_share_of_negatives():
    # review 0.80 lets 20 of the 100 negatives through; four panels at collage_rate 1 share that: 5 each, so
    # a panel must clear the sixth-highest negative (0.94); block 0.95 (5 negatives, 1.25 each -> 1): 0.98
    rule = ViewRule.of(_spec_with_negatives(Tiling(mode="panels", whole_with_panels=False, collage_rate=1)))
    xs, ys = rule.panel_knots[4][0]
    assert 0.94 < xs[1] <= 0.95 and ys[1] == pytest.approx(0.8)
    assert 0.98 < xs[2] <= 0.99 and ys[2] == pytest.approx(0.95)

    def picture(whole: float, panel: float, k: int = 4) -> float:
        views = np.array([[whole, 1 - whole]] + [[0.1, 0.9]] * (k - 1) + [[panel, 1 - panel]], np.float32)
        return float(combine(views, rule)[0])

    assert picture(0.1, 0.94) < 0.8 <= picture(0.1, 0.95)  # the panel must clear 0.94 to reach review
    assert picture(0.1, 0.98) < 0.95 <= picture(0.1, 0.99)  # and 0.98 to reach block
    assert picture(0.99, 0.1) < 0.8  # a found collage is its panels: the composite's own score is left out
    # collage_rate 2: each of four panels gets half of the review share, 10 negatives: above 0.89
    doubled = ViewRule.of(_spec_with_negatives(Tiling(mode="panels", collage_rate=2)))
    assert 0.89 < doubled.panel_knots[4][0][0][1] <= 0.90 and not doubled.panels_only
    # an ordinary photo (no panels) and a collage rule without the negatives' scores keep the plain maximum
    assert float(combine(np.array([[0.85, 0.15]], np.float32), rule)[0]) == pytest.approx(0.85)
    bare = _spec_with_negatives(Tiling(mode="panels", collage_rate=1)).model_copy(update={"negative_scores": None})
    assert ViewRule.of(bare).panel_knots == {}


def test_collage_rule_unreachable_threshold_never_lets_a_panel_through():
    # every negative scores 1.0: no panel threshold below 1 keeps a share of them out
    from serving.thresholds import TrafficScores

    spec = _spec_with_negatives(Tiling(mode="panels", collage_rate=1))
    spec = spec.model_copy(update={"negative_scores": TrafficScores.from_arrays(["ivory"], np.ones((10, 1)), ["p"] * 10)})
    rule = ViewRule.of(spec)
    views = np.array([[0.1, 0.9], [0.999, 0.001], [0.2, 0.8]], np.float32)
    assert float(combine(views, rule)[0]) < 0.8


def test_served_and_evaluated_scores_take_the_collage_panels(onnx_model, tmp_path):
    """A collage JPEG in: the server's (and evaluation's) score is the most suspicious of the whole picture and
    each panel scored on its own; an ordinary photo is scored whole."""
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.runtime import OnnxModel
    from training.predict import predict_images
    from training.export import write_contract

    contract = read_contract(onnx_model).model_copy(update={"tiling": Tiling(mode="panels", min_tile_side=32)})
    model_path = tmp_path / "panels.onnx"
    write_contract(onnx_model, model_path, contract)
    assert read_contract(model_path).tiling == Tiling(mode="panels", min_tile_side=32)

    plain = OnnxModel(onnx_model)
    negative = plain.labels.index(plain.contract.negative_label)
    collage, boxes = make_collage([smooth_photo(seed, (200, 160)) for seed in range(50, 54)], "2x2", size=(512, 448),
                                  gutter=8)
    data = jpeg_bytes(collage)
    from serving.imageio import decode_image
    from serving.tiling import draft_size

    img, _ = decode_image(data, draft_size=draft_size(plain.preprocessing, contract.tiling))  # as the server does
    panels = find_panels(img, min_side=32)
    scale = img.width / collage.width  # the server decoded the JPEG at a reduced size
    assert taken_apart(panels, [tuple(round(v * scale) for v in b) for b in boxes])
    alone = plain.predict_proba(np.stack([plain.preprocessing(img)] + [plain.preprocessing(img.crop(b)) for b in panels]))
    expected = combine(alone, ViewRule(negative))
    checker = ImageChecker(str(model_path))
    served = checker.check(data)
    got = np.array([served["scores"][label] for label in plain.labels])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    panel_model = OnnxModel(model_path)
    np.testing.assert_allclose(predict_images(panel_model, [img])[0], expected, atol=1e-5)
    explained = checker.check(data, explain="true")  # the heat map covers the panels' views
    assert explained["explanation"]["rows"] > 0

    ordinary = smooth_photo(60, (400, 300))
    data = jpeg_bytes(ordinary)
    img, _ = decode_image(data, draft_size=draft_size(plain.preprocessing, contract.tiling))
    assert find_panels(img, min_side=32) == []
    whole = plain.predict_proba(plain.preprocessing(img)[None])[0]
    got = np.array([checker.check(data)["scores"][label] for label in plain.labels])
    np.testing.assert_allclose(got, whole, atol=1e-5)


def test_shipped_model_with_panels_scores_a_real_ivory_panel(tmp_path):
    """The shipped weights with the panels mode: a Met ivory photo as one tile of a 2x2 collage of Met ceramics
    is scored as that panel alone, so the collage gets (at least) the ivory panel's score and decision."""
    pytest.importorskip("onnx")
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.decision import decide
    from serving.imageio import decode_image
    from serving.runtime import OnnxModel
    from training.export import write_contract

    shipped = Path(__file__).resolve().parents[1] / "models" / "wildcheck-ivory.onnx"
    if not shipped.is_file():
        pytest.skip("models/wildcheck-ivory.onnx not present")
    met = shared_dataset("met-ivory") / "val"
    ivory = sorted((met / "ivory").glob("*.jpg"))[:3]
    others = sorted((met / "other").glob("*.jpg"))[:9]
    path = tmp_path / "panels.onnx"
    write_contract(shipped, path, read_contract(shipped).model_copy(update={"tiling": Tiling(mode="panels")}))
    checker, plain = ImageChecker(str(path)), OnnxModel(shipped)
    k = plain.labels.index("ivory")
    for i, target in enumerate(ivory):
        pictures = [Image.open(p).convert("RGB") for p in others[3 * i : 3 * i + 3]]
        pictures.insert(i, Image.open(target).convert("RGB"))
        collage, boxes = make_collage(pictures, "2x2", size=(760, 760), gutter=12)
        data = jpeg_bytes(collage)
        img, _ = decode_image(data)
        panel = next(b for b in find_panels(img) if taken_apart([b], [boxes[i]]))  # the ivory photo's panel
        alone = float(plain.predict_proba(plain.preprocessing(img.crop(panel))[None])[0, k])
        whole = float(plain.predict_proba(plain.preprocessing(img)[None])[0, k])
        served = checker.check(data)
        assert served["scores"]["ivory"] >= max(alone, whole) - 1e-5
        alone_decision = decide({"ivory": alone, "other": 1 - alone}, checker.thresholds, checker.never_block)[0]
        severity = {"allow": 0, "review": 1, "block": 2}
        assert severity[served["decision"]] >= severity[alone_decision]


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "wildcheck-ivory.onnx"


def _met_grid(first: Image.Image, side: tuple[int, int] | None = None, gutter: int = 12) -> tuple[Image.Image, list]:
    """A 2x2 collage (white gutter) of ``first`` and three Met val ceramics, each ``side`` (default: ``first``'s size)."""
    others = sorted((shared_dataset("met-ivory") / "val" / "other").glob("*.jpg"))[20:23]
    w, h = side or first.size
    tiles = [first.resize((w, h))] + [Image.open(p).convert("RGB").resize((w, h)) for p in others]
    collage = Image.new("RGB", (2 * w + gutter, 2 * h + gutter), (255, 255, 255))
    boxes = [((i % 2) * (w + gutter), (i // 2) * (h + gutter)) for i in range(4)]
    for tile, (x, y) in zip(tiles, boxes):
        collage.paste(tile, (x, y))
    return collage, [(x, y, x + w, y + h) for x, y in boxes]


def test_a_hairpin_on_a_white_backdrop_is_a_panel_so_the_collage_is_blocked():
    """Met val ivory_10591 (a thin hairpin on white) is blocked alone; as one tile of a 2x2 collage of Met ceramics its
    panel was judged empty and dropped, and with panels-only scoring the collage was allowed (0.009)."""
    if not SHIPPED.is_file():
        pytest.skip("models/wildcheck-ivory.onnx not present")
    from serving.checker import ImageChecker

    pin = Image.open(shared_dataset("met-ivory") / "val" / "ivory" / "ivory_10591.jpg").convert("RGB")
    collage, boxes = _met_grid(pin)
    assert taken_apart(find_panels(collage), boxes)  # all four panels, the hairpin's among them
    buf = io.BytesIO()
    collage.save(buf, "PNG")
    result = ImageChecker(str(SHIPPED)).check(buf.getvalue())
    assert result["decision"] == "block" and result["scores"]["ivory"] >= 0.9, result["scores"]


def test_a_pin_beside_a_gutter_is_not_cut_away_and_an_empty_slot_is_still_dropped():
    """Met val ivory_60723 (an upright pin on a plain grey backdrop): the backdrop right of the pin merged with the
    white gutter into one cut that began at the pin's edge, so the pin was left out and the collage allowed (0.006).
    An empty slot still is no panel."""
    if not SHIPPED.is_file():
        pytest.skip("models/wildcheck-ivory.onnx not present")
    from serving.checker import ImageChecker

    pin = Image.open(shared_dataset("met-ivory") / "val" / "ivory" / "ivory_60723.jpg").convert("RGB")
    collage, boxes = _met_grid(pin, side=(300, 300))
    found = find_panels(collage)
    assert taken_apart(found, boxes), found
    result = ImageChecker(str(SHIPPED)).check(jpeg_bytes(collage))
    assert result["decision"] == "block", result["scores"]
    empty = collage.copy()
    empty.paste((255, 255, 255), boxes[0])  # the pin's slot left empty: three panels
    assert taken_apart(find_panels(empty), boxes[1:])


def test_panel_boxes_of_a_tall_collage_use_the_y_scale():
    """The work copy's x and y factors differ (each side is rounded up): y scaled by x put the seam of a 769 x 6020
    two-photo collage at 2825-2966 instead of 3000-3020."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    top = Image.open(examples / "ivory_13342.jpg").convert("RGB").crop((40, 40, 340, 300))
    bottom = Image.open(examples / "non_ivory_59208.jpg").convert("RGB").crop((60, 60, 330, 300))
    W, half, gutter = 769, 3000, 20
    collage = Image.new("RGB", (W, 2 * half + gutter), (255, 255, 255))
    collage.paste(top.resize((W, half)), (0, 0))
    collage.paste(bottom.resize((W, half)), (0, half + gutter))
    upper, lower = find_panels(collage)
    assert 2990 <= lower[1] <= 3040 and lower[3] == 2 * half + gutter, (upper, lower)
    assert upper[1] <= 120 and 2800 <= upper[3] <= 3010, (upper, lower)
