"""The serving baseline for benchmarks/serve_bench.py: eager PyTorch, full PIL decode and resize, one
image per request, behind the same HTTP stack as ours (BentoML + FastAPI, same worker count).

    WILDCHECK_CHECKPOINT=RUN_DIR bentoml serve benchmarks.naive_service:NaiveCheck
"""

from __future__ import annotations

import io
import os

import bentoml
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

api = FastAPI()


@bentoml.service(name="naive-check", workers=int(os.environ.get("WILDCHECK_WORKERS", "2")))
@bentoml.asgi_app(api, path="/v1")
class NaiveCheck:
    def __init__(self) -> None:
        import numpy as np
        import torch
        from PIL import Image

        from training.predict import TorchPredictor

        self.predictor = TorchPredictor(os.environ["WILDCHECK_CHECKPOINT"].rstrip("/") + "/best.pt")
        self.np, self.torch, self.Image = np, torch, Image

    def __is_ready__(self) -> bool:
        return True

    def _check(self, data: bytes) -> dict:
        img = self.Image.open(io.BytesIO(data)).convert("RGB")  # full decode, no draft
        x = self.predictor.preprocessing(img)[None]
        with self.torch.no_grad():
            logits = self.predictor.model(self.torch.from_numpy(x))
        probs = self.torch.softmax(logits, 1)[0].tolist()
        return dict(zip(self.predictor.labels, probs))

    @api.post("/check")
    async def check(self, request: Request):
        form = await request.form()
        data = await form["image"].read()
        return {"scores": await run_in_threadpool(self._check, data)}
