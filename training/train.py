"""Fine-tune a timm model on labelled listing photos: ``train()`` orchestrates the parts in ``training.loop``.

The shape is timm's train.py (``train_one_epoch``, ``validate``, a checkpoint saver, a history row per epoch)
kept as plain as nanoGPT's: ``model`` is what trains (DDP/compile-wrapped when asked), ``module`` the
unwrapped network that the EMA, checkpoints and validation use. RunDir documents the files a run writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

import training
from serving.preprocess import Preprocessing
from training import distributed
from serving.contract import ModelSpec
from training.checkpoint import Checkpoint, initial_spec, published_metrics
from training.config import Config, ConfigConflict, SavedRun, check_batch_size, check_resume, check_schedule
from training.data.sources import fingerprint, label_counts
from training.loop.data import DataError, TrainData, resolve_preprocessing
from training.loop.model import build_model, warm_start_source
from training.loop.optim import Optimization, autocast_setting, build_optimization, peak_lr
from training.loop.rng import rng_state, seed_everything, set_rng_state
from training.loop.rundir import RunDir, TrainState
from training.loop.steps import EpochStats, prime_miner, train_one_epoch, validate
from training.outputs import out_folder

__all__ = ["train", "resolve_preprocessing", "autocast_setting"]


# --- what best.pt and last.pt hold: built here and only here -----------------------------------------------

def checkpoint_meta(config: Config, data: TrainData, pre: Preprocessing, roots: list[str],
                    init_from: str | Path | None, world: int = 1) -> dict:
    """What every checkpoint carries besides weights (the fingerprint reads every file: once, not per epoch).
    ``world``: the run's number of processes, which sets its effective batch, steps per epoch and (with
    ``train.lr_scaling``) its lr: a resume must have the same (``check_same_world``)."""
    return {
        "world": world,
        "labels": data.labels, "preprocessing": pre.model_dump(mode="json"), "config": config.model_dump(mode="json"),
        "architecture": config.model.name, "wildcheck_version": training.__version__,
        "training_data": fingerprint(data.train_samples + data.val_samples),
        "data_roots": [str(Path(r).resolve()) for r in roots],
        "init_from": str(init_from) if init_from else None,
        "tiling": config.decision.tiling.model_dump() if config.decision.tiling else None,
    }


def check_same_world(resumed: dict, world: int, config: Config, last: Path) -> None:
    """A resumed run has the saved run's number of processes: the effective batch (processes x train.batch_size),
    the steps per epoch that the schedule, EMA and sampler count, and the lr that train.lr_scaling scales by the
    process count all follow it, as they follow the batch size (which ``check_resume`` holds). A last.pt from
    before the count was recorded is taken as it is."""
    saved = resumed.get("world")
    if saved is None or saved == world:
        return
    batch = config.train.batch_size
    how = "without torchrun" if saved == 1 else f"torchrun --nproc_per_node={saved}, or as many over several nodes"
    raise ConfigConflict(
        f"--resume: {last} was saved by a run of {saved} process(es) (effective batch {saved} x {batch} = "
        f"{saved * batch}), and this one has {world} ({world * batch}): the schedule, EMA and sampler count that "
        f"run's steps, and train.lr_scaling ({config.train.lr_scaling}) scales its lr by the process count. Resume "
        f"with {saved} process(es) ({how}), or start a new run from its weights: --init-from {last.parent} "
        "--out NEW_DIR")


def check_same_data(resumed: dict, meta: dict, last: Path, say=print, samples: list | None = None) -> None:
    """A resumed run goes on with the data it was trained on: its sampler and miner state index those images, and
    last.pt would record the new data alone as the run's (``--data`` pointing elsewhere was silently taken). The
    same files moved to another path (the fingerprint hashes names, sizes, contents, labels and splits) are that
    data. A last.pt whose fingerprint has no ``method`` was written before contents were hashed: ``samples`` (the
    run's images now) are hashed its way, by names and sizes, to compare."""
    before, now = resumed.get("training_data") or {}, meta["training_data"]
    if before.get("sha256") is not None and before.get("method") != now.get("method") and samples is not None:
        now = fingerprint(samples, content=False)
    if before.get("sha256") not in (None, now["sha256"]):
        same_counts = before.get("counts") == now["counts"]
        differs = (" (the same counts of images per label, but files renamed, replaced or edited)" if same_counts
                   else "")
        raise DataError(
            f"--resume: {last} was trained on other data ({before.get('counts')} under {resumed.get('data_roots')}) "
            f"than --data and the negatives give now ({now['counts']} under {meta['data_roots']}){differs}. Resume "
            f"with the run's own data as it was, or fine-tune on this data in a new run: --init-from {last.parent} "
            "--out NEW_DIR")
    if resumed.get("data_roots") not in (None, meta["data_roots"]):
        say(f"the run's data moved from {resumed['data_roots']} to {meta['data_roots']} (the same files): continuing")


def best_payload(meta: dict, spec: ModelSpec, config: Config, eval_module: torch.nn.Module, epoch: int, ema: bool,
                 metrics: dict) -> dict:
    """best.pt: a ``training.checkpoint.Checkpoint`` (the run's spec beside the weights) as plain containers."""
    return Checkpoint(spec.model_copy(update={"metrics": published_metrics(metrics)}), eval_module.state_dict(), epoch,
                      metrics, config, meta["data_roots"], meta["init_from"], ema).to_dict()


def last_payload(meta: dict, module: torch.nn.Module, opt: Optimization, state: TrainState, data: TrainData) -> dict:
    return {**meta, "model": module.state_dict(), **opt.state_dict(), **state.state_dict(), **data.state_dict(),
            "rng": rng_state()}


def run_summary(run: RunDir, data: TrainData, wall_seconds: float, epochs_run: int, paused: bool) -> dict:
    best = Checkpoint.load(run.path / "best.pt")
    return {
        "run_dir": str(run.path), "labels": data.labels, "best_epoch": best.epoch, "val_metrics": best.val_metrics,
        "wall_seconds": round(wall_seconds, 1), "train_counts": label_counts(data.train_samples),
        "skipped": len(data.skipped), "epochs_run": epochs_run, "paused": paused,
        "data_overlap": data.overlap,  # exact copies across splits, pictures under two labels (said at the start)
    }


# --- what is said and recorded per epoch ---------------------------------------------------------------------

def history_row(epoch: int, stats: EpochStats, metrics: dict, opt: Optimization, improved: bool, data: TrainData) -> dict:
    return {
        "epoch": epoch, "train_loss": round(stats.loss, 5), "val_loss": round(metrics["nll"], 5),
        "val_accuracy": round(metrics["accuracy"], 5), "val_balanced_accuracy": round(metrics["balanced_accuracy"], 5),
        "val_macro_f1": round(metrics["macro_f1"], 5), "lr": f"{peak_lr(opt.optimizer):.3e}",
        "epoch_seconds": round(time.time() - stats.started, 1),
        "train_images_per_s": round(stats.seen / stats.train_seconds, 1),
        "data_wait_share": round(stats.wait_seconds / stats.train_seconds, 4),
        "best": int(improved), "mined_negatives": data.miner.last_mined,
        "mined_per_pool": ";".join(map(str, data.miner.last_mined_per_pool)),
        "train_consistency": "" if stats.consistency is None else round(stats.consistency, 5),
    }


def epoch_line(row: dict, epochs: int, data: TrainData) -> str:
    n_negatives, miner = data.sampler.n_negatives, data.miner
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}  val acc {row['val_accuracy']:.4f}  "
        f"bal acc {row['val_balanced_accuracy']:.4f}  macro-F1 {row['val_macro_f1']:.4f}  "
        f"{row['train_images_per_s']} img/s  data wait {row['data_wait_share']:.1%}  {row['epoch_seconds']}s"
        + (f"  mined negatives {miner.last_mined}/{n_negatives} (per pool {miner.last_mined_per_pool})"
           if n_negatives else "")
        + (f"  view disagreement {row['train_consistency']:.4f}" if row["train_consistency"] != "" else "")
        + ("  *best*" if row["best"] else "")
    )


