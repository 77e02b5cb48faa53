"""Fuzz: byte-level mutations of real encoder output must only ever raise ImageError (issue 19.5)."""

from __future__ import annotations

import io
import random

import pytest

from serving.imageio import ImageError, decode_image
from tests.conftest import photo

FORMATS = {"JPEG": {}, "PNG": {}, "GIF": {"save_all": True}, "TIFF": {"save_all": True}, "WEBP": {"quality": 80}}


def encoded(fmt: str) -> bytes:
    """A small two-frame (where the format has frames) picture as the library writes it."""
    first, second = photo(1, (48, 40)), photo(2, (48, 40))
    buf = io.BytesIO()
    kwargs = dict(FORMATS[fmt])
    if kwargs.pop("save_all", False):
        kwargs.update(save_all=True, append_images=[second])
    first.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mutations(data: bytes, n: int, seed: int):
    """Flipped bytes, overwritten runs, cuts, duplicated and deleted spans: what a broken upload looks like."""
    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(5)
        at = rng.randrange(len(b))
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\x80\0\0\0"])
        elif kind == 2:
            b = b[:max(1, at)]
        elif kind == 3:
            span = b[at:at + rng.randint(1, 64)]
            b[at:at] = span * rng.randint(1, 4)
        else:
            del b[at:at + rng.randint(1, 64)]
        yield bytes(b)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mutated_files_only_raise_image_errors(fmt):
    original = encoded(fmt)
    decode_image(original, min_side=1)
    outcomes = {"decoded": 0, "refused": 0}
    for data in mutations(original, 60, seed=sum(fmt.encode())):
        try:
            img, _ = decode_image(data, min_side=1)
            assert img.mode == "RGB"
            outcomes["decoded"] += 1
        except ImageError as exc:
            assert exc.code and exc.message and 400 <= exc.status < 500
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes  # the mutations do reach the error paths
