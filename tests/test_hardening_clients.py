"""Issue 19: `wildcheck scan` and `wildcheck data ingest` against broken servers, files and CSVs."""

from __future__ import annotations

import csv
import fcntl
import json
import os
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import jpeg_bytes, photo

DECISION = {"decision": "allow", "label": "other", "score": 0.9, "scores": {"other": 0.9}}


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(photo(i, (32, 32))))
    return folder


def _server(status: int = 200, body=DECISION, headers=None, calls=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(request)
        if isinstance(body, (dict, list)):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, text=body, headers=headers)

    return httpx.MockTransport(handler)


# --- 4: a wrong key or URL is not an answer ----------------------------------------------------------------------

@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_wrong_key_or_url_stops_the_scan_and_records_nothing(tmp_path, status):
    from serving.client import ScanStopped, scan

    folder, out = _folder(tmp_path), tmp_path / "scan.jsonl"
    with pytest.raises(ScanStopped, match=str(status)):
        scan(folder, "http://x", out, transport=_server(status, {"error": {"code": "unauthorized", "message": "no"}}))
    assert not out.exists() or out.read_text() == ""
    fixed = scan(folder, "http://x", out, transport=_server())  # the rerun with the right key checks everything
    assert fixed["checked"] == 3 and fixed["allow"] == 3


@pytest.mark.parametrize("body", ["<html>proxy error</html>", {"unexpected": True}, [1, 2]])
def test_non_json_or_unexpected_answers_are_not_final(tmp_path, body):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    result = scan(folder, "http://x", out, retries=1, backoff=0.001, transport=_server(200, body))
    assert result["retry later"] == 1
    assert scan(folder, "http://x", out, transport=_server())["checked"] == 1  # checked again, not skipped


def test_cli_exits_non_zero_on_wrong_key_and_on_error_rows(tmp_path, monkeypatch):
    import serving.client as client_module
    from training.cli import app

    folder, out = _folder(tmp_path, 2), tmp_path / "scan.jsonl"
    runner = CliRunner()
    real_scan = client_module.scan
    monkeypatch.setattr(client_module, "scan", lambda *a, **k: real_scan(*a, **k, transport=transport))
    transport = _server(401, {"error": {"code": "unauthorized", "message": "bad key"}})
    r = runner.invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out)])
    assert r.exit_code != 0 and "401" in r.output and "API key" in r.output
    transport = _server(400, {"error": {"code": "corrupt", "message": "bad image"}})
    r = runner.invoke(app, ["scan", str(folder), "--url", "http://x", "--out", str(out)])
    assert r.exit_code == 1 and "error" in r.output


# --- 9: the results file -----------------------------------------------------------------------------------------

def test_truncated_last_line_does_not_swallow_the_next_row(tmp_path):
    from serving.client import scan

    folder, out = _folder(tmp_path, 2), tmp_path / "scan.jsonl"
    out.write_text(json.dumps({"path": str(folder / "0.jpg"), **DECISION}) + "\n" + '{"path": "cut-by-a-cra')
    result = scan(folder, "http://x", out, transport=_server())
    assert result["checked"] == 1 and result["skipped_lines"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()[2:]]
    assert [Path(r["path"]).name for r in rows] == ["1.jpg"]  # the new row is whole, on its own line
    assert scan(folder, "http://x", out, transport=_server())["checked"] == 0


@pytest.mark.parametrize("junk", ["[]", "42", "{}", '"text"', '{"path": 7}'])
def test_lines_that_are_not_results_are_skipped_and_reported(tmp_path, junk):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    out.write_text(junk + "\n")
    result = scan(folder, "http://x", out, transport=_server())
    assert result["checked"] == 1 and result["skipped_lines"] == 1


