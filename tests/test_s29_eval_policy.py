"""Session 29, evaluation reports: `compare --report` wrote over the models and the data, the robustness chart lost
its clean lines, a root given twice (or as data and negatives) was counted twice, and one huge PNG took the
robustness report to 6.9 GB. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, photo
from tests.test_s27_outputs import _cli, _refused

SHIPPED = REPO / "models" / "wildcheck-ivory.onnx"
needs_model = pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED} not present (make model)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Two drawings per class and split, 64 px."""
    from training.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(root, per_class=2, size=64, seed=5, classes=("ivory", "other"))
    return root


# --- compare --report --------------------------------------------------------------------------------------------

@needs_model
def test_compare_report_never_replaces_a_model_an_image_or_the_data(tmp_path, tiny):
    """Before: `compare champ.onnx RUN --report champ.onnx` replaced the champion model with markdown (exit 0), a
    --report naming a data image replaced the image, and a folder failed with IsADirectoryError after the work."""
    champion, challenger = tmp_path / "champ.onnx", tmp_path / "chall.onnx"
    shutil.copy(SHIPPED, champion), shutil.copy(SHIPPED, challenger)
    image = sorted((tiny / "val" / "ivory").glob("*.jpg"))[0]
    before = {p: p.read_bytes() for p in (champion, challenger, image)}
    base = ["compare", champion, challenger, "--data", tiny, "--split", "val"]
    _refused(_cli(*base, "--report", champion), "--report", "reads")
    _refused(_cli(*base, "--report", challenger), "--report", "reads")
    _refused(_cli(*base, "--report", image), "--report", "inside")
    _refused(_cli(*base, "--report", tmp_path), "--report", "is a folder")
    (tmp_path / "notes.csv").write_text("keep me\n")
    _refused(_cli(*base, "--report", tmp_path / "notes.csv"), "--report", "exists")
    assert {p: p.read_bytes() for p in before} == before and (tmp_path / "notes.csv").read_text() == "keep me\n"
    result = _cli(*base, "--report", tmp_path / "reports" / "cmp.md")  # a new file (and folder) is fine
    assert result.exit_code == 0, result.output  # the same model twice passes its own gate
    assert "Gate: **PASS**" in (tmp_path / "reports" / "cmp.md").read_text()


# --- robustness.png ----------------------------------------------------------------------------------------------

def test_robustness_chart_draws_every_metrics_clean_value_in_its_own_colour(tmp_path, monkeypatch):
    """Before: the loop rebound `clean` to the first metric's value, so only that metric got its dashed clean line
    (the README says each does); and with three protected classes (12 metrics) tab10 drew two metrics alike."""
    import training.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    metrics = [f"{c} {m}" for c in ("ivory", "pangolin", "tiger") for m in ("flagged", "blocked", "block precision")]
    metrics += ["negatives flagged", "negatives blocked", "balanced accuracy"]
    series = {m: {"clean": 0.05 + 0.07 * k, "jpeg": 0.5} for k, m in enumerate(metrics)}
    plots.plot_robustness(series, ["clean", "jpeg"], tmp_path / "r.png")
    ax = drawn[0].axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 6) for line in dashed) == sorted(round(v["clean"], 6) for v in series.values())
    colours = {tuple(patch.get_facecolor()) for patch in ax.patches}
    assert len(colours) == len(metrics)  # one colour per metric
    assert "(dashed: clean)" in ax.get_title()


# --- robustness: roots counted twice -----------------------------------------------------------------------------

def test_a_root_given_twice_is_read_once_and_one_given_as_data_and_negatives_is_refused(tiny):
    """Before: `--data d --data d/` counted every image twice, and `--data d --negatives d` counted d's ivory photos
    again as negatives (negatives flagged rose by the ivory recall)."""
    from training.robustness import RobustnessError, gather

    labels = ["ivory", "other"]
    once, _, _ = gather([tiny], [], "val", labels, "other")
    twice, _, _ = gather([tiny, f"{tiny}/"], [], "val", labels, "other")
    assert [s.path for s in twice] == [s.path for s in once] and len(once) == 4
    with pytest.raises(RobustnessError, match="--data and as --negatives"):
        gather([tiny], [tiny], "val", labels, "other")
    with pytest.raises(RobustnessError, match="overlap"):  # a pool inside the labelled root: the same photos
        gather([tiny], [tiny / "val" / "other"], "val", labels, "other")


@needs_model
def test_robustness_refuses_data_given_as_negatives_with_exit_2(tiny, tmp_path):
    _refused(_cli("robustness", SHIPPED, "--data", tiny, "--negatives", tiny, "--out", tmp_path / "rob"),
             "--data and as --negatives")
    assert not (tmp_path / "rob" / "robustness.json").exists()


