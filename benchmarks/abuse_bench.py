"""Replay issue 19's worst cases against a real `bentoml serve` while a well-behaved client sends real photos.

    python benchmarks/abuse_bench.py --model models/wildcheck-ivory.onnx \
        --photos /work/shared/datasets/listings-everyday --seconds 60
    python benchmarks/abuse_bench.py --decode-modes     # peak RSS of the worst image of each PIL mode

Attackers (all at once, for --seconds): 16-bit PNG bombs (6000x6000 greyscale, ~70 KB each) one per request,
batches of them (--batch per request, ~2 MB), slow bodies (headers and a few bytes a second), and a flood of
random paths. The well-behaved client sends one real photo per request from --good-clients connections and,
like `wildcheck scan`, retries 429/503 after Retry-After (at most 3 times). Printed: peak worker RSS, the
client's final success rate and p99 latency (retries included), every status each side got, /metrics size
before/after, and whether /readyz told the truth (503 while the workers answered `overloaded`, 200 after).
Targets (issue 19): worker RSS < 1 GB, >= 95% success, no 500s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.launch import ServerNotReady, ServerProcess, free_port  # noqa: E402


def png16(side: int = 6000) -> bytes:
    """The issue's bomb: a flat 16-bit greyscale PNG under the pixel limit, ~70 KB on the wire."""
    buf = io.BytesIO()
    Image.new("I;16", (side, side)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def start_server(model: Path, port: int, env_extra: dict[str, str], log_path: Path) -> ServerProcess:
    """The server as users start it; its BentoML home sits next to ``log_path`` (one temporary folder to remove)."""
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(log_path.parent / "bentoml"), **env_extra)
    wildcheck = str(Path(sys.executable).parent / "wildcheck")
    server = ServerProcess([wildcheck, "serve", str(model), "--port", str(port), "--host", "127.0.0.1"], port,
                           log_path, env=env, ready_timeout=120)
    try:
        return server.wait_ready()
    except ServerNotReady as exc:
        raise SystemExit(str(exc)) from None


def worker_rss(proc: subprocess.Popen) -> dict[int, int]:
    """RSS of every process under the server (workers are the ones that load the model)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for child in children:
        try:
            out[child.pid] = child.memory_info().rss
        except psutil.Error:
            pass
    return out


class Recorder:
    def __init__(self):
        self.statuses: dict[str, Counter] = {}
        self.latencies: list[float] = []
        self.good_ok = self.good_total = 0
        self.overloaded_at: list[float] = []

    def status(self, who: str, code: int | str) -> None:
        self.statuses.setdefault(who, Counter())[str(code)] += 1


async def good_client(base: str, photos: list[bytes], rec: Recorder, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            data = random.choice(photos)
            started = time.perf_counter()
            ok = False
            for attempt in range(4):
                try:
                    r = await client.post(base + "/v1/check", files={"image": ("p.jpg", data, "image/jpeg")})
                    rec.status("good", r.status_code)
                    if r.status_code == 200:
                        ok = True
                        break
                    if r.status_code == 503:
                        rec.overloaded_at.append(time.time())
                    if r.status_code not in (429, 503) or attempt == 3:
                        break
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                except httpx.HTTPError as exc:
                    rec.status("good", type(exc).__name__)
                    break
            rec.good_total += 1
            rec.good_ok += ok
            if ok:
                rec.latencies.append(time.perf_counter() - started)


async def bomber(base: str, url: str, files, rec: Recorder, who: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=90) as client:
        while not stop.is_set():
            try:
                r = await client.post(base + url, files=files)
                rec.status(who, r.status_code)
                if r.status_code in (429, 503):
                    await asyncio.sleep(0.2)  # an attacker does not wait for Retry-After
            except httpx.HTTPError as exc:
                rec.status(who, type(exc).__name__)


async def slow_body(port: int, rec: Recorder, stop: asyncio.Event) -> None:
    """Declare a 1 MB multipart body and send a few bytes a second."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 1000000\r\n\r\n")
            await writer.drain()
            started = time.monotonic()
            status = "open"
            while not stop.is_set() and time.monotonic() - started < 60:
                writer.write(b"\xff" * 10)
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), 1.0)
                    if line:
                        status = line.split()[1].decode()
                        break
                except asyncio.TimeoutError:
                    continue
            rec.status("slow_body", status)
            writer.close()
        except (OSError, IndexError) as exc:
            rec.status("slow_body", type(exc).__name__)
            await asyncio.sleep(0.5)


async def path_flood(base: str, rec: Recorder, stop: asyncio.Event, total: int) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(total):
            if stop.is_set():
                break
            path = "/v1/" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12)) if i % 2 \
                else "/" + str(random.getrandbits(64))
            try:
                r = await client.get(base + path)
                rec.status("path_flood", r.status_code)
            except httpx.HTTPError as exc:
                rec.status("path_flood", type(exc).__name__)


