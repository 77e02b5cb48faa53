"""Session 32: `wildcheck scan --max-bytes`. A stray multi-GB file among listing photos (a video renamed .jpg) used to
be read whole before it was posted, --concurrency of them at once, only for the server to answer 413."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from serving.settings import Settings
from tests.conftest import jpeg_bytes, photo
from tests.test_hardening_clients import DECISION
from tests.test_hardening_clients import _folder as _photos


def _server(calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.content)
        return httpx.Response(200, json=DECISION)

    return httpx.MockTransport(handler)


def _sized(path: Path, size: int, seed: int = 9) -> bytes:
    """A JPEG padded (after its end marker, as some cameras do) to exactly ``size`` bytes."""
    data = jpeg_bytes(photo(seed, (32, 32)))
    assert len(data) <= size
    data += b"\0" * (size - len(data))
    path.write_bytes(data)
    return data


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}


def _sent(calls: list, data: bytes) -> int:
    return sum(data in body for body in calls)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of the files the scan opens (Path.read_bytes opens through Path.open too)."""
    names: list[str] = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        names.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    return names


def test_a_file_over_the_servers_limit_is_not_read_nor_sent(tmp_path, opened):
    """The default limit is the service's default body limit: a (sparse) file one byte over it is never opened."""
    from serving.client import scan

    folder, out, calls = _photos(tmp_path, 2), tmp_path / "scan.jsonl", []
    limit = Settings.max_body_bytes
    with (folder / "video.jpg").open("wb") as fh:
        fh.truncate(limit + 1)
    opened.clear()  # the files this test wrote
    result = scan(folder, "http://x", out, transport=_server(calls))
    assert "video.jpg" not in opened
    assert len(calls) == 2 and all(len(body) < limit for body in calls)
    assert result["allow"] == 2 and result["error"] == 1 and result["checked"] == 3
    error = _rows(out)["video.jpg"]["error"]
    assert error["code"] == "too_large"
    assert error["message"].startswith(f"{limit + 1} bytes, over --max-bytes {limit}")
    assert "larger --max-bytes" in error["message"]


def test_a_too_large_file_is_final_until_it_fits(tmp_path):
    """A rerun with the same options does not try it again; a larger --max-bytes, or a smaller file in its place,
    checks it again."""
    from serving.client import scan

    folder, out = _photos(tmp_path, 2), tmp_path / "scan.jsonl"
    big_a = _sized(folder / "a.jpg", 5000, seed=5)
    _sized(folder / "b.jpg", 5000, seed=6)
    calls: list = []
    first = scan(folder, "http://x", out, transport=_server(calls), max_bytes=4000)
    assert first["error"] == 2 and len(calls) == 2
    calls.clear()
    again = scan(folder, "http://x", out, transport=_server(calls), max_bytes=4000)
    assert again["already_done"] == 4 and again["checked"] == 0 and calls == []

    small_b = _sized(folder / "b.jpg", 3000, seed=6)  # the real photo copied over the stray file
    replaced = scan(folder, "http://x", out, transport=_server(calls), max_bytes=4000)
    assert replaced["checked"] == 1 and replaced["allow"] == 1 and _sent(calls, small_b) == 1
    calls.clear()
    raised = scan(folder, "http://x", out, transport=_server(calls), max_bytes=5000)
    assert raised["checked"] == 1 and raised["allow"] == 1 and _sent(calls, big_a) == 1
    assert scan(folder, "http://x", out, transport=_server(calls), max_bytes=5000)["checked"] == 0


def test_a_file_of_exactly_max_bytes_is_sent_and_one_byte_more_is_not(tmp_path, opened):
    from serving.client import scan

    folder, out, calls = tmp_path / "photos", tmp_path / "scan.jsonl", []
    folder.mkdir()
    exact = _sized(folder / "exact.jpg", 3000, seed=1)
    _sized(folder / "over.jpg", 3001, seed=2)
    opened.clear()
    result = scan(folder, "http://x", out, transport=_server(calls), max_bytes=3000)
    assert result["allow"] == 1 and result["error"] == 1
    assert len(calls) == 1 and _sent(calls, exact) == 1
    rows = _rows(out)
    assert rows["exact.jpg"]["decision"] == "allow"
    assert rows["over.jpg"]["error"]["code"] == "too_large" and "over.jpg" not in opened


