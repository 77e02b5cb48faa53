"""Recover the trained members of an exported ensemble as run folders to fine-tune from (``--init-from``).

Usage: python benchmarks/members_from_onnx.py models/wildcheck-ivory.onnx --config CFG [--set K=V ...] \
           --data ../shared/datasets/met-ivory --out runs/recovered [--pool NAME[:SOURCES] ... | --no-negatives]

Run folders are not kept between sessions here; the shipped ONNX file is. Its export folded every BatchNorm into
the convolution before it (W' = W g/s, b' = b - m g/s) and joined the members' heads into one ([W_1 ... W_m] / m,
the mean bias). This undoes both into an equivalent trainable network: each convolution gets back its pretrained
per-channel weight norm (W'' = W'/k, so AdamW's step is the size it was in training), and its BatchNorm the
statistics of its input over training photos (eval output k (W''x - mean) + b' + k mean = W'x + b' exactly; in
train mode the batch statistics are close to those). Each member gets the mean bias (the m biases cannot be told
apart). The recovered ensemble must reproduce the ONNX logits (checked here), so a fine-tune from these
folders starts where the shipped members ended, up to the BatchNorm momentum that training restarts.
A model with a grey route (1.5.0 on) holds the ensemble inside ``training.models.GreyRouted``, whose one head is
[W, W_grey, b, b_grey]: each member then also gets back its grey head and the route (checked on the photos in
grey too). A model with a size route (1.6.0 on: ``GreyRouted(SizeRouted(Ensemble))``) keeps its BatchNorm layers
unfolded (the two branches share the weights), so its members are read back as they are; it is checked reading
as the file does, and the members' config records the route, so an ensemble of the recovered runs has it again. Each
member's checkpoint records its training seed and epoch from the contract's ``ensemble`` list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conv_bn_pairs(member: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
    """Each convolution with the BatchNorm that follows it, in module order (timm's EfficientNet-Lite)."""
    mods = [(n, m) for n, m in member.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    pairs = []
    for (cname, conv), (bname, bn) in zip(mods[0::2], mods[1::2]):
        if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)) or bn.num_features != conv.out_channels:
            raise SystemExit(f"{cname} is not followed by its BatchNorm ({bname}): not an EfficientNet-Lite layout")
        pairs.append((cname, conv, bn))
    return pairs