async def readyz_probe(base: str, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                samples.append((time.time(), (await client.get(base + "/readyz")).status_code))
            except httpx.HTTPError:
                samples.append((time.time(), 0))
            await asyncio.sleep(0.25)


def memory_probe(proc, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for pid, rss in worker_rss(proc).items():
            peak[pid] = max(peak.get(pid, 0), rss)
        time.sleep(0.2)


async def attack(args, base: str, port: int, proc, photos: list[bytes]) -> dict:
    bomb = png16()
    rec, ready = Recorder(), []
    metrics_before = len(httpx.get(base + "/metrics").content)
    stop = asyncio.Event()
    peak: dict[int, int] = {}
    mem_stop = threading.Event()
    mem = threading.Thread(target=memory_probe, args=(proc, peak, mem_stop), daemon=True)
    mem.start()
    tasks = [asyncio.create_task(readyz_probe(base, ready, stop))]
    tasks += [asyncio.create_task(good_client(base, photos, rec, stop)) for _ in range(args.good_clients)]
    tasks += [asyncio.create_task(bomber(base, "/v1/check", {"image": ("b.png", bomb, "image/png")}, rec, "bomb", stop))
              for _ in range(args.bombers)]
    batch = [("image", (f"{i}.png", bomb, "image/png")) for i in range(args.batch)]
    tasks += [asyncio.create_task(bomber(base, "/v1/check_batch", batch, rec, "bomb_batch", stop))
              for _ in range(args.batchers)]
    tasks += [asyncio.create_task(slow_body(port, rec, stop)) for _ in range(args.slow)]
    tasks.append(asyncio.create_task(path_flood(base, rec, stop, args.paths)))
    attack_end = time.time() + args.seconds
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=90)
    for t in tasks:
        t.cancel()
    await asyncio.sleep(2)
    after = [httpx.get(base + "/readyz").status_code for _ in range(4)]
    mem_stop.set()
    mem.join()
    metrics_after = len(httpx.get(base + "/metrics").content)
    lat = sorted(rec.latencies)
    during = [s for t, s in ready if t <= attack_end]
    truthful = (not rec.overloaded_at or any(s == 503 for s in during)) and all(s == 200 for s in after)
    fives = {who: sum(n for code, n in c.items() if code.isdigit() and int(code) >= 500 and code not in ("503", "504"))
             for who, c in rec.statuses.items()}
    return {
        "peak_worker_rss_mb": round(max(peak.values(), default=0) / 2**20, 1),
        "peak_rss_by_process_mb": {str(k): round(v / 2**20, 1) for k, v in sorted(peak.items())},
        "good_requests": rec.good_total,
        "good_success_rate": round(rec.good_ok / max(1, rec.good_total), 4),
        "good_p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
        "good_p99_s": round(float(np.percentile(lat, 99)), 3) if lat else None,
        "statuses": {who: dict(c) for who, c in rec.statuses.items()},
        "unexpected_5xx": fives,
        "readyz_during_attack": dict(Counter(str(s) for s in during)),
        "readyz_after": after,
        "readyz_truthful": truthful,
        "metrics_bytes_before_after": [metrics_before, metrics_after],
    }


MAKE_SCRIPT = r"""
import io, sys
from PIL import Image
sys.path.insert(0, sys.argv[4])
from serving.imageio import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, decode_bytes
mode, fmt, path = sys.argv[1], sys.argv[2], sys.argv[3]
side = int(DEFAULT_MAX_PIXELS ** 0.5)
while decode_bytes(mode, side, side) > DEFAULT_MAX_DECODE_BYTES:  # the largest image the limits accept
    side -= 8
Image.new(mode, (side, side)).save(path, fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))
print(side)
"""

DECODE_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from serving.imageio import decode_image
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    img, info = decode_image(data); outcome = f"decoded as {info.mode}"
except Exception as exc:
    outcome = getattr(exc, "code", type(exc).__name__)
print(json.dumps({"bytes": len(data), "outcome": outcome, "seconds": round(time.perf_counter() - t, 2),
                  "rss_before_mb": round(before / 1024, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


SLIVER_SCRIPT = r"""
import io, json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from PIL import Image
from serving.imageio import decode_image
from serving.preprocess import Preprocessing
width, height, guard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "now"
buf = io.BytesIO()
Image.new("RGB", (width, height), (200, 190, 170)).save(buf, "PNG")
data = buf.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:  # what the server does with it: decode, then the shipped model's preprocessing (320 px, crop 0.875)
    img, _ = decode_image(data, **({} if guard else {"max_aspect": float("inf")}))
    Preprocessing(input_size=320)(img); outcome = "checked"
except Exception as exc:
    outcome = getattr(exc, "code", type(exc).__name__)
print(json.dumps({"bytes": len(data), "outcome": outcome, "seconds": round(time.perf_counter() - t, 3),
                  "cost_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1)}))
"""


def slivers(repo: Path, repeats: int = 3) -> list[dict]:
    """A thin picture under every size limit (16 x 60000 is 1 Mpx, 9 KB) had its shorter side scaled to 365 px
    before the centre crop. Each case in a fresh process, without the aspect limit ("before") and with it
    ("now"), paired, median of ``repeats``; cost = peak RSS minus RSS before decoding."""
    rows = []
    for width, height in ((16, 20000), (16, 40000), (16, 60000), (400, 20000)):
        runs = {"before": [], "now": []}
        for _ in range(repeats):
            for arm in runs:
                out = subprocess.run([sys.executable, "-c", SLIVER_SCRIPT, str(width), str(height), arm, str(repo)],
                                     capture_output=True, text=True)
                runs[arm].append(json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]})
        row = {"size": f"{width}x{height}", "bytes": runs["now"][0].get("bytes")}
        for arm, results in runs.items():
            row[arm] = {"outcome": results[0].get("outcome"),
                        "seconds": statistics.median(r.get("seconds", float("nan")) for r in results),
                        "cost_mb": statistics.median(r.get("cost_mb", float("nan")) for r in results)}
        row["time_ratio"] = round(row["now"]["seconds"] / max(row["before"]["seconds"], 1e-6), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_modes(repo: Path) -> list[dict]:
    """The worst image of each mode (as many pixels as the limits allow), decoded alone in a fresh process:
    the peak RSS minus the RSS before decoding is what one such request costs a worker."""
    cases = [("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("RGBA", "PNG"), ("RGB", "PNG"),
             ("L", "PNG"), ("P", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, fmt in cases:
            path = Path(tmp) / f"worst.{fmt.lower()}"
            made = subprocess.run([sys.executable, "-c", MAKE_SCRIPT, mode, fmt, str(path), str(repo)],
                                  capture_output=True, text=True)
            if made.returncode:
                rows.append({"mode": mode, "format": fmt, "error": made.stderr[-300:]})
                continue
            out = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(path), str(repo)], capture_output=True,
                                 text=True)
            row = {"mode": mode, "format": fmt, "side": int(made.stdout)}
            row.update(json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]})
            if "peak_rss_mb" in row:
                row["decode_cost_mb"] = round(row["peak_rss_mb"] - row["rss_before_mb"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "datasets" / "listings-everyday",
                    help="the good clients' JPEGs (default: ../shared/datasets/listings-everyday beside the repo)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--good-clients", type=int, default=2)
    ap.add_argument("--bombers", type=int, default=2)
    ap.add_argument("--batchers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=30, help="16-bit bombs per batch request (30 x 70 KB = 2.1 MB)")
    ap.add_argument("--slow", type=int, default=8, help="slow-body connections")
    ap.add_argument("--paths", type=int, default=3000, help="random-path requests")
    ap.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE (repeatable)")
    ap.add_argument("--decode-modes", action="store_true", help="only measure decode peak RSS per mode")
    ap.add_argument("--slivers", action="store_true", help="only measure thin pictures, with and without the aspect limit")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    args = ap.parse_args()
    odd = [kv for kv in args.env if "=" not in kv or not kv.split("=", 1)[0]]
    if odd:
        ap.error(f"--env {odd[0]!r}: write NAME=VALUE, e.g. --env WILDCHECK_MAX_PIXELS=20000000")
    if args.out and not args.out.parent.is_dir():  # found now, not after the measurement
        ap.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.decode_modes:
        result = {"decode_modes": decode_modes(REPO)}
    elif args.slivers:
        result = {"slivers": slivers(REPO)}
    else:
        if not args.model:
            ap.error("--model is required (an exported ONNX file)")
        photos = [p.read_bytes() for p in sorted(args.photos.rglob("*.jpg"))[:64]]
        if not photos:
            raise SystemExit(f"no .jpg photos under {args.photos}")
        port = free_port()
        env = dict(kv.split("=", 1) for kv in args.env)
        with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:  # the server's log and BentoML home, removed after
            log_path = Path(tmp) / "server.log"
            server = start_server(args.model, port, env, log_path)
            try:
                result = asyncio.run(attack(args, server.base, port, server.proc, photos))
                result["server_settings"] = env
                result["server_tracebacks"] = log_path.read_text().count("Traceback")
            finally:
                server.stop()
        print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
