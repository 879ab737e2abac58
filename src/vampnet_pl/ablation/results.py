"""Each run's record: ``results.json`` (config, commit, codec, final scores) and its curves over training steps.

A run folder (``<sweep>/runs/<run id>/``) holds the training's checkpoints and logs, plus:
- ``results.json``: written once the run has finished, atomically; its presence means "finished";
- ``run.json``: the run (its overrides) as its latest attempt was started; a re-run under other overrides is refused
  while the run has a checkpoint to resume;
- ``failure.json``: the last failed attempt (exit status, log tail; status ``diverged`` where training stopped on a
  non-finite loss, else ``failed``); removed when the run finishes;
- ``curves/attempt-<k>.csv``: the CSV log of each earlier attempt (moved aside by the train app, see
  :mod:`vampnet_pl.training.csv_logs`); the live one is the CSV log itself.

The final scores (:func:`final_metrics`) are read at one step per family, never each column's own last value:
- the last validation (``metrics_step``, the latest step with a ``val/`` value): every column with a value at
  that step, NaN included (a diverged run reports NaN, not the loss it had before it diverged);
- the last generation evaluation (``gen_metrics_step``, the latest step with a ``gen/`` value; the callback
  runs every ``every_n_steps``, which need not fall on the last validation): the ``gen/`` values at that step.
A ``val/`` or ``gen/`` column with earlier values but none at its family's step (a condition the evaluation's
time budget skipped) is no final score; it is listed in ``missing_metrics``. Other columns with no value at the
last validation (per-step training logs: gradient norm, throughput) are curves only.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vampnet_pl.training.csv_logs import attempt_logs, csv_log_dirs
from vampnet_pl.utils.atomic import write_json_atomic

RESULTS = "results.json"
FAILURE = "failure.json"
RUN = "run.json"
# Columns of the CSV log that are bookkeeping or per-step noise, not final scores.
_NOT_FINAL = re.compile(r"^(epoch|step|lr.*)$|_step$")


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


class DamagedRecord(ValueError):
    """A sweep's or run's JSON record that cannot be read."""


def read_record(path: str | Path) -> dict:
    """A sweep's or run's JSON record. Written atomically here, one is damaged only from outside (a partial copy of
    the sweep folder, a full disk on the copy): a ValueError naming the file, not a bare JSON error."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:  # not JSON, or not text
        raise DamagedRecord(f"{path} is damaged ({err}): copy it again from where the sweep ran, or delete it "
                         "(a run without results.json is trained again)") from None


def write_run_record(run) -> None:
    """``run.json``: written as an attempt starts (a local process, a SLURM job submitted)."""
    write_json_atomic(Path(run.run_dir) / RUN, run.to_dict())


def started_overrides(run_dir: str | Path) -> list[str] | None:
    """The overrides the run's latest attempt started with (``run.json``), or None."""
    path = Path(run_dir) / RUN
    return read_record(path).get("overrides") if path.is_file() else None


def trained_overrides(run_dir: str | Path) -> list[str] | None:
    """The overrides the run was trained with so far: its ``results.json``'s once finished, else its latest attempt's
    while it has a checkpoint to resume; None when there is neither."""
    from vampnet_pl.training.app import last_checkpoint

    run_dir = Path(run_dir)
    if results_path(run_dir).is_file():
        return read_record(results_path(run_dir)).get("overrides")
    return started_overrides(run_dir) if last_checkpoint(run_dir) is not None else None


def git_commit() -> str:
    """The source checkout's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def protocol_id(config: dict) -> str:
    """The evaluation protocol the run's validation followed (``eval_protocol``/``protocol`` in its config)."""
    for key in ("eval_protocol", "protocol"):
        node = config.get(key)
        if isinstance(node, (str, int, float)):
            return str(node)
        if isinstance(node, dict):
            for name in ("id", "name", "version"):
                if node.get(name) is not None:
                    return str(node[name])
    return "none"


def _read_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue
            if "step" in values:
                rows.append(values)
    return rows


def read_curves(run_dir: str | Path, log_dirs: list[Path] | None = None) -> dict[str, dict[int, float]]:
    """metric -> {steps trained: value} over every attempt; a later attempt's value for a step replaces an earlier one.

    Lightning logs a value at the 0-based index of the last optimisation step; curves count the steps trained
    (index + 1), so the validation after the final step sits at ``trainer.max_steps``. A logged NaN stays NaN
    (a diverged run); an empty cell (nothing logged at that step) is no value.
    """
    run_dir = Path(run_dir)
    files = attempt_logs(run_dir)
    for log_dir in log_dirs if log_dirs is not None else [run_dir / "csv"]:
        if (log_dir / "metrics.csv").is_file():
            files.append(log_dir / "metrics.csv")
    curves: dict[str, dict[int, float]] = {}
    for path in files:
        for row in _read_csv(path):
            step = int(row.pop("step")) + 1
            for key, value in row.items():
                if key != "epoch":
                    curves.setdefault(key, {})[step] = value
    return curves