def main() -> int:
    import onnxruntime as ort
    from onnx import load, numpy_helper

    from serving.contract import read_contract
    from training.checkpoint import Checkpoint, initial_spec
    from training.config import resolve_config
    from training.data.sources import load_samples, select_split
    from training.data.cache import cache_images
    from training.augment import EvalTransform
    from PIL import Image

    from training.checkpoint import Head
    from training.conditions import greyscale
    from training.ensemble import joined_grey_head
    from training.models import Ensemble, create_model, parse_name, with_grey_route, with_size_route

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--config", required=True, help="the config the members were trained with (for their checkpoints)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data", required=True, help="training photos for the BatchNorm statistics")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pool", action="append", default=None,
                        help="negatives pool the members trained with, recorded in their checkpoints (default: "
                             "met_ivory.py's shippable pools), so a screen that reads a recovered run scores them too")
    parser.add_argument("--no-negatives", action="store_true", help="record no negatives pools")
    args = parser.parse_args()

    contract = read_contract(args.model)
    if not parse_name(contract.architecture):
        raise SystemExit(f"{args.model} is one {contract.architecture}, not an ensemble (wildcheck ensemble)")
    count, arch = parse_name(contract.architecture)
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in load(args.model).graph.initializer}
    config = resolve_config(args.config, sets=args.set).config
    pre = contract.preprocessing
    samples = select_split(load_samples([args.data]), "train")
    rng = np.random.RandomState(0)
    samples = [samples[i] for i in sorted(rng.choice(len(samples), min(args.images, len(samples)), replace=False))]
    pixels, _, _ = cache_images(samples, pre, 32, 2, desc="photos for BatchNorm statistics")
    to_tensor = EvalTransform(pre)
    batch = torch.stack([to_tensor(p) for p in pixels])

    route = contract.grey_route
    # Ensemble, GreyRouted(Ensemble), GreyRouted(SizeRouted(Ensemble)): the members' path is the wrappers' depth
    stems = [k for k in weights if k.endswith(".members.0.conv_stem.weight")]
    if len(stems) != 1:
        raise SystemExit(f"{args.model}: cannot find the members' weights ({len(stems)} candidates for members.0.conv_stem)")
    prefix = stems[0][: -len(".0.conv_stem.weight")]
    head_w = weights["model.classifier.weight"]
    grey_w = grey_b = None
    if route:  # [W_1..W_m, Wg_1..Wg_m, b, b_grey] / m in one bias-free head
        inner = head_w.shape[1] // 2 - 1
        head_w, grey_w, head_b, grey_b = head_w[:, :inner], head_w[:, inner:2 * inner], head_w[:, 2 * inner], head_w[:, 2 * inner + 1]
    else:
        head_b = weights["model.classifier.bias"]
    members, grey_heads = [], []
    for i in range(count):
        member = create_model(arch, len(contract.labels), pretrained="offline").eval()
        own = {k[len(f"{prefix}.{i}."):]: v for k, v in weights.items() if k.startswith(f"{prefix}.{i}.")}
        unfolded = "bn1.running_mean" in own  # BatchNorm kept as it was (a size route's two branches share the weights)
        if unfolded:
            missing, unexpected = member.load_state_dict(own, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
            if missing or unexpected:  # the members' own heads are not in the graph: set below
                raise SystemExit(f"member {i}'s weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        pairs = [] if unfolded else conv_bn_pairs(member)
        stats: dict[str, tuple] = {}
        with torch.no_grad():
            for cname, conv, bn in pairs:
                folded = weights[f"{prefix}.{i}.{cname}.weight"]
                bias = weights[f"{prefix}.{i}.{cname}.weight_bias"]
                k = folded.flatten(1).norm(dim=1) / conv.weight.flatten(1).norm(dim=1).clamp_min(1e-8)
                k = torch.where(k > 1e-8, k, torch.ones_like(k))  # a dead channel (all-zero weights) stays dead
                conv.weight.copy_(folded / k.view(-1, 1, 1, 1))
                bn.weight.copy_(k)
                bn.bias.copy_(bias)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            def accumulate(mod, inp, out, name):  # per channel: count, sum, sum of squares (float64)
                values = inp[0].detach().transpose(0, 1).flatten(1).double()
                n, s1, s2 = stats.get(name, (0, 0.0, 0.0))
                stats[name] = (n + values.shape[1], s1 + values.sum(1), s2 + (values * values).sum(1))

            hooks = [bn.register_forward_hook(lambda mod, inp, out, name=cname: accumulate(mod, inp, out, name))
                     for cname, _, bn in pairs]
            for chunk in batch.split(16) if pairs else []:
                member(chunk)
            for h in hooks:
                h.remove()
            for cname, _, bn in pairs:
                n, s1, s2 = stats[cname]
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp_min(0.0)
                k = bn.weight.double()
                bn.running_mean.copy_(mean.float())
                bn.running_var.copy_(var.float())
                bn.weight.copy_((k * (var + bn.eps).sqrt()).float())
                bn.bias.copy_((bn.bias.double() + k * mean).float())
            width = member.num_features
            member.get_classifier().weight.copy_(head_w[:, i * width:(i + 1) * width] * count)
            member.get_classifier().bias.copy_(head_b)
            if route:
                grey_heads.append(Head(weight=(grey_w[:, i * width:(i + 1) * width] * count).clone(), bias=grey_b.clone()))
        members.append(member)

    recovered = with_size_route(Ensemble(members).eval(), contract.size_route, pre)
    if route:
        recovered = with_grey_route(recovered, joined_grey_head(grey_heads), route, pre)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    grey = torch.stack([to_tensor(np.asarray(greyscale(Image.fromarray(p)))) for p in pixels[:64]])
    for name, x in (("photos", batch[:64]), ("the photos in grey", grey)):
        with torch.no_grad():
            ours = recovered(x).numpy()
        theirs = session.run(["logits"], {session.get_inputs()[0].name: x.numpy()})[0]
        gap = float(np.abs(ours - theirs).max())
        print(f"recovered ensemble vs {args.model}: max |logit difference| {gap:.2e} over 64 {name}")
        if not gap <= 1e-3:  # NaN included
            raise SystemExit("the recovered members do not reproduce the model")

    config.model.name = arch
    config.decision.size_route = contract.size_route  # an ensemble of the recovered runs reads as the file did
    out = Path(args.out)
    if not args.no_negatives:  # what met_ivory.py adds at run time: the validation set then matches a trained run's
        from benchmarks.met_ivory import SHARED, SHIPPABLE_POOLS, pool_root

        config.data.negatives = [pool_root(p, SHARED, out) for p in (args.pool or SHIPPABLE_POOLS)]
    runs = contract.training_data.get("ensemble", [])
    spec = initial_spec(config, contract.labels, pre, {k: v for k, v in contract.training_data.items() if k != "ensemble"})
    for i, member in enumerate(members):
        run = out / (runs[i]["run"] if i < len(runs) else f"member{i}")
        run.mkdir(parents=True, exist_ok=True)
        own = config.model_copy(deep=True)
        if i < len(runs) and runs[i].get("seed") is not None:
            own.train.seed = int(runs[i]["seed"])
        member_spec = spec
        if route:
            fitted = (route.fitted.get("members") or [{}] * count)[i]
            member_spec = spec.model_copy(update={"grey_route": route.model_copy(update={"fitted": fitted})})
        Checkpoint(member_spec, member.state_dict(), runs[i]["epoch"] if i < len(runs) else 0, {}, own,
                   [str(Path(args.data).resolve())], init_from=str(args.model), ema=True,
                   grey_head=grey_heads[i] if route else None).save(run / "best.pt")
        (run / "labels.json").write_text(json.dumps(contract.labels))
        print(f"wrote {run / 'best.pt'}")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
