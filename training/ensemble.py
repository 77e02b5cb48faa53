"""Several trainings of one recipe as one model: ``wildcheck ensemble RUN1 RUN2 ... --out RUN``.

Runs that differ only in their seed make partly different mistakes, and the mean of their logits
(``training.models.Ensemble``) cancels the part that differs: at the same flag budget on the validation
negatives it finds more ivory, as is and under listing conditions. Mistakes the runs share stay -- photos of a
kind none of them trained on (prints, jewellery) are flagged as often or more (benchmarks/README.md, "Averaged
seeds"). The result is a run dir with a ``best.pt`` like any other, calibrated (and so validated) afresh, so it
exports to one self-contained ONNX file whose outputs (logits, heat maps, embedding) keep their meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.contract import SizeRoute
from serving.errors import InvalidInput
from training.checkpoint import Checkpoint, Head, initial_spec, weights_hash
from training.models import Ensemble, check_size_route, create_model, ensemble_name, parse_name
from training.outputs import new_run_folder


# what build and its calibration write into --out
ENSEMBLE_FILES = ("best.pt", "labels.json", "calibration.json", "reliability.png")


class EnsembleError(InvalidInput):
    """The runs cannot be averaged: different labels, preprocessing, architecture or tiling."""


def build(runs: list[str | Path], out: str | Path, say=print, test_time_views: list[str] | None = None,
          size_route: int | None = None, data: list[str] | None = None) -> Path:
    """Average the runs' best checkpoints into ``out``/best.pt (uncalibrated: the caller calibrates).
    ``test_time_views``: the ensemble's (``decision.test_time_views``); ``size_route``: the size blurred or noisy
    inputs are read at (``decision.size_route``, its documented thresholds; 0: none); None: the first run's config's."""
    from training.fileio import atomic_write_text
    from training.predict import resolve_checkpoint

    out = Path(out)
    paths = [resolve_checkpoint(r) for r in runs]
    if len(paths) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    clobbered = [str(p.parent) for p in paths if p.parent.resolve() == out.resolve()]
    if clobbered:
        raise EnsembleError(f"--out {out} is one of the runs ({clobbered[0]}): name a new folder for the ensemble")
    checkpoints = [Checkpoint.load(p) for p in paths]
    first = checkpoints[0]
    # an earlier ensemble's folder is replaced, another run's never; the data it reads stays data
    new_run_folder(out, ENSEMBLE_FILES, reads=[*(data or ()), *(r for ck in checkpoints for r in ck.data_roots)])
    nested = [str(p) for p, ck in zip(paths, checkpoints) if parse_name(ck.spec.architecture)]
    if nested:
        raise EnsembleError(f"{', '.join(nested)}: an ensemble already; list its runs instead")
    for path, ck in zip(paths[1:], checkpoints[1:]):
        for field in ("labels", "negative_label", "preprocessing", "architecture", "tiling"):
            if getattr(ck.spec, field) != getattr(first.spec, field):
                raise EnsembleError(f"{path} differs from {paths[0]} in {field}: "
                                    f"{getattr(ck.spec, field)!r} vs {getattr(first.spec, field)!r}; "
                                    "only runs of one recipe (different seeds) can be averaged")
    # the ensemble is calibrated on the first run's validation photos and its contract names the first run's
    # training data: a member trained on other photos (a grown dataset) may have trained on those validation photos
    for path, ck in zip(paths[1:], checkpoints[1:]):
        theirs, ours = ck.spec.training_data.get("sha256"), first.spec.training_data.get("sha256")
        if theirs and ours and theirs != ours:
            raise EnsembleError(f"{path} was trained on other images than {paths[0]} (training_data sha256 "
                                f"{theirs[:12]} vs {ours[:12]}): the ensemble is validated on the first run's "
                                "validation photos, which another run may have trained on; train every run on one "
                                "dataset (different seeds)")
    routes = {(ck.spec.grey_route.tolerance if ck.spec.grey_route else None) for ck in checkpoints}
    if len(routes) > 1:
        raise EnsembleError(f"the runs' grey routes differ (tolerances {sorted(routes, key=str)}; None: no route): "
                            "give every run a grey head (wildcheck grey-head RUN --out DIR) with one tolerance, or none")
    hashes = [weights_hash(ck.weights) for ck in checkpoints]
    if len(set(hashes)) < len(hashes):
        raise EnsembleError("the same weights are listed twice")
    labels = first.spec.labels
    members = []
    for ck in checkpoints:
        member = create_model(ck.spec.architecture, len(labels), pretrained="none")
        member.load_state_dict(ck.weights)
        members.append(member)
    model = Ensemble(members).eval()
    config = first.config.model_copy(deep=True)
    config.model.name = ensemble_name(len(members), first.spec.architecture)
    if test_time_views is not None:
        config.decision.test_time_views = list(test_time_views)
    if size_route is not None:
        config.decision.size_route = SizeRoute(size=size_route) if size_route else None
    check_size_route(config.decision.size_route, first.spec.preprocessing)
    training_data = {**first.spec.training_data,
                     "ensemble": [{"run": p.parent.name, "seed": ck.config.train.seed, "epoch": ck.epoch,
                                   "val_balanced_accuracy": ck.val_metrics.get("balanced_accuracy")}
                                  for p, ck in zip(paths, checkpoints)]}
    spec = initial_spec(config, labels, first.spec.preprocessing, training_data)
    if first.spec.grey_route is not None:
        route = first.spec.grey_route.model_copy(update={"fitted": {"members": [ck.spec.grey_route.fitted for ck in checkpoints]}})
        spec = spec.model_copy(update={"grey_route": route})
    ensemble = Checkpoint(spec=spec, weights=model.state_dict(), epoch=max(ck.epoch for ck in checkpoints),
                          val_metrics={}, config=config, data_roots=first.data_roots, ema=first.ema,
                          grey_head=joined_grey_head([ck.grey_head for ck in checkpoints]))
    out.mkdir(parents=True, exist_ok=True)
    ensemble.save(out / "best.pt")
    atomic_write_text(out / "labels.json", json.dumps(labels))
    reads = f", and over the views {', '.join(spec.test_time_views)}" if spec.test_time_views else ""
    if spec.size_route is not None:
        reads += f"; blurred or noisy photos read at {spec.size_route.size} px"
    say(f"wrote {out / 'best.pt'}: {len(members)} x {first.spec.architecture}, logits averaged{reads}")
    return out / "best.pt"


def joined_grey_head(heads: list[Head | None]) -> Head | None:
    """The members' grey heads side by side, each divided by m, and their mean bias: read by the ensemble's
    pooled features (the members', side by side), it gives the mean of the members' grey logits -- as
    ``Ensemble.sync_head`` does for the trained heads. None when the members have no grey route."""
    import torch

    if heads[0] is None:
        return None
    return Head(weight=torch.cat([h.weight for h in heads], dim=1) / len(heads),
                bias=torch.stack([h.bias for h in heads]).mean(0))


def make_ensemble(runs: list[str | Path], out: str | Path, data: list[str] | None = None, say=print,
                  test_time_views: list[str] | None = None, size_route: int | None = None) -> dict:
    """``wildcheck ensemble``: build, then calibrate, whose one pass over the validation images also records the
    ensemble's validation metrics (the thresholds are its own, solved on the same validation images and budgets
    as its members'). Returns the calibration report."""
    from training.calibrate import calibrate_new_run

    path = build(runs, out, say, test_time_views, size_route, data)
    report = calibrate_new_run(path.parent, data)
    metrics = Checkpoint.load(path).val_metrics
    say(f"validation: balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n']} images")
    return report
