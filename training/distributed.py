"""torchrun / DDP support: process-group setup, per-rank sharding of the epoch order, gathering results.

``wildcheck train`` runs unchanged under ``torchrun --nproc_per_node=N`` (and multi-node ``--nnodes``
with ``--rdzv-*``): gloo on CPU, nccl on GPU. Every rank builds the same global epoch order from the
same seeded generator (so class balancing and the negatives draw are global) and takes every N-th item.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from serving.errors import InvalidInput


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device. A device torch does not know,
    or CUDA where there is none, is the user's ``train.device`` mistake (InvalidInput), found before any work."""
    try:
        asked = torch.device("cpu" if device_name == "auto" else device_name)
    except RuntimeError as exc:
        raise InvalidInput(f"train.device {device_name!r} is not a device torch knows; use auto, cpu, cuda or "
                           "cuda:N (--set train.device=auto)") from exc
    if asked.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"train.device {device_name!r}: torch sees no CUDA device here; use auto or cpu "
                           "(--set train.device=auto)")
    if asked.type == "meta":
        raise InvalidInput(f"train.device {device_name!r} holds no data and cannot train; use auto, cpu, cuda or "
                           "cuda:N (--set train.device=auto)")
    try:  # mps on Linux, cuda:7 on a 1-GPU machine, xpu without its runtime: found now, not after the data is read
        torch.empty(1, device=asked)
    except (RuntimeError, AssertionError) as exc:
        raise InvalidInput(f"train.device {device_name!r} is not usable here ({str(exc).splitlines()[0][:160]}); "
                           "use auto or cpu (--set train.device=auto)") from exc
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    info = DistInfo(rank=dist.get_rank() if world > 1 else 0, world=world, local_rank=local_rank)
    if want_cuda:
        torch.cuda.set_device(local_rank)
        return info, torch.device("cuda", local_rank)
    return info, asked


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class ShardedSampler(torch.utils.data.Sampler[int]):
    """This rank's share of ``inner``'s global order, padded by cycling that order so that every rank takes the
    same number of items, ``len(self)``, and at least ``min_per_rank`` of them.

    Equal lengths keep the ranks' collectives (DDP's gradient all-reduce each step, the epoch's sums) in step: a
    rank with fewer batches left the others waiting on it for ever. Padding used to append the order's head once,
    so with more than twice as many ranks as items the last ranks got none, whatever ``len`` said (5 ranks, 2
    images: a hang). ``min_per_rank`` (2 for training) keeps a rank from training on a batch of one image, which
    BatchNorm refuses at small sizes."""

    def __init__(self, inner, info: DistInfo, min_per_rank: int = 1):
        self.inner, self.info, self.min_per_rank = inner, info, min_per_rank

    def __len__(self) -> int:
        n = len(self.inner)
        return max(math.ceil(n / self.info.world), self.min_per_rank) if n else 0

    def __iter__(self):
        order = list(self.inner)
        if not order:
            return iter(())
        total = len(self) * self.info.world
        order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.info.rank :: self.info.world])


def gather_predictions(info: DistInfo, indices: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Each rank predicted ``indices``; every rank gets the full (n, C) array back."""
    if not info.enabled:
        return probs
    parts = [None] * info.world
    dist.all_gather_object(parts, (indices, probs))
    # a rank whose shard was empty (fewer items than ranks) predicted a (0, 0) array: the class count and dtype
    # come from the ranks that predicted something
    filled = [(idx, p) for idx, p in parts if len(idx)]
    if not filled:
        return np.zeros((n, probs.shape[1] if probs.ndim == 2 else 0), dtype=probs.dtype)
    width, dtype = filled[0][1].shape[1], filled[0][1].dtype
    out = np.zeros((n, width), dtype=dtype)
    for idx, p in filled:
        out[idx] = p
    return out


def broadcast_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (BatchNorm running statistics). Under DDP each rank's buffers
    drift with its own batches (DDP broadcasts them only at the start of each forward, and the EMA averages each
    rank's own), so a rank validating its shard with its own buffers scored another model than the best.pt and
    last.pt that rank 0 saves; a resumed run, whose ranks all start from rank 0's, then recorded other metrics."""
    if not info.enabled:
        return
    for buffer in module.buffers():
        if buffer.is_contiguous():
            dist.broadcast(buffer.data, src=0)
        else:
            dense = buffer.data.contiguous()
            dist.broadcast(dense, src=0)
            buffer.data.copy_(dense)


def sum_scalars(info: DistInfo, *values: float) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_arrays(info: DistInfo, *arrays: np.ndarray) -> list[np.ndarray]:
    """Element-wise sums of float arrays over all ranks (each rank passes arrays of the same shapes)."""
    if not info.enabled:
        return list(arrays)
    out = []
    for array in arrays:
        t = torch.from_numpy(np.asarray(array, dtype=np.float64).copy())
        dist.all_reduce(t)
        out.append(t.numpy())
    return out


def wrap_model(module: torch.nn.Module, info: DistInfo, device: torch.device, compile: bool) -> torch.nn.Module:
    """The model the loop trains: ``module`` itself, or wrapped for DDP and/or ``torch.compile``."""
    model = module
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def quiet_other_ranks(info: DistInfo) -> None:
    """Under torchrun, leave warnings to rank 0: every rank reads the same files and builds the same model, so each
    warning (a skipped image, a library's note) came once per rank. Errors still print on every rank."""
    if info.main:
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("training", "serving", "timm", "torch", "huggingface_hub", "albumentations", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)


def printer(info: DistInfo):
    """``print`` on rank 0, silence elsewhere: the loop's one output channel."""
    return print if info.main else (lambda *args, **kwargs: None)
