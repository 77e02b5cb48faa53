"""A run directory and the loop's progress: what is written where, in which order, and when to stop.

RUN_DIR receives: ``config.yaml`` (resolved), ``labels.json``, ``last.pt`` (everything needed to resume),
``best.pt`` (inference weights, EMA when used, picked by validation macro-F1), ``history.csv`` (one row per
epoch), ``skipped.json`` (unreadable images), ``summary.json`` and ``history.png``. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.errors import InvalidInput, WildcheckError
from training import distributed
from training.config import UNREADABLE_LAST, Config, dump_config
from training.distributed import DistInfo
from training.fileio import atomic_torch_save, atomic_write_text, load_checkpoint, remove_stale_temporaries

HISTORY_FIELDS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
    "lr", "epoch_seconds", "train_images_per_s", "data_wait_share", "best", "mined_negatives",
    "mined_per_pool", "train_consistency",
]


class ResumeError(WildcheckError, FileNotFoundError):
    """--resume on a directory without a checkpoint."""


# what a run and its follow-ups write into RUN_DIR, which a fresh run removes: train's (with RUN_FILES' others, which
# it writes again first), calibrate's (calibration.json, reliability.png), compare's, grey-head's
PREVIOUS_RUN_FILES = ("best.pt", "last.pt", "summary.json", "history.png", "calibration.json", "reliability.png",
                      "compare.json", "compare.md", "grey_head.json")
# every file a run writes into RUN_DIR
RUN_FILES = (*PREVIOUS_RUN_FILES, "config.yaml", "labels.json", "skipped.json", "history.csv")


def append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})


def _epoch(row: dict) -> int | None:
    """A history row's epoch, or None for a row that is not one of ours (no epoch, or not a number)."""
    try:
        return int(row.get("epoch") or "")
    except ValueError:
        return None


def truncate_history(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs whose checkpoint was never written: a kill's leftover, or an earlier run's history."""
    if not path.exists():
        return
    rows = []
    if last_epoch > 0:  # a fresh run keeps nothing, and reads nothing: a history.csv of another tool crashed it
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            rows = [r for r in csv.DictReader(fh) if _epoch(r) is not None and _epoch(r) <= last_epoch]
    text = ",".join(HISTORY_FIELDS) + "\n" + "".join(",".join(str(r.get(k) or "") for k in HISTORY_FIELDS) + "\n"
                                                    for r in rows)
    atomic_write_text(path, text)


@dataclass
class TrainState:
    """Where the loop stands: epochs done, optimizer steps, the best validation macro-F1 and since when it
    has not improved (early stopping)."""

    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, macro_f1: float) -> bool:
        """Record epoch ``epoch`` (1-based) and its validation macro-F1; True when it is the best so far."""
        self.epoch = epoch
        improved = macro_f1 > self.best_f1
        if improved:
            self.best_f1, self.best_epoch, self.bad_epochs = macro_f1, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def should_stop(self, patience: int | None) -> bool:
        return bool(patience) and self.bad_epochs >= patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in asdict(self):
            setattr(self, key, state[key])


class RunDir:
    """The run directory: set up, resumed from, written at each epoch's end in a kill-safe order, finished."""

    def __init__(self, path: str | Path, info: DistInfo = DistInfo(), say=print):
        self.path, self.main, self.info, self.say = Path(path), info.main, info, say
        self.history = self.path / "history.csv"

    def prepare(self) -> None:
        """Create the directory and remove temporaries an interrupted write left (rank 0, the others wait). A folder
        where a run file goes (``mkdir RUN_DIR/best.pt``) is refused now, on every rank, not met by a traceback when
        the file is written (after caching, or after an epoch)."""
        folders = [name for name in RUN_FILES if (self.path / name).is_dir()]
        if folders:
            raise InvalidInput(f"{self.path} has folder(s) where the run writes files: {', '.join(folders)}; move or "
                               "remove them, or use another --out")
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.path):
                self.say(f"removed {stale.name}, left by an interrupted write")
        distributed.barrier(self.info)

    def resume_state(self) -> dict:
        last = self.path / "last.pt"
        if not last.exists():
            raise ResumeError(f"--resume: {last} does not exist; start without --resume")
        return load_checkpoint(last, advice=UNREADABLE_LAST)

    def write_setup(self, config: Config, labels: list[str], skipped: list, fresh: bool = True) -> None:
        """The run's setup files; a fresh run first removes what an earlier run left in the directory, so a run
        that fails later never leaves the old best.pt beside its own config and labels (a mixed run exports)."""
        if self.main and fresh:
            removed = [name for name in PREVIOUS_RUN_FILES if (self.path / name).exists()]
            for name in removed:
                (self.path / name).unlink()
            if removed:
                self.say(f"a fresh run replaces the one in {self.path}: removed {', '.join(removed)}")
        if self.main:
            atomic_write_text(self.path / "config.yaml", dump_config(config))
            atomic_write_text(self.path / "labels.json", json.dumps(labels, indent=2))
            atomic_write_text(self.path / "skipped.json", json.dumps([s.__dict__ for s in skipped], indent=2))
        if skipped:  # why, counted: a too-small or too-large picture is no unreadable file, and needs another fix
            why = Counter(s.reason.split(":")[0] for s in skipped)
            self.say(f"skipped {len(skipped)} image(s) ({', '.join(f'{code} {n}' for code, n in why.most_common())}); "
                     f"see {self.path / 'skipped.json'}")

    def truncate_history(self, last_epoch: int) -> None:
        """Rows beyond the checkpoint (all of them on a fresh start) describe no saved epoch."""
        if self.main:
            truncate_history(self.history, last_epoch)

    def save_best(self, payload: dict) -> None:
        if self.main:
            atomic_torch_save(payload, self.path / "best.pt")

    def save_last(self, row: dict, payload: dict) -> None:
        """History row first, then the checkpoint: a kill between the two leaves a row for an unsaved epoch,
        which resume drops (``truncate_history``); the other order would lose the row of a saved epoch."""
        if self.main:
            append_history(self.history, row)
            atomic_torch_save(payload, self.path / "last.pt")
        distributed.barrier(self.info)

    def finish(self, summary: dict) -> None:
        from training.plots import plot_history

        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))
        plot_history(self.history, self.path / "history.png")
