"""The suite must not fill the temp disk: CI ran out of space (ENOSPC) with every test's 55 MB checkpoints kept."""

from pathlib import Path

_written: list[Path] = []


def test_a_passing_test_writes_a_checkpoint_sized_file(tmp_path):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"\0" * (8 << 20))
    _written.append(checkpoint)


def test_its_files_are_gone_once_it_passed():
    """Runs after the test above (file order): the passing test's tmp_path was deleted at its teardown."""
    assert _written, "the writing test did not run first"
    assert not _written[0].parent.exists()
