"""Run a sweep: locally (subprocesses, N at a time) or on SLURM (submitit jobs); skip finished runs, resume the rest.

Every run trains in its own folder with ``resume=true``: a run that stopped midway (killed, failed, requeued)
continues from its ``checkpoints/last.ckpt``. A run with a ``results.json`` is finished and skipped.

Locally, SIGTERM and SIGHUP (``timeout``, a closed terminal or ssh session, a service stop) end the sweep as
Ctrl-C does: the training processes it started are stopped, each interrupted run gets a ``failure.json``, and
:class:`SweepStopped` reaches the caller. A run's training process holds the run's ``train.lock`` while it runs
(inherited from the runner, so even a runner killed with SIGKILL leaves it held): a run whose lock is held is
being trained by another process, and is not started a second time in the same folder.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from omegaconf import DictConfig, OmegaConf

from vampnet_pl.ablation import results
from vampnet_pl.ablation.ownership import earlier_jobs, held_elsewhere, lock_run, still_active
from vampnet_pl.ablation.spec import Outcome, Run, SpecError, Sweep, compose_run, validate
from vampnet_pl.config import SweepLauncher
from vampnet_pl.utils.atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"  # every run of the sweep, so the report can list the ones missing


def write_sweep_record(sweep: Sweep) -> None:
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep.sweep_dir / "spec.yaml", OmegaConf.to_yaml(OmegaConf.structured(sweep.spec)))
    write_json_atomic(sweep.sweep_dir / SWEEP_FILE, {
        "name": sweep.spec.name, "baseline": sweep.baseline_id, "primary_metric": sweep.spec.primary_metric,
        "grid_keys": list(sweep.spec.grid), "runs": [r.to_dict() for r in sweep.runs]})


def finished(run: Run) -> bool:
    return results.results_path(run.run_dir).is_file()


def check_runs_match(sweep: Sweep, earlier: dict | None = None) -> None:
    """A run trained with other overrides would be silently mixed into the report (finished), resumed from its
    checkpoint under the new ones (started), or trained and recorded with the old ones (a SLURM job still queued):
    refuse. ``earlier``: the runs' jobs of an earlier ``ablate run`` still in SLURM (looked up when not given)."""
    recorded = {run: results.trained_overrides(run.run_dir) for run in sweep.runs}
    waiting = [run for run, overrides in recorded.items() if overrides is None]
    for run in earlier_jobs(waiting) if earlier is None else [run for run in earlier if run in waiting]:
        recorded[run] = results.started_overrides(run.run_dir)  # its job trains the run as it was submitted
    changes = {run: override_changes(overrides, run.overrides) for run, overrides in recorded.items()
               if overrides is not None}
    stale = {run: change for run, change in changes.items() if change}
    if stale:
        first, (was, now) = next(iter(stale.items()))
        raise SpecError(f"{len(stale)} run(s) were trained or submitted with other overrides than this spec gives "
                        f"them ({', '.join(run.run_id for run in list(stale)[:5])}; {first.run_id}: {was or '-'} "
                        f"then, {now or '-'} now): finished, with a checkpoint to resume, or with a SLURM job still "
                        "queued or running; use a new sweep_dir, or delete their folders (and cancel their jobs) to "
                        "retrain them")


def override_changes(recorded: list[str], wanted) -> tuple[list[str], list[str]] | None:
    """(overrides only the record has, overrides only the spec gives), None when they agree. ``run_dir`` is left
    out: a sweep folder moved or copied (from the cluster, say) still holds the same runs."""
    def keyed(overrides) -> list[str]:
        return [o for o in overrides if not o.startswith("run_dir=")]

    was, now = keyed(recorded), keyed(wanted)
    keys = [o.split("=", 1)[0] for o in now]
    if was == now or (sorted(was) == sorted(now) and len(set(keys)) == len(keys)):  # order counts for a repeated key
        return None
    return [o for o in was if o not in now] or ["(the same, in another order)"], [o for o in now if o not in was]


