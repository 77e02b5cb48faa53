"""``wildcheck compare``: champion vs challenger on the same images, with a paired test and a gate.

The gate fails (non-zero exit) when the challenger's macro-F1 on the classes the champion knows drops,
any existing class loses more than ``max_recall_drop`` points of recall, or the challenger lost a class. The result is written to
``CHALLENGER/compare.json`` (``promote`` reads it) and a markdown report.

The gate is a fair test only on images the challenger never learned from: it trained on ``train`` and chose its best
epoch and calibrated its thresholds on ``val``, so a comparison there flatters it. The result records the split, the
data roots and whether the compared images were held out (``held_out``); ``promote`` refuses a comparison that was not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from serving.contract import weights_id
from serving.errors import InvalidInput
from training.data.sources import load_samples, select_split
from training.metrics import compute_metrics
from training.predict import load_predictor, predict_samples, resolve_checkpoint


class CompareError(InvalidInput):
    """The two models cannot be compared on the data given."""


REPORT_KINDS = (".md", ".markdown", ".txt")  # what an existing --report file may be (it is replaced)
TUNED_SPLITS = ("train", "val")  # what every run learns from (train) and selects and calibrates on (val)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact McNemar test on the discordant pairs."""
    only_a = int((a_correct & ~b_correct).sum())
    only_b = int((~a_correct & b_correct).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"champion_only_correct": only_a, "challenger_only_correct": only_b, "p_value": p}


def _tuning_images(challenger) -> tuple[set[Path] | None, str]:
    """The images the challenger trained on or was tuned on (train and val of the data roots and negatives pools its
    checkpoint records, read as training read them: a folder without split folders is all ``train``), resolved; None
    with the reason when that cannot be known (an ONNX challenger, data moved since)."""
    checkpoint = getattr(challenger, "checkpoint", None)
    if checkpoint is None:
        return None, "the challenger is an ONNX file, which does not record its training images"
    from serving.errors import WildcheckError
    from training.predict import run_samples

    try:
        val, train = run_samples(checkpoint, None)
    except WildcheckError as exc:
        return None, f"the challenger's training data could not be read ({exc})"
    return {s.path.resolve() for s in val + train}, ""


def held_out_check(challenger, compared: list, split: str) -> dict:
    """Whether ``compared`` (the images the gate is measured on) are held out from the challenger. Image by image
    where the run's data can be read; otherwise by the split's name alone (``train``/``val`` are never held out)."""
    seen, unknown = _tuning_images(challenger)
    if seen is None:
        held_out = split not in TUNED_SPLITS
        note = "" if held_out else (f"split {split!r} is what every run trains on or chooses its epoch and thresholds "
                                    f"by, and {unknown}")
        return {"held_out": held_out, "tuning_images_compared": None, "held_out_note": note or unknown}
    count = sum(s.path.resolve() in seen for s in compared)
    note = "" if not count else (f"{count} of the {len(compared)} images compared are in the challenger's training or "
                                 "validation data (it learned from train and chose its best epoch and calibrated its "
                                 "thresholds on val)")
    return {"held_out": count == 0, "tuning_images_compared": count, "held_out_note": note}


def compare_command(champion, challenger, data: list[str]) -> str:
    """The ``wildcheck compare`` command on the held-out split (``--data ROOT`` where the roots are unknown)."""
    roots = " ".join(f"--data {d}" for d in data) or "--data ROOT"
    return f"wildcheck compare {champion} {challenger} {roots} --split test"


def not_held_out_advice(champion, challenger, data: list[str]) -> str:
    """What to run instead of a comparison on images the challenger was trained or tuned on."""
    return f"compare on the held-out split instead: {compare_command(champion, challenger, data)}"


