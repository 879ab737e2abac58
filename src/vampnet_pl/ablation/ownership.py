"""Who trains a run already: a local training process (it holds the run's ``train.lock``) or a SLURM job of an
earlier ``ablate run`` (recorded in the run's ``slurm_job.json``). Neither launcher starts a run one of them holds."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from vampnet_pl.ablation.spec import Run
from vampnet_pl.utils.atomic import write_json_atomic

LOCK = "train.lock"  # held by the run's training process while it runs
JOB_RECORD = "slurm_job.json"  # the run's latest SLURM job, so that a re-run does not submit it a second time


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


def record_job(run: Run, job) -> None:
    write_json_atomic(Path(run.run_dir) / JOB_RECORD, {"job_id": job.job_id, "folder": str(job.paths.folder),
                                                       "tasks": job.num_tasks})


def earlier_jobs(runs: list[Run]) -> dict:
    """The runs' jobs from an earlier ``ablate run`` that are not done: queued, running, requeued, or of a state SLURM
    cannot tell (``UNKNOWN``: sacct failed, or no longer knows the job), as submitit's own wait counts them. One sacct
    call for all of them; submitit is imported only when a run has a job record (local sweeps need no submitit)."""
    records = {}
    for run in runs:
        try:
            records[run] = json.loads((Path(run.run_dir) / JOB_RECORD).read_text())
        except FileNotFoundError:
            continue
    if not records:
        return {}
    try:
        import submitit
    except ImportError:
        raise ImportError(f"{len(records)} run(s) have a SLURM job record ({JOB_RECORD}) from an earlier `ablate run "
                          "--launcher slurm`: install the slurm extra (pip install -e .[slurm]) to check those jobs, "
                          f"or delete their {JOB_RECORD}") from None

    jobs = {run: submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"], tasks=tuple(range(r["tasks"])))
            for run, r in records.items()}
    submitit.SlurmJob.watcher.update()  # the jobs registered with it as they were made
    return {run: job for run, job in jobs.items() if not job.done()}


def still_active(run: Run, job) -> str:
    """An Outcome's detail for a run whose earlier job is not done."""
    state = job.state
    detail = f"job {job.job_id} of an earlier `ablate run` is {state}; not started again"
    if state == "UNKNOWN":
        detail += f" (if that job is gone, delete {Path(run.run_dir) / JOB_RECORD} to run it again)"
    return detail
