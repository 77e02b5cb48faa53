"""Retraining loop end to end: ingest with provenance, warm start, champion/challenger gate, promote, serve."""

import csv
import json
import shutil

import pytest

from tests.conftest import tiny_config
from training.compare import compare
from training.data.ingest import IngestConflict, ingest
from training.data.sources import discover
from training.registry import PromoteRefused, current_model, promote
from training.train import train




def _write_csv(path, rows):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "source", "listing_id", "labeled_by", "labeled_at"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def three_class_root(tmp_path_factory):
    from training.data.synth import synthesize

    root = tmp_path_factory.mktemp("retrain") / "data"
    synthesize(root, per_class=16, size=128, seed=3, classes=("ivory", "pangolin_scales", "other"),
               splits={"train": 1.0, "val": 0.5, "test": 0.75})
    return root


def _few_epochs(config):
    """A handful of epochs on ~60 images: the small-data regularisers (layer-wise lr decay, Mixup/CutMix),
    tuned for thousands of images and 12 epochs, only slow learning down here, and this test is about the
    ingest/compare/promote loop, not the recipe."""
    config.train.layer_decay, config.train.mixup.prob = None, 0.0
    return config


def test_ingest_train_compare_promote_serve(three_class_root, tmp_path):
    from training.data.synth import make_image

    root = three_class_root
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = []
    for i in range(12):  # a new class, tiger_skin, from a seizure
        p = incoming / f"tiger_{i}.jpg"
        make_image("tiger_skin", 5000 + i, 128).save(p, quality=90)
        rows.append({"path": str(p), "label": "tiger_skin", "source": "seizure-2026-11", "listing_id": f"L{i}",
                     "labeled_by": "mod7", "labeled_at": "2026-11-28"})
    for i in range(4):  # more images of an old class
        p = incoming / f"ivory_{i}.jpg"
        make_image("ivory", 6000 + i, 128).save(p, quality=90)
        rows.append({"path": str(p), "label": "ivory", "source": "moderation", "listing_id": f"M{i}",
                     "labeled_by": "mod3", "labeled_at": "2026-11-27"})
    existing = sorted((root / "train" / "ivory").glob("*.jpg"))[0]
    dup = incoming / "dup.jpg"
    shutil.copy(existing, dup)
    rows.append({"path": str(dup), "label": "ivory", "source": "moderation"})
    conflict = incoming / "conflict.jpg"
    shutil.copy(sorted((root / "train" / "other").glob("*.jpg"))[0], conflict)
    rows.append({"path": str(conflict), "label": "pangolin_scales", "source": "moderation"})
    labels_csv = tmp_path / "labels.csv"
    _write_csv(labels_csv, rows)

    # v1 on three classes
    v1 = tmp_path / "v1"
    train([str(root)], v1, _few_epochs(tiny_config(img_size=96, epochs=5)))

    # the conflict stops the ingest and nothing is written
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    with pytest.raises(IngestConflict) as exc:
        ingest(labels_csv, root)
    assert [c["path"] for c in exc.value.conflicts] == [str(conflict)]
    assert "labelled 'other', CSV says 'pangolin_scales'" in exc.value.conflicts[0]["message"]
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before

    # without the conflicting row: the duplicate is reported, the new label announced, provenance kept
    _write_csv(labels_csv, rows[:-1])
    report = ingest(labels_csv, root)
    assert len(report["added"]) == 16 and report["new_labels"] == ["tiger_skin"]
    assert [d["path"] for d in report["duplicates"]] == [str(dup)]
    with (root / "manifest.csv").open() as fh:
        manifest = list(csv.DictReader(fh))
    tiger = [r for r in manifest if r["label"] == "tiger_skin"]
    assert len(tiger) == 12 and tiger[0]["labeled_by"] == "mod7" and tiger[0]["source"] == "seizure-2026-11"
    assert all(r["split"] == "train" for r in tiger) and not (root / "test" / "tiger_skin").exists()
    assert sum(1 for s in discover(root) if s.label == "tiger_skin") == 12
    again = ingest(labels_csv, root)  # idempotent: everything is a duplicate now
    assert not again["added"] and len(again["duplicates"]) == 17

    # validation and test images of the new class (the frozen test split only when named)
    for split, first_seed in (("test", 7000), ("val", 8000)):
        split_rows = []
        for i in range(4):
            p = incoming / f"tiger_{split}_{i}.jpg"
            make_image("tiger_skin", first_seed + i, 128).save(p, quality=90)
            split_rows.append({"path": str(p), "label": "tiger_skin"})
        _write_csv(tmp_path / f"{split}.csv", split_rows)
        ingest(tmp_path / f"{split}.csv", root, split=split)

    # v2: warm start, the old head rows kept, the new class fresh
    v2 = tmp_path / "v2"
    train([str(root)], v2, _few_epochs(tiny_config(img_size=96, epochs=4)), init_from=v1)
    assert json.loads((v2 / "labels.json").read_text()) == ["ivory", "other", "pangolin_scales", "tiger_skin"]

    result = compare(v1, v2, [str(root)], split="test")
    assert result["new_labels"] == ["tiger_skin"] and "tiger_skin" in result["report_markdown"]
    assert result["gate"] == "pass", result["failures"]
    assert (v2 / "compare.md").exists() and json.loads((v2 / "compare.json").read_text())["gate"] == "pass"

    registry = tmp_path / "registry"
    first = promote(v1, registry, version="1")
    with pytest.raises(PromoteRefused, match="compare"):
        promote(tmp_path / "v1", registry, version="1b")  # a second model without a comparison
    second = promote(v2, registry, version="2")
    assert second["previous"] == first["version"]
    # v1's comparison was with v1 itself, and v2 is current now: a comparison with another model than the
    # current one used to pass promote's gate (a weaker model replaced the current one without --force)
    compare(v2, v1, [str(root)], split="test")
    assert json.loads((v1 / "compare.json").read_text())["champion_weights"] == second["version"].rpartition("+")[2]
    stale = json.loads((v2 / "compare.json").read_text())
    (v1 / "compare.json").write_text(json.dumps({**stale, "challenger_weights": first["version"].rpartition("+")[2]}))
    with pytest.raises(PromoteRefused, match="not with the current model"):
        promote(v1, registry, version="1c")  # compared with v1 (its own weights), not with v2
    (v1 / "compare.json").write_text(json.dumps(stale))
    with pytest.raises(PromoteRefused, match="other weights than the run's"):
        promote(v1, registry, version="1c")  # v2's comparison copied into v1
    assert current_model(registry).resolve().parent.name == second["version"]
    served = current_model(registry)
    assert served.resolve().parent.name == second["version"] and (served.parent / "model_card.md").exists()

    from serving.checker import ImageChecker

    checker = ImageChecker(str(served))
    out = checker.check((root / "test" / "tiger_skin").glob("*.jpg").__next__().read_bytes())
    assert out["model"]["version"] == second["version"] and "tiger_skin" in out["scores"]