# --- robustness: huge photos -------------------------------------------------------------------------------------

def test_the_decoder_shrinks_a_huge_photo_before_any_condition(tmp_path):
    """Before: a 6000 x 6000 PNG (1.3 MB) went to the conditions at full size: the frame is 9x its area and phone
    noise 24 bytes a pixel; robustness peaked at 6.9 GB RSS for that one photo (765 MB after)."""
    from training.data.sources import Sample
    from training.robustness import _Decoder

    big = tmp_path / "big.png"
    photo(3, (300, 100)).resize((3600, 1200)).save(big, compress_level=1)
    small = tmp_path / "small.png"
    photo(4, (300, 200)).save(small)
    decoder = _Decoder(None)
    img = decoder(Sample(big, "other", "val"), 0)
    assert img.size == (2048, 683) and img.mode == "RGB"
    assert decoder(Sample(small, "other", "val"), 1).size == (300, 200)  # a listing-sized photo is untouched
    assert decoder.shrunk == {0}


@needs_model
def test_robustness_report_says_how_many_photos_were_shrunk(tmp_path):
    from training.conditions import Greyscale
    from training.robustness import robustness

    root = tmp_path / "data"
    for label, seed in (("ivory", 1), ("other", 2)):
        (root / "val" / label).mkdir(parents=True)
        photo(seed, (200, 160)).save(root / "val" / label / "a.jpg")
    photo(5, (200, 100)).resize((3000, 1500)).save(root / "val" / "other" / "big.png", compress_level=1)
    seen = []
    original = Greyscale.apply
    Greyscale.apply = lambda self, img, rng, others=(): (seen.append(img.size), original(self, img, rng, others))[1]
    try:
        report = robustness(SHIPPED, [root], conditions={"greyscale": Greyscale()}, out_dir=tmp_path / "rob",
                            threads=1, workers=1)
    finally:
        Greyscale.apply = original
    assert max(max(s) for s in seen) == 2048 and len(seen) == 3
    assert report.shrunk == 1 and json.loads((tmp_path / "rob" / "robustness.json").read_text())["shrunk"] == 1
    assert report.counts == {"ivory": 1, "other": 2}


def test_compare_reports_a_challenger_macro_f1_of_zero_as_zero(tmp_path, tiny, monkeypatch):
    """Before: `... or float('nan')` printed a challenger that got every image wrong as `nan (challenger)` in
    compare.md, not 0.0000."""
    from types import SimpleNamespace

    import training.compare as cmp

    labels = ["ivory", "other"]
    models = {name: SimpleNamespace(labels=labels, contract=SimpleNamespace(model_version=f"1.0.0+{name}"))
              for name in ("champ", "chall")}
    monkeypatch.setattr(cmp, "load_predictor", lambda path: models[Path(path).stem])

    def predict(predictor, samples, desc=""):
        right = np.array([[1.0, 0.0] if s.label == "ivory" else [0.0, 1.0] for s in samples])
        return (right if predictor is models["champ"] else right[:, ::-1]), samples, []

    monkeypatch.setattr(cmp, "predict_samples", predict)
    for name in models:
        (tmp_path / f"{name}.onnx").write_bytes(b"stand-in")
    result = cmp.compare(tmp_path / "champ.onnx", tmp_path / "chall.onnx", [str(tiny)], "val",
                         report=tmp_path / "cmp.md")
    assert result["challenger_macro_f1_on_champion_classes"] == 0.0 and result["gate"] == "fail"
    assert "1.0000 (champion) vs 0.0000 (challenger)" in (tmp_path / "cmp.md").read_text()
    assert result["mcnemar"] == {"champion_only_correct": 4, "challenger_only_correct": 0, "p_value": 0.125}


# --- calibrate --traffic ------------------------------------------------------------------------------------------

@needs_model
def test_calibrate_traffic_reads_an_onnx_file_whatever_the_case_of_its_suffix(tmp_path):
    """Before: MODEL.ONNX went to the checkpoint loader: 'MODEL.ONNX is an exported ONNX model, not a wildcheck
    checkpoint; pass a run dir' (exit 2), while the same file as model.onnx was measured."""
    import yaml

    model = tmp_path / "MODEL.ONNX"
    shutil.copy(SHIPPED, model)
    traffic = tmp_path / "uploads"
    traffic.mkdir()
    for i in range(3):
        photo(i, (100, 80)).save(traffic / f"{i}.jpg")
    result = _cli("calibrate", model, "--traffic", traffic, "--out", tmp_path / "policy.yaml",
                  "--max-flag-rate", "0.5", "--max-block-rate", "0.5")
    assert result.exit_code == 0, result.output
    policy = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    assert policy["model"]["name"] == "wildcheck-ivory" and policy["traffic"]["pools"]["uploads"]["n"] == 3


