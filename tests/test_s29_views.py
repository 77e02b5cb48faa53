"""s29: the per-request view logic on odd pictures: collage panels never leave content unscored, and the
collage rule's corrected thresholds keep the block decision."""

import numpy as np
import pytest
from PIL import Image

from serving.panels import find_panels
from serving.tiling import Tiling, ViewRule, combine
from tests.test_panels import make_collage, smooth_photo


def _spec(scores, review: float, block: float, tiling: Tiling):
    from serving.contract import ModelSpec
    from serving.decision import ClassThresholds
    from serving.preprocess import Preprocessing
    from serving.thresholds import TrafficScores

    negatives = TrafficScores.from_arrays(["ivory"], np.asarray(scores, float)[:, None], ["pool"] * len(scores))
    return ModelSpec(labels=["ivory", "other"], preprocessing=Preprocessing(input_size=64), architecture="test",
                     thresholds={"ivory": ClassThresholds(review=review, block=block)}, negative_scores=negatives,
                     tiling=tiling)


def test_a_panel_over_the_corrected_block_threshold_is_blocked_when_it_equals_the_review_one():
    # 95 negatives at 0.0, 5 at 0.9: review 0.8 and block 0.85 let the same 5 through, so for 4 panels at
    # collage_rate 1 both corrected thresholds are "just above 0.9"; a panel at 0.92 clears both (no negative
    # reaches it) and must be blocked, as one photo at 0.92 is; it was mapped to 0.84, i.e. review only
    from serving.decision import decide

    spec = _spec([0.0] * 95 + [0.9] * 5, review=0.8, block=0.85,
                 tiling=Tiling(mode="panels", whole_with_panels=False, collage_rate=1))
    rule = ViewRule.of(spec)
    xs, ys = rule.panel_knots[4][0]
    assert ys[xs > 0.9][-2] == pytest.approx(0.85)  # the last knot above the negatives (before 1.0) is block's

    def decision(panel: float) -> str:
        views = np.array([[0.1, 0.9]] * 4 + [[panel, 1 - panel]], np.float32)
        scores = combine(views, rule)
        return decide({"ivory": float(scores[0]), "other": float(scores[1])}, spec.thresholds, set())[0]

    assert decision(0.92) == "block"
    assert decision(0.901) == "block"
    assert decision(0.9) == "allow"  # the negatives' own score stays below both corrected thresholds
    assert decide({"ivory": 0.92, "other": 0.08}, spec.thresholds, set())[0] == "block"  # one photo


def _covered(obj, panels) -> float:
    """Share of ``obj``'s area inside the panels."""
    l, t, r, b = obj
    inside = sum(max(0, min(r, pr) - max(l, pl)) * max(0, min(b, pb) - max(t, pt)) for pl, pt, pr, pb in panels)
    return inside / ((r - l) * (b - t))


def test_a_thin_object_standing_in_a_collage_gutter_is_in_a_panel():
    """A wide white gutter between the two rows of a 2x2 collage with a thin upright object in it (1.5 % of each
    row's width: the gutter rows still count as "uniform"): the panels are all that is scored of a collage, so
    the object must be in one. It was cut away with the gutter."""
    W, H, g0, g1 = 1200, 1200, 450, 750
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    for i, (x, y) in enumerate([(0, 0), (610, 0), (0, g1), (610, g1)]):
        canvas.paste(smooth_photo(i, (590, g0 if y == 0 else H - g1)), (x, y))
    obj = (600, g0 + 30, 618, g1 - 30)
    canvas.paste((150, 120, 90), obj)
    panels = find_panels(canvas)
    assert len(panels) >= 4  # still a collage: the photos are panels
    assert _covered(obj, panels) > 0.95


def test_a_thin_object_in_a_collage_border_is_in_a_panel():
    """A 2x2 collage with a wide white top border holding a thin upright object: the border is trimmed only
    when it holds nothing (the object was trimmed away with it)."""
    inner, _ = make_collage([smooth_photo(s) for s in range(4)], "2x2", size=(900, 700), gutter=16)
    canvas = Image.new("RGB", (900, 1000), (255, 255, 255))
    canvas.paste(inner, (0, 300))
    obj = (440, 40, 452, 260)  # 1.3 % of the width
    canvas.paste((120, 90, 60), obj)
    panels = find_panels(canvas)
    assert panels == [] or _covered(obj, panels) > 0.95


@pytest.mark.parametrize("n", [2, 3])
def test_panels_of_a_clean_collage_are_unchanged(n):
    """The clean-row rule keeps plain gutters and borders cuttable: a bordered n x n collage is still n*n panels."""
    W = 900
    canvas = Image.new("RGB", (W + 60, W + 60), (250, 250, 250))
    cell = W // n
    for i in range(n):
        for j in range(n):
            canvas.paste(smooth_photo(10 * i + j, (cell - 16, cell - 16)), (30 + j * cell + 8, 30 + i * cell + 8))
    panels = find_panels(canvas)
    assert len(panels) == n * n
