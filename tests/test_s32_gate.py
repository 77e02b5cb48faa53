"""The champion/challenger gate is a fair test only on images the challenger never learned from.

Before: `compare --split train` (or val, where every run chooses its best epoch and calibrates its thresholds) passed
the gate, `promote` accepted it and promotions.jsonl recorded "gate": "pass" without saying where it was measured;
`promote --registry DATA/registry` wrote the registry inside the data the run trained on.

The challenger here is a copy of the promoted run: the same weights, so the gate passes on any images, and only
where it was measured decides whether promote may rely on it.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from serving.errors import InvalidInput
from tests.conftest import tiny_config
from training.compare import compare
from training.registry import PromoteRefused, current_model, promote

CLASSES = ("ivory", "pangolin_scales", "other")


@pytest.fixture(scope="module")
def gate_setup(tmp_path_factory):
    """A dataset with train/val/test folders, a folder of more images without split folders (training reads it all
    as train, compare reads it as whatever --split names), a run trained on both, and a registry it is current in."""
    from training.data.synth import synthesize
    from training.train import train

    base = tmp_path_factory.mktemp("gate")
    root, flat = base / "data", base / "extra"
    synthesize(root, per_class=8, size=96, seed=3, classes=CLASSES, splits={"train": 1.0, "val": 0.5, "test": 0.5})
    synthesize(base / "extra_src", per_class=4, size=96, seed=11, classes=CLASSES, splits={"train": 1.0})
    shutil.move(base / "extra_src" / "train", flat)  # ROOT/<label>/<image>: no split folders
    run = base / "run"
    train([str(root), str(flat)], run, tiny_config(epochs=1))
    registry = base / "reg"
    promote(run, registry, name="m", version="1")
    return {"root": root, "flat": flat, "run": run, "registry": registry}


def _setup(gate_setup, tmp_path):
    """This test's own challenger (compare writes into it) and registry (promote moves its current)."""
    challenger = tmp_path / "challenger"
    shutil.copytree(gate_setup["run"], challenger)
    registry = tmp_path / "reg"
    shutil.copytree(gate_setup["registry"], registry, symlinks=True)
    return challenger, registry


