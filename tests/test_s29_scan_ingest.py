"""Session 29: `wildcheck scan` against redirects, a server that goes away, a full disk, link loops, devices and a
key with a space; `wildcheck data ingest` interrupted, run twice at once, and given devices or huge files."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from serving.errors import InvalidInput

from tests.test_hardening_clients import DECISION, _folder

REPO = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _ok(calls=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(request)
        return httpx.Response(200, json=DECISION)

    return httpx.MockTransport(handler)


# --- scan: a redirect is a wrong URL, not a failure to retry ------------------------------------------------------

def test_a_redirect_stops_the_scan_at_once_naming_where_it_points(tmp_path):
    """Before: every image was retried 5 times with backoff (48 s for 20 images), then left as 'retry later' with
    'HTTP 301 (not JSON: '')', on every rerun; nothing said the URL should be https://."""
    from serving.client import ScanStopped, scan

    folder, out, calls = _folder(tmp_path), tmp_path / "scan.jsonl", []

    def handler(request):
        calls.append(request)
        return httpx.Response(301, headers={"Location": "https://wildcheck.example/v1/check"})

    with pytest.raises(ScanStopped, match="redirect to https://wildcheck.example/v1/check") as stopped:
        scan(folder, "http://user:hunter2@x", out, backoff=0.001, transport=httpx.MockTransport(handler))
    assert "hunter2" not in str(stopped.value) and "user:***@" in str(stopped.value)
    assert len(calls) <= 3  # one per worker at most, none retried
    assert not out.exists() or _rows(out) == []
    assert scan(folder, "http://x", out, transport=_ok())["allow"] == 3  # nothing was recorded: all checked now


# --- scan: a server that goes away ends the run instead of grinding through every image ----------------------------

def test_a_server_that_stops_answering_ends_the_run_and_the_rerun_resumes(tmp_path, monkeypatch):
    """Before: each image waited through its retries (~2 s per image at concurrency 8 with the default backoff: hours
    for a large list) and was written as 'retry later'."""
    import serving.client as client_module
    from training.cli import app

    folder, out, calls = _folder(tmp_path, 12), tmp_path / "scan.jsonl", []

    def handler(request):
        calls.append(request)
        if len(calls) > 3:  # answers three images, then is gone
            raise httpx.ConnectError("All connection attempts failed")
        return httpx.Response(200, json=DECISION)

    result = client_module.scan(folder, "http://x", out, concurrency=1, retries=1, backoff=0.001,
                                transport=httpx.MockTransport(handler))
    assert result["allow"] == 3 and result["retry later"] == 4  # MIN_UNREACHABLE_STREAK images in a row
    assert result["not_sent"] == 5 and result["checked"] == 7 and "answered none of 4 images" in result["stopped"]
    assert len(calls) == 3 + 4 * 2  # each failed image: one try and one retry; the other five were never sent
    assert len(_rows(out)) == 7

    real_scan = client_module.scan
    monkeypatch.setattr(client_module, "scan", lambda source, url, out, concurrency, api_key, retries: real_scan(
        source, url, out, 1, api_key, 0, transport=transport))
    transport = httpx.MockTransport(lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused")))
    r = CliRunner().invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out)])
    assert r.exit_code == 1 and "stopped early" in r.output and "run the same command again" in r.output
    rerun = real_scan(folder, "http://x", out, transport=_ok())
    assert rerun["already_done"] == 3 and rerun["checked"] == 9 and rerun["allow"] == 9 and "stopped" not in rerun


def test_images_that_cannot_be_read_locally_do_not_stop_the_run(tmp_path):
    """Only the server's silence counts: missing files between answers leave the streak as it was."""
    from serving.client import scan

    folder, out = _folder(tmp_path, 2), tmp_path / "scan.jsonl"
    listing = tmp_path / "list.csv"
    missing = "".join(f"photos/missing{i}.jpg\n" for i in range(6))
    listing.write_text("path\n" + missing + "photos/0.jpg\nphotos/1.jpg\n")
    result = scan(listing, "http://x", out, concurrency=1, retries=0, transport=_ok())
    assert result["error"] == 6 and result["allow"] == 2 and "stopped" not in result


# --- scan: a full disk ---------------------------------------------------------------------------------------------

