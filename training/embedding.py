"""The exported graph's embedding output: L2-normalised pooled features for reference galleries
(``training.export.ExportGraph`` computes it beside the logits and heat maps, from one backbone pass).
"""

from __future__ import annotations

import torch
from torch import nn

EMBEDDING_OUTPUT = "embedding"


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's pre-logits features (global pool, no classifier): what the classifier sees."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def embedding_features(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The part of a model's pooled features that the embedding is made of: all of them, except for a model that
    says otherwise (``embedding_of``: a grey-routed model's pooled features hold its backbone's twice, one copy
    zeroed by the route; grey and colour photos of one object must keep matching in a gallery)."""
    return model.embedding_of(pooled) if hasattr(model, "embedding_of") else pooled


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize`` without its ``expand_as``: onnxruntime's symbolic shape inference (INT8 pre-processing)
    fails on the Expand node that F.normalize exports to."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def embedding_size(model: nn.Module) -> int:
    """The embedding's length: the pooled features' (``num_features``) unless the model says (``embedding_size``)."""
    size = getattr(model, "embedding_size", None)
    return int(size if size is not None else model.num_features)


def embedding_spec(model: nn.Module, architecture: str, producer: str = "fine-tuned") -> dict:
    """What the contract says about the output: its name, size and what produced it."""
    return {
        "output": EMBEDDING_OUTPUT,
        "size": embedding_size(model),
        "normalized": True,
        "producer": f"{producer} {architecture}: global-average-pooled pre-logits features, L2-normalised",
    }