# --- wildcheck explain on many images -----------------------------------------------------------------------------

def test_explain_files_streams_explanations_json_instead_of_holding_every_grid(tmp_path, monkeypatch):
    """Before: every record (a grid of up to 64 x 64 Python floats, ~130 KiB) was held until the end and then
    dumped at once: 120 photos peaked at 45 MiB of Python objects (10,000: ~1.3 GB). Each record now goes to the
    file as it is made."""
    import tracemalloc
    from types import SimpleNamespace

    import training.explain as ex
    from serving.explain import Explanation
    from serving.preprocess import Preprocessing

    spec = SimpleNamespace(preprocessing=Preprocessing(), tiling=None)
    monkeypatch.setattr(ex, "load_predictor", lambda model: SimpleNamespace(has_cam=True, labels=["ivory", "other"],
                                                                           spec=spec, path=Path(model)))
    grid = np.linspace(0, 1, 64 * 64).reshape(64, 64).round(4).tolist()
    monkeypatch.setattr(ex, "explain_image", lambda predictor, img, label=None: (
        Explanation(label="ivory", rows=64, cols=64, grid=grid), {"ivory": 0.9, "other": 0.1}))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(120):
        Image.new("RGB", (32, 32), (i % 256, 40, 90)).save(photos / f"p{i:03d}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    tracemalloc.start()
    try:
        records = ex.explain_files(tmp_path / "m.onnx", [photos], tmp_path / "out", max_side=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # one grid at a time (45 MiB before)
    written = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert len(written) == len(records) == 121 and written[0]["error"].startswith("not_an_image")
    assert [r["overlay"] for r in written[1:]] == [f"p{i:03d}.png" for i in range(120)]
    assert all(r["grid"] == grid for r in written[1:]) and "grid" not in records[1]
    assert len(list((tmp_path / "out").glob("*.png"))) == 120


# --- explain=png memory -------------------------------------------------------------------------------------------

@needs_model
def test_explain_png_makes_its_overlay_without_a_full_size_copy(monkeypatch):
    """Before: explain=png copied the whole decoded picture, then shrank the copy to 384 px: a 40-megapixel upload held
    a second 120 MB picture, outside WILDCHECK_MAX_DECODE_BYTES / the decode budget."""
    import base64
    import io

    from serving.checker import ImageChecker

    checker = ImageChecker(str(SHIPPED))
    buf = io.BytesIO()
    photo(6, (300, 200)).resize((3000, 2000)).save(buf, "PNG", compress_level=1)
    copies = []
    original = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: (copies.append(self.size), original(self))[1])
    result = checker.check(buf.getvalue(), "image/png", explain="png")
    assert (3000, 2000) not in copies
    with Image.open(io.BytesIO(base64.b64decode(result["explanation"]["png"]))) as png:
        assert png.size == (384, 256)
    assert result["image"]["width"] == 3000 and result["decision"] in ("allow", "review", "block")


# --- an empty policy ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n  \n", "# classes:\n#   ivory: {block: 0.8}\n"])
def test_an_empty_policy_is_refused_not_served_as_the_models_thresholds(tmp_path, text):
    """Before: a 0-byte policy (a failed copy, a template that rendered nothing, everything commented out) loaded as
    a policy with no settings: the server started with the model's own thresholds and /v1/model named the file."""
    from serving.policy import PolicyError, load_policy

    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match="is empty"):
        load_policy(path)
    path.write_text("{}\n")  # an explicit empty mapping is a choice: it loads
    assert load_policy(path).classes == {}


@needs_model
def test_serve_with_an_empty_policy_exits_2_before_starting(tmp_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(argv))
    for key in [k for k in os.environ if k.startswith("WILDCHECK_")]:
        monkeypatch.delenv(key)
    policy = tmp_path / "policy.yaml"
    policy.write_text("")
    _refused(_cli("serve", SHIPPED, "--policy", policy), "is empty")
    monkeypatch.setenv("WILDCHECK_POLICY", str(policy))
    _refused(_cli("serve", SHIPPED), "is empty")
    assert calls == []


@needs_model
def test_evaluate_reads_an_onnx_file_whatever_the_case_of_its_suffix(tmp_path, tiny):
    """Before: `load_predictor` (evaluate, robustness, compare, explain) sent MODEL.ONNX to the checkpoint loader:
    'MODEL.ONNX is an exported ONNX model, not a wildcheck checkpoint; pass a run dir' (exit 2)."""
    model = tmp_path / "MODEL.ONNX"
    shutil.copy(SHIPPED, model)
    result = _cli("evaluate", model, "--data", tiny, "--split", "val", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 4