def check(spec, sweep_dir=None, progress: bool = True) -> tuple[Sweep, dict]:
    """The expanded, validated sweep, refused where its folder holds runs trained otherwise, and its unfinished runs'
    SLURM jobs of an earlier ``ablate run`` that are not done (one sacct call). Writes nothing (``--dry-run``)."""
    from vampnet_pl.ablation.spec import expand

    sweep = expand(spec, sweep_dir)
    validate(sweep, progress)
    earlier = earlier_jobs([run for run in sweep.runs if not finished(run)])
    check_runs_match(sweep, earlier)
    return sweep, earlier


def prepare(spec, sweep_dir=None, progress: bool = True) -> tuple[Sweep, dict]:
    """:func:`check`, then the sweep recorded in its folder."""
    sweep, earlier = check(spec, sweep_dir, progress)
    write_sweep_record(sweep)
    return sweep, earlier


def settled(run: Run, retry_diverged: bool = False) -> Outcome | None:
    """The outcome of a run this sweep does not train again: finished, or diverged under the overrides the spec
    gives it now (unless retried), else None. A run that diverged under other overrides (a spec changed since, say
    a lower optim.lr, before the run's first checkpoint: nothing for :func:`check_runs_match` to refuse) is no
    result of this spec's setting: it is trained."""
    if finished(run):
        return Outcome(run, "skipped", "finished before")
    diverged = None if retry_diverged else results.diverged_before(run.run_dir)
    if diverged is None:
        return None
    reason, overrides = diverged
    if overrides is not None and override_changes(overrides, run.overrides):
        return None
    return Outcome(run, "diverged", f"before, not retrained (--retry-diverged retrains it): {reason}")


def settled_runs(sweep: Sweep, earlier: dict, retry_diverged: bool = False) -> list[Outcome]:
    """The runs ``ablate run`` does not train again (:func:`settled`), in sweep order. A run whose SLURM job of an
    earlier ``ablate run`` still trains (``earlier``) is not settled by its earlier failure."""
    return [o for r in sweep.runs if (o := settled(r, retry_diverged or r in earlier))]


def run_sweep(spec, sweep_dir=None, launcher: SweepLauncher | None = None, parallel: int | None = None,
              wait: bool = True, progress: bool = True, retry_diverged: bool = False) -> list[Outcome]:
    """Validate the whole spec, then run every unfinished run (a diverged one only with ``retry_diverged``);
    returns one outcome per run."""
    sweep, earlier = prepare(spec, sweep_dir, progress)
    outcomes = settled_runs(sweep, earlier, retry_diverged)
    todo = [r for r in sweep.runs if r not in {o.run for o in outcomes}]
    for outcome in outcomes:
        log.info("skip %s: %s %s", outcome.run.run_id, outcome.status, outcome.detail)
    launcher = SweepLauncher(launcher or sweep.spec.launcher)
    if launcher == SweepLauncher.local:
        # a SLURM job of an earlier `ablate run` trains these runs
        outcomes += [Outcome(r, "running", still_active(r, job)) for r, job in earlier.items()]
        todo = [r for r in todo if r not in earlier]
        # results.json records the config each run's command trains with
        configs = {r.run_id: compose_run(r, LOCAL_OVERRIDES) for r in todo}
        outcomes += run_local(todo, configs, parallel or sweep.spec.parallel, progress)
    else:
        from vampnet_pl.ablation.slurm import run_slurm

        outcomes += run_slurm(sweep, todo, wait, progress, earlier)
    order = {r.run_id: i for i, r in enumerate(sweep.runs)}
    return sorted(outcomes, key=lambda o: order[o.run.run_id])


# -- local ----------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # handled as Ctrl-C is: stop the training processes first


