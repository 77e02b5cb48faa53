"""Everything that turns a loss into a weight update, built in one place: optimizer, per-step schedule, EMA,
grad scaler, Mixup/CutMix and autocast, with one ``state_dict`` for resuming."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from training.augment import BatchMixer
from training.config import TrainConfig


def ema_decay_for(total_steps: int) -> float:
    """EMA horizon of about a tenth of the run (0.9998 averages over ~5,000 steps: far too slow for ~1,000)."""
    return float(min(0.9998, max(0.99, 1.0 - 10.0 / max(total_steps, 1))))


def autocast_setting(amp: bool, cpu_bf16: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """Mixed precision only where the hardware does it natively (emulated CPU bf16 is slower than fp32)."""
    if device.type == "cuda" and amp:
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True, torch.bfloat16
    return False, torch.float32


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr (the head's under layer-wise decay): the number the schedule is stated in."""
    return max(group["lr"] for group in optimizer.param_groups)


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler
    mixer: BatchMixer | None  # Mixup/CutMix on a seeded share of the batches
    use_amp: bool
    amp_dtype: torch.dtype
    lr: float  # the peak lr after scaling by the number of processes
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    class_weight: torch.Tensor | None = None
    consistency_weight: float = 0.0  # train.consistency.weight: the paired views' term

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def eval_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """What validation and best.pt use: the EMA weights when kept, else the trained module."""
        return self.ema.module if self.ema is not None else module

    def describe(self) -> str:
        ema = f"{self.ema.decay}" if self.ema is not None else "off"
        autocast = str(self.amp_dtype).removeprefix("torch.") if self.use_amp else "off"
        return f"EMA decay {ema}, autocast {autocast}"

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "mixer": self.mixer.state_dict() if self.mixer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (last.pt, whose ``step`` is the run's optimizer steps so far). The schedule is
        not restored but rebuilt, as timm's train.py does: restoring it brought back the saved run's length, so
        ``--resume --epochs`` trained its extra epochs at the floor lr; set to the saved step, it follows this
        run's epochs and gives an unchanged run the very same lr."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.step_update(state["step"])  # the lr of the next step (the optimizer's saved one is the old schedule's)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        if self.mixer is not None and state.get("mixer") is not None:
            self.mixer.load_state_dict(state["mixer"])


def build_optimization(module: torch.nn.Module, tc: TrainConfig, steps_per_epoch: int, world: int,
                       device: torch.device, num_classes: int, class_weight: torch.Tensor | None = None) -> Optimization:
    """AdamW (layer-wise decay optional), a per-step cosine schedule with warmup, and the rest, for ``module``."""
    total_steps = steps_per_epoch * tc.epochs
    lr = tc.lr * {"none": 1.0, "linear": world, "sqrt": world ** 0.5}[tc.lr_scaling]
    optimizer = create_optimizer_v2(module, "adamw", lr=lr, weight_decay=tc.weight_decay, layer_decay=tc.layer_decay)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=lr * tc.min_lr_ratio,
        warmup_t=int(tc.warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 0.01, warmup_prefix=True,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(module, decay=tc.ema_decay or ema_decay_for(total_steps), use_warmup=True) if tc.ema else None
    use_amp, amp_dtype = autocast_setting(tc.amp, tc.cpu_bf16, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # the coin's stream is the seed's + 1: not the sampler's, which is seeded with train.seed itself
    mixer = BatchMixer(tc.mixup, tc.label_smoothing, num_classes, tc.seed + 1) if tc.mixup.prob > 0 else None
    return Optimization(optimizer, scheduler, ema, scaler, mixer, use_amp, amp_dtype, lr, tc.label_smoothing,
                        tc.grad_clip, class_weight, tc.consistency.weight)
