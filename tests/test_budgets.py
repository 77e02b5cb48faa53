"""Traffic budgets: thresholds raised to a flag/block budget on the negatives, conflicts with targets
reported, `calibrate --traffic` on an ONNX file without torch, and false positives by source."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.thresholds import Budgets, TrafficScores, apply_budgets, curve_arrays, solve_class
from tests.conftest import REPO

# ivory scores: 10 positives, and 10 negatives in two pools ("shop": 4 look-alikes high up, "web": low)
POS = [0.55, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99]
SHOP = [0.5, 0.65, 0.72, 0.91]
WEB = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2]


def _solve(budgets: Budgets):
    curves = {"ivory": {"pos": POS, "neg": sorted(SHOP + WEB)}}
    solved = {"ivory": solve_class(*curve_arrays(curves["ivory"]), 0.8, 0.9)}
    traffic = TrafficScores.from_arrays(["ivory"], np.array(SHOP + WEB)[:, None], ["shop"] * 4 + ["web"] * 6)
    return solved["ivory"], apply_budgets(solved, curves, traffic, budgets)


def test_budgets_raise_thresholds_and_the_mix_matters():
    free, report = _solve(Budgets())
    assert (free.thresholds.review, free.thresholds.block) == (0.6, 0.7)  # recall 9/10; precision 8/10 at 0.7
    assert report["flag_rate"] == pytest.approx(0.3) and report["conflicts"] == []  # 0.65, 0.72, 0.91
    # at most 1 negative in 10 flagged: only 0.91 may stay above review
    s, report = _solve(Budgets(max_flag_rate=0.1))
    assert s.thresholds.review == pytest.approx(0.720001) and s.rules["review"] == "max_flag_rate"
    assert report["flag_rate"] == pytest.approx(0.1) and report["flag_rate_per_pool"] == {"shop": 0.25, "web": 0.0}
    (conflict,) = [c for c in report["conflicts"] if c["threshold"] == "review"]
    assert conflict["target"] == "review_recall" and conflict["recall_left"] == pytest.approx(0.7)  # the budget wins
    assert s.review_recall == pytest.approx(0.7)
    assert s.thresholds.block == pytest.approx(0.720001) and s.rules["block"] == "max_flag_rate"  # no review band left
    # the same budget on traffic that is mostly web photos (shop weight 1, web 9): the targets fit it
    s, report = _solve(Budgets(max_flag_rate=0.1, negative_weights={"shop": 1, "web": 9}))
    assert s.thresholds.review == 0.6 and s.rules["review"] == "review_recall"
    assert report["flag_rate"] == pytest.approx(3 * 0.1 / 4) and report["conflicts"] == []
    # a block budget of 0: nothing negative may be blocked, review keeps its target
    s, report = _solve(Budgets(max_block_rate=0.0))
    assert s.thresholds.block == pytest.approx(0.910001) and s.rules == {"block": "max_block_rate", "review": "review_recall"}
    assert s.thresholds.review == 0.6 and report["block_rate"] == 0.0
    with pytest.raises(ValueError, match="not there"):
        _solve(Budgets(max_flag_rate=0.1, negative_weights={"shops": 1}))


def test_policy_budget_re_solves_on_the_stored_negatives(tmp_path):
    from serving.contract import DecisionRules, ModelContract
    from serving.decision import ClassThresholds
    from serving.policy import PolicyError, load_policy, resolve
    from serving.preprocess import Preprocessing

    traffic = TrafficScores.from_arrays(["ivory"], np.array(SHOP + WEB)[:, None], ["shop"] * 4 + ["web"] * 6)
    contract = ModelContract(
        labels=["ivory", "other"], preprocessing=Preprocessing(), thresholds={"ivory": ClassThresholds(block=0.6, review=0.6)},
        model_name="m", model_version="1", architecture="a", created_at="now", training_data={}, metrics={},
        wildcheck_version="0", val_curves={"ivory": {"pos": POS, "neg": sorted(SHOP + WEB)}},
        decision=DecisionRules(block_precision=0.8, review_recall=0.9), negative_scores=traffic,
        threshold_rules={"ivory": {"block": "block_precision", "review": "review_recall"}},
    )
    policy = tmp_path / "p.yaml"
    policy.write_text("max_flag_rate: 0.1\nclasses:\n  ivory: {block: 0.95}\n")
    with pytest.raises(PolicyError, match="max_recall_drop: 0.2"):  # recall 0.9 -> 0.7 must be meant
        resolve(load_policy(policy), contract)
    policy.write_text("max_recall_drop: 0.2\nmax_flag_rate: 0.1\nclasses:\n  ivory: {block: 0.95}\n")
    r = resolve(load_policy(policy), contract)
    assert r.thresholds["ivory"].block == 0.95 and r.thresholds["ivory"].review == pytest.approx(0.720001)
    assert r.rules["ivory"] == {"block": "explicit", "review": "max_flag_rate"}
    assert any("recall at review 0.900 -> 0.700" in n for n in r.notes["ivory"])
    # a never_block class: the flag budget raises review past its (unused) block threshold without an error
    policy.write_text("max_recall_drop: 0.2\nmax_flag_rate: 0.1\nnever_block: [ivory]\n")
    r = resolve(load_policy(policy), contract)
    assert r.thresholds["ivory"].review == pytest.approx(0.720001) and r.never_block == ["ivory"]
    contract.negative_scores = None
    with pytest.raises(PolicyError, match="--traffic"):
        resolve(load_policy(policy), contract)


@pytest.mark.parametrize("text,message", [
    ("max_flag_rate: 0.01\ntraffic: {classes: [ivory], pools: {p: {n: 3, rows: [[5.0], [5.0], [5.0]]}}}\n",
     "outside \\[0, 1\\]"),
    ("max_flag_rate: 0.01\ntraffic: {classes: [ivory], pools: {p: {n: 2, rows: [[.nan], [0.5]]}}}\n", "outside"),
    ("classes:\n  ivory: {block: false}\n", "not true/false"),
    ("classes:\n  ivory: {review: true, block: null}\n", "not true/false"),
    ("classes:\n  ivory: {block: -1}\n", "greater than or equal to 0"),
    ("classes:\n  ivory: {block: 0.99}\nclasses:\n  ivory: {block: null}\n", "appears twice"),
])
def test_a_policy_that_would_fail_open_or_block_everything_is_refused(tmp_path, text, message):
    """Each of these used to load: traffic scores of 5.0 (or nan) solved the flag budget to review 1.0, so the
    server allowed every ivory photo; `block: false` read as 0.0 (every listing blocked), `review: true` as 1.0
    (none flagged), and `block: -1` was the parser's own 'absent' marker, silently ignored."""
    from serving.policy import PolicyError, load_policy

    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(policy)