class _CountingReader:
    """A file object that counts the bytes read from it."""

    def __init__(self, fh, counter: dict):
        self._fh, self._counter = fh, counter

    def read(self, n=-1):
        data = self._fh.read(n)
        self._counter["read"] += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.mark.parametrize("real_size, sent", [(500_000, False), (2_990, True)])
def test_a_file_that_grows_after_its_stat_is_read_no_further_than_max_bytes(tmp_path, monkeypatch, real_size, sent):
    """A file still being copied in: its stat said 1,000 bytes, by the read it holds ``real_size``. Over the limit it
    gets the same too_large record, read no further than max_bytes + 1; within it, it is sent whole."""
    from serving.client import scan

    folder, out, calls = tmp_path / "photos", tmp_path / "scan.jsonl", []
    folder.mkdir()
    data = _sized(folder / "growing.jpg", real_size)
    real_stat, real_open = os.stat, Path.open
    counter = {"read": 0}

    def stat_before_it_grew(path, *args, **kwargs):
        info = real_stat(path, *args, **kwargs)
        if os.path.basename(os.fspath(path)) != "growing.jpg":
            return info
        fields = list(info[:10])
        fields[6] = 1000  # st_size
        return os.stat_result(fields)

    def counting_open(self, *args, **kwargs):
        fh = real_open(self, *args, **kwargs)
        return _CountingReader(fh, counter) if self.name == "growing.jpg" else fh

    monkeypatch.setattr(os, "stat", stat_before_it_grew)
    monkeypatch.setattr(Path, "open", counting_open)
    result = scan(folder, "http://x", out, transport=_server(calls), max_bytes=3000)
    row = _rows(out)["growing.jpg"]
    if sent:
        assert result["allow"] == 1 and len(calls) == 1 and data in calls[0] and row["decision"] == "allow"
    else:
        assert counter["read"] <= 3001 and calls == []
        assert row["error"]["code"] == "too_large" and result["error"] == 1
        assert row["error"]["message"].startswith(f"{real_size} bytes, over --max-bytes 3000")


def test_cli_max_bytes_reaches_scan_and_defaults_to_the_servers_limit(tmp_path, monkeypatch):
    import serving.client as client_module
    from training.cli import app

    folder, out, calls = _photos(tmp_path, 1), tmp_path / "scan.jsonl", []
    big = _sized(folder / "big.jpg", 4000)
    real_scan = client_module.scan
    monkeypatch.setattr(client_module, "scan", lambda *a, **k: real_scan(*a, **k, transport=_server(calls)))
    runner = CliRunner()
    r = runner.invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out), "--max-bytes", "3999"])
    assert r.exit_code == 1 and "1 image(s) got an error answer" in r.output
    assert _rows(out)["big.jpg"]["error"]["message"].startswith("4000 bytes, over --max-bytes 3999")
    assert len(calls) == 1 and _sent(calls, big) == 0
    # without the option: the server's default limit (20 MiB), which 4000 bytes fit, so the rerun checks it
    r = runner.invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _sent(calls, big) == 1 and _rows(out)["big.jpg"]["decision"] == "allow"
    r = runner.invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out), "--max-bytes", "0"])
    assert r.exit_code == 2 and "--max-bytes" in r.output


def test_scan_refuses_a_max_bytes_below_one(tmp_path):
    from serving.client import scan
    from serving.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--max-bytes 0"):
        scan(_photos(tmp_path, 2), "http://x", tmp_path / "scan.jsonl", max_bytes=0)
    assert not (tmp_path / "scan.jsonl").exists()
