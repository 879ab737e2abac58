"""Training callbacks: random streams addressed by (seed, rank, batch), so a resumed run draws what an
uninterrupted one would have drawn, on any number of ranks."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed for one rank's one batch."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepSeedCallback(L.Callback):
    """Reseed Python, NumPy and torch (CPU and CUDA) before every training batch.

    Training masks and dropout then depend only on (seed, rank, batch index), never on what came
    before: a run resumed from any step-boundary checkpoint is bit-for-bit the uninterrupted run,
    and every rank draws its own masks. (Saving RNG state in the checkpoint cannot do this for
    several ranks: Lightning saves rank 0's callback state only.)
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        value = batch_seed(self.seed, trainer.global_rank, trainer.fit_loop.epoch_loop.total_batch_idx)
        random.seed(value)
        np.random.seed(value % 2**32)
        torch.manual_seed(value)  # seeds every CUDA device too