def run_lines(config: Config, data: TrainData, opt: Optimization, steps: int, world: int, device, frozen) -> list[str]:
    tc = config.train
    counts = dict(zip(data.labels, data.counts.astype(int).tolist()))
    return [
        f"{world} process(es) x batch {tc.batch_size} = effective batch {world * tc.batch_size}; "
        f"lr {tc.lr:g} x {opt.lr / tc.lr:g} ({tc.lr_scaling} scaling) = {opt.lr:g}",
        f"training {config.model.name} on {data.n_main} images ({counts} incl. "
        f"a pool of {data.n_pool} negatives, {data.sampler.n_negatives} drawn per epoch), "
        f"validating on {len(data.val)}; {steps} steps/epoch x {tc.epochs} epochs on {device}, "
        f"batch {tc.batch_size}, {opt.describe()}"
        + (f", frozen {config.model.freeze}" if frozen else "")
        + (f", layer lr decay {tc.layer_decay}" if tc.layer_decay else "")
        + (f", mixup/cutmix on {opt.mixer.prob:.0%} of batches" if opt.mixer else "")
        + (f", consistency x{tc.consistency.weight:g} over {len(tc.consistency.views)} condition views on unmixed batches"
           if tc.consistency.weight else ""),
    ]


def train(roots: list[str], out_dir: str | Path, config: Config, resume: bool = False,
          stop_after: int | None = None, init_from: str | Path | None = None,
          on_batch: Callable[[int, torch.Tensor], None] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train, validate each epoch, keep the best checkpoint. Returns the summary written to summary.json
    (``{}`` on ranks other than 0).

    ``stop_after``: leave after this many epochs in this call (a resumable pause, e.g. for a time slot); the
    summary's ``paused`` and ``epochs_run`` tell a pause from the end.
    ``on_batch(epoch, indices)``, ``on_epoch_end(epoch, history_row)``: called on every rank (tests, monitors).
    """
    tc = config.train
    check_batch_size(config)
    check_schedule(config)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    info, device = distributed.init(tc.device)
    distributed.quiet_other_ranks(info)  # warnings once, from rank 0
    out_folder(out_dir, reads=[*roots, *config.data.negatives], what="run directory")  # never among the data
    if init_from is not None and not resume:  # before run.prepare and any caching: a wrong --init-from is found first
        warm_start_source(init_from, out_dir)
    say = distributed.printer(info)  # only rank 0 talks and writes
    run = RunDir(out_dir, info, say)
    run.prepare()
    seed_everything(tc.seed)
    pre = resolve_preprocessing(config)
    resumed = run.resume_state() if resume else None
    if resumed is not None:  # last.pt's config is the run's: refuse what differs before any caching
        check_resume(SavedRun.of_checkpoint(resumed, run.path / "last.pt"), config, run.path)
        check_same_world(resumed, info.world, config, run.path / "last.pt")
    built = []

    def build(labels: list[str]) -> None:  # before the images are cached: a wrong model or weights are found first
        built.append(build_model(config, labels, device, resuming=resumed is not None, init_from=init_from, say=say))

    data = TrainData.build(roots, config, pre, labels=resumed["labels"] if resumed else None, say=say,
                           quiet=not info.main, before_caching=build)
    (module, frozen), = built
    meta = checkpoint_meta(config, data, pre, roots, init_from, info.world)
    if resumed is not None:
        check_same_data(resumed, meta, run.path / "last.pt", say, data.train_samples + data.val_samples)
    run.write_setup(config, data.labels, data.skipped, fresh=resumed is None)
    data.build_sampler(config)
    loader = data.loader(info, tc.batch_size, config.data.num_workers, device)
    opt = build_optimization(module, tc, len(loader), info.world, device, len(data.labels),
                             data.class_weight(device) if config.data.balance == "loss" else None)
    state = TrainState()
    if resumed is not None:
        module.load_state_dict(resumed["model"])
        for part in (opt, state, data):
            part.load_state_dict(resumed)
        set_rng_state(resumed["rng"])
        say(f"resuming from epoch {state.epoch} (best macro-F1 {state.best_f1:.4f} at epoch {state.best_epoch})"
            + ("; the run had already finished" if state.epoch >= tc.epochs else ""))
    run.truncate_history(state.epoch)
    model = distributed.wrap_model(module, info, device, tc.compile)
    for line in run_lines(config, data, opt, len(loader), info.world, device, frozen):
        say(line)
    if init_from is not None and resumed is None and data.n_pool and data.miner.max_weight > 1:
        prime_miner(module, data.pool_for_scoring(), data.n_main, data.miner, tc.batch_size * 2, device,
                    channels_last=tc.channels_last, info=info)
        say(f"scored the {data.n_pool} pool negatives with the starting weights: epoch 1 draws hard ones too")
    t_start, start = time.time(), state.epoch
    paused = False
    spec = initial_spec(config, data.labels, pre, meta["training_data"])
    for epoch in range(start, tc.epochs):
        data.set_epoch(tc.seed, epoch)
        stats = train_one_epoch(
            model, module, loader, opt, state, device, channels_last=tc.channels_last, frozen=frozen, miner=data.miner,
            info=info, desc=f"epoch {epoch + 1}/{tc.epochs}", on_batch=on_batch and (lambda idx: on_batch(epoch + 1, idx)))
        metrics = validate(opt.eval_module(module), data.val, data.labels, tc.batch_size * 2, device,
                           channels_last=tc.channels_last, info=info)
        improved = state.update(epoch + 1, metrics["macro_f1"])
        row = history_row(epoch + 1, stats, metrics, opt, improved, data)
        if improved:
            run.save_best(best_payload(meta, spec, config, opt.eval_module(module), epoch + 1, opt.ema is not None, metrics))
        run.save_last(row, last_payload(meta, module, opt, state, data))
        say(epoch_line(row, tc.epochs, data))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
        if stop_after is not None and epoch + 1 - start >= stop_after and epoch + 1 < tc.epochs:
            say(f"pausing after epoch {epoch + 1}; continue with --resume")
            paused = True
            break
        if state.should_stop(tc.early_stopping_patience):
            say(f"early stopping: no macro-F1 gain for {state.bad_epochs} epochs")
            break
    summary = run_summary(run, data, time.time() - t_start, state.epoch, paused) if info.main else {}
    if info.main:
        run.finish(summary)
    distributed.shutdown()
    return summary


def after_training(run_dir: str | Path, config: Config, say=print) -> dict | None:
    """What follows a finished training, for ``wildcheck train`` and the benchmark recipe alike: the grey head
    (``model.grey_head``, fitted on the run's own photos into its best.pt), then calibration
    (``decision.calibrate``). Returns the calibration report, or None."""
    if config.model.grey_head is not None:
        from training.grey_head import fit_grey_head

        fit_grey_head(run_dir, run_dir, config.model.grey_head, say=say, in_place=True)
    if not config.decision.calibrate:
        return None
    from training.calibrate import calibrate

    return calibrate(run_dir)