def _records(registry):
    return [json.loads(line) for line in (registry / "m" / "promotions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_gate_on_train_or_val_is_not_a_fair_test_and_promote_refuses_it(gate_setup, tmp_path, split):
    challenger, registry = _setup(gate_setup, tmp_path)
    champion = gate_setup["run"]  # the weights current points at
    root = gate_setup["root"]
    result = compare(champion, challenger, [str(root)], split=split)
    assert result["gate"] == "pass"  # the same weights: nothing dropped
    before = current_model(registry)
    with pytest.raises(PromoteRefused, match=rf"split '{split}', which is not a fair test.*--split test"):
        promote(challenger, registry, name="m", version="2")
    assert current_model(registry) == before and not (registry / "m" / "2").exists()
    assert result["held_out"] is False and result["tuning_images_compared"] == result["images"] > 0
    assert result["split"] == split and result["data"] == [str(root.resolve())]
    assert "**Not a fair test**" in result["report_markdown"] and "--split test" in result["report_markdown"]
    assert "(not a fair test: see above)" in (challenger / "compare.md").read_text()
    stored = json.loads((challenger / "compare.json").read_text())
    assert (stored["split"], stored["held_out"], stored["data"]) == (split, False, [str(root.resolve())])
    if split == "val":  # --force still promotes, and the record says where the gate was measured
        promote(challenger, registry, name="m", version="2", force=True)
        last = _records(registry)[-1]
        assert (last["version"], last["forced"], last["gate"]) == (current_model(registry).parent.name, True, "pass")
        assert (last["split"], last["held_out"], last["data"]) == ("val", False, [str(root.resolve())])
        assert "measured on split 'val'" in (registry / "m" / "current" / "model_card.md").read_text()


def test_a_folder_the_challenger_trained_on_is_not_held_out_under_any_split_name(gate_setup, tmp_path):
    """A folder without split folders trained as train; compare reads it as the split it is asked for: 'test'
    named images the challenger learned from."""
    challenger, registry = _setup(gate_setup, tmp_path)
    result = compare(gate_setup["run"], challenger, [str(gate_setup["flat"])], split="test")
    with pytest.raises(PromoteRefused, match="12 of the 12 images compared are in the challenger's training"):
        promote(challenger, registry, name="m", version="2")
    assert result["held_out"] is False and result["tuning_images_compared"] == result["images"] == 12


def test_a_gate_on_the_test_split_is_held_out_and_the_promotion_records_it(gate_setup, tmp_path):
    challenger, registry = _setup(gate_setup, tmp_path)
    root = gate_setup["root"]
    result = compare(gate_setup["run"], challenger, [str(root)], split="test")
    done = promote(challenger, registry, name="m", version="2")
    assert current_model(registry).parent.name == done["version"]
    last = _records(registry)[-1]
    assert (last["forced"], last["gate"], last.get("split"), last.get("held_out")) == (False, "pass", "test", True)
    assert last["data"] == [str(root.resolve())]
    assert result["gate"] == "pass" and result["held_out"] is True and result["tuning_images_compared"] == 0
    assert "Not a fair test" not in result["report_markdown"]
    assert f"Measured on split 'test' of {root.resolve()}." in result["report_markdown"]


def test_a_comparison_that_does_not_say_whether_it_was_held_out_is_refused(gate_setup, tmp_path):
    """A compare.json from before the split was checked (or edited) does not count as a fair test."""
    challenger, registry = _setup(gate_setup, tmp_path)
    compare(gate_setup["run"], challenger, [str(gate_setup["root"])], split="test")
    stored = json.loads((challenger / "compare.json").read_text())
    stored.pop("held_out", None)
    (challenger / "compare.json").write_text(json.dumps(stored))
    with pytest.raises(PromoteRefused, match="older wildcheck.*--split test"):
        promote(challenger, registry, name="m", version="2")


def test_an_onnx_challenger_on_val_is_not_held_out_by_the_split_name(gate_setup, tmp_path):
    """An ONNX file records no training images: train and val are taken as seen, test as held out (unchecked)."""
    onnx = current_model(gate_setup["registry"])
    root = str(gate_setup["root"])
    on_val = compare(gate_setup["run"], onnx, [root], split="val", report=tmp_path / "v.md")
    assert on_val["held_out"] is False and on_val["tuning_images_compared"] is None
    assert "does not record its training images" in on_val["held_out_note"]
    on_test = compare(gate_setup["run"], onnx, [root], split="test", report=tmp_path / "t.md")
    assert on_test["held_out"] is True and "Not checked image by image" in on_test["report_markdown"]


def test_promote_refuses_a_registry_inside_the_data_it_read(gate_setup, tmp_path):
    """The run's data roots (a split layout and a flat folder) and the comparison's own data: a registry there
    is read as data next time. Refused before the export, nothing written."""
    challenger, _ = _setup(gate_setup, tmp_path)
    held = tmp_path / "held"  # other images, compared on but never trained on
    shutil.copytree(gate_setup["root"] / "test", held / "test")
    compare(gate_setup["run"], challenger, [str(held)], split="test")
    root, flat = gate_setup["root"], gate_setup["flat"]
    listing = {p: sorted(q.relative_to(p) for q in p.rglob("*")) for p in (root, flat, held)}
    for registry in (root / "registry", root, flat / "ivory" / "reg", held / "reg"):
        with pytest.raises(InvalidInput, match="--registry .* which this command reads"):
            promote(challenger, registry, name="m", version="2", force=True)
    assert {p: sorted(q.relative_to(p) for q in p.rglob("*")) for p in listing} == listing


def test_cli_says_the_gate_is_not_fair_and_promote_exits_1(gate_setup, tmp_path):
    from training.cli import app

    challenger, registry = _setup(gate_setup, tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["compare", str(gate_setup["run"]), str(challenger), "--data", str(gate_setup["root"]),
                              "--split", "train"])
    assert out.exit_code == 0, out.output  # the gate itself passed
    assert "warning: the gate is not a fair test on split 'train'" in out.output
    refused = runner.invoke(app, ["promote", str(challenger), "--registry", str(registry), "--name", "m"])
    assert refused.exit_code == 1 and "--split test" in refused.output
