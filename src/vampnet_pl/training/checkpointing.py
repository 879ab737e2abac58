"""Checkpoint files that appear whole or not at all, and the leftovers of a killed write.

Lightning's own single-file save stages the bytes in the system temp folder and then moves them:
across filesystems that move is a copy into the open target, so a kill or a full disk mid-copy
destroys the previous checkpoint, and a kill leaves the staged file behind. Here the bytes go to a
temporary file beside the target, are synced, and replace it in one rename
(:func:`vampnet_pl.utils.atomic.atomic_path`). Sharded checkpoints: see
:class:`vampnet_pl.training.parallel.AtomicFolderCheckpoints`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from vampnet_pl.model.vampnet import KERNEL_FIELDS
from vampnet_pl.utils.atomic import atomic_path

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is untouched."""


def checkpoint_write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException: (error, trace) per rank
    if failures:
        err = next((error for error, _ in failures.values() if isinstance(error, OSError)), err)
    strerror = getattr(err, "strerror", None) or str(err)
    return CheckpointWriteError(getattr(err, "errno", None) or 0,
                                f"checkpoint {path} was not written ({strerror}); the previous checkpoint there, if "
                                "any, is intact; free space (or fix the folder) and resume")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints written beside their target and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            raise checkpoint_write_error(path, err) from err


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps, and at the last step (``trainer.max_steps``) when that
    falls between two: Lightning writes it at the end only when it never wrote it, so a run of 1200 steps saving
    every 500 left step 1000's weights for export and resume. Written at the last step before that step's
    validation (the final one, see ``callbacks.FinalValidation``), it is written again after it, so that it holds
    the final scores (the best checkpoints' state included); a run killed in between validates when resumed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._validated_after_save: int | None = None  # a step this file was saved at before its validation

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved_before = not trainer.sanity_checking and self._last_global_step_saved == trainer.global_step
        super().on_validation_end(trainer, pl_module)
        self._validated_after_save = trainer.global_step if saved_before else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        finished = 0 < trainer.max_steps <= trainer.global_step  # not a stop for a requeue or a signal
        stale = self._validated_after_save == trainer.global_step
        if finished and (stale or not self._should_skip_saving_checkpoint(trainer)):  # every rank alike
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def writes(self, path: Path) -> bool:
        """Whether ``path`` is this callback's ``last.ckpt``."""
        last = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        return (bool(self.save_last) and self.dirpath is not None
                and Path(self.dirpath, last).resolve() == Path(path).resolve())

    def saved_by_requeue(self, trainer: L.Trainer, path: Path) -> None:
        """The requeue (:class:`~vampnet_pl.training.slurm.SlurmRequeue`, whose hook runs first) has just written
        ``path`` (this callback's ``last.ckpt``) at this step. Neither the periodic save due at the same step nor
        Lightning's save at the end of training (of a callback that has not saved yet) writes it again, inside the
        signal's grace time."""
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = self.last_model_path = str(path)


def remove_checkpoint_leftovers(folder: str | Path) -> list[Path]:
    """Delete what a killed checkpoint write leaves: ``.<name>.*.tmp`` files and ``*.partial`` folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = [*folder.glob(".*.tmp"), *folder.glob("*.partial")]
    for path in leftovers:
        log.warning("removing %s, left by an interrupted checkpoint write", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


class ResumeMismatch(ValueError):
    """The run folder holds a checkpoint of another run (another model, masking or loss)."""


# What makes a checkpoint another run's: the model (less the kernels it runs with), what it learns from and how.
RUN_DEFINING = ("model", "masking", "label_smoothing", "loss_weighting", "lora")


def checkpoint_metadata(checkpoint: str | Path) -> dict | None:
    """A training checkpoint's dict with its tensors left unread (a file, or a sharded folder's ``meta.pt``);
    None where there is none."""
    path = Path(checkpoint)
    path = path / "meta.pt" if path.is_dir() else path
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # our own


def init_from_change(metadata: dict, hparams: dict, init_from_sha256: str | None) -> list[str]:
    """The start a resume would give up: ``init_from`` another model than the checkpoint's run started from
    (told by the file's sha256, so a moved file is the same start), or set where that run started from scratch.
    The checkpoint's weights win on resume, so this run's ``init_from`` would be silently ignored (and recorded)."""
    before = metadata["hyper_parameters"].get("init_from")
    if init_from_sha256 is None:
        return []  # no init_from now: the run goes on from the checkpoint's weights, whatever it started from
    if before is None:
        return [f"init_from None -> {hparams.get('init_from')!r}"]
    recorded = metadata.get("init_from_sha256")
    if recorded is not None and recorded != init_from_sha256:  # older checkpoints recorded no digest
        return [f"init_from {before!r} (sha256 {recorded[:12]}) -> {hparams.get('init_from')!r} (sha256 "
                f"{init_from_sha256[:12]}), another model"]
    return []


def check_resumable(checkpoint: str | Path, hparams: dict, init_from_sha256: str | None = None) -> None:
    """Raise :class:`ResumeMismatch`, naming the differences, when ``checkpoint`` was trained with another model,
    masking or loss than ``hparams`` (a module's), or started from another ``init_from`` (``init_from_sha256``, the
    module's): resuming would load another run's weights and carry on as if they were this one's. Everything else
    (steps, devices, learning rate, logging) may change on resume."""
    metadata = checkpoint_metadata(checkpoint) or {}
    recorded = metadata.get("hyper_parameters")
    if recorded is None:
        return
    changes = init_from_change(metadata, hparams, init_from_sha256)
    for key in RUN_DEFINING:
        before, after = recorded.get(key), hparams.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            # keys of both only: a field added to or dropped from a schema since is not a change of this run's
            names = sorted((before.keys() & after.keys()) - (set(KERNEL_FIELDS) if key == "model" else set()))
            changes += [f"{key}.{n} {before.get(n)!r} -> {after.get(n)!r}" for n in names if before.get(n) != after.get(n)]
        elif before != after:
            changes.append(f"{key} {before!r} -> {after!r}")
    if changes:
        raise ResumeMismatch(
            f"{checkpoint} is another run's ({'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}): give this "
            "run its own folder (run_name=... or runs_dir=...), or resume=false to start over in this one")
