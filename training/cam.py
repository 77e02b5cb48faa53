"""Class activation maps (Zhou et al. 2016) as a second model output, so serving can explain without torch.

For a network that ends in global *average* pooling and one linear layer (timm EfficientNet-Lite:
``forward_features`` -> pool -> classifier), ``logits[c] = mean_hw(W[c] . F[:, h, w]) + b[c]``, so
``cam[c, h, w] = W[c] . F[:, h, w] + b[c]`` is each location's share of the logit: its spatial mean *is*
the logit. The wrapper returns ``(logits, cam)``; ``training.export`` exports it with the output names below.
"""

from __future__ import annotations

import torch
from torch import nn

CAM_OUTPUT = "cam"


def cam_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot give a CAM (None when it can): it needs average pooling into one Linear head."""
    if not (hasattr(model, "forward_features") and hasattr(model, "get_classifier")):
        return "not a timm classifier (no forward_features / get_classifier)"
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        return f"the classifier is {type(head).__name__}, not one Linear layer"
    pool = getattr(model, "global_pool", None)
    if getattr(pool, "pool_type", None) != "avg":
        return f"global pooling is {getattr(pool, 'pool_type', None)!r}, not average pooling"
    return None


class WithCam(nn.Module):
    """``model`` plus its class activation maps: forward returns ``(logits (N, C), cam (N, C, h, w))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        reason = cam_unsupported(model)
        if reason:
            raise ValueError(f"cannot compute class activation maps: {reason}")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)  # N, K, h, w: the pre-pool feature map
        logits = self.model.forward_head(features)
        head = self.model.get_classifier()
        cam = torch.einsum("ck,nkhw->nchw", head.weight, features) + head.bias[None, :, None, None]
        return logits, cam
