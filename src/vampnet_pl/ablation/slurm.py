"""Sweep runs as SLURM jobs through submitit: one job per run, in one array, requeued before the time limit.

As with Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml), submitit owns the time-limit signal and the
requeue (the training's own requeue sees ``SUBMITIT_EXECUTOR`` and stays out): ``checkpoint()`` resubmits the
same run, which resumes from its ``last.ckpt``. Each job trains in-process, on every task of the job (one per
device), and rank 0 writes ``results.json``.

Each run's job is recorded in its folder (``slurm_job.json``). Re-running ``ablate run`` while that job is still
queued or running (after ``--no-wait``, or a closed session) does not submit the run again: two jobs would train
in the same folder. It waits for that job instead (or, with ``--no-wait``, reports it).
"""

from __future__ import annotations

import logging
import os
import time

import submitit

from vampnet_pl.ablation import results
from vampnet_pl.ablation.ownership import earlier_jobs, record_job, still_active, trained_locally
from vampnet_pl.ablation.spec import Outcome, Run, Sweep, compose_run

log = logging.getLogger(__name__)


class TrainRun(submitit.helpers.Checkpointable):
    """The callable a job runs: train one run (resuming), then record it. Picklable: it holds only the run."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self) -> str:
        from vampnet_pl.training.app import run as train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = compose_run(self.run)
        rank = int(os.environ.get("SLURM_PROCID", 0))
        train(cfg)  # rank 0 keeps an earlier attempt's CSV log (training.csv_logs)
        if rank == 0:
            # RunIncomplete when training returned short of its last step (one process stopped by SIGTERM: a
            # preemption, scancel): the job fails, as `vampnet-pl train` exits 143, and is no COMPLETED job to SLURM
            results.write_results(self.run, cfg)
        return self.run.run_id


def executor(sweep: Sweep) -> submitit.AutoExecutor:
    s = sweep.spec.slurm
    tasks = s.tasks_per_node or max(1, s.gpus_per_node)
    ex = submitit.AutoExecutor(folder=sweep.sweep_dir / ".submitit" / "%j", cluster="slurm",
                               slurm_max_num_timeout=s.max_num_timeout)
    extra = dict(s.additional_parameters)
    for key in ("account", "qos"):
        if getattr(s, key):
            extra[key] = getattr(s, key)
    params = dict(name=f"ablate-{sweep.spec.name}", nodes=s.nodes, tasks_per_node=tasks, cpus_per_task=s.cpus_per_task,
                  gpus_per_node=s.gpus_per_node or None, timeout_min=s.timeout_min,
                  slurm_signal_delay_s=s.signal_delay_s,
                  slurm_array_parallelism=s.array_parallelism, slurm_setup=list(s.setup),
                  slurm_additional_parameters=extra)
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def job_outcome(run: Run, job: submitit.Job) -> Outcome:
    """A finished job's outcome. ``results.json`` (written by rank 0 once training reached its last step) is the
    proof that the run finished; the job's results (``Job.results()``: every task's, as a job of several tasks
    has one per device; ``Job.result()`` refuses those) explain a failure. A run with ``results.json`` never gets
    a ``failure.json``, even if another task failed after it was written."""
    try:
        job.results()
        error, detail = None, ""
    except Exception as err:  # a task's own exception or a SLURM failure
        error, detail = f"job {job.job_id}: {type(err).__name__}", str(err)
    if results.results_path(run.run_dir).is_file():
        if error:
            log.warning("%s: finished (results.json), but %s: %s", run.run_id, error, detail[-500:])
        return Outcome(run, "finished", f"job {job.job_id}")
    if error is None:  # returned without recording the run (stopped short of its last step)
        error = f"job {job.job_id}: returned without {results.RESULTS}"
    return Outcome(run, *results.write_failure(run, error, detail))


def run_slurm(sweep: Sweep, runs: list[Run], wait: bool = True, progress: bool = True,
              earlier: dict[Run, submitit.SlurmJob] | None = None) -> list[Outcome]:
    """Submit the runs no one trains yet; ``earlier``: their jobs from an earlier ``ablate run`` still in SLURM
    (:func:`~vampnet_pl.ablation.ownership.earlier_jobs`, looked up here when not given)."""
    from tqdm.auto import tqdm

    if not runs:
        return []
    local = {run: detail for run in runs if (detail := trained_locally(run))}  # a local sweep trains these
    earlier = earlier_jobs(runs) if earlier is None else earlier
    earlier = {run: job for run, job in earlier.items() if run in runs and run not in local}
    for run, job in earlier.items():
        log.info("%s: %s", run.run_id, still_active(run, job))
    new = [run for run in runs if run not in earlier and run not in local]
    jobs = []
    for run in new:
        results.write_run_record(run)
    if new:
        ex = executor(sweep)
        with ex.batch():
            jobs = [ex.submit(TrainRun(run)) for run in new]
    for run, job in zip(new, jobs):
        record_job(run, job)
        log.info("%s: SLURM job %s", run.run_id, job.job_id)
    outcomes = [Outcome(run, "running", detail) for run, detail in local.items()]
    if not wait:
        return (outcomes + [Outcome(run, "submitted", still_active(run, job)) for run, job in earlier.items()]
                + [Outcome(run, "submitted", f"job {job.job_id}") for run, job in zip(new, jobs)])
    pending = {**earlier, **dict(zip(new, jobs))}
    with tqdm(total=len(pending), desc="sweep (SLURM)", unit="run", disable=not progress) as bar:
        while pending:
            for run, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[run]
                outcomes.append(job_outcome(run, job))
                bar.update()
            if pending:
                time.sleep(2)
    return outcomes
