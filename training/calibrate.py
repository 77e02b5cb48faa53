"""``wildcheck calibrate``: temperature scaling and per-class block/review thresholds from validation.

Thresholds come from the targets (``block_precision``, ``review_recall``), then the traffic budgets
(``max_flag_rate``, ``max_block_rate``) on the negatives' validation images, pool by pool. Thresholds are
solved on the stored (rounded) curves, so a serve-time policy re-solves to the same numbers.
``calibrated_spec`` returns the run's ``ModelSpec`` with the temperature, thresholds, the rule behind each, the
validation score curves and the negatives' scores; ``calibrate`` writes it into ``best.pt`` (export copies
it into the ONNX metadata), plus ``calibration.json`` and ``reliability.png`` into the run dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from serving.contract import ModelSpec
from serving.errors import InvalidInput
from serving.runtime import softmax
from serving.thresholds import Budgets, TrafficScores, apply_budgets, curve_arrays, solve_class
from training.config import DecisionConfig
from training.fileio import atomic_write_text

EPS = 1e-7


class NoValidationData(InvalidInput):
    """Nothing to calibrate on."""


def fit_temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(log_probs / T) (log-probabilities work as logits)."""
    y = np.asarray(y, int)

    def nll(log_t: float) -> float:
        p = softmax(log_probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))

    # T is kept in [0.25, 20]: on perfectly separated validation data the NLL keeps falling as T -> 0 and
    # every score would collapse to 0 or 1, leaving thresholds no room (seen on the synthetic demo data)
    result = minimize_scalar(nll, bounds=(np.log(0.25), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by count."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def calibration_report(probs_t1: np.ndarray, y: np.ndarray, labels: list[str], negative_label: str,
                       block_precision: float, review_recall: float, never_block: list[str],
                       temperature: float | None = None, pools: list[str] | None = None,
                       budgets: Budgets | None = None) -> dict:
    """Fit (or apply) a temperature on ``probs_t1``, solve thresholds on the calibrated scores: targets first,
    then ``budgets`` on the negatives (``pools``: each image's pool name, for the traffic mix and the report)."""
    log_probs = np.log(np.clip(probs_t1, EPS, 1.0))
    temperature = temperature or fit_temperature(log_probs, y)
    calibrated = softmax(log_probs, temperature)
    exact = calibrated.astype(np.float64)  # rounded float32 would store 0.6766800284385681 for 0.676680
    budgets = budgets or Budgets()
    y = np.asarray(y)
    protected = [label for label in labels if label != negative_label]
    columns = [labels.index(label) for label in protected]
    curves = {}
    for label, i in zip(protected, columns):
        pos = y == i
        curves[label] = {"pos": np.round(np.sort(exact[pos, i]), 6).tolist(),  # 6 decimals: what the server returns
                         "neg": np.round(np.sort(exact[~pos, i]), 6).tolist()}
    solved = {label: solve_class(*curve_arrays(curves[label]), block_precision, review_recall,
                                 never_block=label in never_block) for label in protected}
    negatives = y == labels.index(negative_label) if negative_label in labels else np.zeros(len(y), bool)
    traffic = None
    if negatives.any() and protected:
        names = [p for p, n in zip(pools or ["validation"] * len(y), negatives) if n]
        traffic = TrafficScores.from_arrays(protected, calibrated[negatives][:, columns], names)
    budget_report = apply_budgets(solved, curves, traffic, budgets, list(never_block))
    return {
        "temperature": temperature,
        "n": int(len(y)),
        "ece_before": expected_calibration_error(probs_t1, y), "ece_after": expected_calibration_error(calibrated, y),
        "nll_before": nll(probs_t1, y), "nll_after": nll(calibrated, y),
        "targets": {"block_precision": block_precision, "review_recall": review_recall,
                    "max_flag_rate": budgets.max_flag_rate, "max_block_rate": budgets.max_block_rate,
                    "negative_weights": budgets.negative_weights},
        "thresholds": {k: v.thresholds.model_dump() for k, v in solved.items()},
        "rules": {k: dict(v.rules) for k, v in solved.items()},
        "achieved": {k: {"block_precision": v.block_precision, "review_recall": v.review_recall,
                         "block_recall": v.block_recall} for k, v in solved.items()},
        "budgets": budget_report,
        "notes": {k: v.notes for k, v in solved.items() if v.notes},
        "never_block": list(never_block),
        "val_curves": curves,
        "negative_scores": traffic.model_dump() if traffic else None,
        "calibrated": calibrated,
    }


def calibrated_spec(spec: ModelSpec, probs_t1: np.ndarray, y: np.ndarray, pools: list[str],
                    decision: DecisionConfig) -> tuple[ModelSpec, dict]:
    """``spec`` with the temperature, thresholds (and the rule behind each), targets, never_block, score curves
    and calibration summary fitted on validation probabilities at temperature 1; and the full report."""
    budgets = Budgets(decision.max_flag_rate, decision.max_block_rate, decision.negative_weights)
    report = calibration_report(probs_t1, y, spec.labels, spec.negative_label, decision.block_precision,
                                decision.review_recall, decision.never_block, pools=pools, budgets=budgets)
    summary = {k: v for k, v in report.items() if k not in ("val_curves", "negative_scores", "calibrated")}
    updated = ModelSpec.model_validate({
        **spec.model_dump(), "temperature": report["temperature"], "thresholds": report["thresholds"],
        "threshold_rules": report["rules"], "decision": report["targets"], "never_block": report["never_block"],
        "metrics": {**spec.metrics, "calibration": summary}, "val_curves": report["val_curves"],
        "negative_scores": report["negative_scores"],
    })
    return updated, report


def calibrate(run: str | Path, data: list[str] | None = None, decision_overrides: dict | None = None) -> dict:
    """Fit on the run's validation split; write the calibrated spec into best.pt (atomically), calibration.json
    and reliability.png; return the report.

    ``decision_overrides``: e.g. ``{"max_flag_rate": 0.01}`` over the run's ``decision`` config (recorded in best.pt)."""
    from training.plots import plot_reliability
    from training.predict import TorchPredictor, predict_samples, resolve_checkpoint, run_samples

    path = resolve_checkpoint(run)
    predictor = TorchPredictor(path)
    ckpt = predictor.checkpoint
    decision = DecisionConfig.model_validate({**ckpt.config.decision.model_dump(), **(decision_overrides or {})})
    val, _ = run_samples(ckpt, data)
    if not val:
        raise NoValidationData("no validation images to calibrate on; pass --data")
    ckpt.spec = ckpt.spec.model_copy(update={"test_time_views": decision.test_time_views,  # scored as it will be
                                             "size_route": decision.size_route})
    # panels are scored without the collage correction: it is derived from the thresholds solved here
    predictor.spec = ckpt.spec.model_copy(update={"temperature": 1.0, "negative_scores": None})
    probs, kept, _ = predict_samples(predictor, val, desc="calibration")
    index = {label: i for i, label in enumerate(ckpt.spec.labels)}
    y = np.array([index[s.label] for s in kept])
    if not ckpt.val_metrics:  # a checkpoint no training validated (training.ensemble): these scores are its validation
        from training.checkpoint import published_metrics
        from training.metrics import compute_metrics

        ckpt.val_metrics = compute_metrics(y, probs, ckpt.spec.labels)
        ckpt.spec = ckpt.spec.model_copy(update={"metrics": published_metrics(ckpt.val_metrics)})
    ckpt.spec, report = calibrated_spec(ckpt.spec, probs, y, [s.pool or "validation" for s in kept], decision)
    ckpt.config = ckpt.config.model_copy(update={"decision": decision})
    calibrated = report.pop("calibrated")
    run_dir = path.parent
    plot_reliability(probs, calibrated, y, run_dir / "reliability.png", (report["ece_before"], report["ece_after"]))
    ckpt.save(path)
    atomic_write_text(run_dir / "calibration.json", json.dumps(ckpt.spec.metrics["calibration"], indent=2))
    return report


def calibrate_new_run(run_dir: Path, data: list[str] | None = None) -> dict:
    """Calibrate the ``best.pt`` a command has just written (``ensemble``, ``grey-head``). If that fails, the
    checkpoint goes: uncalibrated, it would export with the default thresholds and no metrics."""
    try:
        return calibrate(run_dir, data)
    except BaseException:
        (run_dir / "best.pt").unlink(missing_ok=True)
        raise


def format_report(report: dict) -> str:
    lines = [f"temperature {report['temperature']:.3f}: ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}, "
             f"NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f} on {report['n']} validation images"]
    for label, t in report["thresholds"].items():
        a = report["achieved"][label]
        block = f"{t['block']:.4f}" if t["block"] is not None else "never"
        prec = f"{a['block_precision']:.3f}" if a["block_precision"] is not None else "-"
        rec = f"{a['review_recall']:.3f}" if a["review_recall"] is not None else "-"
        rules = report.get("rules", {}).get(label, {})
        lines.append(f"  {label}: block >= {block} (precision {prec}; set by {rules.get('block', '?')}), "
                     f"review >= {t['review']:.4f} (recall {rec}; set by {rules.get('review', '?')})")
        for note in report["notes"].get(label, []):
            lines.append(f"    note: {note}")
    lines += format_budgets(report.get("budgets") or {})
    return "\n".join(lines)


def format_budgets(b: dict) -> list[str]:
    """The traffic-budget part of a calibration report: rates reached, per pool, and each conflict."""
    if "flag_rate" not in b:
        return []
    budget = lambda v: "off" if v is None else f"{v:.2%}"  # noqa: E731
    lines = [f"  negatives ({sum(b['negatives'].values())} images): flag rate {b['flag_rate']:.2%} "
             f"(budget {budget(b['max_flag_rate'])}), block rate {b['block_rate']:.2%} (budget {budget(b['max_block_rate'])})"
             + (f", weighted {b['negative_weights']}" if b.get("negative_weights") else "")]
    for pool, n in b["negatives"].items():
        lines.append(f"    {pool} ({n}): flag {b['flag_rate_per_pool'][pool]:.2%}, block {b['block_rate_per_pool'][pool]:.2%}")
    for c in b["conflicts"]:
        left = "-" if c["recall_left"] is None else f"{c['recall_left']:.3f}"
        before = "-" if c["recall_before"] is None else f"{c['recall_before']:.3f}"
        lines.append(f"  CONFLICT {c['class']}: {c['budget']} overrides {c['target']} at {c['threshold']}; "
                     f"the budget wins: recall at {c['threshold']} {before} -> {left}")
    lines += [f"  note: {n}" for n in b.get("notes", [])]
    return lines
