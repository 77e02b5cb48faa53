"""Atomic writes leave files as readable as any other file the user writes (not mkstemp's owner-only mode)."""

import os
import stat

from training.fileio import atomic_write_text


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "model_card.md", "hello")
    finally:
        os.umask(old)
    assert (tmp_path / "model_card.md").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "model_card.md").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model_card.md"]
