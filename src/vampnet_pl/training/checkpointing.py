"""Checkpoint files that appear whole or not at all, and the leftovers of a killed write.

Lightning's own single-file save stages the bytes in the system temp folder and then moves them:
across filesystems that move is a copy into the open target, so a kill or a full disk mid-copy
destroys the previous checkpoint, and a kill leaves the staged file behind. Here the bytes go to a
temporary file beside the target, are synced, and replace it in one rename
(:func:`vampnet_pl.utils.atomic.atomic_path`). Sharded checkpoints: see
:class:`vampnet_pl.training.parallel.AtomicModelParallelStrategy`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vampnet_pl.utils.atomic import atomic_path

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is untouched."""


def checkpoint_write_error(path: Path, err: BaseException) -> CheckpointWriteError:
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
