"""A sweep end to end: 2 conditions x 2 seeds of the tiny coarse model; one run killed midway, the sweep re-run
resumes it (from its checkpoint, not from scratch) and skips the finished ones; the report has means, CIs and
paired differences."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vampnet_pl.cli import main
from vampnet_pl.training.export import read_checkpoint

STEPS = 20


def sweep_spec(tmp_path: Path, prepared, codec_path) -> Path:
    spec = {
        "name": "e2e", "sweep_dir": str(tmp_path / "sweep"), "parallel": 2,
        "base": [f"data.dataset_dir={prepared}", f"codec.source={codec_path}", "codec.device=cpu",
                 "experiment=demo_coarse", "data.num_workers=0", "data.window_seconds=1.0", "data.batch_size=4",
                 "data.val_max_windows=8", "data.batches_per_epoch=5", f"trainer.max_steps={STEPS}",
                 "checkpoint.every_n_train_steps=5", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false"],
        "grid": {"masking.schedule": ["cosine", "linear"]},
        "seeds": [0, 1],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sweep_survives_a_killed_run_resumes_it_skips_finished_and_reports(prepared, codec_path, codec, tmp_path):
    spec = sweep_spec(tmp_path, prepared, codec_path)
    runs = tmp_path / "sweep" / "runs"
    victim = runs / "schedule-cosine_seed-0"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    sweep = subprocess.Popen([sys.executable, "-m", "vampnet_pl.cli", "ablate", "run", str(spec)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # kill once a checkpoint exists and the CSV log has flushed rows (Lightning saves the checkpoint of a
        # step before it logs that step, so the checkpoint alone can appear before any curve is on disk)
        live_log = victim / "csv" / "metrics.csv"
        wait_for(lambda: (victim / "checkpoints" / "last.ckpt").exists() and live_log.is_file()
                 and live_log.stat().st_size > 0, 300, "the first checkpoint and curve rows")
        os.kill(json.loads((victim / "attempt.json").read_text())["pid"], signal.SIGKILL)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, out[-3000:]  # a failed run fails the sweep, after the others ran
    assert "failed    schedule-cosine_seed-0 exit status -9 (SIGKILL)" in out
    killed_at = read_checkpoint(victim / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < killed_at < STEPS
    assert not (victim / "results.json").exists() and (victim / "failure.json").is_file()
    others = sorted(p for p in runs.iterdir() if p != victim)
    assert len(others) == 3 and all((p / "results.json").is_file() for p in others)
    assert main(["ablate", "report", str(tmp_path / "sweep")]) == 0
    partial = (tmp_path / "sweep" / "report.md").read_text()
    assert "3 of 4 runs finished" in partial and "`schedule-cosine_seed-0` | failed | exit status -9" in partial

    recorded = {p.name: (p / "results.json").stat().st_mtime_ns for p in others}
    assert main(["ablate", "run", str(spec)]) == 0
    assert {p.name: (p / "results.json").stat().st_mtime_ns for p in others} == recorded  # skipped
    assert all((p / "train.log").read_text().count("=== vampnet-pl ablate") == 1 for p in others)
    log = (victim / "train.log").read_text()
    assert log.count("=== vampnet-pl ablate") == 2 and "resuming from" in log and "Restored all states" in log
    result = json.loads((victim / "results.json").read_text())
    assert result["final_step"] == result["metrics_step"] == STEPS
    assert result["codec_fingerprint"] == codec.fingerprint and result["git_commit"]
    assert result["config"]["masking"]["schedule"] == "cosine" and result["config"]["seed"] == 0
    assert result["config"]["run_dir"] == str(victim)
    assert {"val/loss", "val/acc1", "val/acc1/ratio_0.50"} <= set(result["metrics"]) and not (victim / "failure.json").exists()
    # the curves join both attempts: the first one's steps before the kill and the resumed one's after
    assert (victim / "curves" / "attempt-0.csv").is_file()
    from vampnet_pl.ablation.results import read_curves

    curves = read_curves(victim)
    assert {10, 15, 20} <= set(curves["val/loss"])
    assert min(curves["train/loss_step"]) <= killed_at < max(curves["train/loss_step"]) == STEPS

    assert main(["ablate", "report", str(tmp_path / "sweep")]) == 0
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "4 of 4 runs finished" in text and "baseline: `schedule-cosine`" in text
    final = text.split("## Final scores")[1].split("##")[0]
    assert "| `val/loss` |" in final and final.count("±") >= 2
    differences = text.split("## Paired differences")[1].split("##")[0]
    assert "`schedule-linear` − baseline" in differences and "(p=" in differences
    assert (tmp_path / "sweep" / "figures" / "curves.png").is_file()


def test_a_run_that_returns_before_its_last_step_is_not_recorded_as_finished(tmp_path, monkeypatch):
    """Training returns normally when a signal stops it for a requeue: exit 0 is not enough to call it done."""
    import torch
    from omegaconf import OmegaConf

    from vampnet_pl.ablation import runner
    from vampnet_pl.ablation.spec import Run

    run = Run("a_seed-0", "a", (), 0, (), tmp_path / "a_seed-0")
    (run.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3, "hyper_parameters": {"model": {}}}, run.run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(runner, "train_command", lambda run: [sys.executable, "-c", "pass"])
    cfg = OmegaConf.create({"trainer": {"max_steps": STEPS}, "run_dir": str(run.run_dir), "logger": {}})
    outcome = runner.run_local_one(run, cfg, threads=1)
    assert (outcome.status, outcome.detail) == ("failed", f"a_seed-0 stopped at step 3 of {STEPS}")
    assert (run.run_dir / "failure.json").is_file() and not (run.run_dir / "results.json").exists()


DIVERGE = ("import sys; print('Traceback (most recent call last):', file=sys.stderr); "
           "print('FloatingPointError: train loss is nan at global step 6: lower optim.lr, check the data, or try "
           "trainer.precision=32', file=sys.stderr); sys.exit(1)")


def test_a_diverged_run_is_recorded_and_reported_apart_from_a_crash(tmp_path, monkeypatch):
    """Training stops on a NaN loss with exit status 1, as a crash does: the sweep and the report said
    'failed, exit status 1' for both, and a diverged setting (a finding) read as a broken run."""
    from vampnet_pl.ablation import report, runner
    from vampnet_pl.ablation.spec import Run

    runs = [Run(f"{c}_seed-0", c, (), 0, (), tmp_path / "runs" / f"{c}_seed-0") for c in ("nan", "crash")]
    commands = {"nan_seed-0": ["-c", DIVERGE], "crash_seed-0": ["-c", "raise SystemExit('segfault, say')"]}
    monkeypatch.setattr(runner, "train_command", lambda run: [sys.executable, *commands[run.run_id]])
    outcomes = {run.run_id: runner.run_local_one(run, None, threads=1) for run in runs}
    assert outcomes["nan_seed-0"].detail == ("diverged: train loss is nan at global step 6: lower optim.lr, check the "
                                             "data, or try trainer.precision=32 (exit status 1)")
    assert outcomes["crash_seed-0"].detail == "exit status 1"
    assert {run_id: o.status for run_id, o in outcomes.items()} == {"nan_seed-0": "diverged", "crash_seed-0": "failed"}
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "nan", "baseline": "crash", "primary_metric": "val/loss",
                                                     "runs": [r.to_dict() for r in runs]}))
    _, records = report.read_sweep(tmp_path, progress=False)
    assert {r.run_id: r.status for r in records} == {"nan_seed-0": "diverged", "crash_seed-0": "failed"}
    assert report.seed_gaps({"nan": {}, "crash": {1: 2.0}}, [1], records) == {
        0: ["`crash_seed-0` failed (exit status 1)"]}
    assert report.seed_gaps({"nan": {1: 1.0}, "crash": {1: 2.0}}, [1], records)[0][0].startswith(
        "`nan_seed-0` diverged: train loss is nan at global step 6")
    # the next attempt crashes: the divergence in the same train.log was the earlier attempt's, not this one's
    commands["nan_seed-0"] = ["-c", "raise SystemExit(1)"]
    assert runner.run_local_one(runs[0], None, threads=1).detail == "exit status 1"
    assert json.loads((runs[0].run_dir / "failure.json").read_text())["status"] == "failed"
    # a SLURM job's failure carries the task's traceback
    pytest.importorskip("submitit")
    from submitit.core.utils import FailedJobError

    from vampnet_pl.ablation import slurm as ablation_slurm

    class DivergedJob:
        job_id = "77"

        def results(self):
            raise FailedJobError("Job (task=0) failed during processing with trace:\n----------------------\n"
                                 "Traceback (most recent call last):\nFloatingPointError: train loss is nan at global "
                                 "step 6: lower optim.lr\n")

    outcome = ablation_slurm.job_outcome(runs[1], DivergedJob())
    assert (outcome.status, outcome.detail) == (
        "diverged", "diverged: train loss is nan at global step 6: lower optim.lr (job 77: FailedJobError)")
    assert json.loads((runs[1].run_dir / "failure.json").read_text())["status"] == "diverged"


def submitit_job(folder: Path, run_id: str, task_results: list[tuple[str, str]]):
    """A finished submitit job of len(task_results) tasks (one per device), as each task's process left it."""
    import submitit
    from submitit.core import utils

    job = submitit.SlurmJob(folder=folder, job_id="4242", tasks=tuple(range(len(task_results))))
    for task, outcome in enumerate(task_results):
        paths = utils.JobPaths(folder, job_id="4242", task_id=task)
        paths.folder.mkdir(parents=True, exist_ok=True)
        utils.cloudpickle_dump(outcome, paths.result_pickle)
    return job


