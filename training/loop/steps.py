"""One training epoch and one validation pass, in the shape of timm's ``train_one_epoch`` / ``validate``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training import distributed
from training.data.sampling import HardNegativeMiner
from training.distributed import DistInfo
from training.loop.optim import Optimization, peak_lr
from training.loop.rundir import TrainState
from training.metrics import compute_metrics


@dataclass
class EpochStats:
    loss_sum: float  # summed over items (and ranks)
    seen: int
    started: float  # time.time() at the epoch's start
    train_seconds: float
    wait_seconds: float  # of which waiting for data
    consistency_sum: float = 0.0  # the paired views' term, summed over the items that had one
    paired: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def consistency(self) -> float | None:
        return self.consistency_sum / self.paired if self.paired else None


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def view_disagreement(logits: torch.Tensor, view_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per batch item, p the picture's prediction (detached: the view learns from it, not the
    reverse), q its condition view's: how much the answer changes when the photo is greyscale, blurred..."""
    p = torch.softmax(logits.detach().float(), dim=1)
    return F.kl_div(F.log_softmax(view_logits.float(), dim=1), p, reduction="batchmean")


def train_one_epoch(model: torch.nn.Module, module: torch.nn.Module, loader, opt: Optimization, state: TrainState,
                    device: torch.device, *, channels_last: bool = False, frozen: list[torch.nn.Module] = (),
                    miner: HardNegativeMiner | None = None, info: DistInfo = DistInfo(), desc: str = "train",
                    on_batch: Callable[[torch.Tensor], None] | None = None) -> EpochStats:
    """One pass over ``loader``: ``model`` (perhaps DDP-wrapped) is trained, ``module`` (the unwrapped one)
    feeds the EMA. Unmixed batches score the pool's negatives for ``miner``; losses and mining are merged
    over ranks at the end. ``on_batch(indices)`` sees each batch's dataset indices after its step.

    A loader of paired views (``train.consistency``) yields ``[pictures, views]``: an unmixed batch adds
    ``opt.consistency_weight`` x the views' disagreement to the loss (one forward pass over both); a mixed one
    has no single picture to agree with and trains on its pictures alone."""
    model.train()
    for m in frozen:  # frozen modules keep their pretrained batch-norm statistics
        m.eval()
    started, loss_sum, seen, wait, consistency_sum, paired = time.time(), 0.0, 0, 0.0, 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not info.main)
    ready = time.perf_counter()
    for x, y, idx in bar:
        wait += time.perf_counter() - ready
        x, views = x if isinstance(x, (list, tuple)) else (x, None)
        x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
        # mixed batches (timm Mixup/CutMix, smoothing included in its soft targets) say nothing about
        # single negatives, so only unmixed batches feed hard-negative mining
        x, target, mixed = opt.mixer(x, y) if opt.mixer is not None else (x, y, False)
        smoothing = 0.0 if mixed else opt.label_smoothing  # mixed targets carry their own smoothing
        paired_views = views is not None and not mixed and opt.consistency_weight > 0
        with opt.autocast(device):
            if paired_views:
                logits, view_logits = model(torch.cat([x, _to_device(views, device, channels_last)])).split(len(y))
            else:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), target, weight=opt.class_weight, label_smoothing=smoothing)
            if paired_views:
                disagreement = view_disagreement(logits, view_logits)
                loss = loss + opt.consistency_weight * disagreement
                consistency_sum += disagreement.item() * len(y)
                paired += len(y)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if opt.grad_clip:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        state.step += 1
        opt.scheduler.step_update(state.step)
        if opt.ema is not None:
            opt.ema.update(module, step=state.step)
        if miner is not None and miner.n_pool and not mixed:
            miner.update_from_batch(idx, logits)
        if on_batch is not None:
            on_batch(idx)
        loss_sum += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{peak_lr(opt.optimizer):.2e}")
        ready = time.perf_counter()
    train_seconds = time.time() - started
    loss_sum, seen, consistency_sum, paired = distributed.sum_scalars(info, loss_sum, seen, consistency_sum, paired)
    if miner is not None:
        miner.sync(info)
    return EpochStats(loss_sum, seen, started, train_seconds, wait, consistency_sum, paired)


@torch.no_grad()
def predict_dataset(module: torch.nn.Module, dataset, batch_size: int, device: torch.device, channels_last: bool,
                    desc: str = "val", progress: bool = True) -> np.ndarray:
    """Softmax probabilities for every item of ``dataset``, in order (an empty one: a (0, 0) array).
    ``progress``: show a bar (rank 0 only under torchrun)."""
    module.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, *_ in tqdm(loader, desc=desc, leave=False, unit="batch", disable=not progress):
        out.append(torch.softmax(module(_to_device(x, device, channels_last)).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def prime_miner(module: torch.nn.Module, pool, n_main: int, miner: HardNegativeMiner, batch_size: int,
                device: torch.device, *, channels_last: bool = False, info: DistInfo = DistInfo()) -> None:
    """Score the negatives pool (``pool``: its images as evaluation sees them) with the starting weights, so a warm
    start's first epoch draws hard negatives too: the miner otherwise learns only from the first epoch's batches
    and draws that epoch uniformly (a 3-epoch fine-tune mined in two epochs of three)."""
    shard = np.arange(info.rank, len(pool), info.world)
    probs = predict_dataset(module, torch.utils.data.Subset(pool, shard.tolist()), batch_size, device, channels_last,
                            desc="scoring negatives", progress=info.main)
    if len(shard):
        miner.update(shard + n_main, probs[:, miner.product_columns].max(1))
    miner.sync(info)


def validate(module: torch.nn.Module, dataset, labels: list[str], batch_size: int, device: torch.device, *,
             channels_last: bool = False, info: DistInfo = DistInfo()) -> dict:
    """Metrics of ``module`` on ``dataset`` (each rank predicts every N-th item; all ranks get all metrics). Under
    torchrun every rank first takes rank 0's buffers of ``module`` (``distributed.broadcast_buffers``): the metrics
    are those of the model rank 0 saves, and a resumed run records what an uninterrupted one does. A rank whose
    shard is empty (fewer images than ranks) predicts nothing."""
    distributed.broadcast_buffers(info, module)
    shard = np.arange(info.rank, len(dataset), info.world)
    probs = predict_dataset(module, torch.utils.data.Subset(dataset, shard.tolist()), batch_size, device, channels_last,
                            progress=info.main)
    probs = distributed.gather_predictions(info, shard, probs, len(dataset))
    return compute_metrics(np.asarray(dataset.targets), probs, labels)
