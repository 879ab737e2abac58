"""A run's ``train.lock``: held by the process that trains the run, so no second launcher (local or SLURM) starts
it while it trains."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from vampnet_pl.ablation.spec import Run

LOCK = "train.lock"  # held by the run's training process while it runs


def lock_run(run_dir: Path):
    """The run's ``train.lock``, opened and locked (``flock``), or None when another process holds it. The training
    process inherits the open file, so the lock stays held while it runs, whatever becomes of this runner."""
    handle = open(Path(run_dir) / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def held_elsewhere(run: Run) -> str:
    """An Outcome's detail for a run whose ``train.lock`` another process holds."""
    try:
        pid = json.loads((run.run_dir / "attempt.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        pid = "?"
    return (f"being trained by another process (pid {pid}, holding {LOCK}); not started again: stop it, or wait "
            "and re-run")


def trained_locally(run: Run) -> str | None:
    """:func:`held_elsewhere`'s detail while a local training process holds the run's lock, else None."""
    if not (Path(run.run_dir) / LOCK).exists():
        return None
    lock = lock_run(run.run_dir)
    if lock is None:
        return held_elsewhere(run)
    lock.close()
    return None
