"""benchmarks/met_errors.py: tells images every run gets wrong (a ceiling) from seed noise."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _write_run(run: Path, rows: list[tuple[str, str, float]]) -> None:
    (run / "eval_met_val").mkdir(parents=True)
    with open(run / "eval_met_val" / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "pred", "p_ivory", "p_other"])
        for path, label, p in rows:
            writer.writerow([path, label, "ivory" if p > 0.5 else "other", p, 1 - p])


def test_reports_per_run_and_averaged_errors_and_draws_the_always_wrong(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    grey = np.repeat(rng.integers(0, 255, (48, 48, 1), dtype=np.uint8), 3, axis=2)
    paths = []
    for name, arr in [("a.jpg", colour), ("b.jpg", grey), ("c.jpg", colour), ("d.jpg", colour)]:
        Image.fromarray(arr).save(tmp_path / name, quality=95)
        paths.append(str(tmp_path / name))
    labels = ["ivory", "ivory", "other", "other"]
    # run1 gets b (grey) and c wrong; run2 gets b and d wrong: b is wrong in both, the average fixes c and d
    _write_run(tmp_path / "run1", list(zip(paths, labels, [0.9, 0.2, 0.6, 0.1])))
    _write_run(tmp_path / "run2", list(zip(paths, labels, [0.9, 0.3, 0.1, 0.7])))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "met_errors.py"), str(tmp_path / "run1"), str(tmp_path / "run2"),
         "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 images (1 black-and-white), 2 runs" in out
    assert "| run1 | 0.5000 | 2 | 1 / 1 | 1 / 3 |" in out
    assert "| average of all runs | 0.7500 | 1 | 1 / 1 | 0 / 3 |" in out
    assert "| 2 | 1 |" in out and "| 1 | 2 |" in out
    assert f"{paths[1]}  (ivory)" in out
    assert Image.open(tmp_path / "out" / "always_wrong.png").size[0] > 100


def test_refuses_runs_evaluated_on_different_images(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.jpg")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.jpg")
    _write_run(tmp_path / "run1", [(str(tmp_path / "a.jpg"), "ivory", 0.9)])
    _write_run(tmp_path / "run2", [(str(tmp_path / "b.jpg"), "ivory", 0.9)])
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "met_errors.py"), str(tmp_path / "run1"),
                             str(tmp_path / "run2")], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "other images" in result.stderr


def test_runs_with_the_same_folder_name_are_both_kept(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.jpg")
    _write_run(tmp_path / "x" / "best", [(str(tmp_path / "a.jpg"), "ivory", 0.9)])
    _write_run(tmp_path / "y" / "best", [(str(tmp_path / "a.jpg"), "ivory", 0.2)])
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "met_errors.py"), str(tmp_path / "x" / "best"),
                             str(tmp_path / "y" / "best"), "--out", str(tmp_path / "out")],
                            check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 images (0 black-and-white), 2 runs" in result.stdout
    assert "| 1 | 1 |" in result.stdout  # wrong in one of the two runs, not collapsed into one


def test_a_predictions_file_without_rows_is_refused_with_its_name(tmp_path):
    (tmp_path / "run1" / "eval_met_val").mkdir(parents=True)
    empty = tmp_path / "run1" / "eval_met_val" / "predictions.csv"
    empty.write_text("path,label,pred,p_ivory,p_other\n")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "met_errors.py"), str(tmp_path / "run1")],
                            check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert str(empty) in result.stderr and "no predictions" in result.stderr
