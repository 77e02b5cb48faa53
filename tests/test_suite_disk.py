"""The suite must not fill the temp disk: CI ran out of space (ENOSPC) with every test's 55 MB checkpoints kept."""

import tomllib
from pathlib import Path

from tests.conftest import REPO

pytest_plugins = ["pytester"]


def test_a_passing_tests_files_are_deleted_when_it_ends(pytester, tmp_path):
    """An inner session under this project's pytest settings: the passing test's tmp_path is gone afterwards, the
    failing one's is kept for its reader."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    pytester.makeini("[pytest]\n" + "".join(f"{k} = {settings[k]}\n" for k in settings if k.startswith("tmp_path_")))
    record = tmp_path / "paths.txt"
    pytester.makepyfile(f"""
        def _write(tmp_path, name):
            (tmp_path / "last.pt").write_bytes(b"\\0" * (8 << 20))
            with open({str(record)!r}, "a") as f:
                f.write(f"{{name}} {{tmp_path}}\\n")

        def test_passes(tmp_path):
            _write(tmp_path, "passed")

        def test_fails(tmp_path):
            _write(tmp_path, "failed")
            assert False
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)
    written = dict(line.split(" ", 1) for line in record.read_text().splitlines())
    assert not Path(written["passed"]).exists()
    assert (Path(written["failed"]) / "last.pt").is_file()
