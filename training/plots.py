"""PNG plots for evaluation reports (matplotlib, headless; scikit-learn's displays where one fits)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay  # noqa: E402


def _save(fig, path: str | Path) -> None:
    """Write the figure as PNG atomically (a report someone opens while a rerun writes is never half a file)."""
    from training.fileio import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str | Path) -> None:
    """Counts, with each row shaded by its share (recall), so small classes stay readable."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(share, display_labels=labels)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, im_kw={"vmin": 0, "vmax": 1})
    for (i, j), text in np.ndenumerate(display.text_):  # shaded by share, labelled with the counts
        text.set_text(str(cm[i, j]))
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    _save(fig, path)


def plot_pr_curves(y_true: np.ndarray, probs: np.ndarray, labels: list[str], path: str | Path) -> None:
    """One precision-recall curve per class present in the data (one-vs-rest), average precision in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, label in enumerate(labels):
        positives = y_true == i
        if not positives.any() or positives.all():
            continue
        PrecisionRecallDisplay.from_predictions(positives, probs[:, i], name=label, ax=ax)
    ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall (one vs rest)")
    if ax.lines:
        ax.legend(loc="lower left")
    _save(fig, path)


def plot_image_grid(paths: list[str], captions: list[str], path: str | Path, title: str = "", cols: int = 4,
                    heatmaps: list[np.ndarray | None] | None = None) -> None:
    """Thumbnails with captions (e.g. the most confident false positives and their scores).

    ``heatmaps``: a ``serving.explain`` grid per image (or None); each is drawn over a copy beside the photo.
    """
    from PIL import Image

    from serving.explain import overlay
    from serving.imageio import ImageError, decode_image

    heatmaps = heatmaps or [None] * len(paths)
    wide = any(h is not None for h in heatmaps)
    n = max(1, len(paths))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=((6 if wide else 3) * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img_path, caption, heat in zip(axes.flat, paths, captions, heatmaps):
        try:
            img, _ = decode_image(img_path, draft_size=256)
            img.thumbnail((256, 256))
            if heat is not None:  # photo | photo with heat map
                side = Image.new("RGB", (2 * img.width + 8, img.height), "white")
                side.paste(img, (0, 0))
                side.paste(overlay(img, heat, 256), (img.width + 8, 0))
                img = side
            ax.imshow(img)
        except (ImageError, OSError):
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(caption, fontsize=8)
    if not paths:
        axes.flat[0].text(0.5, 0.5, "none", ha="center")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_robustness(series: dict[str, dict[str, float | None]], conditions: list[str], path: str | Path,
                    clean: str = "clean") -> None:
    """A bar group per listing condition (one bar per metric); each metric's ``clean`` value as a dashed line.

    ``series``: ``training.robustness.chart_series`` of a report.
    """
    names = [n for n in conditions if n != clean]
    metrics = list(series)
    fig, ax = plt.subplots(figsize=(min(18.0, max(8.0, 0.22 * len(names) * len(metrics) + 4)), 5))
    width = 0.8 / max(1, len(metrics))
    # tab10 repeats after 10 metrics (three protected classes make 12): two metrics drawn alike, one legend colour
    colours = plt.get_cmap("tab10" if len(metrics) <= 10 else "tab20").colors
    for k, metric in enumerate(metrics):
        colour = colours[k % len(colours)]
        values = [series[metric].get(n) for n in names]
        xs = np.arange(len(names)) + (k - (len(metrics) - 1) / 2) * width
        ax.bar(xs, [np.nan if v is None else v for v in values], width, color=colour, label=metric)
        baseline = series[metric].get(clean)  # not `clean`: rebinding it lost every later metric's line
        if baseline is not None:
            ax.axhline(baseline, color=colour, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share")
    ax.set_title(f"robustness to listing conditions (dashed: {clean})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_history(history: str | Path, out: str | Path) -> None:
    """Loss and validation curves of a run's history.csv, for people who would rather look than read it."""
    import csv

    with Path(history).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [float(r["train_loss"]) for r in rows], label="train loss")
    a.plot(epochs, [float(r["val_loss"]) for r in rows], label="val NLL")
    a.set_xlabel("epoch"), a.legend()
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1"):
        b.plot(epochs, [float(r[key]) for r in rows], label=key)
    b.set_xlabel("epoch"), b.legend()
    _save(fig, out)


def plot_source_false_positives(sources: dict, folder: Path) -> None:
    """One PNG per source: its most confident negatives with score and decision. Sources whose cleaned names
    collide (``a b`` and ``a_b``, ``Shop`` and ``shop`` on a case-blind disk) get a short hash of the raw name:
    before, the second PNG replaced the first."""
    import hashlib
    import re
    from collections import Counter

    cleaned = {origin: re.sub(r"[^A-Za-z0-9._-]+", "_", origin).strip("_") or "data" for origin in sources}
    taken = Counter(name.lower() for name in cleaned.values())
    for origin, r in sources.items():
        name = cleaned[origin]
        if taken[name.lower()] > 1:
            name += "-" + hashlib.sha256(origin.encode()).hexdigest()[:8]
        plot_image_grid([t["path"] for t in r["top"]], [f"{t['label']} {t['score']:.3f} ({t['decision']})" for t in r["top"]],
                        folder / f"{name}.png", title=f"{origin}: most confident negatives "
                        f"(flag {r['flag_rate']:.1%}, block {r['block_rate']:.1%} of {r['n']})")


def plot_reliability(before: np.ndarray, after: np.ndarray, y: np.ndarray, path: Path, ece: tuple[float, float],
                     n_bins: int = 15) -> None:
    """Accuracy against confidence before and after temperature scaling; ``ece``: (before, after), for the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    edges = np.linspace(0, 1, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for probs, name, error in ((before, "before", ece[0]), (after, "after", ece[1])):
        conf, correct = probs.max(1), probs.argmax(1) == y
        acc = [correct[(conf > lo) & (conf <= hi)].mean() if ((conf > lo) & (conf <= hi)).any() else np.nan
               for lo, hi in zip(edges[:-1], edges[1:])]
        ax.plot(centres, acc, marker="o", label=f"{name} (ECE {error:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.set_xlabel("confidence (top class)"), ax.set_ylabel("accuracy"), ax.set_title("reliability")
    ax.legend(loc="upper left")
    _save(fig, path)