def test_a_multi_task_submitit_job_with_results_json_is_finished(tmp_path, monkeypatch):
    """A job of several tasks (slurm.gpus_per_node: 2) has one result per task: ``Job.result()`` refuses it, and a
    finished run was recorded as failed. ``results.json`` is the proof; it never gets a failure.json beside it."""
    import contextlib

    from vampnet_pl.ablation import slurm as ablation_slurm
    from vampnet_pl.ablation.spec import Run, Sweep
    from vampnet_pl.config import AblationConfig

    def make_run(name: str) -> Run:
        run = Run(f"{name}_seed-0", name, (), 0, (), tmp_path / "runs" / f"{name}_seed-0")
        run.run_dir.mkdir(parents=True)
        return run

    ok, late_error, unrecorded = make_run("ok"), make_run("late-error"), make_run("unrecorded")
    for run in (ok, late_error):
        (run.run_dir / "results.json").write_text(json.dumps({"status": "finished"}))  # rank 0 recorded it
    jobs = {ok.run_id: submitit_job(tmp_path / "j1", ok.run_id, [("success", ok.run_id)] * 2),
            late_error.run_id: submitit_job(tmp_path / "j2", late_error.run_id,
                                            [("success", late_error.run_id), ("error", "Traceback: rank 1 died")]),
            unrecorded.run_id: submitit_job(tmp_path / "j3", unrecorded.run_id, [("success", unrecorded.run_id)] * 2)}
    submitted = iter(jobs.values())

    class FakeExecutor:
        def batch(self):
            return contextlib.nullcontext()

        def submit(self, train_run):
            return next(submitted)

    monkeypatch.setattr(ablation_slurm, "executor", lambda sweep: FakeExecutor())
    sweep = Sweep(AblationConfig(name="k"), tmp_path, [ok, late_error, unrecorded], "ok")
    outcomes = ablation_slurm.run_slurm(sweep, [ok, late_error, unrecorded], wait=True, progress=False)
    assert {o.run.run_id: o.status for o in outcomes} == {
        ok.run_id: "finished", late_error.run_id: "finished", unrecorded.run_id: "failed"}
    assert not (ok.run_dir / "failure.json").exists() and not (late_error.run_dir / "failure.json").exists()
    failure = json.loads((unrecorded.run_dir / "failure.json").read_text())
    assert failure["reason"] == "job 4242: returned without results.json"


