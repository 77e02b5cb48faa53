"""Report plots: counts shaded by recall, one PR curve per class present, PNGs written atomically."""

import numpy as np
from PIL import Image

from training import plots


def test_confusion_matrix_and_pr_curves(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figures to read them back
    labels = ["ivory", "other", "pangolin_scales"]
    y_true = np.array([0, 0, 1, 1, 1, 0])  # no pangolin_scales: its curve is undefined and left out
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1],
                      [0.3, 0.6, 0.1]])
    cm = np.array([[20, 1, 0], [3, 2, 0], [0, 0, 0]])
    plots.plot_confusion_matrix(cm, labels, tmp_path / "cm" / "confusion_matrix.png")  # the folder is created
    plots.plot_pr_curves(y_true, probs, labels, tmp_path / "pr.png")

    cm_ax, pr_ax = figures[0].axes[0], figures[1].axes[0]
    assert [t.get_text() for t in cm_ax.texts] == ["20", "1", "0", "3", "2", "0", "0", "0", "0"]
    shades = cm_ax.images[0].get_array()
    assert np.isclose(shades[1, 1], 0.4) and shades.max() <= 1  # row share (recall), not the count
    legend = [t.get_text() for t in pr_ax.get_legend().get_texts()]
    assert len(legend) == 2 and legend[0].startswith("ivory (AP = ") and legend[1].startswith("other (AP = ")
    for name in ("cm/confusion_matrix.png", "pr.png"):
        img = Image.open(tmp_path / name)
        assert img.format == "PNG" and min(img.size) > 300
    assert not list(tmp_path.rglob("*.tmp"))


def test_per_source_plots_of_sources_named_alike_do_not_replace_each_other(tmp_path):
    """`a b` and `a_b` (and `Shop`/`shop` on a case-blind disk) were both `a_b.png`: the second replaced the first."""
    from tests.conftest import photo

    img = tmp_path / "fp.jpg"
    photo(1, (64, 64)).save(img)
    top = [{"path": str(img), "label": "ivory", "score": 0.9, "decision": "block"}]
    one = {"top": top, "flag_rate": 0.1, "block_rate": 0.05, "n": 20}
    sources = {"pool/a b": one, "pool/a_b": one, "pool/Shop": one, "pool/shop": one, "pool/carvings": one}
    plots.plot_source_false_positives(sources, tmp_path / "by_source")
    names = sorted(p.name for p in (tmp_path / "by_source").glob("*.png"))
    assert len(names) == 5 and "pool_carvings.png" in names  # a name of its own keeps its plain file name
    assert sum(n.startswith("pool_a_b-") for n in names) == 2 and sum(n.lower().startswith("pool_shop-") for n in names) == 2