def test_failed_gate_blocks_promotion_unless_forced(lost_class_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lost_class_runs[0], run)  # the three-class champion
    (run / "compare.json").write_text(json.dumps({"gate": "fail", "failures": ["ivory recall dropped by 9.0 points"]}))
    with pytest.raises(PromoteRefused, match="ivory recall dropped"):
        promote(run, tmp_path / "reg")
    assert promote(run, tmp_path / "reg", force=True)["previous"] is None


def test_ingest_skips_near_duplicates_and_keeps_test_frozen(tmp_path):
    from PIL import Image

    from training.data.synth import make_image

    root = tmp_path / "data"
    (root / "train" / "ivory").mkdir(parents=True)
    make_image("ivory", 1, 200).save(root / "train" / "ivory" / "a.jpg", quality=95)
    src = tmp_path / "in"
    src.mkdir()
    Image.open(root / "train" / "ivory" / "a.jpg").resize((150, 150)).save(src / "a_small.jpg", quality=60)
    make_image("other", 2, 200).save(src / "b.jpg")
    _write_csv(tmp_path / "l.csv", [{"path": str(src / "a_small.jpg"), "label": "ivory"},
                                    {"path": str(src / "b.jpg"), "label": "other"}])
    report = ingest(tmp_path / "l.csv", root)
    assert [d["path"] for d in report["near_duplicates"]] == [str(src / "a_small.jpg")]
    assert len(report["added"]) == 1 and report["new_labels"] == ["other"]
    assert not (root / "test").exists()
    with pytest.raises(ValueError, match="split"):
        ingest(tmp_path / "l.csv", root, split="holdout")


