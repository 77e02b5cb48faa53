"""The module a run trains: created (pretrained, or blank when a checkpoint will fill it), warm-started from an
earlier run, partly frozen, on its device and memory format."""

from __future__ import annotations

from pathlib import Path

import torch

from serving.errors import InvalidInput, WildcheckError
from training.config import Config
from training.models import create_model, freeze_modules, warm_start


class WarmStartError(WildcheckError, ValueError):
    """--init-from names a run of another architecture."""


def warm_start_source(init_from: str | Path, out_dir: str | Path) -> Path:
    """The checkpoint ``--init-from`` names, checked before any work: a run directory with a best.pt, or a .pt file,
    and never one a fresh run in ``out_dir`` replaces (it removes OUT/best.pt and OUT/last.pt before its first
    epoch: a run stopped then would have lost the weights it started from)."""
    from training.loop.rundir import PREVIOUS_RUN_FILES

    path = Path(init_from)
    if path.is_dir() and not (path / "best.pt").is_file():
        more = (f": it has only last.pt (a run still training, or stopped before its first epoch ended); resume "
                f"it with --resume --out {path}, or pass {path / 'last.pt'}") if (path / "last.pt").is_file() else ""
        raise WarmStartError(f"--init-from {init_from}: no best.pt in that folder, so it is not a finished run{more}")
    if not path.exists():
        raise WarmStartError(f"--init-from {init_from}: no such run directory or checkpoint")
    source = (path / "best.pt" if path.is_dir() else path).resolve()
    if source.parent == Path(out_dir).resolve() and source.name in PREVIOUS_RUN_FILES:
        raise WarmStartError(f"--init-from {init_from} is inside --out {out_dir}: the fresh run removes "
                             f"{source.name} before training, so the weights it starts from would be lost if it "
                             "stopped. Write the new run elsewhere: --init-from RUN_DIR --out NEW_DIR")
    return source


@torch.no_grad()
def check_input_size(module: torch.nn.Module, config: Config, n_labels: int) -> None:
    """One forward pass of an ``img_size`` picture, before any image is cached: a model that cannot read it (a ViT
    whose input size its name fixes, ``vit_tiny_patch16_224`` at 64 px) failed in the first training step, with an
    assertion's traceback, after minutes of caching. In eval mode: the BatchNorm statistics stay as they are."""
    size, training = config.data.img_size, module.training
    module.eval()
    try:
        out = module(torch.zeros(1, 3, size, size))
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        raise InvalidInput(f"model.name {config.model.name!r} cannot read a {size}x{size} picture (data.img_size "
                           f"{size}): {type(exc).__name__}: {why}. Set data.img_size to a size the model takes "
                           "(--img-size), or use another model") from exc
    finally:
        module.train(training)
    if tuple(getattr(out, "shape", ())) != (1, n_labels):
        raise InvalidInput(f"model.name {config.model.name!r} gives {tuple(getattr(out, 'shape', ()))} outputs for one "
                           f"picture, not one score per label ({n_labels}): use a classification model")


def build_model(config: Config, labels: list[str], device: torch.device, *, resuming: bool = False,
                init_from: str | Path | None = None, say=print) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(the unwrapped module, its frozen submodules). ``resuming``: no pretrained weights (last.pt replaces them);
    ``init_from``: a fresh run starts from that run's weights, head rows matched by label."""
    warm = not resuming and init_from is not None
    module = create_model(
        config.model.name, len(labels), "none" if resuming or warm else config.model.pretrained,
        config.model.drop_rate, config.model.drop_path_rate,
    )
    if warm:
        from training.checkpoint import Checkpoint
        from training.predict import resolve_checkpoint

        prior = Checkpoint.load(resolve_checkpoint(init_from))
        if prior.spec.architecture != config.model.name:
            raise WarmStartError(f"--init-from {init_from} is a {prior.spec.architecture}, the config asks for {config.model.name}")
        moved = warm_start(module, prior.weights, prior.spec.labels, labels)
        say(f"warm start from {init_from}: head rows kept for {moved['kept']}, fresh for {moved['fresh']}"
            + (f", dropped {moved['dropped']}" if moved["dropped"] else ""))
    check_input_size(module, config, len(labels))
    frozen = freeze_modules(module, config.model.freeze)
    module = module.to(device)
    if config.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module, frozen
