"""albumentations pipelines built from the config, with strict argument checking.

albumentations 2.x only *warns* about unknown (e.g. 1.x-style) keyword arguments and then does
something else; here an unknown argument is a config error.
"""

from __future__ import annotations

import inspect

import albumentations as A
import cv2
import numpy as np
import torch
from pydantic import ValidationError

from serving.contract import one_line
from serving.errors import WildcheckError
from serving.preprocess import Preprocessing
from training.config import AugmentStep, MixupConfig

_CV2_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                      "lanczos": cv2.INTER_LANCZOS4}


class AugmentError(WildcheckError, ValueError):
    """An augmentation step of the config that albumentations (or training.realism) cannot build."""


def _transform_class(name: str):
    from training import realism

    cls = getattr(realism, name, None) or getattr(A, name, None)
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise AugmentError(f"unknown augmentation {name!r}: use an albumentations transform or one of training.realism")
    return cls


def build_step(step: AugmentStep, pre: Preprocessing):
    cls = _transform_class(step.name)
    params = dict(step.params)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(params) - accepted
    if unknown:
        raise AugmentError(f"augmentation {step.name}: unknown arguments {sorted(unknown)}; it accepts {sorted(accepted)}")
    if "size" in accepted and "size" not in params and step.name.endswith("Crop"):
        params["size"] = (pre.input_size, pre.input_size)
    if step.name == "RandomResizedCrop" and "interpolation" not in params:
        params["interpolation"] = _CV2_INTERPOLATION[pre.interpolation]
    for key, value in params.items():
        if isinstance(value, list):
            params[key] = tuple(value)
    if step.p is not None:
        params["p"] = step.p
    try:
        return cls(**params)
    except Exception as exc:  # pydantic's ValidationError for a value out of range, ValueError, TypeError
        raise AugmentError(f"augmentation {step.name}: {_one_line(exc)}; fix its params in augment.train") from exc


