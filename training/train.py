"""Fine-tune a timm model on labelled listing photos: a plain loop in the style of nanoGPT.

RUN_DIR receives: ``config.yaml`` (resolved), ``labels.json``, ``last.pt`` (everything needed to
resume), ``best.pt`` (inference weights, EMA when used, picked by validation macro-F1),
``history.csv`` (one row per epoch), ``skipped.json`` (unreadable images) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

import training
from serving.preprocess import Preprocessing
from training import distributed
from training.augment import EvalTransform, TrainTransform, worker_init_fn
from training.config import Config, dump_config
from training.data.cache import CachedImageDataset, cache_images
from training.data.sampling import EpochSampler, negatives_count
from training.data.sources import Sample, fingerprint, label_counts, load_samples, pool_name, select_split
from training.fileio import atomic_torch_save, atomic_write_text, load_checkpoint, remove_stale_temporaries
from training.metrics import compute_metrics
from training.models import create_model, freeze_modules, pretrained_data_config, warm_start

log = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
    "lr", "epoch_seconds", "train_images_per_s", "data_wait_share", "best", "mined_negatives",
    "mined_per_pool",
]


def resolve_preprocessing(config: Config) -> Preprocessing:
    """The preprocessing this run trains with: config values, else what the pretrained weights expect."""
    pretrained = pretrained_data_config(config.model.name) if config.model.pretrained != "none" else {}
    return Preprocessing(
        input_size=config.data.img_size,
        crop_pct=config.data.crop_pct,
        interpolation=config.data.interpolation or pretrained.get("interpolation", "bicubic"),
        mean=config.data.mean or pretrained.get("mean", (0.485, 0.456, 0.406)),
        std=config.data.std or pretrained.get("std", (0.229, 0.224, 0.225)),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    random.setstate(_tuplify(state["python"]))


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def ema_decay_for(total_steps: int) -> float:
    """EMA horizon of about a tenth of the run (0.9998 averages over ~5,000 steps: far too slow for ~1,000)."""
    return float(min(0.9998, max(0.99, 1.0 - 10.0 / max(total_steps, 1))))


@dataclass
class Prepared:
    labels: list[str]
    train: CachedImageDataset  # main training images first, then the negatives pool
    val: CachedImageDataset
    n_main: int
    n_pool: int
    pool_groups: list[int]  # per pool image: which --negatives root it came from
    train_samples: list[Sample]
    val_samples: list[Sample]
    skipped: list


def _negative_samples(roots: list[str], negative_label: str, val_size: int, seed: int
                      ) -> tuple[list[Sample], list[int], list[Sample]]:
    """All images under the negatives roots, relabelled: (training pool, the pool index of each -- its root's
    position -- and a fixed validation sample drawn evenly from the roots)."""
    pool, groups, vals = [], [], []
    for g, root in enumerate(roots):
        found = [Sample(s.path, negative_label, s.split) for s in load_samples([root])]
        train = [s for s in found if s.split == "train"]
        pool += train
        groups += [g] * len(train)
        vals.append([s for s in found if s.split == "val"])
    val = _even_sample(vals, val_size, np.random.RandomState(seed))
    return pool, groups, val


def _even_sample(groups: list[list[Sample]], total: int, rng: np.random.RandomState) -> list[Sample]:
    """Up to ``total`` samples, an equal share from each group (a small group's unused share goes to the rest)."""
    order = sorted(range(len(groups)), key=lambda g: len(groups[g]))
    chosen: dict[int, list[Sample]] = {}
    left = total
    for k, g in enumerate(order):
        share = left // (len(order) - k)
        items = groups[g]
        if len(items) > share:
            keep = rng.choice(len(items), share, replace=False)
            items = [items[i] for i in sorted(keep)]
        chosen[g] = items
        left -= len(items)
    return [s for g in range(len(groups)) for s in chosen[g]]


def _check_negative_weights(config: Config, roots: list[str]) -> None:
    """Fail before training, not at calibration after it, when decision.negative_weights names no pool."""
    weights = config.decision.negative_weights or {}
    pools = sorted({pool_name(r) for r in list(roots) + list(config.data.negatives)})
    unknown = sorted(set(weights) - set(pools))
    if unknown:
        raise ValueError(f"decision.negative_weights names {unknown}, which is no data root or negatives pool; pools: {pools}")


def prepare_data(roots: list[str], config: Config, pre: Preprocessing, labels: list[str] | None = None) -> Prepared:
    samples = load_samples(roots)
    train_s, val_s = select_split(samples, "train"), select_split(samples, "val")
    if not train_s:
        raise ValueError(f"no training images in {roots}: expected ROOT/train/<label>/<image> or a manifest split=train")
    negative = config.data.negative_label
    _check_negative_weights(config, roots)
    pool_s, pool_groups, neg_val_s = _negative_samples(config.data.negatives, negative, config.data.val_negatives,
                                                       config.train.seed)
    val_s = val_s + neg_val_s
    if not val_s:
        raise ValueError(
            f"no validation images in {roots}: add ROOT/val/<label>/<image> (or split=val rows) so the best epoch can be chosen"
        )
    labels = labels or sorted({s.label for s in train_s} | ({negative} if pool_s else set()))
    if len(labels) < 2:
        raise ValueError(f"training needs at least two labels, found {labels}")
    unknown_val = Counter(s.label for s in val_s if s.label not in labels)
    if unknown_val:
        log.warning("validation labels not in training data are left out of validation: %s", dict(unknown_val))
    val_s = [s for s in val_s if s.label in labels]
    index = {label: i for i, label in enumerate(labels)}
    workers, min_side = config.data.cache_workers, config.data.min_side
    main_px, main_kept, skipped_m = cache_images(train_s, pre, min_side, workers, desc="caching train")
    pool_px, pool_kept, skipped_p = cache_images(pool_s, pre, min_side, workers, desc="caching negatives")
    val_px, val_kept, skipped_v = cache_images(val_s, pre, min_side, workers, desc="caching val")
    group_of = {s.path: g for s, g in zip(pool_s, pool_groups)}
    train_kept = main_kept + pool_kept
    train_ds = CachedImageDataset(
        main_px + pool_px, [index[s.label] for s in train_kept], TrainTransform(config.augment.train, pre, config.train.seed)
    )
    train_ds.transform.set_bank(pool_px)  # scene-building steps add negatives' photos around an image
    val_ds = CachedImageDataset(val_px, [index[s.label] for s in val_kept], EvalTransform(pre))
    return Prepared(labels, train_ds, val_ds, len(main_kept), len(pool_kept), [group_of[s.path] for s in pool_kept],
                    train_kept, val_kept, skipped_m + skipped_p + skipped_v)


def autocast_setting(amp: bool, cpu_bf16: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """Mixed precision only where the hardware does it natively (emulated CPU bf16 is slower than fp32)."""
    if device.type == "cuda" and amp:
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True, torch.bfloat16
    return False, torch.float32


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset, batch_size: int, device: torch.device, channels_last: bool,
                    desc: str = "val") -> np.ndarray:
    """Softmax probabilities for every item of ``dataset``, in order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, *_ in tqdm(loader, desc=desc, leave=False, unit="batch"):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})


def _truncate_history(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs whose checkpoint was never written: a kill's leftover, or an earlier run's history."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= last_epoch]
    text = ",".join(HISTORY_FIELDS) + "\n" + "".join(",".join(str(r.get(k, "")) for k in HISTORY_FIELDS) + "\n" for r in rows)
    atomic_write_text(path, text)


def _peak_lr(optimizer) -> float:
    """The largest group lr (the head's under layer-wise decay): the number the schedule is stated in."""
    return max(group["lr"] for group in optimizer.param_groups)


def make_mixer(tc, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix, applied to every batch it is called on (``tc.mixup.prob`` picks the batches)."""
    mc = tc.mixup
    if mc.prob == 0:
        return None
    return Mixup(mixup_alpha=mc.mixup_alpha, cutmix_alpha=mc.cutmix_alpha, switch_prob=mc.switch_prob, prob=1.0,
                 label_smoothing=tc.label_smoothing, num_classes=num_classes)


def train(roots: list[str], out_dir: str | Path, config: Config, resume: bool = False,
          stop_after: int | None = None, init_from: str | Path | None = None) -> dict:
    """Train, validate each epoch, keep the best checkpoint. Returns the summary written to summary.json.

    ``stop_after``: leave after this many epochs in this call (a resumable pause, e.g. for a time slot).
    """
    out_dir = Path(out_dir)
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dinfo, device = distributed.init(tc.device)
    say = print if dinfo.main else (lambda *a, **k: None)  # only rank 0 talks and writes
    if dinfo.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(out_dir):
            print(f"removed {stale.name}, left by an interrupted write")
    distributed.barrier(dinfo)
    seed_everything(tc.seed)
    pre = resolve_preprocessing(config)

    state = None
    if resume:
        last = out_dir / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: {last} does not exist; start without --resume")
        state = load_checkpoint(last)
        if state["epoch"] >= tc.epochs:
            log.info("run already finished %d epochs", state["epoch"])

    data = prepare_data(roots, config, pre, labels=state["labels"] if state else None)
    labels = data.labels
    if dinfo.main:
        atomic_write_text(out_dir / "config.yaml", dump_config(config))
        atomic_write_text(out_dir / "labels.json", json.dumps(labels, indent=2))
        atomic_write_text(out_dir / "skipped.json", json.dumps([s.__dict__ for s in data.skipped], indent=2))
    if data.skipped:
        say(f"skipped {len(data.skipped)} unreadable image(s); see {out_dir / 'skipped.json'}")

    warm = state is None and init_from is not None
    model = create_model(
        config.model.name, len(labels), "none" if state is not None or warm else config.model.pretrained,
        config.model.drop_rate, config.model.drop_path_rate,
    )
    if warm:
        from training.evaluate import resolve_checkpoint

        prior = load_checkpoint(resolve_checkpoint(init_from))
        if prior["architecture"] != config.model.name:
            raise ValueError(f"--init-from {init_from} is a {prior['architecture']}, the config asks for {config.model.name}")
        moved = warm_start(model, prior, labels)
        say(f"warm start from {init_from}: head rows kept for {moved['kept']}, fresh for {moved['fresh']}"
            + (f", dropped {moved['dropped']}" if moved["dropped"] else ""))
    frozen = freeze_modules(model, config.model.freeze)
    model = model.to(device)
    channels_last = tc.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    core = model  # the unwrapped module: EMA, checkpoints and evaluation use it

    targets = np.asarray(data.train.targets)
    counts = np.bincount(targets, minlength=len(labels)).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"labels without readable training images: {[l for l, c in zip(labels, counts) if c == 0]}")
    sampler_gen = torch.Generator().manual_seed(tc.seed)
    n_negatives = negatives_count(config.data.negatives_per_epoch, data.n_main, data.n_pool)
    sampler = EpochSampler(data.train.targets[: data.n_main], data.n_pool, n_negatives,
                           balance=config.data.balance == "sampler", generator=sampler_gen,
                           hard_max_weight=config.data.hard_negative_max_weight, pool_groups=data.pool_groups)
    negative_index = labels.index(config.data.negative_label) if config.data.negative_label in labels else None
    product_columns = [i for i in range(len(labels)) if i != negative_index]
    class_weight = None
    if config.data.balance == "loss":
        class_weight = torch.tensor(counts.sum() / (len(labels) * counts), dtype=torch.float32, device=device)
    workers = config.data.num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    rank_sampler = distributed.ShardedSampler(sampler, dinfo) if dinfo.enabled else sampler
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=tc.batch_size, sampler=rank_sampler, num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None, drop_last=len(rank_sampler) > tc.batch_size,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * tc.epochs
    lr = tc.lr * {"none": 1.0, "linear": dinfo.world, "sqrt": dinfo.world ** 0.5}[tc.lr_scaling]
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=tc.weight_decay, layer_decay=tc.layer_decay)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=lr * tc.min_lr_ratio,
        warmup_t=int(tc.warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 0.01, warmup_prefix=True,
        t_in_epochs=False,
    )
    ema_decay = tc.ema_decay or ema_decay_for(total_steps)
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if tc.ema else None
    use_amp, amp_dtype = autocast_setting(tc.amp, tc.cpu_bf16, device)
    mixer = make_mixer(tc, len(labels))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, best_f1, best_epoch, bad_epochs, step = 0, -1.0, 0, 0, 0
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best_f1, best_epoch = state["epoch"], state["best_f1"], state["best_epoch"]
        bad_epochs, step = state["bad_epochs"], state["step"]
        sampler_gen.set_state(state["sampler_rng"])
        if state.get("hardness") is not None:
            sampler.hardness = state["hardness"].numpy().astype(np.float64)
        _set_rng_state(state["rng"])
        say(f"resuming from epoch {start_epoch} (best macro-F1 {best_f1:.4f} at epoch {best_epoch})")
    if dinfo.main:  # rows beyond the checkpoint (all of them on a fresh start) describe no saved epoch
        _truncate_history(out_dir / "history.csv", start_epoch)

    if dinfo.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)
    say(
        f"{dinfo.world} process(es) x batch {tc.batch_size} = effective batch {dinfo.world * tc.batch_size}; "
        f"lr {tc.lr:g} x {lr / tc.lr:g} ({tc.lr_scaling} scaling) = {lr:g}"
    )
    say(
        f"training {config.model.name} on {data.n_main} images ({dict(zip(labels, counts.astype(int).tolist()))} incl. "
        f"a pool of {data.n_pool} negatives, {n_negatives} drawn per epoch), "
        f"validating on {len(data.val)}; {steps_per_epoch} steps/epoch x {tc.epochs} epochs on {device}, "
        f"batch {tc.batch_size}, EMA decay {ema_decay if ema else 'off'}, "
        f"autocast {str(amp_dtype).removeprefix('torch.') if use_amp else 'off'}"
        + (f", frozen {config.model.freeze}" if frozen else "")
        + (f", layer lr decay {tc.layer_decay}" if tc.layer_decay else "")
        + (f", mixup/cutmix on {tc.mixup.prob:.0%} of batches" if mixer else "")
    )
    t_start = time.time()
    history_path = out_dir / "history.csv"
    val_targets = np.asarray(data.val.targets)
    # what every checkpoint carries besides weights (the fingerprint stats every file: once, not per epoch)
    meta = {
        "labels": labels, "preprocessing": pre.model_dump(mode="json"), "config": config.model_dump(mode="json"),
        "architecture": config.model.name, "wildcheck_version": training.__version__,
        "training_data": fingerprint(data.train_samples + data.val_samples),
        "data_roots": [str(Path(r).resolve()) for r in roots],
        "init_from": str(init_from) if init_from else None,
        "tiling": config.decision.tiling.model_dump() if config.decision.tiling else None,
    }
    for epoch in range(start_epoch, tc.epochs):
        # the augmentation stream is a function of (seed, epoch), so a resumed epoch sees what it would have seen
        data.train.transform.set_seed(tc.seed * 10_007 + epoch)
        model.train()
        for module in frozen:
            module.eval()
        t0 = time.time()
        running, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", leave=False, disable=not dinfo.main)
        wait_seconds, ready, seen_items = 0.0, time.perf_counter(), []
        for x, y, idx in bar:
            wait_seconds += time.perf_counter() - ready
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # mixed batches (timm Mixup/CutMix, smoothing included in its soft targets) say nothing about
            # single negatives, so only unmixed batches feed hard-negative mining
            mixed = mixer is not None and len(y) % 2 == 0 and random.random() < tc.mixup.prob
            target, smoothing = y, tc.label_smoothing
            if mixed:
                x, target = mixer(x, y)
                smoothing = 0.0
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), target, weight=class_weight, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(core, step=step)
            if data.n_pool and not mixed:
                with torch.no_grad():
                    product = torch.softmax(logits.detach().float(), 1)[:, product_columns].max(1).values
                sampler.update_hardness(idx.numpy(), product.cpu().numpy())
            seen_items.extend(idx.tolist())
            running += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{_peak_lr(optimizer):.2e}")
            ready = time.perf_counter()
        train_seconds = time.time() - t0
        if os.environ.get("WILDCHECK_DEBUG_SEEN"):  # which items this rank trained on (distributed tests)
            (out_dir / "seen").mkdir(exist_ok=True)
            np.save(out_dir / "seen" / f"rank{dinfo.rank}_epoch{epoch + 1}.npy", np.asarray(seen_items, dtype=np.int64))
        running, seen = distributed.sum_scalars(dinfo, running, seen)
        distributed.sync_hardness(dinfo, sampler)
        eval_model = ema.module if ema is not None else core
        shard = np.arange(dinfo.rank, len(data.val), dinfo.world)
        probs = predict_dataset(eval_model, torch.utils.data.Subset(data.val, shard.tolist()), tc.batch_size * 2,
                                device, channels_last)
        probs = distributed.gather_predictions(dinfo, shard, probs, len(data.val))
        metrics = compute_metrics(val_targets, probs, labels)
        improved = metrics["macro_f1"] > best_f1
        if improved:
            best_f1, best_epoch, bad_epochs = metrics["macro_f1"], epoch + 1, 0
        else:
            bad_epochs += 1
        row = {
            "epoch": epoch + 1, "train_loss": round(running / max(seen, 1), 5), "val_loss": round(metrics["nll"], 5),
            "val_accuracy": round(metrics["accuracy"], 5), "val_balanced_accuracy": round(metrics["balanced_accuracy"], 5),
            "val_macro_f1": round(metrics["macro_f1"], 5), "lr": f"{_peak_lr(optimizer):.3e}",
            "epoch_seconds": round(time.time() - t0, 1), "train_images_per_s": round(seen / train_seconds, 1),
            "data_wait_share": round(wait_seconds / train_seconds, 4),
            "best": int(improved), "mined_negatives": sampler.last_mined,
            "mined_per_pool": ";".join(map(str, sampler.last_mined_per_group)),
        }
        if improved and dinfo.main:
            atomic_torch_save(
                {**meta, "model": eval_model.state_dict(), "epoch": epoch + 1, "ema": ema is not None,
                 "val_metrics": metrics, "temperature": 1.0},
                out_dir / "best.pt",
            )
        if dinfo.main:
            _save_last(out_dir, history_path, row, {**meta, "model": core.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
             "step": step, "best_f1": best_f1, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
             "sampler_rng": sampler_gen.get_state(), "rng": _rng_state(),
             "hardness": torch.from_numpy(sampler.hardness)})
        distributed.barrier(dinfo)
        say(
            f"epoch {epoch + 1}/{tc.epochs}: loss {row['train_loss']:.4f}  val acc {row['val_accuracy']:.4f}  "
            f"bal acc {row['val_balanced_accuracy']:.4f}  macro-F1 {row['val_macro_f1']:.4f}  "
            f"{row['train_images_per_s']} img/s  data wait {row['data_wait_share']:.1%}  {row['epoch_seconds']}s"
            + (f"  mined negatives {sampler.last_mined}/{n_negatives} (per pool {sampler.last_mined_per_group})"
               if n_negatives else "")
            + ("  *best*" if improved else "")
        )
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < tc.epochs:
            say(f"pausing after epoch {epoch + 1}; continue with --resume")
            break
        if tc.early_stopping_patience and bad_epochs >= tc.early_stopping_patience:
            say(f"early stopping: no macro-F1 gain for {bad_epochs} epochs")
            break
    if not dinfo.main:
        distributed.shutdown()
        return {}
    if config.decision.calibrate:
        from training.calibrate import calibrate, format_report

        print(format_report(calibrate(out_dir)))
    best = load_checkpoint(out_dir / "best.pt")
    summary = {
        "run_dir": str(out_dir), "labels": labels, "best_epoch": best["epoch"], "val_metrics": best["val_metrics"],
        "wall_seconds": round(time.time() - t_start, 1), "train_counts": label_counts(data.train_samples),
        "skipped": len(data.skipped),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    _plot_history(history_path, out_dir / "history.png")
    distributed.shutdown()
    return summary


def _save_last(out_dir: Path, history_path: Path, row: dict, state: dict) -> None:
    """History row first, then the checkpoint: a kill between the two leaves a row for an unsaved epoch,
    which resume drops (``_truncate_history``); the other order would lose the row of a saved epoch."""
    _append_history(history_path, row)
    atomic_torch_save(state, out_dir / "last.pt")


def _plot_history(history: Path, out: Path) -> None:
    """Loss and validation curves, for people who would rather look than read history.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history.open(newline="") as fh:
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
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