def test_resume_key_ignores_how_the_path_was_typed(tmp_path, monkeypatch):
    from serving.client import scan

    _folder(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scan.jsonl"
    assert scan("photos", "http://x", out, transport=_server())["checked"] == 2
    assert scan("./photos", "http://x", out, transport=_server())["checked"] == 0
    assert scan(str(tmp_path / "photos"), "http://x", out, transport=_server())["checked"] == 0
    listing = tmp_path / "list.csv"
    listing.write_text("path\n./photos/0.jpg\n", encoding="utf-8-sig")  # and a CSV saved by Excel (BOM)
    assert scan(listing, "http://x", out, transport=_server())["already_done"] == 1


def test_server_json_cannot_overwrite_path_or_status(tmp_path):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    scan(folder, "http://x", out, transport=_server(200, {**DECISION, "path": "/etc/passwd", "status": 999}))
    row = json.loads(out.read_text())
    assert row["path"] == str((folder / "0.jpg").resolve()) and row["status"] == 200


def test_a_file_name_that_is_not_utf8_is_checked_and_does_not_stop_the_others(tmp_path):
    """One such name used to raise UnicodeEncodeError in httpx's multipart header, cancel every worker and
    record nothing, on every rerun."""
    from serving.client import scan

    folder, out = _folder(tmp_path, 2), tmp_path / "scan.jsonl"
    odd = os.fsdecode(b"bad\xffname.jpg")
    (folder / "0.jpg").rename(folder / odd)
    calls = []
    result = scan(folder, "http://x", out, transport=_server(calls=calls))
    assert result["checked"] == 2 and result["allow"] == 2
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == sorted(
        str((folder / name).resolve()) for name in (odd, "1.jpg"))
    assert scan(folder, "http://x", out, transport=_server())["already_done"] == 2


def test_a_listed_file_that_cannot_be_read_yet_is_retried_not_done(tmp_path):
    """A CSV may list a photo before it lands; it used to be recorded as done and never checked. Missing, it is a
    final not_found error for this run (not 'retry later' forever), and the next run checks it once it is there."""
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    listing = tmp_path / "list.csv"
    listing.write_text("path\nphotos/0.jpg\nphotos/later.jpg\n")
    first = scan(listing, "http://x", out, transport=_server())
    assert first["allow"] == 1 and first["error"] == 1 and first.get("retry later", 0) == 0
    (folder / "later.jpg").write_bytes(jpeg_bytes(photo(5, (32, 32))))
    second = scan(listing, "http://x", out, transport=_server())
    assert second["already_done"] == 1 and second["checked"] == 1 and second["allow"] == 1


@pytest.mark.parametrize("url", ["localhost:3000", "ftp://host/", "http://", "/v1/check"])
def test_an_address_no_request_can_reach_stops_before_anything_is_written(tmp_path, url):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "new" / "scan.jsonl"
    with pytest.raises(ValueError, match="not an http"):
        scan(folder, url, out, transport=_server())
    assert not out.parent.exists()
    with pytest.raises(ValueError, match="is a folder"):
        scan(folder, "http://x", tmp_path, transport=_server())
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "nowhere", "http://x", out, transport=_server())
    assert not out.parent.exists()


def test_two_scans_on_the_same_out_do_not_both_write(tmp_path):
    from serving.client import scan

    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    with open(tmp_path / "scan.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running scan holds
        with pytest.raises(ValueError, match="another scan"):
            scan(folder, "http://x", out, transport=_server())
    assert not out.exists()
    assert scan(folder, "http://x", out, transport=_server())["checked"] == 1  # a dead holder leaves no lock


def test_retry_after_is_honoured(tmp_path, monkeypatch):
    import serving.client as client_module

    slept = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    answers = iter([httpx.Response(503, json={"error": {"code": "overloaded", "message": "busy"}},
                                   headers={"Retry-After": "7"}), httpx.Response(200, json=DECISION)])
    transport = httpx.MockTransport(lambda request: next(answers))
    folder, out = _folder(tmp_path, 1), tmp_path / "scan.jsonl"
    result = client_module.scan(folder, "http://x", out, backoff=0.001, transport=transport)
    assert result["allow"] == 1 and slept and slept[0] >= 7


# --- 3, 14: ingest -------------------------------------------------------------------------------------------------

def _labels(tmp_path: Path, rows: list[tuple[str, str]], encoding="utf-8", extra: dict | None = None) -> Path:
    images = tmp_path / "incoming"
    images.mkdir(exist_ok=True)
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", *(extra or {})])
        for i, (name, label) in enumerate(rows):
            if not (images / name).exists():
                (images / name).write_bytes(jpeg_bytes(photo(40 + i * 7, (64, 64))))
            writer.writerow([f"incoming/{name}", label, *(extra or {}).values()])
    return labels_csv


@pytest.mark.parametrize("label", ["../../../x", "../test/ivory", "..", ".", "a/b/c", "=1+1", "x" * 300,
                                   "../manifest.csv", ".hidden"])
def test_ingest_refuses_unsafe_labels_before_copying_anything(tmp_path, label):
    from training.data.ingest import ingest

    root = tmp_path / "data"
    labels_csv = _labels(tmp_path, [("good.jpg", "ivory"), ("bad.jpg", label)])
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9\]"):
        ingest(labels_csv, root)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "incoming" not in p.parts and p != labels_csv]
    assert written == [], written


def test_ingest_extension_follows_the_decoded_format(tmp_path):
    from training.data.ingest import ingest

    root = tmp_path / "data"
    images = tmp_path / "incoming"
    images.mkdir()
    photo(3, (64, 64)).save(images / "really_a_png.jpg", "PNG")
    labels_csv = _labels(tmp_path, [("really_a_png.jpg", "ivory")])
    report = ingest(labels_csv, root)
    assert report["added"][0]["to"].endswith(".png") and (root / report["added"][0]["to"]).is_file()