def test_an_explicit_never_block_still_overrides_the_model():
    from serving.policy import ClassPolicy

    assert ClassPolicy.model_validate({"block": None}).block_given
    assert not ClassPolicy.model_validate({"review": 0.5}).block_given


@pytest.fixture(scope="module")
def lookalikes(synth_root, tmp_path_factory) -> Path:
    """A negatives pool of ivory-looking photos (synthetic ivory training images filed as 'other') from one
    shop, and ordinary ones from another: ROOT/val/other/<source>/."""
    root = tmp_path_factory.mktemp("pools") / "lookalikes"
    for source, label in (("carvings_shop", "ivory"), ("kitchen_shop", "other")):
        folder = root / "val" / "other" / source
        folder.mkdir(parents=True)
        for p in sorted((synth_root / "train" / label).glob("*.jpg"))[:6]:
            shutil.copy(p, folder / p.name)
    return root


def test_tiny_model_budget_moves_thresholds_and_reports_the_conflict(trained_run, synth_root, lookalikes, tmp_path):
    from training.calibrate import calibrate, format_report
    from training.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = [str(synth_root), str(lookalikes)]
    free = calibrate(run, data)
    assert free["budgets"]["flag_rate_per_pool"]["lookalikes"] > 0.1  # the look-alikes get flagged at the targets
    tight = calibrate(run, data, {"max_flag_rate": 0.02, "max_block_rate": 0.0})
    ivory, ivory_free = tight["thresholds"]["ivory"], free["thresholds"]["ivory"]
    assert ivory["review"] > ivory_free["review"] and tight["rules"]["ivory"]["review"] == "max_flag_rate"
    assert tight["budgets"]["flag_rate"] <= 0.02 and tight["budgets"]["block_rate"] == 0.0
    conflict = next(c for c in tight["budgets"]["conflicts"] if c["class"] == "ivory" and c["threshold"] == "review")
    assert conflict["target"] == "review_recall" and conflict["recall_left"] < 0.95
    text = format_report(tight)
    assert "CONFLICT ivory: max_flag_rate overrides review_recall" in text and "lookalikes" in text
    # evaluate: flag/block rates per source and one PNG of the most confident negatives per source
    metrics = evaluate(run, data, split="val", out_dir=tmp_path / "eval")
    per_source = metrics.per_source
    assert per_source["lookalikes/carvings_shop"]["n"] == 6
    carvings, kitchen = per_source["lookalikes/carvings_shop"], per_source["lookalikes/kitchen_shop"]
    assert carvings["top"][0]["label"] == "ivory" and carvings["top"][0]["score"] > kitchen["top"][0]["score"]
    # the served decision rule flags exactly what the budget solve counted, pool by pool
    flagged = carvings["flag_rate"] * carvings["n"] + kitchen["flag_rate"] * kitchen["n"]
    assert flagged / 12 == pytest.approx(tight["budgets"]["flag_rate_per_pool"]["lookalikes"])
    assert (tmp_path / "eval" / "false_positives_by_source" / "lookalikes_carvings_shop.png").stat().st_size > 1000


BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"{name} is blocked: this command must work without torch")
sys.meta_path.insert(0, _NoTorch())
"""


def test_calibrate_traffic_on_onnx_without_torch_changes_served_decisions(onnx_model, synth_root, tmp_path):
    from serving.checker import ImageChecker

    traffic = tmp_path / "platform_traffic"  # unlabelled: everything is taken as ordinary traffic
    for label in ("ivory", "other"):
        (traffic / label[:3]).mkdir(parents=True)
        for p in sorted((synth_root / "train" / label).glob("*.jpg"))[:10]:
            shutil.copy(p, traffic / label[:3] / p.name)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{REPO}")
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker works
    policy = tmp_path / "policy.yaml"
    cmd = [sys.executable, "-m", "training.cli", "calibrate", str(onnx_model), "--traffic", str(traffic),
           "--max-flag-rate", "0.05", "--max-block-rate", "0", "--out", str(policy)]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    # the traffic holds ivory photos taken as ordinary: the budget would cut ivory recall, refused unless meant
    assert refused.returncode == 2 and "max_recall_drop" in refused.stderr + refused.stdout and not policy.exists()
    done = subprocess.run(cmd + ["--max-recall-drop", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "flag rate" in done.stdout and policy.is_file()
    written = yaml.safe_load(policy.read_text())
    assert written["max_flag_rate"] == 0.05 and written["traffic"]["pools"]["platform_traffic"]["n"] == 20
    assert written["max_recall_drop"] == 1

    image = (traffic / "ivo" / sorted(os.listdir(traffic / "ivo"))[0]).read_bytes()
    checker = ImageChecker(str(onnx_model))
    before = checker.check(image, "image/jpeg")
    checker.apply_policy(str(policy))
    after = checker.check(image, "image/jpeg")
    assert before["decision"] != "allow" and after["decision"] == "allow"  # an ordinary photo no longer flagged
    assert after["scores"] == before["scores"]
    rules = checker.describe()["threshold_rules"]
    assert rules["ivory"]["review"] == "max_flag_rate", rules
    assert checker.describe()["policy"]["budgets"]["flag_rate"] <= 0.05


def test_a_traffic_sample_too_small_for_its_budget_is_refused(onnx_model, synth_root, tmp_path):
    """On 5 photos a 0.1% block budget bound nothing: the policy lowered the shipped model's block threshold
    (0.9816 -> 0.9723, 1 -> 4 of 282 Met ceramics blocked) and reported the budget met."""
    from typer.testing import CliRunner

    from training.cli import app

    traffic = tmp_path / "five"
    traffic.mkdir()
    for p in sorted((synth_root / "train" / "other").glob("*.jpg"))[:5]:
        shutil.copy(p, traffic / p.name)
    policy = tmp_path / "policy.yaml"
    for rate, needed in (("0.001", "1,000"), ("0.05", "20")):
        result = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--traffic", str(traffic),
                                          "--max-flag-rate", rate, "--out", str(policy)])
        assert result.exit_code == 2, result.output
        assert "5 ordinary photo(s) cannot measure --max-flag-rate" in result.output and needed in result.output
    assert not policy.exists()
    done = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--traffic", str(traffic), "--max-flag-rate", "0.2",
                                    "--max-block-rate", "0", "--out", str(policy)])
    assert done.exit_code == 0 and policy.is_file(), done.output  # one photo in five is measurable