def test_a_full_disk_stops_with_a_message_and_the_rerun_resumes(tmp_path):
    """Before: OSError inside the TaskGroup became an 'ExceptionGroup: unhandled errors' traceback (and the buffered
    rows were written again at close). The limit on file size gives the same write error as a full disk."""
    folder, out = _folder(tmp_path, 12), tmp_path / "scan.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal, httpx
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
        from serving.client import ScanStopped, scan
        transport = httpx.MockTransport(lambda r: httpx.Response(200, json={DECISION!r}))
        try:
            scan({str(folder)!r}, "http://x", {str(out)!r}, concurrency=1, transport=transport)
        except ScanStopped as exc:
            print("STOPPED:", exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "STOPPED: writing to --out" in done.stdout and "File too large" in done.stdout, done.stdout
    written = out.stat().st_size
    assert 0 < written <= 600
    from serving.client import scan

    rerun = scan(folder, "http://x", out, transport=_ok())
    assert rerun["already_done"] >= 1 and rerun["already_done"] + rerun["allow"] == 12
    assert scan(folder, "http://x", out, transport=_ok())["checked"] == 0


# --- scan: paths that are no image file ----------------------------------------------------------------------------

def test_links_in_a_circle_are_a_final_not_found_not_a_traceback(tmp_path):
    """Before: Path.resolve raised RuntimeError('Symlink loop') before anything was sent, for a folder or a CSV."""
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    os.symlink("b.jpg", folder / "a.jpg")
    os.symlink("a.jpg", folder / "b.jpg")
    result = scan(folder, "http://x", out, transport=_ok())
    assert result["allow"] == 1 and result["error"] == 2 and "retry later" not in result
    codes = sorted(r["error"]["code"] for r in _rows(out) if "error" in r)
    assert codes == ["not_found", "not_found"]
    assert scan(folder, "http://x", out, transport=_ok())["checked"] == 0  # the run is complete


def test_a_device_listed_is_not_read_or_sent(tmp_path):
    """Before: /dev/zero was read until memory ran out (MemoryError, 'retry later' for ever), a named pipe hung
    every worker, and /dev/null was sent as an empty upload."""
    from serving.client import scan

    folder, out, calls = _folder(tmp_path, 1), tmp_path / "scan.jsonl", []
    listing = tmp_path / "list.csv"
    listing.write_text("path\n/dev/null\nphotos/0.jpg\n")
    result = scan(listing, "http://x", out, transport=_ok(calls))
    assert result["allow"] == 1 and result["error"] == 1 and len(calls) == 1
    (row,) = [r for r in _rows(out) if "error" in r]
    assert row["path"] == "/dev/null" and row["error"]["code"] == "not_a_file"
    assert scan(listing, "http://x", out, transport=_ok())["checked"] == 0


# --- scan: the API key never ends up in the results file ------------------------------------------------------------

def test_an_api_key_with_a_space_is_refused_before_anything_is_sent(tmp_path):
    """Before: httpx refused every request with 'Illegal header value b's3cret '', and that message, key included,
    went into every row of the results file and onto the terminal; every image was 'retry later'."""
    from serving.client import scan

    folder, out, calls = _folder(tmp_path, 2), tmp_path / "scan.jsonl", []
    for key in ("s3cret ", " s3cret"):
        with pytest.raises(InvalidInput, match="starts or ends with a space"):
            scan(folder, "http://x", out, api_key=key, retries=0, transport=_ok(calls))
    assert calls == [] and (not out.exists() or "s3cret" not in out.read_text())


def test_an_error_message_that_quotes_the_key_is_written_without_it(tmp_path):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"

    def handler(request):
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers['x-api-key']!r}")

    result = scan(folder, "http://x", out, api_key="k3y-value", retries=0, transport=httpx.MockTransport(handler))
    assert result["retry later"] == 1
    text = out.read_text()
    assert "k3y-value" not in text and "***" in text


# --- scan: --out that is no plain file, or a link to one -------------------------------------------------------