@dataclass
class FinalScores:
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None  # the last validation
    gen_metrics_step: int | None = None  # the last generation evaluation (gen/ scores), None without one
    missing: list[str] = field(default_factory=list)  # val/ and gen/ columns with no value at their family's step


def _last_step(curves: dict[str, dict[int, float]], prefix: str) -> int | None:
    steps = [max(c) for k, c in curves.items() if c and k.startswith(prefix)]
    return max(steps) if steps else None


def final_metrics(curves: dict[str, dict[int, float]]) -> FinalScores:
    """The scores of the last validation and of the last generation evaluation (see the module's docstring)."""
    val_step, gen_step = _last_step(curves, "val/"), _last_step(curves, "gen/")
    scores = FinalScores(metrics_step=val_step, gen_metrics_step=gen_step)
    for key, curve in sorted(curves.items()):
        if not curve or _NOT_FINAL.search(key):
            continue
        step = gen_step if key.startswith("gen/") else val_step
        if step in curve:
            scores.metrics[key] = curve[step]
        elif key.startswith(("val/", "gen/")):
            scores.missing.append(key)
    return scores


def checkpoint_info(run_dir: Path) -> tuple[int | None, str | None]:
    """(global step, codec fingerprint) of the run's last checkpoint."""
    from vampnet_pl.training.app import last_checkpoint
    from vampnet_pl.training.export import read_checkpoint

    path = last_checkpoint(run_dir)
    if path is None:
        return None, None
    checkpoint = read_checkpoint(path)
    model = (checkpoint.get("hyper_parameters") or {}).get("model") or {}
    return int(checkpoint.get("global_step", -1)), model.get("codec_fingerprint")


class RunIncomplete(RuntimeError):
    """Training returned before its last step (a signal stopped it for a requeue): not a finished run."""


def write_results(run, cfg: DictConfig) -> dict:
    """Record a finished run in ``results.json`` (atomically) and clear its failure record. Raises
    :class:`RunIncomplete`, writing nothing, when its last checkpoint is short of ``trainer.max_steps``."""
    config = OmegaConf.to_container(cfg, resolve=True)
    step, fingerprint = checkpoint_info(run.run_dir)
    if step != config["trainer"]["max_steps"]:
        raise RunIncomplete(f"{run.run_id} stopped at step {step} of {config['trainer']['max_steps']}")
    curves = read_curves(run.run_dir, csv_log_dirs(cfg))
    scores = final_metrics(curves)
    record = {
        **run.to_dict(),
        "status": "finished",
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "codec_fingerprint": fingerprint,
        "protocol": protocol_id(config),
        "final_step": step,
        "metrics_step": scores.metrics_step,  # the last validation: the step of every score but gen/ ones
        "gen_metrics_step": scores.gen_metrics_step,  # the last generation evaluation: the step of the gen/ scores
        "missing_metrics": scores.missing,  # no value at their step (skipped by the evaluation's time budget)
        "metrics": scores.metrics,
        "config": config,
    }
    write_json_atomic(results_path(run.run_dir), record)
    (run.run_dir / FAILURE).unlink(missing_ok=True)
    return record


# The line a local run's train.log gets before each attempt's output (the runner writes it).
ATTEMPT_MARKER = "=== vampnet-pl ablate: "
# What training raises on a non-finite loss (training/module.py): the run diverged, it did not crash.
_DIVERGED = re.compile(r"^FloatingPointError: (.+)$", re.MULTILINE)


def divergence(log_tail: str) -> str | None:
    """The non-finite-loss error of the latest attempt in a failed run's log (``train loss is nan at global step
    6: ...``), or None: a crash, a kill, a stop. An earlier attempt's divergence in the same log is not this one's."""
    latest = log_tail.rsplit(ATTEMPT_MARKER, 1)[-1]
    found = _DIVERGED.findall(latest)
    return found[-1].strip() if found else None


def write_failure(run, reason: str, log_tail: str = "") -> tuple[str, str]:
    """Record a failed attempt in ``failure.json``; a divergence (NaN or infinite loss) is recorded as such, status
    ``diverged``, so a report tells it from a crash. Returns the status and the reason recorded."""
    diverged = divergence(log_tail)
    if diverged:
        reason = f"diverged: {diverged} ({reason})"
    status = "diverged" if diverged else "failed"
    write_json_atomic(run.run_dir / FAILURE, {**run.to_dict(), "status": status, "reason": reason,
                                              "at": datetime.datetime.now().isoformat(timespec="seconds"),
                                              "log_tail": log_tail[-4000:]})
    return status, reason


def diverged_before(run_dir: str | Path) -> tuple[str, list[str] | None] | None:
    """(reason, overrides) recorded when this run's last attempt diverged, else None (no failure, or a crash); the
    overrides it diverged under (None in a record without them). Training is seeded, so a resumed diverged run
    usually diverges again: ``ablate run`` leaves it, unless told to retry or its overrides changed since."""
    path = Path(run_dir) / FAILURE
    if not path.is_file():
        return None
    failure = read_record(path)
    if failure.get("status") != "diverged":
        return None
    return failure.get("reason", "diverged"), failure.get("overrides")
