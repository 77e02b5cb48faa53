"""``wildcheck scan``: check a folder or CSV of images against a running server, over HTTP only.

Results are appended to a JSONL file as they arrive, one line per image, so an interrupted scan resumes
where it stopped (images with a final answer in the file are skipped; transient failures are retried).
A final answer is a decision, or the server's JSON error about that image (e.g. ``corrupt``). A wrong key
or URL (401/403/404/405) stops the whole run before anything is recorded: otherwise every image would be
"done" with an error and a rerun with the right key would check nothing.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
from collections import Counter
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from serving.csvio import read_rows
from serving.errors import InvalidInput, MissingInput, WildcheckError
from serving.imageio import images_under
from serving.locking import exclusive

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
# errors about the request, not the image: the same image sent again is answered
RETRY_CODES = {"body_timeout", "disconnected"}
# the listed path is no file: final (a rerun checks it again once a file is there)
NOT_FOUND_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR}
FATAL_STATUSES = {401: "the API key was refused (--api-key / WILDCHECK_API_KEY)",
                  403: "the API key is not allowed to check images",
                  404: "no check endpoint at this URL (give the server's base URL, e.g. http://host:3000)",
                  405: "this URL does not accept image uploads (give the server's base URL)"}
MAX_RETRY_AFTER_S = 60.0


class ScanStopped(WildcheckError, RuntimeError):
    """The server's answer means no image can be checked with these settings; nothing was recorded for it."""


