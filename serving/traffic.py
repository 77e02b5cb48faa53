"""``wildcheck calibrate MODEL --traffic ROOT``: measure a platform's own traffic, write a budget policy.

A platform points it at a sample of its ordinary uploads (all assumed negative, or sorted into
``ROOT/<label>/`` when it has labels). The model scores them exactly as the server does (same decoding and
preprocessing), and the negatives' scores go into a policy file with the budgets: ``wildcheck serve
--policy`` re-solves the thresholds on them (``serving.policy``). Needs onnxruntime, not torch.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from serving.contract import ModelContract
from serving.errors import InvalidInput, MissingInput
from serving.imageio import ImageError, decode_image, images_under, label_folders
from serving.policy import Policy, PolicyModel, Resolved, check_sample_measures, resolve
from serving.thresholds import TrafficScores
from serving.tiling import draft_size, predict_views, views

# traffic images scoring below this on every protected class are counted, not stored: no threshold worth
# setting is that low, and it keeps a policy for 100,000 images small
TRAFFIC_FLOOR = 0.001


def find_traffic(root: str | Path, labels: list[str], negative_label: str) -> list[tuple[Path, str]]:
    """(path, label) for every image under ``root``: ``ROOT/<label>/`` when its folders are named after the
    model's labels, else every image is taken as negative (ordinary traffic)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"traffic folder {root} not found")
    folders = label_folders(root)
    if any(d.name in labels for d in folders):
        unknown = [d.name for d in folders if d.name not in labels]
        if unknown:
            raise InvalidInput(f"{root} has folders named after the model's labels and others ({unknown}); name every "
                             f"folder after a label ({labels}) or use no label folders (all images taken as negative)")
        items = [(p, d.name) for d in folders for p in images_under(d)]
    else:
        items = [(p, negative_label) for p in images_under(root)]
    if not items:
        raise InvalidInput(f"no images under {root}")
    return items


def score_paths(model, paths: list[Path], batch_size: int = 32) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Calibrated probabilities for the readable images, scored as the server scores them (decoding,
    preprocessing, the contract's tiling), their indices, and (path, reason) for the others."""
    pre, tiling = model.preprocessing, getattr(model, "tiling", None)
    probs, kept, skipped, batch = [], [], [], []
    for i, path in enumerate(tqdm(paths, desc="scoring traffic", unit="img", leave=False)):
        try:
            img, _ = decode_image(path, draft_size=draft_size(pre, tiling))
            batch.append(views(img, pre, tiling))
            kept.append(i)
        except ImageError as exc:
            skipped.append((str(path), f"{exc.code}: {exc.message}"))
        except OSError as exc:
            skipped.append((str(path), f"unreadable: {exc}"))
        if len(batch) == batch_size:
            probs.append(predict_views(model, batch))
            batch = []
    if batch:
        probs.append(predict_views(model, batch))
    n = len(model.labels)
    return (np.concatenate(probs) if probs else np.zeros((0, n), np.float32)), kept, skipped


def measure_traffic(model, contract: ModelContract, root: str | Path, max_flag_rate: float | None,
                    max_block_rate: float | None, batch_size: int = 32,
                    max_recall_drop: float | None = None) -> tuple[Policy, Resolved, dict]:
    """Score ``root`` with ``model``; the policy holding the budgets and the traffic's negatives' scores, what it
    resolves to on ``contract``, and a report (counts, skipped images, recall on labelled traffic positives).
    ``max_recall_drop``: written into the policy when given (``serving.policy``'s default otherwise)."""
    labels, negative = list(contract.labels), contract.negative_label
    items = find_traffic(root, labels, negative)
    probs, kept, skipped = score_paths(model, [p for p, _ in items], batch_size)
    y = [items[i][1] for i in kept]
    protected = list(contract.thresholds)
    columns = [labels.index(c) for c in protected]
    is_neg = np.array([label == negative for label in y], bool)
    if not is_neg.any():
        raise InvalidInput(f"no readable negative images in {root}: the budgets need ordinary traffic")
    model_rules = contract.decision
    flag = max_flag_rate if max_flag_rate is not None else (model_rules.max_flag_rate if model_rules else None)
    block = max_block_rate if max_block_rate is not None else (model_rules.max_block_rate if model_rules else None)
    if flag is None and block is None:
        raise InvalidInput("no budget: give --max-flag-rate and/or --max-block-rate (the model has no default budgets)")
    check_sample_measures(int(is_neg.sum()), {"--max-flag-rate": flag, "--max-block-rate": block})
    pool = Path(root).resolve().name or "traffic"
    traffic = TrafficScores.from_arrays(protected, probs[is_neg][:, columns], [pool] * int(is_neg.sum()), floor=TRAFFIC_FLOOR)
    extra = {} if max_recall_drop is None else {"max_recall_drop": max_recall_drop}
    policy = Policy(max_flag_rate=flag, max_block_rate=block, traffic=traffic, model=PolicyModel.of(contract), **extra)
    resolved = resolve(policy, contract)
    positives = {}
    for c, col in zip(protected, columns):
        mine = np.array([label == c for label in y], bool)
        if mine.any():
            t = resolved.thresholds[c]
            positives[c] = {"n": int(mine.sum()), "recall_at_review": float((probs[mine, col] >= t.review).mean()),
                            "recall_at_block": None if t.block is None else float((probs[mine, col] >= t.block).mean())}
    report = {"root": str(root), "images": len(items), "negatives": int(is_neg.sum()), "skipped": skipped,
              "traffic_positives": positives}
    return policy, resolved, report


def policy_yaml(policy: Policy, resolved: Resolved, report: dict, contract: ModelContract) -> str:
    """The policy file, with a header saying where it came from and what it resolves to."""
    b = resolved.budgets
    head = [f"wildcheck traffic policy, written {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"model {contract.model_name} {contract.model_version}; traffic {report['root']}: {report['negatives']} "
            f"negative images scored ({len(report['skipped'])} unreadable skipped)",
            f"on that traffic: flag rate {b['flag_rate']:.2%}, block rate {b['block_rate']:.2%}"]
    for label, t in resolved.thresholds.items():
        rules = resolved.rules[label]
        block = "never" if t.block is None else f">= {t.block}"
        head.append(f"{label}: review >= {t.review} ({rules['review']}), block {block} ({rules['block']})")
        for note in resolved.notes.get(label, []):
            head.append(f"  {note}")
    for label, p in report["traffic_positives"].items():
        head.append(f"{label}: recall on the traffic's {p['n']} labelled positives: review {p['recall_at_review']:.3f}"
                    + ("" if p["recall_at_block"] is None else f", block {p['recall_at_block']:.3f}"))
    head.append("serve with: wildcheck serve MODEL.onnx --policy THIS_FILE (the server re-solves on `traffic`)")
    values = policy.model_dump(mode="json", exclude_defaults=True)
    values = {"model": values.pop("model")} | values if "model" in values else values  # which model, first
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in head) + body