class SweepStopped(Exception):
    """``ablate run`` got SIGTERM or SIGHUP: its training processes were stopped (re-running resumes them)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class _Children:
    """The training processes this sweep started, so an interrupt stops exactly those."""

    def __init__(self):
        self.lock, self.processes = threading.Lock(), {}
        self.stopped_by: str | None = None  # why the sweep stopped its children, once it did

    def add(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes[process.pid] = process
            if self.stopped_by is not None:  # started while the sweep was stopping
                process.send_signal(signal.SIGTERM)

    def remove(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes.pop(process.pid, None)

    def stop_all(self, reason: str = "ablate run stopped") -> None:
        with self.lock:
            self.stopped_by = reason
            for process in self.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)


# A local run is never a SLURM job of its own, even when the sweep runs inside an allocation (an interactive
# ``salloc``, an ``sbatch`` job); requeueing that would requeue the whole sweep's job from inside one of its runs.
LOCAL_OVERRIDES = ("slurm.requeue=off",)


def train_command(run: Run) -> list[str]:
    """A local run's command: its overrides and :data:`LOCAL_OVERRIDES`."""
    return [sys.executable, "-m", "vampnet_pl.cli", "train", *run.overrides, *LOCAL_OVERRIDES]


def child_environment(threads: int) -> dict[str, str]:
    """The environment of a local run's training process: this one's, without the variables that would make the
    run take part in another launch. ``SLURM_*`` (the sweep may run inside an allocation) would make Lightning
    read rank, world size and the main port from SLURM: every parallel run would take the allocation's place
    and the same port (EADDRINUSE). Device binding (``CUDA_VISIBLE_DEVICES``, set by SLURM too) is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # a launcher's variables of this process are not the run's
    return env


def run_local_one(run: Run, cfg: DictConfig, threads: int, children: _Children | None = None) -> Outcome:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run(run.run_dir)
    if lock is None:
        return Outcome(run, "running", held_elsewhere(run))
    with lock:
        results.write_run_record(run)
        return _train(run, cfg, threads, children, lock.fileno())


def _train(run: Run, cfg: DictConfig, threads: int, children: _Children | None, lock_fd: int) -> Outcome:
    env = child_environment(threads)
    log_path = run.run_dir / "train.log"
    with open(log_path, "a") as log_file:
        log_file.write(f"\n{results.ATTEMPT_MARKER}{' '.join(train_command(run))}\n")
        log_file.flush()
        process = subprocess.Popen(train_command(run), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, pass_fds=(lock_fd,))
        if children:
            children.add(process)
        write_json_atomic(run.run_dir / "attempt.json", {"pid": process.pid, "command": train_command(run)})
        code = process.wait()
        if children:
            children.remove(process)
    reason = None
    if code != 0:
        reason = f"exit status {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
        if children and children.stopped_by:
            reason = f"{children.stopped_by} ({reason})"
    else:
        try:
            results.write_results(run, cfg)
        except results.RunIncomplete as err:
            reason = str(err)
    if reason is not None:  # the next sweep run resumes it (a diverged one: with --retry-diverged)
        status, reason = results.write_failure(run, reason, log_path.read_text(errors="replace")[-4000:])
        return Outcome(run, status, reason)
    return Outcome(run, "finished")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM allocation's, taskset's), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def run_local(runs: list[Run], configs: dict[str, DictConfig], parallel: int, progress: bool = True) -> list[Outcome]:
    from tqdm.auto import tqdm

    if not runs:
        return []
    threads = max(1, usable_cpus() // parallel)
    children, outcomes = _Children(), []

    def on_stop_signal(signum, frame) -> None:
        if children.stopped_by is None:  # the first one ends the wait below; later ones (while stopping) change nothing
            raise SweepStopped(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    try:
        with ThreadPoolExecutor(parallel) as pool, tqdm(total=len(runs), desc="sweep", unit="run",
                                                         disable=not progress) as bar:
            futures = {}
            try:
                futures = {pool.submit(run_local_one, r, configs[r.run_id], threads, children): r for r in runs}
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes.append(outcome)
                    bar.update()
                    bar.set_postfix_str(f"{outcome.run.run_id}: {outcome.status}")
                    log.info("%s: %s %s", outcome.run.run_id, outcome.status, outcome.detail)
            except (KeyboardInterrupt, SweepStopped) as err:
                for future in futures:
                    future.cancel()
                name = signal.Signals(err.signum).name if isinstance(err, SweepStopped) else "SIGINT"
                log.warning("%s: stopping the training processes; re-running the sweep resumes them", name)
                children.stop_all(f"ablate run stopped by {name}")
                raise  # once the pool's threads have recorded their runs (failure.json)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return outcomes
