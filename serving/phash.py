"""Perceptual hash (pHash) with numpy + PIL only: serving must not need imagehash (and its scipy/pywavelets).

Same recipe as ``imagehash.phash``: greyscale, 32 x 32 Lanczos, 2-D DCT-II, the top-left 8 x 8
coefficients compared with their median -> 64 bits. Near-copies (resized, re-compressed) differ in a
few bits; unrelated photos in about 32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
_HIGHFREQ = 4
_N = HASH_SIZE * _HIGHFREQ


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))  # unnormalised DCT-II rows (scale is irrelevant here)


_DCT = _dct_matrix(_N)
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash(img: Image.Image) -> int:
    """64-bit pHash of a picture, as an unsigned int (bit order as imagehash's hex string)."""
    pixels = np.asarray(img.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _DCT @ pixels @ _DCT.T  # DCT along columns, then rows
    low = dct[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int(np.bitwise_or.reduce(_WEIGHTS[bits])) if bits.any() else 0


def hamming(query: int, hashes: np.ndarray) -> np.ndarray:
    """Bit distance between one hash and an array of uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(hashes.astype(np.uint64), np.uint64(query))).astype(np.int32)