def _one_line(exc: Exception) -> str:
    """An exception as one line: pydantic's ``loc: msg`` per error (its text is a multi-line dump), else the first line."""
    for cause in (exc, exc.__cause__):  # albumentations re-raises pydantic's error as a ValueError of its text
        if isinstance(cause, ValidationError):
            return one_line(cause)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_steps(steps: list[AugmentStep], pre: Preprocessing, where: str = "augment.train",
                sizes: tuple[tuple[int, int], ...] | None = None) -> None:
    """Run ``steps`` once, each applied (p = 1), on a picture of the smallest size the cache holds (a square of
    ``pre.resize_size``; ``sizes``: others), before any image is cached: a step that needs more than a picture (bboxes, a
    mask), fails on its params (``SmallBlurry`` with min_side > max_side) or a crop larger than the picture, failed in
    the first training batch, after minutes of caching; one that returns no 8-bit RGB picture (``Normalize``,
    ``ToFloat``: float pixels that were then scaled and normalised a second time) trained on garbage silently."""
    side = pre.resize_size
    sizes = sizes or ((side, side),)
    rng = np.random.default_rng(0)
    for h, w in sizes:
        image = _probe_picture(h, w, rng)
        for step in steps:
            forced = build_step(step.model_copy(update={"p": 1.0}), pre)
            forced.set_random_seed(0)
            if hasattr(forced, "bank"):
                forced.bank = [image]  # scene steps draw photos from the negatives pool: give them one
            shape = getattr(image, "shape", None)
            try:
                image = forced(image=image)["image"]
            except Exception as exc:
                raise AugmentError(f"{where}: {step.name} fails on a {shape[1]}x{shape[0]} RGB picture (the cache holds "
                                   f"every image with its shorter side at {side} px): {_one_line(exc)}. Fix or remove "
                                   "the step") from exc
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3 and min(image.shape[:2]) > 0):
                got = (f"a {image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                       else type(image).__name__)
                raise AugmentError(f"{where}: {step.name} returns {got}; every step must return an 8-bit RGB picture "
                                   "(H x W x 3 uint8). Training scales and normalises the result itself with the "
                                   "model's mean and std (data.mean, data.std): leave out Normalize, ToFloat, "
                                   "ToTensorV2 and single-channel outputs")


def _probe_picture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An object on a plain backdrop with some noise: a picture every step can work on."""
    image = np.full((h, w, 3), 235, np.uint8)
    image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (150, 120, 90)
    return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


class TrainTransform:
    """uint8 HWC (cached, resized) -> float32 CHW tensor, augmented then normalised like serving.

    With ``views`` (``train.consistency``): a pair, the augmented picture and the same picture under one of the
    views (drawn at random, each view's steps all applied), for the loop's consistency term."""

    def __init__(self, steps: list[AugmentStep], pre: Preprocessing, seed: int = 0,
                 views: list[list[AugmentStep]] | None = None):
        self.pre = pre
        check_steps(steps, pre)
        for view in views or []:  # a view is applied to the augmented picture, input_size square after the crop
            check_steps(view, pre, "train.consistency.views", sizes=((pre.input_size, pre.input_size),))
        self.compose = A.Compose([build_step(s, pre) for s in steps], seed=seed)
        self.views = (A.Compose([A.OneOf([A.Sequential([build_step(s, pre) for s in view], p=1.0) for view in views],
                                         p=1.0)], seed=seed + 1) if views else None)
        self._size = pre.input_size

    def set_bank(self, bank: list[np.ndarray]) -> None:
        """Photos (uint8 HWC, all of the negative label) that scene-building steps may add to an image."""
        for step in self.compose.transforms:
            if hasattr(step, "bank"):
                step.bank = bank

    def set_seed(self, seed: int) -> None:
        # albumentations 2.0.x creates its RNG in the constructor: every DataLoader worker would
        # repeat the same sequence unless each worker reseeds its copy.
        self.compose.set_random_seed(seed)
        if self.views is not None:
            self.views.set_random_seed(seed + 1)

    def _tensor(self, out: np.ndarray) -> torch.Tensor:
        if out.shape[0] != self._size or out.shape[1] != self._size:
            out = cv2.resize(out, (self._size, self._size), interpolation=cv2.INTER_AREA)
        arr = (out.astype(np.float32) / 255.0 - np.asarray(self.pre.mean, np.float32)) / np.asarray(self.pre.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.compose(image=image)["image"]
        if self.views is None:
            return self._tensor(out)
        return self._tensor(out), self._tensor(self.views(image=out)["image"])


class EvalTransform:
    """The serving preprocessing on a cached resized image (centre crop + normalise)."""

    def __init__(self, pre: Preprocessing):
        self.pre = pre

    def set_seed(self, seed: int) -> None:
        pass

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.pre.crop_and_normalize(image))


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (derived from torch's per-worker seed)."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % (2**32)
    np.random.seed(seed)
    import random

    random.seed(seed)
    dataset = info.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        transform.set_seed(seed)


class BatchMixer:
    """timm's Mixup/CutMix on a share ``prob`` of the training batches, the share picked by a seeded coin
    (a ``torch.Generator`` whose state resumes with the run, not the global ``random``)."""

    def __init__(self, mixup: MixupConfig, label_smoothing: float, num_classes: int, seed: int):
        from timm.data import Mixup

        self.prob = mixup.prob
        self.mixup = Mixup(mixup_alpha=mixup.mixup_alpha, cutmix_alpha=mixup.cutmix_alpha,
                           switch_prob=mixup.switch_prob, prob=1.0, label_smoothing=label_smoothing,
                           num_classes=num_classes)
        self.coin = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(images, targets, mixed): mixed batches get soft targets (smoothing included); timm mixes even
        batches only, so an odd one passes unmixed without tossing the coin."""
        if len(y) % 2 or torch.rand(1, generator=self.coin).item() >= self.prob:
            return x, y, False
        x, target = self.mixup(x, y)
        return x, target, True

    def state_dict(self) -> dict:
        return {"coin": self.coin.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.coin.set_state(state["coin"])
