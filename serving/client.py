"""``wildcheck scan``: check a folder or CSV of images against a running server, over HTTP only.

Results are appended to a JSONL file as they arrive, one line per image, so an interrupted scan resumes
where it stopped (images with a final answer in the file are skipped; transient failures are retried).
A final answer is a decision, or the server's JSON error about that image (e.g. ``corrupt``), or ``too_large``: a
file over ``max_bytes`` (the server's default body limit) is neither read nor sent, so a stray video among the
photos never costs ``concurrency`` x its size in memory. A wrong key or URL (401/403/404/405, or a redirect)
stops the whole run before anything is recorded: otherwise every image would be "done" with an error and a rerun
with the right key would check nothing. A server that stops answering
(every image of a run of ``2 x concurrency`` in a row out of retries) stops the run too: the images not yet sent
are left for the rerun rather than each waiting through its retries (hours for a large list).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from serving.csvio import read_rows
from serving.errors import InvalidInput, MissingInput, WildcheckError
from serving.imageio import images_under
from serving.locking import exclusive
from serving.settings import Settings

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
# errors about the request, not the image: the same image sent again is answered
RETRY_CODES = {"body_timeout", "disconnected"}
# the listed path is no file: final (a rerun checks it again once a file is there); ELOOP: links in a circle
NOT_FOUND_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP}
FATAL_STATUSES = {401: "the API key was refused (--api-key / WILDCHECK_API_KEY)",
                  403: "the API key is not allowed to check images",
                  404: "no check endpoint at this URL (give the server's base URL, e.g. http://host:3000)",
                  405: "this URL does not accept image uploads (give the server's base URL)"}
MAX_RETRY_AFTER_S = 60.0
MIN_UNREACHABLE_STREAK = 4  # images in a row out of retries that stop a run (at least 2 x concurrency)
# the service's default body limit: a larger file would be answered 413, so it is not read (nor held in memory)
DEFAULT_MAX_BYTES = Settings.max_body_bytes


class ScanStopped(WildcheckError, RuntimeError):
    """The run cannot go on with these settings: the server's answer means no image can be checked (a wrong key or
    URL, a redirect; nothing was recorded for it), or ``--out`` cannot be written (the rows so far are kept)."""


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
    """The same file however its path was typed (photos/a.jpg, ./photos/a.jpg, /abs/photos/a.jpg). Links in a
    circle (a.jpg -> b.jpg -> a.jpg) resolve to nothing: their absolute path (reading them is a ``not_found``)."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a symlink loop
        return os.path.abspath(path)


