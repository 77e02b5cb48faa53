"""The training loop's parts on a tiny conv net, in milliseconds: one epoch, validation, progress and early
stopping, the run directory's kill-safe writes, hard-negative mining's state."""

import csv

import numpy as np
import pytest
import torch

from training.config import load_config
from training.data.sampling import EpochSampler, HardNegativeMiner
from training.loop.optim import build_optimization, peak_lr
from training.loop.rundir import RunDir, TrainState, truncate_history
from training.loop.steps import train_one_epoch, validate


class Toy(torch.utils.data.Dataset):
    """Two classes told apart by brightness: class 1 images are bright, class 0 dark, plus noise."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 2 for i in range(n)]
        y = torch.tensor(self.targets, dtype=torch.float32)
        self.x = (y * 2 - 1).view(-1, 1, 1, 1) + 0.3 * torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i], i


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def tiny_optimization(module, steps_per_epoch=4, **train):
    values = {"epochs": 3, "lr": 0.05, "layer_decay": None, "ema": False, "warmup_epochs": 0,
              "label_smoothing": 0.0, "mixup": {"prob": 0.0}}
    values.update(train)
    tc = load_config(None, {"train": values}).train
    return build_optimization(module, tc, steps_per_epoch, 1, torch.device("cpu"), num_classes=2)


def test_train_one_epoch_reduces_the_loss_on_a_separable_batch():
    module, data = tiny_net(), Toy()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    opt, state, batches = tiny_optimization(module), TrainState(), []
    losses = [train_one_epoch(module, module, loader, opt, state, torch.device("cpu"),
                              on_batch=lambda idx: batches.append(idx.tolist())).loss for _ in range(3)]
    assert losses[2] < 0.5 * losses[0] and state.step == 12
    assert sorted(i for b in batches[:4] for i in b) == list(range(32))  # every item once per epoch, indices seen


def test_train_one_epoch_updates_the_ema_from_the_unwrapped_module():
    module = tiny_net()
    opt = tiny_optimization(module, ema=True, ema_decay=0.5)
    before = [p.clone() for p in opt.ema.module.parameters()]
    train_one_epoch(module, module, torch.utils.data.DataLoader(Toy(), batch_size=8), opt, TrainState(), torch.device("cpu"))
    assert opt.eval_module(module) is opt.ema.module
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.ema.module.parameters()))


def _lrs_used(module, opt, state, epochs: int) -> list[float]:
    """The lr each optimizer step of ``epochs`` epochs on the toy data actually took (4 steps an epoch)."""
    used = []
    hook = opt.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(peak_lr(optimizer)))
    for _ in range(epochs):
        train_one_epoch(module, module, torch.utils.data.DataLoader(Toy(), batch_size=8), opt, state, torch.device("cpu"))
    hook.remove()
    return used


def test_resume_with_more_epochs_trains_them_on_the_longer_schedule():
    """--resume --epochs 4 of a finished 2-epoch run restored the 2-epoch schedule with the rest: its extra epochs
    all trained at the floor lr (lr x min_lr_ratio). Rebuilt for 4 epochs and set to the saved step, they take the
    lrs of a run planned with 4; an unchanged resume keeps the lrs of the uninterrupted run."""
    planned = _lrs_used(tiny_net(), tiny_optimization(tiny_net(), epochs=4, warmup_epochs=0.5), TrainState(), 4)
    module, state = tiny_net(), TrainState()
    short = tiny_optimization(module, epochs=2, warmup_epochs=0.5)
    first = _lrs_used(module, short, state, 1)
    paused = {**short.state_dict(), **state.state_dict()}
    second = _lrs_used(module, short, state, 1)
    saved = {**short.state_dict(), **state.state_dict()}

    for at, epochs, left, expected in ((paused, 2, 1, second), (saved, 4, 2, planned[8:])):
        resumed_module, resumed_state = tiny_net(1), TrainState()
        resumed = tiny_optimization(resumed_module, epochs=epochs, warmup_epochs=0.5)
        resumed.load_state_dict(at)
        resumed_state.load_state_dict(at)
        assert _lrs_used(resumed_module, resumed, resumed_state, left) == pytest.approx(expected, rel=1e-9, abs=0.0)
    assert first + second != planned[:8] and min(planned[8:]) > 2 * 0.05 * 0.01  # the floor: lr x min_lr_ratio


def test_validate_returns_metrics_of_the_dataset_in_order():
    data = Toy(20)

    class Brightness(torch.nn.Module):  # logits (dark, bright) from the mean pixel: right on every toy item
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1)

    metrics = validate(Brightness(), data, ["dark", "bright"], batch_size=6, device=torch.device("cpu"))
    assert metrics["accuracy"] == 1.0 and np.array(metrics["confusion_matrix"]).tolist() == [[10, 0], [0, 10]]

    class Flipped(Brightness):
        def forward(self, x):
            return -super().forward(x)

    assert validate(Flipped(), data, ["dark", "bright"], 6, torch.device("cpu"))["accuracy"] == 0.0


def test_train_state_tracks_the_best_epoch_and_stops_after_patience():
    state = TrainState()
    improved = [state.update(epoch, f1) for epoch, f1 in enumerate([0.5, 0.6, 0.6, 0.55], start=1)]
    assert improved == [True, True, False, False]
    assert (state.best_epoch, state.best_f1, state.bad_epochs, state.epoch) == (2, 0.6, 2, 4)
    assert state.should_stop(2) and not state.should_stop(3) and not state.should_stop(None)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state


def _epochs(path):
    with path.open(newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_run_dir_writes_the_history_row_before_the_checkpoint(tmp_path, monkeypatch):
    import training.loop.rundir as rundir

    run = RunDir(tmp_path)
    run.prepare()
    run.save_last({"epoch": 1, "train_loss": 0.9}, {"epoch": 1})
    assert _epochs(run.history) == [1] and (tmp_path / "last.pt").exists()

    def killed(obj, path):
        raise KeyboardInterrupt("killed while writing last.pt")

    monkeypatch.setattr(rundir, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        run.save_last({"epoch": 2, "train_loss": 0.8}, {"epoch": 2})
    assert _epochs(run.history) == [1, 2]  # the row of an unsaved epoch: resume drops it
    run.truncate_history(1)
    assert _epochs(run.history) == [1]


def test_history_truncation_keeps_saved_epochs_and_all_columns(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,train_loss\n1,0.9\n2,0.8\n5,0.1\n")  # an earlier run's leftovers beyond epoch 2
    truncate_history(path, 2)
    assert _epochs(path) == [1, 2]
    assert path.read_text().splitlines()[0].split(",")[:3] == ["epoch", "train_loss", "val_loss"]
    truncate_history(path, 0)
    assert _epochs(path) == []


def test_run_dir_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from serving.errors import WildcheckError

    with pytest.raises(WildcheckError, match="start without --resume"):
        RunDir(tmp_path).resume_state()


def test_mining_state_round_trips_and_the_draw_follows_it():
    def sampler(miner, seed):
        return EpochSampler([0, 1] * 10, n_pool=100, n_negatives=20, balance=False,
                            generator=torch.Generator().manual_seed(seed), miner=miner)

    miner = HardNegativeMiner(n_main=20, n_pool=100, pool_groups=[0] * 50 + [1] * 50, max_weight=4.0,
                              product_columns=[1])
    logits = torch.zeros(6, 2)
    logits[:3, 1] = 5.0  # the model calls pool images 0..2 products: hard
    miner.update_from_batch(torch.tensor([20, 21, 22, 23, 24, 0]), logits)
    assert miner.hardness[:3].min() > 0.9 and 0 < miner.hardness[3] < 0.6 and miner.touched[:5].all()
    copy = HardNegativeMiner(n_main=20, n_pool=100, pool_groups=[0] * 50 + [1] * 50, max_weight=4.0)
    copy.load_state_dict(miner.state_dict())
    assert np.array_equal(copy.hardness, miner.hardness)
    first, second = list(sampler(miner, 7)), list(sampler(copy, 7))
    assert first == second and (miner.last_mined, miner.last_mined_per_pool) == (copy.last_mined, copy.last_mined_per_pool)
    assert list(sampler(HardNegativeMiner(20, 100, [0] * 50 + [1] * 50, 4.0), 7)) != first  # hardness changes the draw


def test_the_mixup_coin_is_reproducible_from_its_generator():
    from training.augment import BatchMixer

    mixup = load_config(None, {"train": {"mixup": {"prob": 0.5}}}).train.mixup
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])

    def tosses(mixer, n=40):
        return [mixer(x.clone(), y)[2] for _ in range(n)]

    a, b = BatchMixer(mixup, 0.1, 2, seed=3), BatchMixer(mixup, 0.1, 2, seed=3)
    first = tosses(a)
    assert first == tosses(b) and 5 < sum(first) < 35  # same seed, same batches mixed; about half of them
    state = a.state_dict()
    later = tosses(a)
    b.load_state_dict(state)
    assert tosses(b) == later != first  # a restored coin continues where it was
    assert not any(a(x[:3], y[:3])[2] for _ in range(10))  # odd batches never mix
    xm, target, mixed = next(out for out in (a(x.clone(), y) for _ in range(20)) if out[2])  # timm mixes in place
    assert target.shape == (4, 2) and not torch.equal(xm, x)  # soft targets, blended images


def test_train_data_puts_main_images_first_then_the_pool_which_keeps_its_source_and_pool(tmp_path):
    from tests.conftest import photo
    from training.loop.data import TrainData, negative_samples, resolve_preprocessing

    def images(folder, n, seed):
        folder.mkdir(parents=True)
        for i in range(n):
            photo(seed + i, (64, 48)).save(folder / f"{i}.jpg")

    main, negatives = tmp_path / "main", tmp_path / "street_photos"
    for split, n in (("train", 3), ("val", 1)):
        images(main / split / "ivory", n, 0)
        images(main / split / "other", n, 10)
    images(negatives / "train" / "cars" / "shop_a", 4, 20)  # labelled 'cars' on disk, source shop_a
    images(negatives / "val" / "cars", 2, 30)
    pool, groups, val = negative_samples([str(negatives)], "other", val_size=1, seed=0)
    assert {(s.label, s.source, s.pool) for s in pool} == {("other", "shop_a", "street_photos")}
    assert groups == [0] * 4 and len(val) == 1 and val[0].pool == "street_photos"

    config = load_config(None, {"data": {"img_size": 32, "negatives": [str(negatives)], "negatives_per_epoch": 2,
                                         "cache_workers": 1}})
    data = TrainData.build([str(main)], config, resolve_preprocessing(config), say=lambda *a: None)
    assert (data.n_main, data.n_pool, data.labels) == (6, 4, ["ivory", "other"])
    assert [s.pool for s in data.train_samples] == ["main"] * 6 + ["street_photos"] * 4
    assert data.train.targets[6:] == [1] * 4 and data.product_columns == [0]
    sampler = data.build_sampler(config)
    epoch = list(sampler)
    assert len(epoch) == 8 and sorted(i for i in epoch if i < 6) == list(range(6))  # every main image once
    assert len({i for i in epoch if i >= 6}) == 2 and data.miner.n_main == 6  # two pool images drawn afresh


class PairedToy(Toy):
    """Toy pictures, each with a view whose first channel is washed out to one bright value (a stand-in for a
    listing condition): a net that reads brightness off every channel calls dark views bright."""

    def __init__(self, n: int = 32, seed: int = 0):
        super().__init__(n, seed)
        self.views = self.x.clone()
        self.views[:, 0] = 3.0

    def __getitem__(self, i):
        return (self.x[i], self.views[i]), self.targets[i], i


def _disagreement_after_training(weight: float, **train) -> tuple[float, list, float]:
    from training.loop.steps import view_disagreement

    module, data = tiny_net(), PairedToy()
    opt = tiny_optimization(module, consistency={"weight": weight}, **train)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    stats = [train_one_epoch(module, module, loader, opt, TrainState(), torch.device("cpu")) for _ in range(6)]
    module.eval()
    with torch.no_grad():
        accuracy = (module(data.x).argmax(1) == torch.tensor(data.targets)).float().mean().item()
        return view_disagreement(module(data.x), module(data.views)).item(), stats, accuracy


def test_paired_views_pull_a_views_prediction_towards_its_pictures():
    """train.consistency: the same net on the same batches agrees with itself under the condition when the views'
    term is on, and classifies the pictures as well."""
    without, stats_off, _ = _disagreement_after_training(0.0)
    with_term, stats_on, accuracy = _disagreement_after_training(5.0)
    assert with_term < 0.1 * without and accuracy == 1.0
    assert stats_off[-1].consistency is None and stats_on[-1].paired == 32 and stats_on[-1].consistency > 0


def test_mixed_batches_have_no_views_term():
    _, stats, _ = _disagreement_after_training(5.0, mixup={"prob": 1.0})
    assert all(s.paired == 0 and s.consistency is None for s in stats)