def test_out_on_a_pipe_is_refused_at_once(tmp_path):
    """Before: `--out /dev/stdout` piped into another command waited for ever, reading its own output back to
    resume, before any image was sent (as root it also wrote /dev/stdout.lock into /dev)."""
    folder = _folder(tmp_path, 1)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-c", "from training.cli import main; main()"]
    try:
        done = subprocess.run([*cli, "scan", str(folder), "--url", "http://127.0.0.1:9", "--out", "/dev/stdout"],
                              capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("wildcheck scan --out /dev/stdout hung")
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr[-1000:]


def test_a_link_to_a_results_file_is_locked_as_that_file(tmp_path):
    """Before: the lock was taken beside the name given, so `--out link.jsonl` and `--out real.jsonl` both ran."""
    from serving.client import scan

    folder, real = _folder(tmp_path, 1), tmp_path / "real.jsonl"
    real.write_text("")
    (tmp_path / "link.jsonl").symlink_to(real)
    with open(tmp_path / "real.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a scan writing real.jsonl holds
        with pytest.raises(InvalidInput, match="another scan"):
            scan(folder, "http://x", tmp_path / "link.jsonl", transport=_ok())
    assert real.read_text() == ""


def test_scan_runs_when_called_from_a_running_event_loop(tmp_path):
    """A notebook runs its cells inside an event loop: before, the library call raised 'asyncio.run() cannot be
    called from a running event loop'."""
    import asyncio

    from serving.client import scan

    folder, out = _folder(tmp_path, 2), tmp_path / "scan.jsonl"

    async def cell():
        return scan(folder, "http://x", out, transport=_ok())

    assert asyncio.run(cell())["allow"] == 2


# --- ingest ---------------------------------------------------------------------------------------------------------

def _labels(tmp_path: Path, rows: list[tuple[str, str]], name: str = "labels.csv", seed: int = 300) -> Path:
    from training.data.synth import make_image

    folder = tmp_path / Path(name).stem
    folder.mkdir(exist_ok=True)
    path = tmp_path / name
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "labeled_by"])
        for i, (file_name, label) in enumerate(rows):
            if not (folder / file_name).exists():
                make_image("ivory", seed + i, 200).save(folder / file_name, quality=95)
            writer.writerow([f"{folder.name}/{file_name}", label, "alice"])
    return path


def _label_folders_dataset(tmp_path: Path) -> Path:
    """ROOT/<label>/<image>: no split folders, no manifest (README: a layout every command reads)."""
    from training.data.synth import make_image

    root = tmp_path / "data"
    for i, label in enumerate(("ivory", "other")):
        (root / label).mkdir(parents=True)
        make_image(label, 10 + i, 200).save(root / label / "a.jpg", quality=95)
    return root


