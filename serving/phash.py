"""Perceptual hash (pHash) with numpy + PIL only: serving must not need imagehash (and its scipy/pywavelets).

Same recipe as ``imagehash.phash``: greyscale, 32 x 32 Lanczos, 2-D DCT-II, the top-left 8 x 8
coefficients compared with their median -> 64 bits. Near-copies (resized, re-compressed) differ in a
few bits; unrelated photos in about 32.

A flat picture (blank, one colour, a plain backdrop's tile) has no low-frequency content: its coefficients are
rounding noise, so its bits say nothing about it, and every one-colour picture gets nearly the same hash (white
and grey 6 bits apart: a "near-copy"). ``structure`` measures what the hash is made of, the root mean square of
the low-frequency content in grey levels (the 63 non-DC coefficients, orthonormal); under ``MIN_STRUCTURE`` a
picture is ``flat`` and identifies nothing (``ViewHash``). 2.0: every one of 1,795 real photos of the shared
datasets has at least 3.6 (median 39), JPEG noise on a blank picture 0.1, a 4-level vignette on white 1.1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
_HIGHFREQ = 4
_N = HASH_SIZE * _HIGHFREQ
MIN_STRUCTURE = 2.0  # grey levels of low-frequency content below which a picture is flat


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))  # unnormalised DCT-II rows (scale is irrelevant here)


_DCT = _dct_matrix(_N)
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
# the unnormalised coefficients -> orthonormal ones (Parseval: their squares sum to the pixels' squares)
_SCALE = np.where(np.arange(HASH_SIZE) == 0, np.sqrt(1.0 / _N), np.sqrt(2.0 / _N))
_ORTHO = _SCALE[:, None] * _SCALE[None, :]


class ViewHash(int):
    """A picture's pHash (an ``int``: it formats, compares and stores as before) with its ``structure``; a
    ``flat`` picture's hash is noise, so it matches nothing (``serving.gallery.Gallery.match``)."""

    structure: float

    def __new__(cls, value: int, structure: float = float("inf")) -> "ViewHash":  # (pickle passes the value alone)
        obj = super().__new__(cls, value)
        obj.structure = structure
        return obj

    @property
    def flat(self) -> bool:
        return self.structure < MIN_STRUCTURE


def _low(img: Image.Image) -> np.ndarray:
    pixels = np.asarray(img.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    return (_DCT @ pixels @ _DCT.T)[:HASH_SIZE, :HASH_SIZE]  # DCT along columns, then rows


def _bits(low: np.ndarray) -> int:
    bits = (low > np.median(low)).ravel()
    return int(np.bitwise_or.reduce(_WEIGHTS[bits])) if bits.any() else 0


def _structure(low: np.ndarray) -> float:
    ac = low * _ORTHO
    ac[0, 0] = 0.0
    return float(np.sqrt((ac ** 2).sum() / (_N * _N)))


def phash(img: Image.Image) -> int:
    """64-bit pHash of a picture, as an unsigned int (bit order as imagehash's hex string)."""
    return _bits(_low(img))


def view_hash(img: Image.Image) -> ViewHash:
    """The pHash with the picture's structure (one DCT for both)."""
    low = _low(img)
    return ViewHash(_bits(low), _structure(low))


def structure(img: Image.Image) -> float:
    """Root mean square, in grey levels, of the low-frequency content the pHash is made of."""
    return _structure(_low(img))


def hamming(query: int, hashes: np.ndarray) -> np.ndarray:
    """Bit distance between one hash and an array of uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(hashes.astype(np.uint64), np.uint64(query))).astype(np.int32)
