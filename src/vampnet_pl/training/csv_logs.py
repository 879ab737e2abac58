"""CSV logs that survive a restart.

Lightning's CSVLogger deletes the ``metrics.csv`` it finds when a run starts again in the same folder (a
resume, a SLURM requeue). Before the loggers are built, rank 0 moves it to ``<run dir>/curves/attempt-<k>.csv``
(k = 0, 1, ...); :func:`attempt_logs` lists them in order, the live ``metrics.csv`` holds the latest attempt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def csv_log_dirs(cfg: DictConfig) -> list[Path]:
    """The folders of the config's CSV loggers (``logger`` is one ``_target_`` node or a mapping of them)."""
    nodes = [cfg.logger] if cfg.logger is not None and "_target_" in cfg.logger else list((cfg.logger or {}).values())
    return [Path(n.save_dir) / (n.name or "") / str(n.version if n.version is not None else "")
            for n in nodes if n and n.get("_target_") == CSV_LOGGER]


def attempt_logs(run_dir: str | Path) -> list[Path]:
    """The CSV logs of a run's earlier attempts, oldest first."""
    return sorted((Path(run_dir) / "curves").glob("attempt-*.csv"), key=lambda p: int(p.stem.split("-")[1]))


def keep_earlier_attempt(run_dir: str | Path, cfg: DictConfig) -> list[Path]:
    """Move each CSV logger's non-empty ``metrics.csv`` to the next ``curves/attempt-<k>.csv``; the paths written."""
    moved = []
    for log_dir in csv_log_dirs(cfg):
        live = log_dir / "metrics.csv"
        if live.is_file() and live.stat().st_size:
            curves = Path(run_dir) / "curves"
            curves.mkdir(parents=True, exist_ok=True)
            target = curves / f"attempt-{len(attempt_logs(run_dir))}.csv"
            os.replace(live, target)
            log.info("kept the previous attempt's CSV log as %s", target)
            moved.append(target)
    return moved