def _table(per_a: dict, per_b: dict, labels: list[str]) -> list[str]:
    lines = ["| class | support | champion P | champion R | champion F1 | challenger P | challenger R | challenger F1 | ΔR (points) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        b = per_b[label]
        a = per_a.get(label)
        fa = (lambda k: f"{a[k]:.3f}") if a else (lambda k: "—")
        delta = f"{100 * (b['recall'] - a['recall']):+.1f}" if a else "new"
        lines.append(f"| {label} | {b['support']} | {fa('precision')} | {fa('recall')} | {fa('f1')} | "
                     f"{b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} | {delta} |")
    return lines


def _cm(matrix, labels) -> list[str]:
    lines = ["| true \\ pred | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(labels, matrix)]
    return lines


def compare(champion: str | Path, challenger: str | Path, data: list[str], split: str = "test",
            max_recall_drop: float = 1.0, report: str | Path | None = None) -> dict:
    if not np.isfinite(max_recall_drop) or max_recall_drop < 0:
        raise CompareError(f"--max-recall-drop must be a number of points >= 0, not {max_recall_drop}")
    if report is not None:  # before any work: never a folder, the models, an image or inside the data
        from training.outputs import out_file

        models = [champion, challenger]
        models += [resolve_checkpoint(m) for m in models if Path(m).exists()]
        out_file(report, "--report", "compare.md", reads=data, protect=models, kinds=REPORT_KINDS)
    champ, chall = load_predictor(champion), load_predictor(challenger)
    samples = select_split(load_samples(data, default_split=split), split)
    samples = [s for s in samples if s.label in chall.labels]
    if not samples:
        raise CompareError(f"no images of the challenger's labels in split {split!r} of {data}")
    p_chall, kept, _ = predict_samples(chall, samples, desc="challenger")
    p_champ, kept_a, _ = predict_samples(champ, kept, desc="champion")
    y_b = np.array([chall.labels.index(s.label) for s in kept])
    m_b = compute_metrics(y_b, p_chall, chall.labels)
    shared = np.array([s.label in champ.labels for s in kept])
    if not shared.any():
        raise CompareError(f"no images in split {split!r} of {data} carry a label both models know "
                           f"(champion: {', '.join(champ.labels)}; challenger: {', '.join(chall.labels)})")
    y_a = np.array([champ.labels.index(s.label) for s in kept if s.label in champ.labels])
    m_a = compute_metrics(y_a, p_champ[shared], champ.labels)
    # like-for-like macro-F1: the same images, the champion's classes (a prediction of a new class is simply wrong)
    pred_b = [chall.labels[i] for i in p_chall.argmax(1)]
    true_shared = [s.label for s, k in zip(kept, shared) if k]
    pred_b_shared = [p for p, k in zip(pred_b, shared) if k]
    present = sorted(set(true_shared))
    macro_b = float(f1_score(true_shared, pred_b_shared, labels=present, average="macro", zero_division=0))
    pred_a_shared = [champ.labels[i] for i in p_champ[shared].argmax(1)]
    a_correct = np.array([p == t for p, t in zip(pred_a_shared, true_shared)], dtype=bool)
    b_correct = np.array([p == t for p, t in zip(pred_b_shared, true_shared)], dtype=bool)
    fairness = held_out_check(chall, kept, split)
    failures = []
    if macro_b < m_a["macro_f1"]:
        failures.append(f"macro-F1 on the champion's classes dropped: {m_a['macro_f1']:.4f} -> {macro_b:.4f}")
    for label in champ.labels:
        a, b = m_a["per_class"][label], m_b["per_class"].get(label)
        if b is None:  # a retrain that lost a class must not pass as one that kept its recall
            failures.append(f"{label}: the challenger does not know this class, the champion does (train the "
                            "challenger with its images, or promote --force if the class is retired on purpose)")
            continue
        if a["support"] == 0:
            continue
        drop = 100 * (a["recall"] - b["recall"])
        if drop > max_recall_drop:
            failures.append(f"{label} recall dropped by {drop:.1f} points ({a['recall']:.3f} -> {b['recall']:.3f})")
    result = {
        "champion": str(champion), "challenger": str(challenger), "split": split,
        "data": [str(Path(d).resolve()) for d in data], **fairness, "images": len(kept),
        "shared_images": int(shared.sum()), "new_labels": [l for l in chall.labels if l not in champ.labels],
        "champion_metrics": m_a, "challenger_metrics": m_b,
        "challenger_macro_f1_on_champion_classes": macro_b,
        "mcnemar": mcnemar(a_correct, b_correct), "max_recall_drop": max_recall_drop,
        "gate": "pass" if not failures else "fail", "failures": failures,
        # which weights were compared: promote accepts the comparison only against the current model
        "champion_weights": weights_id(champ.contract.model_version),
        "challenger_weights": weights_id(chall.contract.model_version),
    }
    fairness_lines = [] if fairness["held_out"] else [
        f"**Not a fair test**: {fairness['held_out_note']}. This gate flatters the challenger and `wildcheck promote` "
        f"refuses it without --force; {not_held_out_advice(champion, challenger, data)}", ""]
    if fairness["held_out"] and fairness["tuning_images_compared"] is None:  # held out by the split's name alone
        fairness_lines = [f"Not checked image by image: {fairness['held_out_note']}.", ""]
    md = [f"# {Path(challenger).name} vs {Path(champion).name} on {split}", "",
          f"Measured on split {split!r} of {', '.join(result['data'])}.", "", *fairness_lines,
          f"Gate: **{result['gate'].upper()}**" + ("" if not failures else ": " + "; ".join(failures))
          + ("" if fairness["held_out"] else " (not a fair test: see above)"), "",
          f"{len(kept)} images, {int(shared.sum())} with labels both models know; new labels: {result['new_labels'] or 'none'}.",
          f"Macro-F1 on the champion's classes: {m_a['macro_f1']:.4f} (champion) vs "
          f"{macro_b:.4f} (challenger).",
          f"McNemar (exact) on shared images: champion-only correct {result['mcnemar']['champion_only_correct']}, "
          f"challenger-only correct {result['mcnemar']['challenger_only_correct']}, p = {result['mcnemar']['p_value']:.4g}.",
          "", *_table(m_a["per_class"], m_b["per_class"], chall.labels), "", "## Champion confusion matrix", "",
          *_cm(m_a["confusion_matrix"], champ.labels), "", "## Challenger confusion matrix", "",
          *_cm(m_b["confusion_matrix"], chall.labels), ""]
    result["report_markdown"] = "\n".join(md)
    from training.fileio import atomic_write_text

    target_dir = resolve_checkpoint(challenger).parent
    atomic_write_text(Path(report) if report else target_dir / "compare.md", result["report_markdown"])
    if resolve_checkpoint(challenger).suffix.lower() != ".onnx":
        atomic_write_text(target_dir / "compare.json", json.dumps({k: v for k, v in result.items()
                                                                   if k != "report_markdown"}, indent=2))
    return result