def list_images(source: str | Path) -> list[Path]:
    """Images under a folder (recursively) or the ``path`` column of a CSV."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        rows, _ = read_rows(source, {"path"}, "the CSV needs a 'path' column")
        return [p if p.is_absolute() else source.parent / p for p in (Path(r["path"]) for r in rows if r["path"])]
    if source.is_dir():
        return images_under(source)
    raise MissingInput(f"{source} is neither a folder nor a CSV file")


def resume_key(path: str | Path) -> str:
    """The same file however its path was typed (photos/a.jpg, ./photos/a.jpg, /abs/photos/a.jpg)."""
    return str(Path(path).resolve())


def read_done(out: Path) -> tuple[set[str], int]:
    """Resume keys with a final answer in ``out``, and how many lines were not result objects (skipped)."""
    done, bad = set(), 0
    if not out.exists():
        return done, bad
    with out.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None  # a line cut by a crash: its image is checked again
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                bad += 1
                continue
            if _answered(row):
                done.add(resume_key(row["path"]))
    return done, bad


def _answered(row: dict) -> bool:
    """A decision or a final error; a row with only a path (a hand edit) is not an answer. A missing file's
    ``not_found`` counts until a file is there."""
    if row.get("retryable"):
        return False
    if row.get("decision") in ("block", "review", "allow"):
        return True
    error = row.get("error")
    if not (isinstance(error, dict) and isinstance(error.get("code"), str)):
        return False
    return error["code"] != "not_found" or not os.path.isfile(row["path"])


def done_paths(out: Path) -> set[str]:
    """Resume keys that already have a final answer (a result or a client error) in ``out``."""
    return read_done(out)[0]


def _final(status: int, body) -> bool:
    """A decision, or our JSON error about this image; anything else (a proxy's HTML page...) is not final."""
    if not isinstance(body, dict):
        return False
    if status == 200:
        return body.get("decision") in ("block", "review", "allow")
    error = body.get("error")
    return (400 <= status < 500 and isinstance(error, dict) and isinstance(error.get("code"), str)
            and error["code"] not in RETRY_CODES)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return None


async def _check_one(client: httpx.AsyncClient, url: str, path: Path, retries: int, backoff: float) -> dict:
    key = resume_key(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        if exc.errno in NOT_FOUND_ERRNOS:  # final, so a run ends; a rerun checks it again once a file is there
            return {"path": key, "error": {"code": "not_found", "message": f"no file at {key}: {exc.strerror}"}}
        # not an answer about the image: a file not yet readable (permissions, a share that dropped)
        return {"path": key, "retryable": True, "error": {"code": "unreadable", "message": str(exc)}}
    # the server never reads the name; a file name that is not UTF-8 could not go into the multipart header
    upload_name = "image" + "".join(c for c in path.suffix if c.isascii())
    attempt = 0
    while True:
        wait = None
        try:
            r = await client.post(url, files={"image": (upload_name, data, "application/octet-stream")})
            if r.status_code in FATAL_STATUSES:
                raise ScanStopped(f"{url} answered {r.status_code}: {FATAL_STATUSES[r.status_code]}. Nothing was "
                                  "recorded for it; fix the option and run the same command again.")
            try:
                body = r.json()
            except ValueError:
                body = None
            if r.status_code not in RETRY_STATUSES and _final(r.status_code, body):
                return {**body, "path": key, "status": r.status_code}  # our fields win over the server's
            reason = f"HTTP {r.status_code}" + ("" if body is not None else f" (not JSON: {r.text[:80]!r})")
            wait = _retry_after(r)
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > retries:
            return {"path": key, "retryable": True, "error": {"code": "unavailable", "message": reason}}
        delay = backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
        await asyncio.sleep(max(delay, wait or 0.0))  # the server's Retry-After is a lower bound


async def _scan(paths: list[Path], url: str, out: Path, concurrency: int, api_key: str | None, retries: int,
                backoff: float, transport: httpx.AsyncBaseTransport | None = None) -> Counter:
    headers = {"X-API-Key": api_key} if api_key else {}
    counts: Counter = Counter()
    queue: asyncio.Queue = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with out.open("a", encoding="utf-8") as fh, tqdm(total=len(paths), desc="scanning", unit="img") as bar:
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60, transport=transport) as client:
            async def worker():
                while not queue.empty():
                    path = queue.get_nowait()
                    try:
                        row = await _check_one(client, url, path, retries, backoff)
                    except (ScanStopped, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # one bad file never sinks the run: its row says why, the next run retries
                        row = {"path": resume_key(path), "retryable": True,
                               "error": {"code": "client_error", "message": f"{type(exc).__name__}: {exc}"}}
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    counts[row.get("decision") or ("retry later" if row.get("retryable") else "error")] += 1
                    bar.update()

            try:
                async with asyncio.TaskGroup() as group:  # one ScanStopped cancels the other workers
                    for _ in range(concurrency):
                        group.create_task(worker())
            except BaseExceptionGroup as failures:
                stopped = [e for e in failures.exceptions if isinstance(e, ScanStopped)]
                if stopped:
                    raise stopped[0] from None
                raise
    return counts


def check_url(url: str) -> str:
    """The server's check endpoint for ``url``; an address no request could reach stops the scan up front
    (otherwise every image would be retried, then left for a rerun that fails the same way)."""
    try:
        parsed = httpx.URL(url) if "://" in url else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput(f"--url {url!r} is not an http(s) address; give the server's base URL, "
                           "e.g. http://127.0.0.1:3000")
    url = url.rstrip("/")
    return url if url.endswith("/v1/check") else url + "/v1/check"


def _end_with_newline(out: Path) -> None:
    """A last line cut by a crash or a full disk must not swallow the next row."""
    if out.exists() and out.stat().st_size:
        with out.open("rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def scan(source: str | Path, url: str, out: str | Path, concurrency: int = 8, api_key: str | None = None,
         retries: int = 5, backoff: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Check every image not yet answered in ``out``; returns counts of decisions/errors for this run.

    Raises ScanStopped on 401/403/404/405 and ValueError when another scan is writing the same ``out``.
    """
    out = Path(out)
    url = check_url(url)
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise InvalidInput("the API key has characters outside printable ASCII, which an HTTP header cannot carry; "
                           "check --api-key / WILDCHECK_API_KEY")
    listed = list_images(source)
    unique: dict[str, Path] = {}
    for p in listed:  # a file listed twice (however typed) is sent once
        unique.setdefault(resume_key(p), p)
    paths = list(unique.values())
    _check_out(out, source, set(unique))
    with exclusive(out, "scan", "wait for it to finish or use another --out"):
        _end_with_newline(out)
        done, bad_lines = read_done(out)
        todo = [p for p in paths if resume_key(p) not in done]
        counts = asyncio.run(_scan(todo, url, out, max(1, concurrency), api_key, retries, backoff, transport)) \
            if todo else Counter()
    summary = {"images": len(paths), "already_done": len(paths) - len(todo), "checked": len(todo), **dict(counts)}
    if len(listed) > len(paths):
        summary["listed_twice"] = len(listed) - len(paths)
    if bad_lines:
        summary["skipped_lines"] = bad_lines  # lines of `out` that were not result objects
    return summary


def _check_out(out: Path, source: str | Path, keys: set[str]) -> None:
    """``out`` is appended to: it must not be one of the inputs, nor a file of anything but results, and must be
    writable, before any image is sent."""
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a folder; give the JSONL file to write, e.g. {out / 'scan.jsonl'}")
    key = resume_key(out)
    if key in keys or (Path(source).is_file() and key == resume_key(source)):
        raise InvalidInput(f"--out {out} is one of the scan's inputs (the CSV or a listed image); results would be "
                           "appended to it: give a new file, e.g. scan.jsonl")
    if out.exists() and not _looks_like_results(out):
        raise InvalidInput(f"--out {out} exists and is not a JSON lines file of scan results; nothing was written "
                           "to it: give a new file (or the .jsonl of an earlier scan to resume it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidInput(f"--out {out}: a part of its folder is a file, not a folder ({exc.filename}); "
                           "give a path in a folder") from exc
    except OSError as exc:
        raise InvalidInput(f"--out {out}: its folder cannot be made ({exc.strerror}); give a writable path") from exc
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise InvalidInput(f"--out {out} is not writable (permissions); give a writable path")


def _looks_like_results(out: Path) -> bool:
    """The first non-empty line is JSON (or the start of an object a crash cut short): not a photo or a CSV."""
    try:
        with out.open("rb") as fh:
            for raw in iter(lambda: fh.readline(1 << 20), b""):  # bounded: a photo may have no newline at all
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b"{"):
                    return True
                try:
                    json.loads(line)
                except ValueError:  # UnicodeDecodeError included
                    return False
                return True
    except OSError:
        return False
    return True
