"""Serving footprint: install size, time from `wildcheck serve` to ready, resident memory per worker.

    python benchmarks/serve_footprint.py [--model models/wildcheck-ivory.onnx] [--wildcheck VENV/bin/wildcheck]
        [--venv /tmp/venv-serve --venv .venv] [--requests 300] [--rounds 3] [--concurrency 8]

- size: `du -sk` of each --venv (e.g. a serving-only `pip install .` and the full `.[train,test,backbones]`).
- startup: seconds from starting `wildcheck serve MODEL` (the given executable, default this interpreter's)
  to the first 200 from /readyz (all workers loaded and warmed up).
- memory: RSS of the supervisor and of each worker process at idle (ready + 3 s), after each of --rounds
  rounds of --requests multipart uploads of ~1000x1000 JPEGs (like listing photos) sent at --concurrency
  (growth from round to round would be a leak), the peak of each worker, and idle again after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_bench import _free_port, listing_photos  # noqa: E402
from serving.launch import ServerNotReady, ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def du_mb(path: str) -> float:
    return int(subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True).stdout.split()[0]) / 1024


def rss_mb(proc: psutil.Process) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def workers(supervisor: psutil.Process) -> list[psutil.Process]:
    """BentoML's worker processes: the children of the serve process that load the service."""
    return [p for p in supervisor.children(recursive=True) if "multiprocessing" not in " ".join(p.cmdline())]


async def load(base: str, photos: list[bytes], n: int, concurrency: int) -> tuple[int, float]:
    ok = 0
    queue = list(range(n))
    async with httpx.AsyncClient(timeout=60) as client:
        async def one() -> None:
            nonlocal ok
            while queue:
                i = queue.pop()
                r = await client.post(base + "/v1/check", files={"image": ("p.jpg", photos[i % len(photos)], "image/jpeg")})
                ok += r.status_code == 200
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
    return ok, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "wildcheck-ivory.onnx"))
    parser.add_argument("--wildcheck", default=str(Path(sys.executable).parent / "wildcheck"))
    parser.add_argument("--venv", action="append", default=[], help="venv folder to size; repeatable")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="load rounds of --requests each")
    args = parser.parse_args()

    sizes = {v: du_mb(v) for v in args.venv}
    for v, mb in sizes.items():
        print(f"size {v}: {mb:,.0f} MB")
    if len(sizes) == 2:
        (a, sa), (b, sb) = sizes.items()
        print(f"size ratio {a} / {b}: {sa / sb:.1%}")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    home = tempfile.mkdtemp(prefix="footprint-bentoml-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    env.update(BENTOML_HOME=home, BENTOML_DO_NOT_TRACK="true")
    started = time.perf_counter()
    server = ServerProcess([args.wildcheck, "serve", args.model, "--port", str(port), "--host", "127.0.0.1"], port,
                           Path(home) / "server.log", env=env, ready_timeout=180, poll=0.1)
    proc = server.proc
    try:
        try:
            server.wait_ready()
        except ServerNotReady as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"startup: {time.perf_counter() - started:.1f} s from `wildcheck serve` to /readyz 200")
        supervisor = psutil.Process(proc.pid)
        time.sleep(3)
        ws = workers(supervisor)
        print(f"idle: supervisor {rss_mb(supervisor):.0f} MB; workers " + ", ".join(f"{rss_mb(w):.0f}" for w in ws) + " MB")

        peaks = {w.pid: rss_mb(w) for w in ws}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for w in ws:
                    peaks[w.pid] = max(peaks[w.pid], rss_mb(w))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        photos = listing_photos(32)
        ok, seconds = 0, 0.0
        for round_ in range(1, args.rounds + 1):  # RSS after each round: a plateau, or growth (a leak)?
            n_ok, took = asyncio.run(load(base, photos, args.requests, args.concurrency))
            ok, seconds = ok + n_ok, seconds + took
            print(f"after round {round_} ({round_ * args.requests} requests): workers "
                  + ", ".join(f"{rss_mb(w):.0f}" for w in ws) + " MB")
        done.set()
        sampler.join()
        total = args.requests * args.rounds
        print(f"load: {ok}/{total} ok in {seconds:.1f} s ({ok / seconds:.1f} req/s, concurrency "
              f"{args.concurrency}, ~{sum(map(len, photos)) // len(photos) // 1000} KB 1000 px JPEGs)")
        print("under load (peak): workers " + ", ".join(f"{peaks[w.pid]:.0f}" for w in ws) + " MB")
        time.sleep(3)
        print("idle after load: workers " + ", ".join(f"{rss_mb(w):.0f}" for w in ws) + " MB")
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)  # BentoML's home and the server log (a failed start printed its tail)
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