LOCAL_RUNNER = """
import sys
from pathlib import Path
from vampnet_pl.ablation import runner
from vampnet_pl.ablation.spec import Run

runner.train_command = lambda run: ["sleep", "300"]  # a training process that runs until it is stopped
runs = [Run(f"r{i}", "c", (), i, (), Path(sys.argv[1]) / f"r{i}") for i in range(2)]
try:
    runner.run_local(runs, {r.run_id: None for r in runs}, parallel=2, progress=False)
except runner.SweepStopped as stopped:
    sys.exit(128 + stopped.signum)
"""


def start_local_runner(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A local sweep of 2 runs whose training is ``sleep 300``; returns it and its training processes' pids."""
    runner = subprocess.Popen([sys.executable, "-c", LOCAL_RUNNER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    attempts = [tmp_path / f"r{i}" / "attempt.json" for i in range(2)]
    wait_for(lambda: all(a.is_file() for a in attempts) or runner.poll() is not None, 60, "both runs to start")
    assert runner.poll() is None, runner.communicate()[0]
    return runner, [json.loads(a.read_text())["pid"] for a in attempts]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_a_local_sweep_stops_its_training_processes(signum, tmp_path):
    runner, pids = start_local_runner(tmp_path)
    try:
        runner.send_signal(signum)
        output = runner.communicate(timeout=30)[0]
        assert runner.returncode == 128 + signum, output
        wait_for(lambda: not any(running(pid) for pid in pids), 10, "the training processes to end")
        for i in range(2):
            failure = json.loads((tmp_path / f"r{i}" / "failure.json").read_text())
            assert failure["reason"].startswith(f"ablate run stopped by {signal.Signals(signum).name}"), failure
    finally:
        runner.kill()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_run_whose_training_process_is_alive_is_not_started_again(tmp_path, monkeypatch):
    """The runner killed outright (SIGKILL) leaves its training processes running; they hold their run's lock, so
    a second sweep in the same folder reports them and trains neither a second time."""
    from vampnet_pl.ablation import runner as runner_module
    from vampnet_pl.ablation.spec import Run

    runner, pids = start_local_runner(tmp_path)
    try:
        runner.kill()
        runner.wait()
        assert all(running(pid) for pid in pids)
        started = []
        monkeypatch.setattr(runner_module, "train_command", lambda run: started.append(run) or ["false"])
        runs = [Run(f"r{i}", "c", (), i, (), tmp_path / f"r{i}") for i in range(2)]
        outcomes = runner_module.run_local(runs, {r.run_id: None for r in runs}, parallel=2, progress=False)
        assert started == [] and sorted(o.status for o in outcomes) == ["running", "running"]
        assert {o.detail.split(",")[0] for o in outcomes} == {f"being trained by another process (pid {p}" for p in pids}
        assert not any((tmp_path / f"r{i}" / "failure.json").exists() for i in range(2))
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(running(pid) for pid in pids), 10, "the orphaned training processes to end")
    outcome = runner_module.run_local_one(runs[0], None, threads=1)  # the lock went with its process
    assert {r.run_id for r in started} == {"r0"} and outcome.status == "failed"  # started (and "false" failed)


ENV_DUMP = """
import json, os, sys
from lightning.fabric.plugins.environments import SLURMEnvironment
json.dump({"env": dict(os.environ), "slurm": SLURMEnvironment.detect()}, open(sys.argv[1], "w"))
"""


def test_local_runs_inside_a_slurm_allocation_are_no_slurm_jobs(tmp_path, monkeypatch):
    """A sweep run inside an allocation (salloc, an sbatch job): its parallel runs must not read rank and port from
    SLURM (each would take the allocation's place, on the same port: EADDRINUSE), nor requeue the allocation."""
    from vampnet_pl.ablation import results, runner
    from vampnet_pl.ablation.spec import Run

    for name, value in dict(SLURM_JOB_ID="77", SLURM_JOB_NAME="sweep", SLURM_NTASKS="1", SLURM_PROCID="0",
                            SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="n1", CUDA_VISIBLE_DEVICES="0,1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    run = Run("r0", "c", (), 0, ("data.dataset_dir=codes", "slurm.requeue=on"), tmp_path / "r0")
    dump = tmp_path / "child.json"
    command = runner.train_command(run)
    monkeypatch.setattr(runner, "train_command", lambda run: [sys.executable, "-c", ENV_DUMP, str(dump)])
    monkeypatch.setattr(results, "write_results", lambda run, cfg: {})
    assert runner.run_local_one(run, None, threads=1).status == "finished"
    child = json.loads(dump.read_text())
    assert not child["slurm"] and not [k for k in child["env"] if k.startswith("SLURM_") or k == "MASTER_PORT"]
    assert child["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # the allocation's devices stay bound
    # the run's own command turns the requeue off, whatever the spec says
    printed = subprocess.run([*command, "--cfg", "job", "--package", "slurm"], capture_output=True, text=True,
                             env=runner.child_environment(1), timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "requeue: 'off'" in printed.stdout or "requeue: off" in printed.stdout, printed.stdout


def test_local_runs_share_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """OMP_NUM_THREADS per run: the CPUs of this process's affinity (a SLURM allocation, taskset) over the parallel
    runs, not the machine's CPU count."""
    from vampnet_pl.ablation import results, runner
    from vampnet_pl.ablation.spec import Run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(results, "write_results", lambda run, cfg: {})
    monkeypatch.setattr(runner, "train_command", lambda run: [
        sys.executable, "-c", f"import os; open({str(run.run_dir / 'threads')!r}, 'w').write(os.environ['OMP_NUM_THREADS'])"])
    runs = [Run(f"r{i}", "c", (), i, (), tmp_path / f"r{i}") for i in range(2)]
    runner.run_local(runs, {r.run_id: None for r in runs}, parallel=2, progress=False)
    assert [(r.run_dir / "threads").read_text() for r in runs] == ["2", "2"]


FAKE_SACCT = """#!/bin/sh
# sacct -o JobID,State,NodeList --parsable2 -j ID ...: the states in $SACCT_STATES (a JSON object id -> state)
echo "$@" >> "$SACCT_STATES.calls"
exec {python} -c 'import json, os; print("JobID|State|NodeList"); [print(f"{{i}}|{{s}}|n1") for i, s in json.load(open(os.environ["SACCT_STATES"])).items()]'
"""


def fake_sacct(tmp_path: Path, monkeypatch) -> Path:
    """An ``sacct`` on PATH that reports the states written (as JSON, job id -> state) to the returned file."""
    import submitit

    states = tmp_path / "states.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(FAKE_SACCT.format(python=sys.executable))
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SACCT_STATES", str(states))
    submitit.SlurmJob.watcher.clear()  # its cache is shared by every SlurmJob
    return states


def test_a_rerun_does_not_submit_a_run_whose_earlier_job_is_still_queued_or_running(tmp_path, monkeypatch):
    """``ablate run --no-wait`` then ``ablate run`` again (or after a closed session) while the first jobs wait in the
    queue: each run's job is recorded, and one that SLURM still has is waited for, not submitted a second time (two
    jobs would train in the same folder). A job that ended without finishing its run is submitted again."""
    import contextlib

    import submitit
    from submitit.core import utils

    from vampnet_pl.ablation import slurm as ablation_slurm
    from vampnet_pl.ablation.spec import Run, Sweep
    from vampnet_pl.config import AblationConfig

    states = fake_sacct(tmp_path, monkeypatch)

    runs = [Run(f"{name}_seed-0", name, (), 0, (), tmp_path / "runs" / f"{name}_seed-0") for name in ("a", "b")]
    submitted, finish_on_submit = [], []

    def finish(run: Run, job_id: str) -> None:  # the job's task and rank 0 leave their records
        job = submitit.SlurmJob(folder=tmp_path / "jobs" / "%j", job_id=job_id)
        job.paths.folder.mkdir(parents=True, exist_ok=True)
        utils.cloudpickle_dump(("success", run.run_id), job.paths.result_pickle)
        (run.run_dir / "results.json").write_text(json.dumps({"status": "finished"}))

    class FakeExecutor:
        def batch(self):
            return contextlib.nullcontext()

        def submit(self, train_run):
            submitted.append(train_run.run.run_id)
            job_id = str(7100 + len(submitted))
            if finish_on_submit:  # after the sweep looked for earlier jobs: b's earlier one and this one finish
                finish(runs[1], "7102")
                finish(train_run.run, job_id)
            return submitit.SlurmJob(folder=tmp_path / "jobs" / "%j", job_id=job_id)

    monkeypatch.setattr(ablation_slurm, "executor", lambda sweep: FakeExecutor())
    sweep = Sweep(AblationConfig(name="q"), tmp_path, runs, "a")
    first = ablation_slurm.run_slurm(sweep, runs, wait=False, progress=False)
    assert submitted == ["a_seed-0", "b_seed-0"] and [o.status for o in first] == ["submitted", "submitted"]

    states.write_text(json.dumps({"7101": "PENDING", "7102": "RUNNING"}))
    again = ablation_slurm.run_slurm(sweep, runs, wait=False, progress=False)
    assert submitted == ["a_seed-0", "b_seed-0"]  # nothing submitted twice
    assert len(Path(f"{states}.calls").read_text().splitlines()) == 1  # one sacct call for every run
    assert [(o.status, o.detail) for o in again] == [
        ("submitted", "job 7101 of an earlier `ablate run` is PENDING; not started again"),
        ("submitted", "job 7102 of an earlier `ablate run` is RUNNING; not started again")]

    # a's job failed (its run is unfinished: submitted again); b's is still running, and this sweep waits for it
    states.write_text(json.dumps({"7101": "FAILED", "7102": "RUNNING"}))
    finish_on_submit.extend(runs)
    waited = ablation_slurm.run_slurm(sweep, runs, wait=True, progress=False)
    assert submitted == ["a_seed-0", "b_seed-0", "a_seed-0"]
    assert sorted((o.run.run_id, o.status, o.detail) for o in waited) == [
        ("a_seed-0", "finished", "job 7103"), ("b_seed-0", "finished", "job 7102")]
    assert json.loads((runs[0].run_dir / "slurm_job.json").read_text())["job_id"] == "7103"


def test_a_submitit_job_whose_training_returned_short_fails(tmp_path, monkeypatch):
    """One process stopped by SIGTERM (a preemption, scancel): Lightning's loop stops and training returns. The job
    must fail (as `vampnet-pl train` exits 143), not return as a success that SLURM counts COMPLETED."""
    import torch
    from omegaconf import OmegaConf

    from vampnet_pl.ablation import slurm as ablation_slurm
    from vampnet_pl.ablation.results import RunIncomplete
    from vampnet_pl.ablation.spec import Run
    from vampnet_pl.training import app

    run = Run("a_seed-0", "a", (), 0, (), tmp_path / "a_seed-0")
    (run.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3, "hyper_parameters": {"model": {}}}, run.run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(ablation_slurm, "compose_run", lambda run: OmegaConf.create(
        {"trainer": {"max_steps": STEPS}, "run_dir": str(run.run_dir), "logger": {}}))
    monkeypatch.setattr(app, "run", lambda cfg: None)  # returned at step 3
    with pytest.raises(RunIncomplete, match=f"a_seed-0 stopped at step 3 of {STEPS}"):  # the job's task raises
        ablation_slurm.TrainRun(run)()
    assert not (run.run_dir / "results.json").exists()


def test_a_changed_spec_is_refused_while_a_job_of_the_old_one_is_queued(tmp_path, monkeypatch):
    """The queued job trains the run as it was submitted and records it: under a changed spec, that run would enter
    the new spec's report with the old overrides."""
    import dataclasses

    import submitit

    from vampnet_pl.ablation import runner
    from vampnet_pl.ablation.results import write_run_record
    from vampnet_pl.ablation.ownership import record_job
    from vampnet_pl.ablation.spec import Run, SpecError, Sweep
    from vampnet_pl.config import AblationConfig

    states = fake_sacct(tmp_path, monkeypatch)
    submitted = Run("a_seed-0", "a", (), 0, ("optim.lr=0.001",), tmp_path / "a_seed-0")
    write_run_record(submitted)
    record_job(submitted, submitit.SlurmJob(folder=tmp_path / "jobs", job_id="7201"))
    now = Sweep(AblationConfig(name="c"), tmp_path, [dataclasses.replace(submitted, overrides=("optim.lr=0.1",))], "a")
    states.write_text(json.dumps({"7201": "PENDING"}))
    with pytest.raises(SpecError, match=r"\(a_seed-0; a_seed-0: \['optim.lr=0.001'\] then, \['optim.lr=0.1'\] now\): "
                                        "finished, with a checkpoint to resume, or with a SLURM job still queued or "
                                        "running"):
        runner.check_runs_match(now)
    submitit.SlurmJob.watcher.clear()
    states.write_text(json.dumps({"7201": "CANCELLED"}))  # cancelled before it trained: the new spec may run it
    runner.check_runs_match(now)


def test_neither_launcher_starts_a_run_the_other_one_trains(tmp_path, monkeypatch):
    """`--launcher slurm` while a local sweep trains a run (its train.lock held), and a local sweep while a SLURM job
    of an earlier `ablate run` trains it: neither starts that run a second time in the same folder."""
    import contextlib

    import submitit
    import yaml

    from vampnet_pl.ablation import ownership, runner
    from vampnet_pl.ablation import slurm as ablation_slurm
    from vampnet_pl.ablation.spec import load_spec

    spec = {"name": "both", "sweep_dir": str(tmp_path / "sweep"), "seeds": [0], "grid": {"masking.schedule": ["cosine"]},
            "base": ["experiment=demo_coarse", "data.dataset_dir=codes", "data.batches_per_epoch=4",
                     "trainer.max_steps=8", "data.num_workers=0"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "sweep" / "runs" / "schedule-cosine_seed-0"
    run_dir.mkdir(parents=True)
    started, submitted = [], []
    monkeypatch.setattr(runner, "train_command", lambda run: started.append(run.run_id) or ["false"])

    class FakeExecutor:
        def batch(self):
            return contextlib.nullcontext()

        def submit(self, train_run):
            submitted.append(train_run.run.run_id)
            return submitit.SlurmJob(folder=tmp_path / "jobs" / "%j", job_id="7301")

    monkeypatch.setattr(ablation_slurm, "executor", lambda sweep: FakeExecutor())

    held = ownership.lock_run(run_dir)  # a local sweep's training process
    (run_dir / "attempt.json").write_text(json.dumps({"pid": 4321}))
    outcomes = runner.run_sweep(load_spec(tmp_path / "spec.yaml"), launcher="slurm", wait=False, progress=False)
    assert submitted == [] and [o.status for o in outcomes] == ["running"]
    assert outcomes[0].detail.startswith("being trained by another process (pid 4321, holding train.lock)")
    held.close()  # that process ended: the run may be submitted
    runner.run_sweep(load_spec(tmp_path / "spec.yaml"), launcher="slurm", wait=False, progress=False)
    assert submitted == ["schedule-cosine_seed-0"]

    states = fake_sacct(tmp_path, monkeypatch)
    states.write_text(json.dumps({"7301": "RUNNING"}))
    outcomes = runner.run_sweep(load_spec(tmp_path / "spec.yaml"), launcher="local", progress=False)
    assert started == [] and [(o.status, o.detail) for o in outcomes] == [
        ("running", "job 7301 of an earlier `ablate run` is RUNNING; not started again")]
    assert len(Path(f"{states}.calls").read_text().splitlines()) == 1  # one sacct call for the whole `ablate run`
    submitit.SlurmJob.watcher.clear()
    runner.run_sweep(load_spec(tmp_path / "spec.yaml"), launcher="slurm", wait=False, progress=False)
    assert len(Path(f"{states}.calls").read_text().splitlines()) == 2 and submitted == ["schedule-cosine_seed-0"]
    submitit.SlurmJob.watcher.clear()
    states.write_text(json.dumps({"7301": "FAILED"}))
    runner.run_sweep(load_spec(tmp_path / "spec.yaml"), launcher="local", progress=False)
    assert set(started) == {"schedule-cosine_seed-0"}
