"""The one preprocessing definition: RGB picture -> normalised float32 CHW array (numpy + PIL, no torch).

Evaluation (checkpoint or ONNX) and the server both call ``Preprocessing.__call__``; training caches
``resize`` output and applies ``crop_and_normalize`` on it for validation, which is the same arithmetic
split in two.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class Preprocessing(BaseModel):
    """How a picture becomes model input. Stored verbatim in the ONNX metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(224, ge=16, description="model input is input_size x input_size")
    resize: str = Field(
        "shorter_side",
        description="shorter_side: shorter side to input_size / crop_pct, keep aspect; "
        "squash: both sides to input_size / crop_pct (the whole picture stays in view)",
    )
    crop: str = Field("center", description="then take a centred input_size square")
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    color_order: str = "RGB"
    layout: str = "NCHW"
    jpeg_draft: bool = Field(True, description="decode JPEGs at a reduced DCT scale when they are much larger")

    @field_validator("interpolation")
    @classmethod
    def _known_interpolation(cls, value: str) -> str:
        if value not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        return value

    @field_validator("resize", "crop", "color_order", "layout")
    @classmethod
    def _supported(cls, value: str, info) -> str:
        allowed = {"resize": {"shorter_side", "squash"}, "crop": {"center"}, "color_order": {"RGB"}, "layout": {"NCHW"}}
        if value not in allowed[info.field_name]:
            raise ValueError(f"{info.field_name} must be one of {sorted(allowed[info.field_name])}")
        return value

    @property
    def resize_size(self) -> int:
        """Length of the shorter side after resizing (before the centre crop)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) after resizing to ``resize_size``: the shorter side (aspect kept) or both sides (squash)."""
        target = self.resize_size
        if self.resize == "squash":
            return target, target
        if width <= height:
            return target, max(target, int(round(height * target / width)))
        return max(target, int(round(width * target / height))), target

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centred ``input_size`` square in a resized picture of ``width`` x ``height``."""
        return max(0, (width - self.input_size) // 2), max(0, (height - self.input_size) // 2)

    def resize_image(self, img: Image.Image) -> Image.Image:
        """Resize to ``resize_size``: the shorter side (aspect kept) or both sides (squash)."""
        new_w, new_h = self.resized_size(*img.size)
        if (new_w, new_h) == img.size:
            return img
        return img.resize((new_w, new_h), _INTERPOLATIONS[self.interpolation])

    def crop_and_normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 HWC (already resized) -> float32 CHW, centre-cropped and normalised."""
        h, w = arr.shape[:2]
        size = self.input_size
        left, top = self.crop_offsets(w, h)
        arr = arr[top : top + size, left : left + size]
        out = arr.astype(np.float32) * (1.0 / 255.0)
        out -= np.asarray(self.mean, dtype=np.float32)
        out /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB picture -> float32 array of shape (3, input_size, input_size)."""
        if img.mode != "RGB":
            raise ValueError("preprocessing expects an RGB image; decode with serving.imageio.decode_image")
        return self.crop_and_normalize(np.asarray(self.resize_image(img)))

    @property
    def draft_size(self) -> int | None:
        return self.resize_size if self.jpeg_draft else None