def shown_url(url: str) -> str:
    """``url`` for a message: a password in it (http://user:pw@host) is not printed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    return str(parsed.copy_with(username=parsed.username, password="***")) if parsed.password else url


def read_done(out: Path, max_bytes: int | None = None) -> tuple[set[str], int]:
    """Resume keys with a final answer in ``out``, and how many lines were not result objects (skipped).
    With ``max_bytes`` (the run's limit), a ``too_large`` file that now fits is not done: it is checked again."""
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
            if _answered(row, max_bytes):
                done.add(resume_key(row["path"]))
    return done, bad


def _answered(row: dict, max_bytes: int | None = None) -> bool:
    """A decision or a final error; a row with only a path (a hand edit) is not an answer. A missing file's
    ``not_found`` counts until a file is there; a ``too_large`` one until it fits in ``max_bytes`` (a larger
    --max-bytes, or the file replaced by a smaller one)."""
    if row.get("retryable"):
        return False
    if row.get("decision") in ("block", "review", "allow"):
        return True
    error = row.get("error")
    if not (isinstance(error, dict) and isinstance(error.get("code"), str)):
        return False
    if error["code"] == "too_large" and max_bytes is not None:
        return not _fits(row["path"], max_bytes)
    return error["code"] != "not_found" or not os.path.isfile(row["path"])


def _fits(path: str, max_bytes: int) -> bool:
    try:
        return os.path.getsize(path) <= max_bytes
    except OSError:  # gone: nothing to check again (a file put there later is a new file to the listing)
        return False


def done_paths(out: Path, max_bytes: int | None = None) -> set[str]:
    """Resume keys that already have a final answer (a result or a client error) in ``out``."""
    return read_done(out, max_bytes)[0]


def _final(status: int, body) -> bool:
    """A decision, or our JSON error about this image; anything else (a proxy's HTML page...) is not final."""
    if not isinstance(body, dict):
        return False
    if status == 200:
        return body.get("decision") in ("block", "review", "allow")
    error = body.get("error")
    return (400 <= status < 500 and isinstance(error, dict) and isinstance(error.get("code"), str)
            and error["code"] not in RETRY_CODES)


def _refused_by_another(status: int, body) -> bool:
    """A 4xx that is not the service's JSON error (a proxy's 413 page for a photo over its 1 MB default): retrying
    it only waits through the backoff, ~15 s per image; the rerun tries again once the proxy is fixed."""
    ours = isinstance(body, dict) and isinstance(body.get("error"), dict)
    return 400 <= status < 500 and status not in RETRY_STATUSES and not ours


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return None


def _too_large(key: str, size: int, max_bytes: int) -> dict:
    return {"path": key, "error": {"code": "too_large", "message": (
        f"{size} bytes, over --max-bytes {max_bytes}: not read nor sent (the server refuses bodies over its limit, "
        f"WILDCHECK_MAX_BODY_BYTES, {DEFAULT_MAX_BYTES} by default). A listing photo is a few MB: if this is no "
        "image (a video, a disk image), remove it from the list; if the server takes larger bodies, run again with "
        "a larger --max-bytes to check it")}}


def _read_at_most(path: Path, size: int, max_bytes: int) -> tuple[bytes | None, int]:
    """The file's bytes (None when it holds more than ``max_bytes``) and its size: a file still being copied in may
    have grown since its stat (``size``), and is never read past ``max_bytes + 1``."""
    with path.open("rb") as fh:
        data = fh.read(size + 1)  # not read(max_bytes + 1): that would allocate max_bytes for every small photo
        if len(data) > size:  # it grew
            data += fh.read(max_bytes + 1 - len(data))
        if len(data) > max_bytes:
            return None, max(os.fstat(fh.fileno()).st_size, len(data))
    return data, len(data)


async def _check_one(client: httpx.AsyncClient, url: str, path: Path, retries: int, backoff: float,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    key = resume_key(path)
    try:
        info = os.stat(path)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):  # /dev/zero would be read until memory ran out, a named pipe hang the run
            return {"path": key, "error": {"code": "not_a_file", "message": f"{key} is not a regular file (a device, "
                                           "pipe or socket); list image files only"}}
        if info.st_size > max_bytes:  # not read: --concurrency such files would be held at once, to get 413s
            return _too_large(key, info.st_size, max_bytes)
        data, size = _read_at_most(path, info.st_size, max_bytes)
        if data is None:
            return _too_large(key, size, max_bytes)
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
                raise ScanStopped(f"{shown_url(url)} answered {r.status_code}: {FATAL_STATUSES[r.status_code]}. "
                                  "Nothing was recorded for it; fix the option and run the same command again.")
            if 300 <= r.status_code < 400:  # not followed: the API key would go along to wherever it points
                target = shown_url(r.headers.get("location", "")) or "nowhere (no Location)"
                raise ScanStopped(f"{shown_url(url)} answered {r.status_code}, a redirect to {target}: give the "
                                  "server's own base URL as --url (e.g. https:// instead of http://). Nothing was "
                                  "recorded for it; run the command again with it.")
            try:
                body = r.json()
            except ValueError:
                body = None
            if r.status_code not in RETRY_STATUSES and _final(r.status_code, body):
                return {**body, "path": key, "status": r.status_code}  # our fields win over the server's
            if _refused_by_another(r.status_code, body):  # the same bytes sent again get the same page
                return {"path": key, "retryable": True, "status": r.status_code, "error": {"code": "refused", "message":
                        f"HTTP {r.status_code} that is not the service's answer (a proxy in front of it?): "
                        f"{r.text[:80]!r}; not retried in this run: fix what refused it (e.g. nginx "
                        "client_max_body_size for 413), then run the same command again"}}
            reason = f"HTTP {r.status_code}" + ("" if body is not None else f" (not JSON: {r.text[:80]!r})")
            wait = _retry_after(r)
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > retries:
            return {"path": key, "retryable": True, "error": {"code": "unavailable", "message": reason}}
        delay = backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
        await asyncio.sleep(max(delay, wait or 0.0))  # the server's Retry-After is a lower bound


class _Run:
    """What the workers of one run share: the counts, and why the run stopped early (the server stopped answering)."""

    def __init__(self, url: str, concurrency: int):
        self.counts: Counter = Counter()
        self.stop_after = max(MIN_UNREACHABLE_STREAK, 2 * concurrency)
        self.streak = 0  # images in a row that ran out of retries (server unreachable, 5xx, not the service)
        self.url = url
        self.stopped: str | None = None

    def record(self, row: dict) -> None:
        self.counts[row.get("decision") or ("retry later" if row.get("retryable") else "error")] += 1
        error = row.get("error") if isinstance(row.get("error"), dict) else {}
        if error.get("code") == "unavailable":
            self.streak += 1
            if self.streak >= self.stop_after and self.stopped is None:
                self.stopped = (f"{shown_url(self.url)} answered none of {self.streak} images in a row, each after "
                                f"its retries (last: {error.get('message', '')})")
        elif "status" in row:  # the server answered (files that could not be read locally say nothing of it)
            self.streak = 0


async def _scan(paths: list[Path], url: str, out: Path, concurrency: int, api_key: str | None, retries: int,
                backoff: float, transport: httpx.AsyncBaseTransport | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Counter, int, str | None]:
    """Counts of this run's rows, how many images were not sent (the run stopped early) and why."""
    headers = {"X-API-Key": api_key} if api_key else {}
    run = _Run(url, concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        fh = out.open("ab", buffering=0)  # unbuffered: a write that failed is not tried again at close
    except OSError as exc:
        raise ScanStopped(f"--out {out} cannot be written ({exc.strerror}); give a writable file") from None
    with fh, tqdm(total=len(paths), desc="scanning", unit="img") as bar:
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60, transport=transport) as client:
            async def worker():
                while not queue.empty() and run.stopped is None:
                    path = queue.get_nowait()
                    try:
                        row = await _check_one(client, url, path, retries, backoff, max_bytes)
                    except (ScanStopped, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # one bad file never sinks the run: its row says why, the next run retries
                        row = {"path": resume_key(path), "retryable": True,
                               "error": {"code": "client_error", "message": f"{type(exc).__name__}: {exc}"}}
                    if api_key and not row.get("status"):  # a message of ours (an httpx error) never quotes the key
                        row["error"]["message"] = row["error"]["message"].replace(api_key, "***")
                    try:
                        _write_all(fh, (json.dumps(row) + "\n").encode())
                    except OSError as exc:  # a full disk: a cut line is skipped on the rerun, which resumes here
                        raise ScanStopped(f"writing to --out {out} failed ({exc.strerror}); the results so far are "
                                          "kept: free space (or give another --out) and run the same command again "
                                          "to check the rest") from None
                    run.record(row)
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
    return run.counts, queue.qsize(), run.stopped


def _write_all(fh, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


def check_url(url: str) -> str:
    """The server's check endpoint for ``url``; an address no request could reach stops the scan up front
    (otherwise every image would be retried, then left for a rerun that fails the same way)."""
    try:
        parsed = httpx.URL(url) if "://" in url else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput(f"--url {shown_url(url)!r} is not an http(s) address; give the server's base URL, "
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
         retries: int = 5, backoff: float = 0.5, transport: httpx.AsyncBaseTransport | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Check every image not yet answered in ``out``; returns counts of decisions/errors for this run.

    A file over ``max_bytes`` is not read: it gets a final ``too_large`` error (checked again by a run whose
    ``max_bytes`` it fits), so the run holds at most ``concurrency x max_bytes`` of images at once.

    Raises ScanStopped on 401/403/404/405, a redirect or a failed write to ``out``, and ValueError when another
    scan is writing the same ``out``. When the server stops answering, the run ends early: ``stopped`` says why and
    ``not_sent`` counts the images left for the rerun.
    """
    out = Path(out)
    url = check_url(url)
    if max_bytes < 1:
        raise InvalidInput(f"--max-bytes {max_bytes}: give the largest file to send, in bytes (at least 1; the "
                           f"server's default limit is {DEFAULT_MAX_BYTES})")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise InvalidInput("the API key has characters outside printable ASCII, which an HTTP header cannot carry; "
                           "check --api-key / WILDCHECK_API_KEY")
    if api_key is not None and api_key != api_key.strip():  # httpx refused every request, quoting the key
        raise InvalidInput("the API key starts or ends with a space, which an HTTP header cannot carry; "
                           "check --api-key / WILDCHECK_API_KEY (a key read from a file keeps its spaces)")
    listed = list_images(source)
    unique: dict[str, Path] = {}
    for p in listed:  # a file listed twice (however typed) is sent once
        unique.setdefault(resume_key(p), p)
    paths = list(unique.values())
    _check_out(out, source, set(unique))
    # the lock beside the file itself: a link to it (or another spelling of its path) is the same results file
    with exclusive(Path(resume_key(out)), "scan", "wait for it to finish or use another --out"):
        _end_with_newline(out)
        done, bad_lines = read_done(out, max_bytes)
        todo = [p for p in paths if resume_key(p) not in done]
        counts, not_sent, stopped = _run(_scan(todo, url, out, max(1, concurrency), api_key, retries, backoff,
                                                transport, max_bytes)) if todo else (Counter(), 0, None)
    summary = {"images": len(paths), "already_done": len(paths) - len(todo), "checked": len(todo) - not_sent,
               **dict(counts)}
    if stopped and not_sent:  # the rest is not recorded: the rerun sends it
        summary["not_sent"] = not_sent
        summary["stopped"] = stopped
    if len(listed) > len(paths):
        summary["listed_twice"] = len(listed) - len(paths)
    if bad_lines:
        summary["skipped_lines"] = bad_lines  # lines of `out` that were not result objects
    return summary


def _run(coro):
    """``asyncio.run``, also when called from a running event loop (a Jupyter notebook), where it cannot start one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:  # its own loop, in a thread; the caller waits as it would
        return pool.submit(asyncio.run, coro).result()


def _check_out(out: Path, source: str | Path, keys: set[str]) -> None:
    """``out`` is appended to: it must not be one of the inputs, nor a file of anything but results, and must be
    writable, before any image is sent."""
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a folder; give the JSONL file to write, e.g. {out / 'scan.jsonl'}")
    if out.exists() and not out.is_file():  # /dev/stdout piped: reading it back (to resume) waited for ever
        raise InvalidInput(f"--out {out} is not a regular file (a device, pipe or socket): the results are appended "
                           "to a file and read back to resume; give a file, e.g. scan.jsonl")
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
