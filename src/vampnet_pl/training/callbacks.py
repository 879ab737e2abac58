"""Training callbacks: random streams addressed by (seed, rank, batch), so a resumed run draws what an
uninterrupted one would have drawn, on any number of ranks; data-integrity metrics and limits; a progress
bar that reads the training metrics on the host only at log points."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar

from vampnet_pl.data.datamodule import DataIntegrityError, check_skip_rate
from vampnet_pl.data.validation import REASONS

log = logging.getLogger(__name__)


def batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed for one rank's one batch."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def log_step(trainer: L.Trainer) -> int:
    """The step a callback logs the optimiser step just taken at: Lightning's own train/ and val/ rows of that step
    (``global_step`` has already counted it)."""
    return trainer.global_step - 1


class LogPoints:
    """Which training batches end at a log point: the batch that completes an optimiser step that is a multiple
    of ``trainer.log_every_n_steps``, as for Lightning's loggers. Every host read of the training loop's
    metrics belongs there: on a GPU each read waits for the step to finish."""

    def __init__(self, every_when_not_logging: int | None = None) -> None:
        self.every_when_not_logging = every_when_not_logging  # the cadence with trainer.log_every_n_steps=0
        self.last_step: int | None = None

    def start(self, trainer: L.Trainer) -> None:
        self.last_step = trainer.global_step  # a resumed run starts at its checkpoint's step

    def stepped(self, trainer: L.Trainer) -> bool:
        """Whether the optimiser stepped since the previous call (not inside a gradient accumulation)."""
        stepped, self.last_step = trainer.global_step != self.last_step, trainer.global_step
        return stepped

    def __call__(self, trainer: L.Trainer) -> bool:
        every = trainer.log_every_n_steps if trainer.log_every_n_steps > 0 else self.every_when_not_logging
        return self.stepped(trainer) and bool(every) and trainer.global_step % every == 0


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


class FinalValidation(L.Callback):
    """Validate the final weights: Lightning validates at an epoch's end only, so a run whose last step
    (``trainer.max_steps``) fell mid-epoch ended unscored (its last ``val/`` metrics, best checkpoints and the
    ablation's final scores were of older weights). At the batch that completes the last step, the validation
    interval becomes that batch's count, so Lightning validates after it; at an epoch's end it validates once, as
    always. (``trainer.should_stop`` would validate too, but also makes that step a log point, one that logs
    metrics of earlier steps as its own.)

    The checkpoint records the step of the last validation (this callback's state, ``validated_step``). A run
    resumed from a checkpoint at its last step that was written before that step's validation (``last.ckpt`` is
    written first, see ``checkpointing.LastCheckpoint``; a kill, a node failure in between) would otherwise end at
    once, unscored: it validates first, then ends as a finished run does (``last.ckpt`` written again, with the
    scores). A checkpoint written before this record existed is taken as validated at its step unless Lightning's
    progress in it shows it was written at a training batch's end (:func:`validated_step_unrecorded`)."""

    def __init__(self) -> None:
        self._val_check_batch: int | float | None = None  # Lightning's own, restored when training ends
        self.validated_step: int | None = None  # the global step of the last validation (not a sanity check)

    def state_dict(self) -> dict:
        return {"validated_step": self.validated_step}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.validated_step = validated_step_unrecorded(checkpoint)  # load_state_dict follows, where it was recorded

    def load_state_dict(self, state_dict: dict) -> None:
        self.validated_step = state_dict.get("validated_step")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            validate_before_a_skipped_fit(trainer, self)

    def owed(self, trainer: L.Trainer) -> bool:
        """Whether the weights at the last step were never validated, where Lightning would have validated them;
        the same answer on every rank (the checkpoint's record)."""
        return (0 < trainer.max_steps <= trainer.global_step and self.validated_step != trainer.global_step
                and trainer.val_check_batch not in (None, float("inf"))
                and trainer.fit_loop.epoch_loop._should_check_val_epoch())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if not 0 < trainer.max_steps <= trainer.global_step or trainer.val_check_batch in (None, float("inf")):
            return  # not the last step (the same on every rank), or no batch-counted validation interval
        loop = trainer.fit_loop.epoch_loop  # Lightning validates when (batches counted as below) % interval == 0
        batches = loop.total_batch_idx + 1 if trainer.check_val_every_n_epoch is None else loop.batch_idx + 1
        if self._val_check_batch is None:
            self._val_check_batch = trainer.val_check_batch
        trainer.val_check_batch = batches

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_check_batch is not None:
            trainer.val_check_batch, self._val_check_batch = self._val_check_batch, None


def validated_step_unrecorded(checkpoint: dict) -> int | None:
    """The validated step of a checkpoint with no :class:`FinalValidation` record (an older one): its own step, or
    None where Lightning's progress shows a training batch processed but not completed, that is a checkpoint written
    at that batch's end (``last.ckpt`` every ``every_n_train_steps``, a requeue), before its step's validation."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("total", {})
    return None if progress.get("completed", 0) < progress.get("processed", 0) else checkpoint.get("global_step")


def validate_before_a_skipped_fit(trainer: L.Trainer, final: FinalValidation) -> None:
    """Make Lightning's fit loop validate a resumed checkpoint that ``final`` finds :meth:`~FinalValidation.owed` a
    validation. Lightning skips the whole loop when the restored step has reached ``trainer.max_steps`` (no
    ``on_train_start``, no validation, no ``on_train_end``); here that loop starts, validates and ends (as at the
    last step of an uninterrupted run: best checkpoints, metrics at that step, ``last.ckpt`` written again)."""
    loop = trainer.fit_loop
    names = ("run", "setup_data", "on_run_start", "on_run_end")
    if not (all(callable(getattr(loop, n, None)) for n in names) and hasattr(loop, "skip")
            and callable(getattr(loop.epoch_loop, "_should_check_val_epoch", None))):
        log.warning("this Lightning runs its fit loop in another way than FinalValidation expects: a run resumed "
                    "at its last step before that step's validation ends without it")
        return
    if getattr(loop.run, "validates_first", False):
        return  # a second fit of this trainer
    run = loop.run

    def run_validating_first() -> None:
        loop.setup_data()  # Lightning's run starts so too (once): the validation interval is known after it
        if not (final.owed(trainer) and loop.skip):
            return run()
        if trainer.is_global_zero:
            log.info("the checkpoint at step %d (trainer.max_steps) was written before that step's validation: "
                     "validating it now", trainer.global_step)
        loop.on_run_start()  # on_train_start
        trainer.validating = True
        loop.epoch_loop.val_loop.run()
        trainer.training = True
        loop.on_run_end()  # on_train_end: last.ckpt is written again, with this validation's scores

    run_validating_first.validates_first = True
    loop.run = run_validating_first


class DataHealth(L.Callback):
    """What the data readers skipped, as metrics summed over ranks, with the skip-rate limit and a closing summary.

    Train batches carry their DataLoader worker's cumulative :meth:`SkipCounter.report` (``batch["data_health"]``:
    the counts live in worker processes). Every ``trainer.log_every_n_steps`` optimiser steps (every step with
    ``trainer.log_every_n_steps=0``), and at the end, the
    latest report of each worker is summed, all-reduced over ranks and logged as ``data/skipped/<reason>``,
    ``data/samples_read`` and ``data/skip_rate``; ``data.max_skip_rate`` is applied to those sums (all ranks
    decide together, so none is left waiting). Validation skips (every rank reads the same windows) are
    logged unsummed as ``data/skipped_val/<reason>``.
    """

    def __init__(self) -> None:
        self.reports: dict[int, dict] = {}
        self.summary: dict | None = None
        self.log_points = LogPoints(every_when_not_logging=1)  # the skip-rate limit applies without logging too

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_points.start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        report = batch.get("data_health") if isinstance(batch, dict) else None
        if report:
            self.reports[report["worker"]] = report
        if self.log_points(trainer):  # all ranks together: the same global step
            self._sync(trainer, pl_module, emit=trainer.log_every_n_steps > 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skips = getattr(trainer.datamodule, "val_skips", None) if trainer.datamodule is not None else None
        if skips is not None and not trainer.sanity_checking:
            for reason in REASONS:
                pl_module.log(f"data/skipped_val/{reason}", float(skips.counts[reason]), sync_dist=True,
                              reduce_fx="max")  # every rank read the same windows: the same count

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self._sync(trainer, pl_module, emit=False)
        val = getattr(trainer.datamodule, "val_skips", None) if trainer.datamodule is not None else None
        self.summary = {"train": totals, "validation": val.report() if val is not None else None}
        if trainer.is_global_zero:
            for split, report in self.summary.items():
                if report is None:
                    continue
                skipped = sum(report["counts"].values())
                reasons = ", ".join(f"{n} {r}" for r, n in report["counts"].items() if n) or "none"
                log.info("data integrity, %s: %d samples passed, %d skipped (%s)%s", split, report["samples"], skipped,
                         reasons, f"; damaged shards: {', '.join(report['damaged_shards'])}" if skipped else "")

    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule, emit: bool) -> dict:
        """Sum of the workers' reports over all ranks; raises when the skip rate passes the limit."""
        local = [sum(r["samples"] for r in self.reports.values())]
        local += [sum(r["counts"][reason] for r in self.reports.values()) for reason in REASONS]
        summed = trainer.strategy.reduce(torch.tensor(local, dtype=torch.long, device=pl_module.device),
                                         reduce_op="sum")
        values = [int(v) for v in summed.tolist()]
        totals = {"samples": values[0], "counts": dict(zip(REASONS, values[1:])),
                  "damaged_shards": sorted({s for r in self.reports.values() for s in r["damaged_shards"]})}
        if emit:
            seen = values[0] + sum(values[1:])
            for reason, count in totals["counts"].items():
                pl_module.log(f"data/skipped/{reason}", float(count), on_step=True, on_epoch=False, sync_dist=False)
            pl_module.log("data/samples_read", float(seen), on_step=True, on_epoch=False, sync_dist=False)
            pl_module.log("data/skip_rate", sum(values[1:]) / max(1, seen), on_step=True, on_epoch=False, sync_dist=False)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "hparams") and "max_skip_rate" in datamodule.hparams:
            try:
                check_skip_rate(totals, datamodule.hparams.max_skip_rate, datamodule.hparams.skip_rate_min_samples,
                                f"train data (all {trainer.world_size} ranks)")
            except DataIntegrityError:
                totals["damaged_shards"] = _gathered_names(totals["damaged_shards"])
                check_skip_rate(totals, datamodule.hparams.max_skip_rate, datamodule.hparams.skip_rate_min_samples,
                                f"train data (all {trainer.world_size} ranks)")
        return totals


