"""``wildcheck scan``: check a folder or CSV of images against a running server, over HTTP only.

Results are appended to a JSONL file as they arrive, one line per image, so an interrupted scan resumes
where it stopped (images with a final answer in the file are skipped; transient failures are retried).
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
from collections import Counter
from pathlib import Path

import httpx
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
RETRY_STATUSES = {429, 500, 502, 503, 504}


def list_images(source: str | Path) -> list[Path]:
    """Images under a folder (recursively) or the ``path`` column of a CSV."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{source}: the CSV needs a 'path' column")
            return [p if p.is_absolute() else source.parent / p for p in (Path(r["path"]) for r in reader)]
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"{source} is neither a folder nor a CSV file")


def done_paths(out: Path) -> set[str]:
    """Paths that already have a final answer (a result or a client error) in ``out``."""
    done = set()
    if not out.exists():
        return done
    with out.open() as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the image is checked again
            if not row.get("retryable"):
                done.add(row["path"])
    return done


async def _check_one(client: httpx.AsyncClient, url: str, path: Path, retries: int, backoff: float) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"path": str(path), "error": {"code": "unreadable", "message": str(exc)}}
    attempt = 0
    while True:
        try:
            r = await client.post(url, files={"image": (path.name, data, "application/octet-stream")})
            if r.status_code not in RETRY_STATUSES:
                try:
                    body = r.json()
                except ValueError:
                    body = {"error": {"code": "bad_response", "message": r.text[:200]}}
                return {"path": str(path), "status": r.status_code, **body}
            reason = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > retries:
            return {"path": str(path), "retryable": True, "error": {"code": "unavailable", "message": reason}}
        await asyncio.sleep(backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))


async def _scan(paths: list[Path], url: str, out: Path, concurrency: int, api_key: str | None, retries: int,
                backoff: float) -> Counter:
    headers = {"X-API-Key": api_key} if api_key else {}
    counts: Counter = Counter()
    queue: asyncio.Queue = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with out.open("a") as fh, tqdm(total=len(paths), desc="scanning", unit="img") as bar:
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
            async def worker():
                while not queue.empty():
                    path = queue.get_nowait()
                    row = await _check_one(client, url, path, retries, backoff)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    counts[row.get("decision") or ("retry later" if row.get("retryable") else "error")] += 1
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def scan(source: str | Path, url: str, out: str | Path, concurrency: int = 8, api_key: str | None = None,
         retries: int = 5, backoff: float = 0.5) -> dict:
    """Check every image not yet answered in ``out``; returns counts of decisions/errors for this run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    url = url.rstrip("/")
    if not url.endswith("/v1/check"):
        url += "/v1/check"
    paths = list_images(source)
    done = done_paths(out)
    todo = [p for p in paths if str(p) not in done]
    counts = asyncio.run(_scan(todo, url, out, max(1, concurrency), api_key, retries, backoff)) if todo else Counter()
    return {"images": len(paths), "already_done": len(paths) - len(todo), "checked": len(todo), **dict(counts)}
