"""The training data of a run: images cached once, the index convention, the epoch sampler and its miner.

Training items ``[0, n_main)`` are the main images (every epoch), ``[n_main, n_main + n_pool)`` the negatives
pool (a fresh draw each epoch). ``TrainData`` is the one place that knows this; the sampler and the
hard-negative miner it builds are told, not left to guess.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from serving.errors import WildcheckError
from serving.preprocess import Preprocessing
from training.augment import EvalTransform, TrainTransform, worker_init_fn
from training.config import Config, distinct_roots
from training.data.cache import CachedImageDataset, cache_images
from training.data.check import content_hashes, exact_duplicates
from training.data.sampling import EpochSampler, HardNegativeMiner, negatives_count
from training.data.sources import Sample, load_samples, pool_name, select_split
from training.distributed import DistInfo, ShardedSampler
from training.models import pretrained_data_config


class DataError(WildcheckError, ValueError):
    """The data roots cannot make a training run (no images, one label, a negatives weight naming no pool)."""


def resolve_preprocessing(config: Config) -> Preprocessing:
    """The preprocessing this run trains with: config values, else what the pretrained weights expect."""
    pretrained = pretrained_data_config(config.model.name) if config.model.pretrained != "none" else {}
    return Preprocessing(
        input_size=config.data.img_size,
        crop_pct=config.data.crop_pct,
        interpolation=config.data.interpolation or pretrained.get("interpolation", "bicubic"),
        mean=config.data.mean or pretrained.get("mean", (0.485, 0.456, 0.406)),
        std=config.data.std or pretrained.get("std", (0.229, 0.224, 0.225)),
    )


def negative_samples(roots: list[str], negative_label: str, val_size: int, seed: int
                     ) -> tuple[list[Sample], list[int], list[Sample]]:
    """All images under the negatives roots, relabelled (their source and pool kept): (training pool, the pool index of
    each -- its root's position -- and a fixed validation sample drawn evenly from the roots)."""
    pool, groups, vals = [], [], []
    # `p` and `./p/` are one pool, read once (it was two, each photo drawn twice as often)
    for g, root in enumerate(distinct_roots(roots)):
        found = [replace(s, label=negative_label) for s in load_samples([root])]
        train = [s for s in found if s.split == "train"]
        pool += train
        groups += [g] * len(train)
        vals.append([s for s in found if s.split == "val"])
    val = even_sample(vals, val_size, np.random.RandomState(seed))
    return pool, groups, val


def even_sample(groups: list[list[Sample]], total: int, rng: np.random.RandomState) -> list[Sample]:
    """Up to ``total`` samples, an equal share from each group (a small group's unused share goes to the rest)."""
    order = sorted(range(len(groups)), key=lambda g: len(groups[g]))
    chosen: dict[int, list[Sample]] = {}
    left = total
    for k, g in enumerate(order):
        share = left // (len(order) - k)
        items = groups[g]
        if len(items) > share:
            keep = rng.choice(len(items), share, replace=False)
            items = [items[i] for i in sorted(keep)]
        chosen[g] = items
        left -= len(items)
    return [s for g in range(len(groups)) for s in chosen[g]]


def _check_decision_labels(config: Config, labels: list[str]) -> None:
    """The negative label and never_block name classes of the data: a misspelt one would make the ordinary
    photos a protected class (blocked) or leave the class it meant free to auto-block."""
    if config.data.negative_label not in labels:
        raise DataError(f"data.negative_label {config.data.negative_label!r} is not one of the labels {labels}: set it "
                        "to the label of the ordinary photos (e.g. --set data.negative_label=other)")
    unknown = sorted(set(config.decision.never_block) - set(labels))
    if unknown:
        raise DataError(f"decision.never_block names labels the data does not have: {unknown}; labels: {labels}")


def _check_negative_weights(config: Config, roots: list[str]) -> None:
    """Fail before training, not at calibration after it, when decision.negative_weights names no pool."""
    weights = config.decision.negative_weights or {}
    pools = sorted({pool_name(r) for r in list(roots) + list(config.data.negatives)})
    unknown = sorted(set(weights) - set(pools))
    if unknown:
        raise DataError(f"decision.negative_weights names {unknown}, which is no data root or negatives pool; pools: {pools}")


def _check_empty_label_folders(roots: list[str], trained: set[str], val_s: list[Sample]) -> None:
    """A label folder under ROOT/train/ without any image, whose label validation has: the label would silently
    leave the model (validation only noted that its images were left out), while a folder whose images are all
    unreadable is refused. An empty folder is a copy that failed, not a wish to train without the class."""
    wanted = Counter(s.label for s in val_s if s.label not in trained)
    empty = [(Path(root) / "train" / label, n) for label, n in sorted(wanted.items()) for root in roots
             if Path(root).is_dir() and (Path(root) / "train" / label).is_dir()]
    if empty:
        folders = "; ".join(f"{folder} (val has {n} image(s) of {folder.name!r})" for folder, n in empty)
        raise DataError(f"label folder(s) without any training image: {folders}. The label would be left out of the "
                        "model. Add its training images, or remove the label from val/ too to train without it")


def _check_data_not_negatives(data: list[Sample], negatives: list[Sample], negative_label: str) -> None:
    """No image is both data and a negative: a root given as --data and as --negatives (or one inside the other) made
    each of its ivory photos an ``other`` image too, and its validation images were scored under both labels."""
    pooled = {s.path.resolve(): s for s in negatives}
    both = [(s, pooled[p]) for s in data if (p := s.path.resolve()) in pooled]
    if both:
        s, n = both[0]
        raise DataError(f"{len(both)} image(s) are both in the data and in the negatives pools, e.g. {s.path} "
                        f"({s.label!r} in {s.pool}, and {negative_label!r} as a negative of {n.pool}): every image of a "
                        "negatives pool is trained as the negative label. Give each root once: --data for labelled "
                        "photos, --negatives (data.negatives) for a root of ordinary photos outside the data roots")


def _check_pool_is_drawn(labels: list[str], main_labels: set[str], n_negatives: int, n_pool: int, n_main: int,
                         per_epoch: float) -> None:
    """A label whose training images are all in the negatives pool (``other``, when the data has only products) is
    trained on what each epoch draws from the pool: drawing none (``data.negatives_per_epoch: 0``, or a ratio that
    rounds to 0 of a small main set) trained a model that never saw the label, without a word."""
    pool_only = [label for label in labels if label not in main_labels]
    if n_pool and n_negatives == 0 and pool_only:
        how = "a count" if per_epoch >= 1 or per_epoch == 0 else f"a ratio of the {n_main} main image(s), rounded"
        raise DataError(f"label(s) {pool_only} have training images only in the negatives pools, and "
                        f"data.negatives_per_epoch {per_epoch:g} ({how}) draws none of their {n_pool} image(s) per "
                        "epoch: the model would never train on them. Draw some, e.g. --set "
                        f"data.negatives_per_epoch={min(n_pool, max(n_main, 2))}")


# validation made mostly of training images is a copy gone wrong (val/ copied from train/), not a dataset's few
# stray duplicates (Met ivory has none across its splits): above this share of val, training refuses
LEAKED_VAL_REFUSED = 0.5


def exact_overlap(train_s: list[Sample], val_s: list[Sample], test_s: list[Sample], workers: int = 4) -> dict:
    """Exact copies (the same bytes, ``data check``'s ``exact_duplicates``) between the training images and the
    validation or test ones, and pictures under two labels: ``{val_in_train, val, test_in_train, test,
    label_conflicts, examples}``, ``examples`` a few ``[path, path]`` pairs (empty lists and zeros: none)."""
    samples = train_s + val_s + test_s
    groups = exact_duplicates(samples, content_hashes(samples, workers))
    trained = {p for g in groups if "train" in g["splits"] for p in g["paths"]}
    leaked = {split: [s for s in kept if str(s.path) in trained] for split, kept in (("val", val_s), ("test", test_s))}
    mixed = [g for g in groups if (g["cross_split"] and "train" in g["splits"]) or g["label_conflict"]]
    return {"val_in_train": len(leaked["val"]), "val": len(val_s), "test_in_train": len(leaked["test"]),
            "test": len(test_s), "label_conflicts": sum(g["label_conflict"] for g in groups),
            "examples": [g["paths"][:2] for g in mixed[:2]]}


def _check_overlap(overlap: dict, roots: list[str], say) -> None:
    """Validation images that are training images measure nothing the model has not seen: the best epoch, the
    validation metrics and the calibrated thresholds (which the exported model serves with) were fitted on them,
    without a word. Mostly copies: refused; a few (or test copies, or one picture under two labels): said."""
    val_in, test_in, conflicts = overlap["val_in_train"], overlap["test_in_train"], overlap["label_conflicts"]
    if not (val_in or test_in or conflicts):
        return
    examples = "; ".join(" = ".join(pair) for pair in overlap["examples"])
    check = f"wildcheck data check {' '.join(map(str, roots))} lists every one"
    if val_in > LEAKED_VAL_REFUSED * overlap["val"]:
        raise DataError(f"{val_in} of the {overlap['val']} validation images are exact copies of training images "
                        f"(e.g. {examples}): was val/ copied from train/? Validation would measure the training images "
                        "themselves, and the best epoch, the validation metrics and the calibrated thresholds (which "
                        "the exported model uses) would be fitted on them. Give validation images of their own "
                        f"(photos not in train/); {check}")
    found = [f"{n} {split} image(s) are exact copies of training images" for n, split in
             ((val_in, "validation"), (test_in, "test")) if n]
    found += [f"{conflicts} picture(s) are the same file under two labels"] if conflicts else []
    say(f"warning: {', '.join(found)} (e.g. {examples}): copies in val/ inflate the validation metrics and the "
        "thresholds calibrated on them, copies in test/ the evaluation, and a picture under two labels teaches "
        f"both; {check} (remove the copies, fix the labels)")


@dataclass
class TrainData:
    labels: list[str]
    train: CachedImageDataset  # main training images first, then the negatives pool
    val: CachedImageDataset
    n_main: int
    n_pool: int
    pool_groups: list[int]  # per pool image: which --negatives root it came from
    train_samples: list[Sample]
    val_samples: list[Sample]
    skipped: list
    negative_label: str = "other"
    generator: torch.Generator = field(default_factory=torch.Generator)  # the sampler's: all of its randomness
    # the DataLoader's: each epoch's workers draw their augmentation seeds from it (set per epoch by set_epoch)
    worker_seeds: torch.Generator = field(default_factory=torch.Generator)
    sampler: EpochSampler | None = None
    overlap: dict = field(default_factory=dict)  # exact_overlap's counts, for summary.json

    @classmethod
    def build(cls, roots: list[str], config: Config, pre: Preprocessing, labels: list[str] | None = None,
              say=print, quiet: bool = False, before_caching: Callable[[list[str]], None] | None = None) -> TrainData:
        """Find, relabel and cache the images of ``roots`` and the negatives pools (``labels``: a resumed run's).

        What can be checked without the pixels is checked before caching them (minutes of decoding on a real
        dataset): the labels, the augmentation (its transform is built first) and ``before_caching(labels)``,
        where ``train`` builds the model (its name, pretrained weights and frozen modules). ``quiet``: no progress
        bars or per-file warnings (torchrun's ranks other than 0)."""
        samples = load_samples(roots)
        train_s, val_s = select_split(samples, "train"), select_split(samples, "val")
        if not train_s:
            raise DataError(f"no training images in {roots}: expected ROOT/train/<label>/<image> or a manifest split=train")
        negative = config.data.negative_label
        _check_negative_weights(config, roots)
        pool_s, pool_groups, neg_val_s = negative_samples(config.data.negatives, negative, config.data.val_negatives,
                                                          config.train.seed)
        _check_data_not_negatives(train_s + val_s, pool_s + neg_val_s, negative)
        val_s = val_s + neg_val_s
        if not val_s:
            raise DataError(
                f"no validation images in {roots}: add ROOT/val/<label>/<image> (or split=val rows) so the best epoch can be chosen"
            )
        if labels:
            new = sorted({s.label for s in train_s} - set(labels))
            if new:
                raise DataError(f"the data has labels the resumed run was not trained on: {new}; train a new run "
                                "warm-started from it instead (--init-from RUN_DIR keeps the old classes' rows)")
        if not labels:
            labels = sorted({s.label for s in train_s} | ({negative} if pool_s else set()))
            _check_empty_label_folders(roots, set(labels), val_s)
        if len(labels) < 2:
            raise DataError(f"training needs at least two labels, found {labels}")
        _check_decision_labels(config, labels)
        per_epoch = config.data.negatives_per_epoch
        _check_pool_is_drawn(labels, {s.label for s in train_s}, negatives_count(per_epoch, len(train_s), len(pool_s)),
                             len(pool_s), len(train_s), per_epoch)
        consistency = config.train.consistency
        transform = TrainTransform(config.augment.train, pre, config.train.seed,
                                   views=consistency.views if consistency.weight > 0 else None)
        overlap = exact_overlap(train_s + pool_s, val_s, select_split(samples, "test"), workers=4)
        _check_overlap(overlap, roots, say)
        if before_caching is not None:
            before_caching(labels)
        unknown_val = Counter(s.label for s in val_s if s.label not in labels)
        if unknown_val:
            say(f"validation labels not in training data are left out of validation: {dict(unknown_val)}")
        val_s = [s for s in val_s if s.label in labels]
        if not val_s:  # validation then failed after the first epoch, with a traceback
            raise DataError(f"no validation image has a label of the training data {labels} (validation labels: "
                            f"{sorted(unknown_val)}): add val/<label>/ images of the trained labels so the best "
                            "epoch can be chosen")
        index = {label: i for i, label in enumerate(labels)}
        workers, min_side = config.data.cache_workers, config.data.min_side
        # validation first: the smaller set, and without a readable image of it there is nothing to train for
        val_px, val_kept, skipped_v = cache_images(val_s, pre, min_side, workers, desc="caching val", quiet=quiet)
        if not val_kept:
            raise DataError(f"none of the {len(val_s)} validation image(s) could be read ({skipped_v[0].path}: "
                            f"{skipped_v[0].reason}); the best epoch cannot be chosen without them: fix or replace "
                            "them (wildcheck data check lists every unreadable file)")
        main_px, main_kept, skipped_m = cache_images(train_s, pre, min_side, workers, desc="caching train", quiet=quiet)
        pool_px, pool_kept, skipped_p = cache_images(pool_s, pre, min_side, workers, desc="caching negatives",
                                                     quiet=quiet)
        group_of = {s.path: g for s, g in zip(pool_s, pool_groups)}
        train_kept = main_kept + pool_kept
        train_ds = CachedImageDataset(main_px + pool_px, [index[s.label] for s in train_kept], transform)
        train_ds.transform.set_bank(pool_px)  # scene-building steps add negatives' photos around an image
        val_ds = CachedImageDataset(val_px, [index[s.label] for s in val_kept], EvalTransform(pre))
        data = cls(labels, train_ds, val_ds, len(main_kept), len(pool_kept), [group_of[s.path] for s in pool_kept],
                   train_kept, val_kept, skipped_m + skipped_p + skipped_v, negative, overlap=overlap)
        empty = [label for label, c in zip(labels, data.counts) if c == 0]
        if empty:
            raise DataError(f"labels without readable training images: {empty}")
        return data

    @property
    def counts(self) -> np.ndarray:
        """Training images per label (pool included), in label order."""
        return np.bincount(np.asarray(self.train.targets), minlength=len(self.labels)).astype(np.float64)

    @property
    def product_columns(self) -> list[int]:
        """Every label's column but the negative label's: what a hard negative is scored on."""
        return [i for i, label in enumerate(self.labels) if label != self.negative_label]

    def epoch_counts(self) -> np.ndarray:
        """Training images per label in one epoch: the main set, plus the negatives the sampler draws from the pool
        (all of the pool before a sampler is built)."""
        counts = np.bincount(np.asarray(self.train.targets[: self.n_main], dtype=np.int64),
                             minlength=len(self.labels)).astype(np.float64)
        drawn = self.sampler.n_negatives if self.sampler is not None else self.n_pool
        if drawn:
            counts[self.labels.index(self.negative_label)] += drawn
        return counts

    def class_weight(self, device: torch.device) -> torch.Tensor:
        """Inverse-frequency loss weights (``data.balance: loss``) of what an epoch trains on: weighed by the whole
        pool, a pool of 10,000 negatives of which each epoch draws 50 made every product image count ~100x an
        ``other`` one."""
        counts = self.epoch_counts()
        return torch.tensor(counts.sum() / (len(self.labels) * counts), dtype=torch.float32, device=device)

    @property
    def miner(self) -> HardNegativeMiner:
        return self.sampler.miner

    def pool_for_scoring(self) -> CachedImageDataset:
        """The negatives pool's images as validation shows them (no augmentation), indexed from 0."""
        return CachedImageDataset(self.train.pixels[self.n_main:], self.train.targets[self.n_main:], self.val.transform)

    def build_sampler(self, config: Config) -> EpochSampler:
        """This run's epoch sampler over (main, pool), its generator seeded from ``train.seed``."""
        self.generator.manual_seed(config.train.seed)
        per_epoch = config.data.negatives_per_epoch
        n_negatives = negatives_count(per_epoch, self.n_main, self.n_pool)
        main_labels = {self.labels[t] for t in self.train.targets[: self.n_main]}
        _check_pool_is_drawn(self.labels, main_labels, n_negatives, self.n_pool, self.n_main, per_epoch)
        miner = HardNegativeMiner(self.n_main, self.n_pool, self.pool_groups, config.data.hard_negative_max_weight,
                                  self.product_columns)
        self.sampler = EpochSampler(self.train.targets[: self.n_main], self.n_pool, n_negatives,
                                    balance=config.data.balance == "sampler", generator=self.generator, miner=miner)
        return self.sampler

    def loader(self, info: DistInfo, batch_size: int, workers: int | None, device: torch.device):
        """The training DataLoader: this rank's shard of the sampler's global order."""
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        # every rank takes the same number of items, at least 2 (a batch of one image fails in BatchNorm)
        rank_sampler = ShardedSampler(self.sampler, info, min_per_rank=2) if info.enabled else self.sampler
        # a final partial batch is dropped when there are full ones: it could hold a single image, and BatchNorm
        # cannot train on one (train.batch_size is at least 2, and a shorter epoch is one batch of at least 2)
        return torch.utils.data.DataLoader(
            self.train, batch_size=batch_size, sampler=rank_sampler, num_workers=workers,
            worker_init_fn=worker_init_fn if workers else None, drop_last=len(rank_sampler) > batch_size,
            pin_memory=device.type == "cuda", generator=self.worker_seeds,
            # workers start afresh each epoch, seeded from (seed, epoch): persistent ones were seeded once, when they
            # started, so a resumed run's epoch was augmented like the first epoch of a fresh run, not like the
            # uninterrupted run's (the cached images are shared with the forked workers, not copied)
            persistent_workers=False,
        )

    def set_epoch(self, seed: int, epoch: int) -> None:
        """The augmentation stream is a function of (seed, epoch), so a resumed epoch sees what it would have seen."""
        self.train.transform.set_seed(seed * 10_007 + epoch)
        self.worker_seeds.manual_seed(seed * 10_007 + epoch)  # DataLoader workers: base seed + worker id

    def state_dict(self) -> dict:
        return {"sampler_rng": self.generator.get_state(), **self.miner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["sampler_rng"])
        self.miner.load_state_dict(state)