def _gathered_names(names: list[str]) -> list[str]:
    """Every rank's names (all ranks call this together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return names
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part})


class LogPointProgressBar(RichProgressBar):
    """Lightning's progress bar, with the training step metrics as of the last log point.

    Lightning converts every metric logged with ``prog_bar=True`` to a Python number after every batch,
    with the bar on or off: on a GPU each is a wait for the whole step to finish, every step. The module
    logs its training metrics without ``prog_bar``; this bar reads the ones it shows (:attr:`shown`) where
    the loggers read them anyway: every ``trainer.log_every_n_steps`` optimiser steps.
    Validation metrics (read once per validation) show as before."""

    shown = ("train/loss_step", "train/top1_masked_step")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latest: dict[str, float] = {}
        self.log_points = LogPoints()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_points.start(trainer)
        super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.log_points(trainer):
            metrics = trainer.callback_metrics
            self.latest.update({name: float(metrics[name]) for name in self.shown if name in metrics})
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self.latest}

    def _get_train_description(self, current_epoch: int) -> str:
        """``Epoch N``, and ``/last`` only where epochs bound the run: ours end at ``max_steps`` (``max_epochs=-1``,
        which Lightning's bar showed as ``Epoch 0/-2``)."""
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # as wide as the validation bar's: no flicker
