"""Thresholds from validation scores, the decision rule's edge cases, calibration, and policy files."""

import numpy as np
import pytest

from serving.decision import ClassThresholds, decide
from serving.thresholds import block_threshold, review_threshold, solve_class
from training.calibrate import calibration_report, expected_calibration_error, fit_temperature


def test_block_threshold_lowest_score_meeting_precision():
    # scores descending: 0.95 P, 0.9 P, 0.8 N, 0.7 P, 0.6 P, 0.5 N
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    pos = np.array([1, 1, 0, 1, 1, 0], bool)
    # precision at t=0.9: 2/2; t=0.8: 2/3; t=0.7: 3/4; t=0.6: 4/5 = 0.8; t=0.5: 4/6
    assert block_threshold(scores, pos, 0.8) == (0.6, pytest.approx(0.8))
    assert block_threshold(scores, pos, 1.0) == (0.9, 1.0)
    assert block_threshold(scores, pos, 0.75)[0] == 0.6


def test_block_threshold_unreachable_and_ties():
    scores = np.array([0.9, 0.9, 0.4])
    pos = np.array([1, 0, 1], bool)  # the top score is shared by a positive and a negative
    t, best = block_threshold(scores, pos, 0.98)
    assert t is None and best == pytest.approx(2 / 3)  # ties cannot be split: 0.9 gives 1/2, 0.4 gives 2/3


def test_review_threshold_highest_score_meeting_recall():
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    pos = np.array([1, 1, 0, 1, 1], bool)
    assert review_threshold(scores, pos, 0.75) == (0.2, 0.75)  # 3 of 4 positives
    assert review_threshold(scores, pos, 0.95) == (0.1, 1.0)
    assert review_threshold(scores, np.zeros(5, bool), 0.95) == (None, None)


def test_solve_class_reports_fallbacks():
    solved = solve_class(np.array([0.9, 0.9, 0.4]), np.array([1, 0, 1], bool), 0.98, 0.95)
    assert solved.thresholds.block is None and solved.thresholds.review == 0.4
    assert any("unreachable" in n for n in solved.notes)
    never = solve_class(np.array([0.99, 0.1]), np.array([1, 0], bool), 0.98, 0.95, never_block=True)
    assert never.thresholds.block is None and any("never_block" in n for n in never.notes)


T = {"ivory": ClassThresholds(block=0.9, review=0.5), "pangolin_scales": ClassThresholds(block=0.8, review=0.3)}


def test_a_split_without_negatives_keeps_the_default_block():
    """Before: with positives only, every threshold has precision 1.0, so block fell to the lowest positive
    score (0.40 here) and was reported as meeting the 0.98 target."""
    from serving.decision import DEFAULT_BLOCK

    solved = solve_class(np.array([0.97, 0.6, 0.4]), np.ones(3, bool), 0.98, 0.95)
    assert solved.thresholds.block == DEFAULT_BLOCK and solved.block_precision is None
    assert solved.rules["block"] == "default" and "no images of other classes" in solved.notes[0]
    assert solved.thresholds.review == 0.4  # recall is measured on positives alone: still solved


def test_decision_rule_edge_cases():
    assert decide({"ivory": 0.9, "other": 0.1}, T) == ("block", ["ivory"])  # tie with the threshold blocks
    assert decide({"ivory": 0.8999, "other": 0.1}, T) == ("review", ["ivory"])
    assert decide({"ivory": 0.49, "pangolin_scales": 0.29, "other": 0.22}, T) == ("allow", [])
    # several classes over threshold: block wins over review, triggers sorted by score
    assert decide({"ivory": 0.6, "pangolin_scales": 0.85}, T) == ("block", ["pangolin_scales"])
    assert decide({"ivory": 0.6, "pangolin_scales": 0.7}, T) == ("review", ["pangolin_scales", "ivory"])
    # never_block sends even a certain score to review
    assert decide({"ivory": 0.99}, T, never_block=["ivory"]) == ("review", ["ivory"])
    # 'other' has no thresholds: a confident 'other' never blocks
    assert decide({"other": 0.99, "ivory": 0.01}, T) == ("allow", [])
    with pytest.raises(ValueError):
        ClassThresholds(block=0.3, review=0.6)


def test_temperature_scaling_lowers_ece_of_overconfident_scores():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 2, n)
    margin = rng.normal(1.0, 1.0, n)  # true log-odds of the labelled class
    logits = np.stack([np.where(y == 0, margin, -margin), np.where(y == 0, -margin, margin)], 1)
    flip = rng.random(n) < 1 / (1 + np.exp(2 * margin))  # labels drawn from the true probabilities
    y = np.where(flip, 1 - y, y)
    overconfident = logits * 4
    probs = np.exp(overconfident) / np.exp(overconfident).sum(1, keepdims=True)
    t = fit_temperature(np.log(probs), y)
    assert 3.0 < t < 5.0  # undoes the x4
    report = calibration_report(probs, y, ["ivory", "other"], "other", 0.98, 0.95, [])
    assert report["ece_after"] < report["ece_before"] / 2 and report["nll_after"] < report["nll_before"]
    assert expected_calibration_error(report["calibrated"], y) == pytest.approx(report["ece_after"])


def test_policy_overrides_and_re_solves(tmp_path):
    from serving.contract import ModelContract
    from serving.policy import PolicyError, load_policy, resolve_policy
    from serving.preprocess import Preprocessing

    contract = ModelContract(
        labels=["ivory", "other", "pangolin_scales"], preprocessing=Preprocessing(), thresholds=T,
        model_name="m", model_version="1", architecture="a", created_at="now", training_data={}, metrics={},
        wildcheck_version="0", val_curves={"ivory": {"pos": [0.6, 0.7, 0.8, 0.9], "neg": [0.1, 0.2, 0.65]},
                                           "pangolin_scales": {"pos": [0.5], "neg": [0.1]}},
    )
    policy = tmp_path / "p.yaml"
    policy.write_text("classes:\n  ivory: {block_precision: 1.0, review_recall: 0.75}\n"
                      "  pangolin_scales: {block: null, review: 0.2}\n")
    thresholds, never_block, notes = resolve_policy(load_policy(policy), contract)
    assert thresholds["ivory"].block == 0.7 and thresholds["ivory"].review == 0.7
    assert thresholds["pangolin_scales"].block is None and thresholds["pangolin_scales"].review == 0.2
    assert "re-solved" in notes["ivory"][0]
    policy.write_text("classes:\n  rhino_horn: {block: 0.9}\n")
    with pytest.raises(PolicyError, match="rhino_horn"):
        resolve_policy(load_policy(policy), contract)
    policy.write_text("classes:\n  ivory: {block: 0.2, review: 0.6}\n")
    with pytest.raises(PolicyError, match="above block"):
        resolve_policy(load_policy(policy), contract)
