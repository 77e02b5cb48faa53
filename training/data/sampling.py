"""Per-epoch sampling: the main training set every epoch, plus a fresh draw from a negatives pool.

A pool of ordinary photos ten times larger than the positives must not make epochs ten times longer;
drawing a fixed number of them afresh each epoch shows the model the whole pool over a run.
"""

from __future__ import annotations

import numpy as np
import torch

from training import distributed


def negatives_count(per_epoch: float, main_size: int, pool_size: int) -> int:
    """``per_epoch`` >= 1 is a count, below 1 a ratio of the main set; never more than the pool."""
    n = int(per_epoch) if per_epoch >= 1 else int(round(per_epoch * main_size))
    return min(n, pool_size)


class HardNegativeMiner:
    """How strongly the model recently called each negatives-pool image a product class, and the draw weights
    that follow from it. Training items ``[0, n_main)`` are the main set, ``[n_main, n_main + n_pool)`` the pool
    (the index convention of ``TrainData``); ``pool_groups`` says which pool (--negatives root) each came from."""

    def __init__(self, n_main: int, n_pool: int, pool_groups: list[int] | None = None, max_weight: float = 1.0,
                 product_columns: list[int] | None = None):
        groups = np.zeros(n_pool, dtype=np.int64) if pool_groups is None else np.asarray(pool_groups, dtype=np.int64)
        if len(groups) != n_pool:
            raise ValueError("pool_groups needs one group per pool image")
        self.n_main, self.n_pool, self.pool_groups = n_main, n_pool, groups
        self.n_groups = len(np.unique(groups)) if n_pool else 0
        self.max_weight = max(1.0, max_weight)
        self.product_columns = product_columns
        self.hardness = np.zeros(n_pool, dtype=np.float64)
        self.touched = np.zeros(n_pool, dtype=bool)  # updated since the last cross-rank sync
        self.last_mined = 0
        self.last_mined_per_pool: list[int] = [0] * self.n_groups

    @property
    def weighted(self) -> bool:
        return self.max_weight > 1.0 and bool(self.hardness.any())

    def hardness_range(self) -> tuple[float, float]:
        """(typical, hard): the pool's median hardness (0 for images not scored yet) and its top decile (at least
        0.05 above the median). A negative at or above ``hard`` counts as mined."""
        if not self.n_pool:
            return 0.0, 1.0
        typical = float(np.median(self.hardness))
        return typical, max(float(np.percentile(self.hardness, 90)), typical + 0.05)

    def weights(self) -> torch.Tensor:
        """1 for typical negatives up to ``max_weight`` for the hardest, relative to the pool itself, so it
        bites even when every score is low in absolute terms; bounded, so the draw never collapses."""
        typical, hard = self.hardness_range()
        relative = np.clip((self.hardness - typical) / (hard - typical), 0.0, 1.0)
        return torch.as_tensor(1.0 + (self.max_weight - 1.0) * relative, dtype=torch.double)

    def update(self, indices: np.ndarray, product_scores: np.ndarray) -> None:
        """Record the highest product-class probability the model just gave these training items
        (a running mean once an image has been scored; its first score as it is). Main-set items are ignored."""
        indices = np.asarray(indices)
        in_pool = indices >= self.n_main
        pool_idx = indices[in_pool] - self.n_main
        scores = np.clip(product_scores[in_pool], 0.0, 1.0)
        seen = self.hardness[pool_idx] > 0
        self.hardness[pool_idx] = np.where(seen, 0.5 * self.hardness[pool_idx] + 0.5 * scores, np.maximum(scores, 1e-6))
        self.touched[pool_idx] = True

    @torch.no_grad()
    def update_from_batch(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        """``update`` with the batch's highest product-class softmax probability (needs ``product_columns``)."""
        if not self.n_pool:
            return
        product = torch.softmax(logits.detach().float(), 1)[:, self.product_columns].max(1).values
        self.update(indices.numpy(), product.cpu().numpy())

    def record_draw(self, pool: np.ndarray) -> None:
        """Count how many of an epoch's drawn pool images (pool positions) are hard, in all and per pool."""
        hard = self.hardness[pool] >= self.hardness_range()[1] if len(pool) else np.zeros(0, bool)
        self.last_mined = int(hard.sum())
        self.last_mined_per_pool = [int(hard[self.pool_groups[pool] == g].sum()) for g in range(self.n_groups)]

    def sync(self, info) -> None:
        """Merge the scores each rank updated on its own shard of the pool (a mean where several ranks scored)."""
        if not info.enabled or not self.n_pool:
            return
        touched, values = distributed.sum_arrays(info, self.touched.astype(np.float64), self.hardness * self.touched)
        seen = touched > 0
        self.hardness[seen] = values[seen] / touched[seen]
        self.touched[:] = False

    def state_dict(self) -> dict:
        return {"hardness": torch.from_numpy(self.hardness.copy())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("hardness") is not None:
            self.hardness = state["hardness"].numpy().astype(np.float64)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices ``[0, n_main)`` are the main set, ``[n_main, n_main + n_pool)`` the negatives pool
    (``pool_groups``: which pool each came from, when the ``miner`` does not say).

    balance=True gives each class an equal share of the epoch (as many draws as the main set has images),
    each class's share cut from fresh permutations of its images, so within a class every image appears
    as evenly as the share allows (a balanced set is then seen exactly once per epoch, where a weighted draw
    with replacement would leave about a third of it out); otherwise each main image appears once.
    ``n_negatives`` pool images are drawn without replacement every epoch, weighted by the ``miner``'s
    hardness within each pool. The generator's state is all the randomness, so resuming restores it.
    """

    def __init__(self, main_targets: list[int], n_pool: int, n_negatives: int, balance: bool,
                 generator: torch.Generator, pool_groups: list[int] | None = None,
                 miner: HardNegativeMiner | None = None):
        self.main_targets = np.asarray(main_targets)
        self.n_main = len(main_targets)
        self.n_pool = n_pool
        self.n_negatives = min(n_negatives, n_pool)
        self.balance = balance
        self.generator = generator
        self.class_members = [np.flatnonzero(self.main_targets == c) for c in np.unique(self.main_targets)]
        # pools (e.g. one per --negatives root) share each epoch's draw equally, so a big easy pool cannot
        # drown a small hard one
        self.miner = miner or HardNegativeMiner(self.n_main, n_pool, pool_groups)
        if (self.miner.n_main, self.miner.n_pool) != (self.n_main, n_pool):
            raise ValueError("the miner describes another main set or pool than the sampler")
        groups = self.miner.pool_groups
        self.group_members = [np.flatnonzero(groups == g) for g in np.unique(groups)] if n_pool else []

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
        weighted = self.miner.weighted
        weights = self.miner.weights() if weighted else None
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
        self.miner.record_draw(pool.numpy())
        pool = pool + self.n_main
        order = torch.cat([main, pool])
        order = order[torch.randperm(len(order), generator=self.generator)]
        return iter(order.tolist())
