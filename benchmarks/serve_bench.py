"""Serving benchmark: ours vs a naive baseline vs the in-process ceiling, measured in one run.

    python benchmarks/serve_bench.py --model model.onnx --run RUN_DIR [--seconds 20] [--soak 120]

- ours: `wildcheck serve MODEL.onnx` (bentoml serve, defaults), multipart uploads of ~1000x1000 JPEGs
  (~100 KB) at concurrency 1, 8, 32 for --seconds each; then a --soak run at concurrency 32 with RSS.
- baseline: the same HTTP stack (BentoML + FastAPI, same workers) serving the eager PyTorch checkpoint
  with a full PIL decode and resize, one image per request (benchmarks/naive_service.py).
- ceiling: decode + preprocess + onnxruntime in-process, no HTTP, one process per core.
Prints req/s, p50/p95/p99, error counts, server RSS, and ours/baseline, ours/ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.launch import ServerProcess, free_port  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"


def listing_photos(n: int = 48, side: int = 1000) -> list[bytes]:
    """~1000x1000 JPEGs of ~100 KB: real photos upscaled (or synthetic ones when ../shared is absent)."""
    paths = sorted((SHARED / "met-ivory" / "val").glob("*/*.jpg"))[:: 7][: n // 2]
    paths += sorted((SHARED / "generic-products" / "val").glob("*/*.jpg"))[:: 5][: n - len(paths)]
    images = []
    if paths:
        for p in paths:
            images.append(Image.open(p).convert("RGB"))
    else:
        from training.data.synth import make_image

        images = [make_image(("ivory", "other")[i % 2], i, 512) for i in range(n)]
    out = []
    for img in images:
        scale = side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


_free_port = free_port  # serve_footprint and abuse_bench import it from here


class Server(ServerProcess):
    """A started, ready server (``serving.launch``) whose memory can be read."""

    def __init__(self, argv: list[str], env: dict, port: int, log: Path):
        super().__init__(argv, port, log, env=env, ready_timeout=120)
        self.wait_ready()

    def rss_mb(self) -> float:
        procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 1e6


def multipart(photo: bytes, boundary: str = "wildcheckbenchboundary") -> tuple[bytes, dict]:
    """A multipart/form-data body with one file field ``image``, encoded once so the load generator
    (on the same 2 cores as the server) spends its CPU on sending, not on re-encoding."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    body = head + photo + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def _request(reader, writer, request: bytes) -> int:
    """Send one pre-built HTTP/1.1 request on a keep-alive connection; return the status after reading the body."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    if b"connection: close" in head.lower():
        raise ConnectionResetError("server closed the connection")
    return status


async def _load(base: str, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    """A deliberately light load generator (raw asyncio sockets, requests encoded once): it shares the two
    cores with the server, so every cycle it saves is a cycle the server gets."""
    host, port = base.split("//", 1)[1].split(":")
    latencies, statuses, errors = [], {}, 0
    stop_at = time.perf_counter() + seconds

    async def worker(k: int):
        nonlocal errors
        i, conn = k, None
        while time.perf_counter() < stop_at:
            request = requests[i % len(requests)]
            i += concurrency
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                status = await asyncio.wait_for(_request(*conn, request), timeout=60)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"rps": len(latencies) / wall, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "5xx": sum(v for k, v in statuses.items() if k >= 500),
            "4xx": sum(v for k, v in statuses.items() if 400 <= k < 500), "conn_errors": errors, "ok": len(latencies)}


def load(base: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    host = base.split("//", 1)[1]
    requests = []
    for p in photos:
        body, headers = multipart(p)
        requests.append((f"POST /v1/check HTTP/1.1\r\nHost: {host}\r\nContent-Type: {headers['Content-Type']}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = asyncio.run(_load(base, requests, concurrency, seconds))
    # the load generator shares the 2 cores with the server: report how much of them it took
    result["client_cores"] = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    return result


def _ceiling_worker(model: str, photos: list[bytes], seconds: float, queue) -> None:
    from serving.checker import ImageChecker

    checker = ImageChecker(model, threads=1)
    checker.warm_up()
    n, stop_at, i = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < stop_at:
        checker.check(photos[i % len(photos)], "image/jpeg")
        i += 1
        n += 1
    queue.put(n)


def ceiling(model: str, photos: list[bytes], seconds: float, processes: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(model, photos, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    counts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(counts) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ONNX file (ours)")
    parser.add_argument("--run", required=True, help="run dir or checkpoint (baseline: eager PyTorch)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--soak", type=float, default=120, help="seconds at concurrency 32 (0 to skip)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    # both are checked now: the baseline (--run) starts only after minutes of measuring ours
    if not Path(args.model).is_file():
        parser.error(f"--model {args.model}: no such ONNX file")
    run = Path(args.run)
    if not (run.is_file() or (run / "best.pt").is_file()):
        parser.error(f"--run {args.run}: neither a checkpoint nor a run dir with best.pt")

    photos = listing_photos()
    print(f"{len(photos)} listing photos, mean {np.mean([len(p) for p in photos]) / 1000:.0f} KB, 1000 px long side")
    bin_dir = Path(sys.executable).parent
    home = tempfile.mkdtemp(prefix="serve-bench-")  # BentoML's home and the servers' logs, removed at the end
    # the servers' settings are this benchmark's: a WILDCHECK_API_KEYS left in the shell would make every answer a 401
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    env.update(BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=home, WILDCHECK_WORKERS=str(args.workers))
    try:
        return measure(args, photos, bin_dir, env, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def measure(args, photos: list[bytes], bin_dir: Path, env: dict, home: str) -> int:
    rows = {}

    port = _free_port()
    ours = Server([str(bin_dir / "wildcheck"), "serve", args.model, "--port", str(port), "--host", "127.0.0.1"], env, port,
                  Path(home) / "ours.log")
    try:
        for c in (1, 8, 32):
            rows[f"ours c={c}"] = load(ours.base, photos, c, args.seconds)
        if args.soak:
            rss0 = ours.rss_mb()
            rows["ours soak c=32"] = load(ours.base, photos, 32, args.soak)
            rss1 = ours.rss_mb()
            rows["ours soak c=32"]["rss"] = (rss0, rss1)
    finally:
        ours.stop()

    port = _free_port()
    naive_env = dict(env, WILDCHECK_CHECKPOINT=str(Path(args.run).resolve()))
    naive = Server([str(bin_dir / "bentoml"), "serve", "benchmarks.naive_service:NaiveCheck", "--port", str(port),
                    "--host", "127.0.0.1", "--working-dir", str(REPO)], naive_env, port, Path(home) / "baseline.log")
    try:
        for c in (1, 8):
            rows[f"baseline c={c}"] = load(naive.base, photos, c, args.seconds)
    finally:
        naive.stop()

    ceil_rps = ceiling(args.model, photos, args.seconds, processes=args.workers)

    print("\n| run | req/s | p50 ms | p95 ms | p99 ms | 4xx | 5xx | conn errors | client CPU (cores) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['4xx']} | {r['5xx']} | "
              f"{r['conn_errors']} | {r['client_cores']:.2f} |")
    print(f"| ceiling (in-process, {args.workers} procs x 1 thread) | {ceil_rps:.1f} | | | | | | | |")
    o8 = rows["ours c=8"]["rps"]
    print(f"\nours/baseline at c=8: {o8 / rows['baseline c=8']['rps']:.2f}x")
    print(f"ours/ceiling at c=8: {o8 / ceil_rps:.2%}")
    if "ours soak c=32" in rows:
        r0, r1 = rows["ours soak c=32"]["rss"]
        print(f"server RSS during soak: {r0:.0f} MB -> {r1:.0f} MB ({(r1 - r0) / r0:+.1%})")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