def test_ingest_reads_excel_bom_and_neutralises_formulas(tmp_path):
    from training.data.ingest import ingest

    root = tmp_path / "data"
    labels_csv = _labels(tmp_path, [("a.jpg", "ivory")], encoding="utf-8-sig",
                         extra={"source": "=HYPERLINK(\"http://evil\")", "listing_id": "+123", "labeled_by": "@me"})
    report = ingest(labels_csv, root)
    assert len(report["added"]) == 1
    with (root / "manifest.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["source"].startswith("'=") and row["listing_id"] == "'+123" and row["labeled_by"] == "'@me"
    assert row["label"] == "ivory"
    assert os.path.commonpath([root.resolve(), (root / row["path"]).resolve()]) == str(root.resolve())


# --- ingest into a dataset whose manifest.csv is plain path,label,split --------------------------------------------

def _plain_manifest_dataset(tmp_path: Path) -> Path:
    """The README's manifest format, no sha256/phash columns, plus a column of the team's own (notes)."""
    root = tmp_path / "data"
    for label in ("ivory", "other"):
        (root / "train" / label).mkdir(parents=True)
    photo(40, (200, 200)).save(root / "train" / "ivory" / "x.jpg", quality=95)
    photo(41, (200, 200)).save(root / "train" / "other" / "y.jpg", quality=95)
    (root / "manifest.csv").write_text("path,label,split,notes\ntrain/ivory/x.jpg,ivory,train,seized 2021\n"
                                       "train/other/y.jpg,other,train,\n")
    return root


def test_ingest_sees_conflicts_and_duplicates_in_a_plain_manifest(tmp_path):
    """Before, only the manifest's sha256/phash columns were searched: a copy of x.jpg labelled `other` was added."""
    from training.cli import app
    from training.data.ingest import IngestConflict, ingest

    root = _plain_manifest_dataset(tmp_path)
    before = (root / "manifest.csv").read_text()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "dup.jpg").write_bytes((root / "train" / "ivory" / "x.jpg").read_bytes())
    conflict_csv = tmp_path / "conflict.csv"
    conflict_csv.write_text("path,label\nincoming/dup.jpg,other\n")
    with pytest.raises(IngestConflict, match="train/ivory/x.jpg labelled 'ivory'"):
        ingest(conflict_csv, root)
    result = CliRunner().invoke(app, ["data", "ingest", str(conflict_csv), "--into", str(root)])
    assert result.exit_code == 1 and "conflicts 1" in result.output
    assert (root / "manifest.csv").read_text() == before and len(list(root.rglob("*.jpg"))) == 2

    photo(41, (200, 200)).resize((150, 150)).save(incoming / "y_small.jpg", quality=70)  # same picture, other bytes
    (incoming / "new.jpg").write_bytes(jpeg_bytes(photo(77, (64, 64))))
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,label\nincoming/dup.jpg,ivory\nincoming/y_small.jpg,other\nincoming/new.jpg,other\n")
    report = ingest(labels_csv, root)
    assert [d["same_as"] for d in report["duplicates"]] == ["train/ivory/x.jpg"]
    assert [d["same_as"] for d in report["near_duplicates"]] == ["train/other/y.jpg"]
    assert len(report["added"]) == 1 and report["dataset_unreadable"] == []
    with (root / "manifest.csv").open(newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["train/ivory/x.jpg"]["notes"] == "seized 2021"  # the manifest's own column survives the rewrite
    assert len(rows["train/ivory/x.jpg"]["sha256"]) == 64 and len(rows["train/other/y.jpg"]["phash"]) == 16


def test_ingest_reports_dataset_images_it_cannot_hash(tmp_path):
    """A broken or missing image already in the dataset is named in the report; the ingest still goes ahead."""
    from training.data.ingest import format_ingest, ingest

    root = _plain_manifest_dataset(tmp_path)
    (root / "train" / "other" / "broken.jpg").write_bytes(b"not a jpeg")
    with (root / "manifest.csv").open("a") as fh:
        fh.write("train/other/broken.jpg,other,train,\ntrain/other/gone.jpg,other,train,\n")
    report = ingest(_labels(tmp_path, [("a.jpg", "ivory")]), root)
    assert len(report["added"]) == 1
    assert [(u["where"], Path(u["path"]).name) for u in report["dataset_unreadable"]] == [
        ("manifest.csv line 4", "broken.jpg"), ("manifest.csv line 5", "gone.jpg")]
    text = format_ingest(report)
    assert "DATASET IMAGES UNREADABLE: 2" in text and "gone.jpg" in text and "wildcheck data check" in text
    with (root / "manifest.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5  # nothing lost: the broken rows stay, for data check to name