def test_an_interrupted_ingest_into_a_folder_dataset_loses_nothing(tmp_path, monkeypatch):
    """Before: killed after copying but before its manifest, the ingest left ROOT/train/ivory/<sha>.jpg beside
    ROOT/ivory/ and ROOT/other/: the dataset was read from train/ alone (its own two images gone), and the rerun
    called the new image a duplicate, wrote no manifest, and its provenance (labeled_by) was lost."""
    import training.data.ingest as ingest_module
    from training.data.sources import discover

    root = _label_folders_dataset(tmp_path)
    labels_csv = _labels(tmp_path, [("new.jpg", "ivory")])
    real_write = ingest_module.atomic_write_text

    def killed_while_writing_the_new_rows(path, text):
        if "alice" in text:
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(ingest_module, "atomic_write_text", killed_while_writing_the_new_rows)
    with pytest.raises(KeyboardInterrupt):
        ingest_module.ingest(labels_csv, root)
    assert sorted(str(s.path.relative_to(root)) for s in discover(root)) == ["ivory/a.jpg", "other/a.jpg"]
    monkeypatch.setattr(ingest_module, "atomic_write_text", real_write)
    rerun = ingest_module.ingest(labels_csv, root)
    assert len(rerun["added"]) == 1 and rerun["duplicates"] == []
    with (root / "manifest.csv").open(newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows[rerun["added"][0]["to"]]["labeled_by"] == "alice"
    assert {"ivory/a.jpg", "other/a.jpg"} <= set(rows)
    assert len(discover(root)) == 3


def test_two_ingests_at_once_do_not_drop_each_others_rows(tmp_path, monkeypatch):
    """Before: both read the manifest, both copied, and the one that wrote last dropped the other's rows (both said
    'added 3'; the manifest listed 3 of the 6 copied images)."""
    import training.data.ingest as ingest_module

    root = tmp_path / "data"
    first = _labels(tmp_path, [(f"{i}.jpg", "ivory") for i in range(3)], "a.csv", seed=400)
    second = _labels(tmp_path, [(f"{i}.jpg", "ivory") for i in range(3)], "b.csv", seed=500)
    real_write, during = ingest_module.atomic_write_text, []

    def the_other_ingest_meanwhile(path, text):
        if not during:
            try:
                during.append(ingest_module.ingest(second, root))
            except InvalidInput as exc:
                during.append(exc)
        real_write(path, text)

    monkeypatch.setattr(ingest_module, "atomic_write_text", the_other_ingest_meanwhile)
    report = ingest_module.ingest(first, root)
    assert isinstance(during[0], InvalidInput) and "another data ingest" in str(during[0])
    monkeypatch.setattr(ingest_module, "atomic_write_text", real_write)
    later = ingest_module.ingest(second, root)  # once the first is done
    with (root / "manifest.csv").open(newline="") as fh:
        listed = {r["path"] for r in csv.DictReader(fh)}
    assert listed == {a["to"] for a in report["added"] + later["added"]} and len(listed) == 6


def test_an_ingest_held_by_another_changes_nothing_and_one_that_adds_nothing_leaves_nothing(tmp_path):
    from training.data.ingest import ingest

    root = tmp_path / "data"
    root.mkdir()
    labels_csv = _labels(tmp_path, [("a.jpg", "ivory")])
    with open(root / "manifest.csv.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running ingest holds
        with pytest.raises(InvalidInput, match="another data ingest"):
            ingest(labels_csv, root)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.csv.lock"]
    broken = tmp_path / "broken.csv"
    broken.write_text("path,label\nnowhere.jpg,ivory\n")
    new_root = tmp_path / "new" / "data"
    assert ingest(broken, new_root)["added"] == []
    assert not (tmp_path / "new").exists()  # no folder, no lock left for an ingest that added nothing


def test_ingest_reads_no_device_and_no_file_larger_than_any_image(tmp_path, monkeypatch):
    """Before: a row naming /dev/zero was read until memory ran out (MemoryError traceback, or the OOM killer), a
    named pipe hung the ingest, and a multi-GB video was read whole before the decoder refused it."""
    import training.data.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "MAX_SOURCE_BYTES", 4096)
    root = tmp_path / "data"
    labels_csv = _labels(tmp_path, [("big.jpg", "ivory")])
    with labels_csv.open("a") as fh:
        fh.write("/dev/null,ivory,alice\n")
    report = ingest_module.ingest(labels_csv, root)
    reasons = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    assert "not a file" in reasons["null"] and "over the 4 KiB" in reasons["big.jpg"], reasons
    assert report["added"] == []


def test_a_csv_without_the_column_says_what_its_first_line_has(tmp_path):
    """Before: 'needs columns path,label' for a header `Path,Label` (or a file with no header line): the user saw a
    path column and could not tell what was wrong."""
    from serving.client import scan
    from training.data.ingest import ingest

    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("Path,Label\nin/a.jpg,ivory\n")
    with pytest.raises(InvalidInput, match="first line has the columns 'Path', 'Label'; needs columns path,label"):
        ingest(labels_csv, tmp_path / "data")
    assert not (tmp_path / "data").exists()
    listing = tmp_path / "list.csv"
    listing.write_text("photos/a.jpg\nphotos/b.jpg\n")  # no header line at all
    with pytest.raises(InvalidInput, match="first line has the columns 'photos/a.jpg'; the CSV needs a 'path' column"):
        scan(listing, "http://x", tmp_path / "out.jsonl", transport=_ok())


def test_a_proxy_refusal_is_not_retried_in_the_run_but_left_for_the_next(tmp_path):
    """Before: nginx's HTML 413 (its default limit is 1 MB, below many listing photos) was retried with backoff, ~15 s
    per image at the default settings, only to be left as 'retry later' anyway."""
    from serving.client import scan

    folder, out, calls = _folder(tmp_path, 2), tmp_path / "scan.jsonl", []

    def handler(request):
        calls.append(request)
        return httpx.Response(413, text="<html><title>413 Request Entity Too Large</title></html>")

    result = scan(folder, "http://x", out, retries=3, backoff=0.001, transport=httpx.MockTransport(handler))
    assert len(calls) == 2 and result["retry later"] == 2
    assert {r["error"]["code"] for r in _rows(out)} == {"refused"} and "client_max_body_size" in out.read_text()
    again = scan(folder, "http://x", out, transport=_ok())  # fixed: checked on the rerun
    assert again["checked"] == 2 and again["allow"] == 2
