"""Per-epoch sampling: the main training set every epoch, plus a fresh draw from a negatives pool.

A pool of ordinary photos ten times larger than the positives must not make epochs ten times longer;
drawing a fixed number of them afresh each epoch shows the model the whole pool over a run.
"""

from __future__ import annotations

import numpy as np
import torch


def negatives_count(per_epoch: float, main_size: int, pool_size: int) -> int:
    """``per_epoch`` >= 1 is a count, below 1 a ratio of the main set; never more than the pool."""
    n = int(per_epoch) if per_epoch >= 1 else int(round(per_epoch * main_size))
    return min(n, pool_size)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices ``[0, n_main)`` are the main set, ``[n_main, n_main + n_pool)`` the negatives pool.

    balance=True gives each class an equal share of the epoch (as many draws as the main set has images),
    each class's share cut from fresh permutations of its images, so within a class every image appears
    as evenly as the share allows (a balanced set is then seen exactly once per epoch, where a weighted draw
    with replacement would leave about a third of it out); otherwise each main image appears once.
    ``n_negatives`` pool images are drawn without replacement every epoch. The generator's state is all
    the randomness, so resuming restores it.
    """

    def __init__(self, main_targets: list[int], n_pool: int, n_negatives: int, balance: bool,
                 generator: torch.Generator, hard_max_weight: float = 1.0, pool_groups: list[int] | None = None):
        self.main_targets = np.asarray(main_targets)
        self.n_main = len(main_targets)
        self.n_pool = n_pool
        self.n_negatives = min(n_negatives, n_pool)
        self.balance = balance
        self.generator = generator
        self.class_members = [np.flatnonzero(self.main_targets == c) for c in np.unique(self.main_targets)]
        # pools (e.g. one per --negatives root) share each epoch's draw equally, so a big easy pool cannot
        # drown a small hard one
        groups = np.zeros(n_pool, dtype=np.int64) if pool_groups is None else np.asarray(pool_groups, dtype=np.int64)
        if len(groups) != n_pool:
            raise ValueError("pool_groups needs one group per pool image")
        self.pool_groups = groups
        self.group_members = [np.flatnonzero(groups == g) for g in np.unique(groups)] if n_pool else []
        # hard-negative mining: how strongly the model recently called each pool image a product class
        self.hardness = np.zeros(n_pool, dtype=np.float64)
        self.touched = np.zeros(n_pool, dtype=bool)  # updated since the last cross-rank sync
        self.hard_max_weight = max(1.0, hard_max_weight)
        self.last_mined = 0
        self.last_mined_per_group: list[int] = [0] * len(self.group_members)

    def hardness_range(self) -> tuple[float, float]:
        """(typical, hard): the pool's median hardness (0 for images not scored yet) and its top decile (at least
        0.05 above the median). A negative at or above ``hard`` counts as mined."""
        if not self.n_pool:
            return 0.0, 1.0
        typical = float(np.median(self.hardness))
        return typical, max(float(np.percentile(self.hardness, 90)), typical + 0.05)

    def pool_weights(self) -> torch.Tensor:
        """1 for typical negatives up to ``hard_max_weight`` for the hardest, relative to the pool itself, so it
        bites even when every score is low in absolute terms; bounded, so the draw never collapses."""
        typical, hard = self.hardness_range()
        relative = np.clip((self.hardness - typical) / (hard - typical), 0.0, 1.0)
        return torch.as_tensor(1.0 + (self.hard_max_weight - 1.0) * relative, dtype=torch.double)

    def update_hardness(self, indices: np.ndarray, product_scores: np.ndarray) -> None:
        """Record the highest product-class probability the model just gave these training items
        (a running mean once an image has been scored; its first score as it is)."""
        indices = np.asarray(indices)
        in_pool = indices >= self.n_main
        pool_idx = indices[in_pool] - self.n_main
        scores = np.clip(product_scores[in_pool], 0.0, 1.0)
        seen = self.hardness[pool_idx] > 0
        self.hardness[pool_idx] = np.where(seen, 0.5 * self.hardness[pool_idx] + 0.5 * scores, np.maximum(scores, 1e-6))
        self.touched[pool_idx] = True

    def _draw_pool(self) -> torch.Tensor:
        """``n_negatives`` pool indices without replacement: equal shares per group (what a small group cannot
        fill goes to the others), hardness-weighted within each group."""
        sizes = np.array([len(m) for m in self.group_members])
        shares = np.zeros(len(sizes), dtype=np.int64)
        left = self.n_negatives
        while left > 0:
            open_groups = np.flatnonzero(shares < sizes)
            each = np.full(len(open_groups), left // len(open_groups))
            extra = torch.randperm(len(open_groups), generator=self.generator)[: left % len(open_groups)].numpy()
            each[extra] += 1
            take = np.minimum(each, sizes[open_groups] - shares[open_groups])
            shares[open_groups] += take
            left -= int(take.sum())
        weighted = self.hard_max_weight > 1.0 and self.hardness.any()
        weights = self.pool_weights() if weighted else None
        parts = []
        for members, share in zip(self.group_members, shares):
            if share == 0:
                continue
            if weighted:
                pick = torch.multinomial(weights[members], int(share), replacement=False, generator=self.generator)
            else:
                pick = torch.randperm(len(members), generator=self.generator)[: int(share)]
            parts.append(torch.as_tensor(members)[pick])
        return torch.cat(parts)

    def _balanced_main(self) -> torch.Tensor:
        """Equal shares per class (the remainder to randomly chosen classes), each cut from permutations."""
        n_classes = len(self.class_members)
        shares = np.full(n_classes, self.n_main // n_classes)
        extra = torch.randperm(n_classes, generator=self.generator)[: self.n_main % n_classes].numpy()
        shares[extra] += 1
        parts = []
        for members, share in zip(self.class_members, shares):
            rounds = -(-int(share) // len(members))
            cycled = torch.cat([torch.randperm(len(members), generator=self.generator) for _ in range(rounds)])
            parts.append(torch.as_tensor(members)[cycled[:share]])
        return torch.cat(parts)

    def __len__(self) -> int:
        return self.n_main + self.n_negatives

    def __iter__(self):
        if self.balance and self.n_main:
            main = self._balanced_main()
        else:
            main = torch.randperm(self.n_main, generator=self.generator)
        if self.n_negatives == 0:
            pool = torch.zeros(0, dtype=torch.long)
        else:
            pool = self._draw_pool()
        hard = self.hardness[pool.numpy()] >= self.hardness_range()[1] if self.n_negatives else np.zeros(0, bool)
        self.last_mined = int(hard.sum())
        self.last_mined_per_group = [int(hard[self.pool_groups[pool.numpy()] == g].sum())
                                     for g in range(len(self.group_members))]
        pool = pool + self.n_main
        order = torch.cat([main, pool])
        order = order[torch.randperm(len(order), generator=self.generator)]
        return iter(order.tolist())