def test_ingest_near_copies_within_one_csv_and_the_distance_setting(tmp_path):
    """A near-copy of a row added earlier in the same CSV is skipped too (the index grows as rows are staged,
    past its first allocation); a ``near_distance`` below the copy's distance lets it in."""
    from PIL import Image

    from training.data.neardup import image_hash
    from training.data.synth import make_image

    src = tmp_path / "in"
    src.mkdir()
    rows = []
    for i in range(20):  # 20 distinct pictures, then a re-compressed, resized copy of the 20th
        make_image("ivory", 100 + i, 200).save(src / f"{i}.jpg", quality=95)
        rows.append({"path": str(src / f"{i}.jpg"), "label": "ivory"})
    Image.open(src / "19.jpg").crop((1, 1, 199, 199)).save(src / "copy.jpg", quality=90)
    distance = bin(int(image_hash(Image.open(src / "19.jpg")), 16) ^ int(image_hash(Image.open(src / "copy.jpg")), 16)).count("1")
    assert 0 < distance <= 4
    rows.append({"path": str(src / "copy.jpg"), "label": "ivory"})
    _write_csv(tmp_path / "l.csv", rows)
    report = ingest(tmp_path / "l.csv", tmp_path / "data")
    assert len(report["added"]) == 20
    assert report["near_duplicates"] == [{"line": 22, "path": str(src / "copy.jpg"), "same_as": report["added"][19]["to"]}]
    strict = ingest(tmp_path / "l.csv", tmp_path / "strict", near_distance=distance - 1)
    assert len(strict["added"]) == 21 and not strict["near_duplicates"]


@pytest.fixture(scope="module")
def lost_class_runs(tmp_path_factory):
    """A champion of three classes and a challenger retrained on data that lost pangolin_scales. Its own data:
    the module's three_class_root gains a manifest from the ingest test, and a copy of it without the
    pangolin_scales folders then names images that are gone (a clear DataError, not the case tested here)."""
    from training.data.synth import synthesize

    base = tmp_path_factory.mktemp("lost")
    three_class, two_class = base / "three", base / "two"
    synthesize(three_class, per_class=16, size=128, seed=3, classes=("ivory", "pangolin_scales", "other"),
               splits={"train": 1.0, "val": 0.5, "test": 0.75})
    shutil.copytree(three_class, two_class)
    for split in ("train", "val", "test"):
        shutil.rmtree(two_class / split / "pangolin_scales")
    champion, challenger = base / "champion", base / "challenger"
    train([str(three_class)], champion, tiny_config(epochs=1))
    train([str(two_class)], challenger, tiny_config(epochs=1))
    return champion, challenger, three_class


def test_a_challenger_that_lost_a_class_fails_the_gate(lost_class_runs, tmp_path):
    """Before: the champion's pangolin_scales images were left out and the gate skipped the class, so a retrain
    that no longer knew a protected class could pass and be promoted without --force."""
    champion, challenger, root = lost_class_runs
    result = compare(champion, challenger, [str(root)], split="test", report=tmp_path / "c.md")
    assert result["gate"] == "fail"
    assert any(f.startswith("pangolin_scales: the challenger does not know this class") for f in result["failures"])
    with pytest.raises(PromoteRefused, match="pangolin_scales"):
        promote(challenger, tmp_path / "reg")


def test_compare_refuses_a_nan_recall_drop_and_data_no_model_shares(lost_class_runs, tmp_path):
    """Before: --max-recall-drop nan turned the recall gate off; data whose labels only the challenger knows
    ended in compute_metrics' ValueError traceback."""
    from training.compare import CompareError

    champion, challenger, root = lost_class_runs
    with pytest.raises(CompareError, match="max-recall-drop"):
        compare(champion, challenger, [str(root)], split="test", max_recall_drop=float("nan"))
    only_new = tmp_path / "only_pangolin"
    shutil.copytree(root / "test" / "pangolin_scales", only_new / "test" / "pangolin_scales")
    with pytest.raises(CompareError, match="a label both models know"):
        compare(challenger, champion, [str(only_new)], split="test", report=tmp_path / "c.md")


def test_promote_writes_only_inside_the_registry(lost_class_runs, tmp_path):
    """Before: --version '../../escaped' wrote the model two folders above the registry (and pointed current
    there), an absolute --name put it anywhere, a registry whose `current` was a copied folder failed with
    IsADirectoryError after the version folder was written, and a truncated compare.json was a traceback."""
    from serving.errors import InvalidInput

    champion = lost_class_runs[0]
    registry = tmp_path / "a" / "b" / "reg"
    for kwargs in ({"version": "../../escaped"}, {"name": str(tmp_path / "abs")}, {"version": "current"}):
        with pytest.raises(InvalidInput, match="cannot name a folder of the registry"):
            promote(champion, registry, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written anywhere
    first = promote(champion, registry)
    copy = tmp_path / "copy"
    shutil.copytree(registry, copy, symlinks=False)  # `current` is now a real folder
    with pytest.raises(InvalidInput, match="is a folder, not the link"):
        promote(champion, copy, force=True)
    assert sorted(p.name for p in (copy / first["name"]).iterdir()) == sorted(
        p.name for p in (registry / first["name"]).iterdir())
    run = tmp_path / "run"
    shutil.copytree(champion, run)
    (run / "compare.json").write_text('{"gate": "pa')
    with pytest.raises(InvalidInput, match="not readable JSON"):
        promote(run, registry)
