"""The slurm/ scripts, submitted unchanged (CPU settings through their environment and overrides) to a
real single-node SLURM cluster started on localhost (tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import ClusterError, LocalSlurm, missing_binaries
from vampnet_pl.data.index import load_index
from vampnet_pl.prep.index import verify

from conftest import CRASH_MARKERS, write_tone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Launcher variables of the pytest process itself must not leak into the jobs.
LEAKY = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "PL_GLOBAL_SEED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root")
    if missing := missing_binaries():
        pytest.fail(f"missing {', '.join(missing)}: `make test` installs slurm-wlm and munge (scripts/system_deps.sh)")
    local = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield local
    local.stop()


def jobs_environment(cluster: LocalSlurm, log_dir: Path) -> dict:
    """The environment the submit scripts run in: this venv, a log folder, CPU-sized jobs."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(cluster.env, VAMPNET_VENV=sys.prefix, LOG_DIR=str(log_dir), CPUS_PER_TASK="1", TIME="20")
    return env


@pytest.fixture
def jobs_env(cluster, tmp_path):
    yield jobs_environment(cluster, tmp_path / "logs")
    cluster.cancel_all()


def submit(script: str, env: dict, *args: str, **extra_env: str) -> list[str]:
    """Run slurm/<script> (a submit script); return the job ids it prints."""
    done = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], env={**env, **extra_env},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def job_logs(env: dict, tail: int | None = None) -> str:
    """Every job log of this test; the last ``tail`` characters of each when given."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-(tail or 0):]}"
                     for p in sorted(Path(env["LOG_DIR"]).glob("*.out")))


def assert_completed(cluster: LocalSlurm, job_id: str, env: dict, timeout: float) -> None:
    try:
        jobs = cluster.wait(job_id, timeout)
    except ClusterError as err:
        raise AssertionError(f"{err}\n{job_logs(env, 4000)}") from None
    states = {j.id: j.state for j in jobs}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{job_logs(env, 4000)}"
    assert_no_crash(env, job_id)


def assert_no_crash(env: dict, job_id: str) -> None:
    """No process of job ``job_id`` (all its runs and array tasks: one log, opened for appending) crashed. A job
    requeued after its checkpoint completes even when a rank crashed on the way out, so look."""
    logs = sorted(Path(env["LOG_DIR"]).glob(f"*-{job_id}[._]*out"))
    assert logs, f"no log of job {job_id} in {env['LOG_DIR']}"
    for path in logs:
        log = path.read_text(errors="replace")
        crashes = [marker for marker in CRASH_MARKERS if marker in log]
        assert not crashes, f"a process of job {job_id} crashed ({', '.join(crashes)}):\n{log[-6000:]}"


def long_stereo_wav(path: Path, minutes: int, sample_rate: int = 44100) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(sample_rate * 60) / sample_rate
    with sf.SoundFile(str(path), "w", sample_rate, 2, subtype="PCM_16") as handle:
        for minute in range(minutes):
            tone = 0.2 * np.sin(2 * np.pi * (110 + 5 * minute) * t)
            handle.write(np.stack([tone, 0.5 * tone], axis=1).astype(np.float32))
    return path


def test_prep_array_then_dependent_finalize_and_verify(cluster, jobs_env, tmp_path, fast_codec_path):
    catalog = tmp_path / "catalog"
    for i in range(6):
        write_tone(catalog / f"tone{i}.wav", 6.0 + i, sample_rate=22050, freq=110.0 * (i + 1))
    (catalog / "broken.flac").write_bytes(b"not audio at all")  # skipped and recorded, never fatal
    # Decoded whole, this file alone is 635 MB; the tasks run under a 1.2 GB limit that SLURM enforces.
    long_stereo_wav(catalog / "long.wav", minutes=30)
    out = tmp_path / "codes"
    scan, encode, finalize = submit(
        "prep.sh", jobs_env, f"catalog={catalog}", f"out_dir={out}", f"codec.source={fast_codec_path}",
        "codec.device=cpu", "files_per_unit=2", "segment_seconds=60", "split.val_fraction=0.2", TASKS="2",
        MEM="1200M")
    assert_completed(cluster, finalize, jobs_env, timeout=600)
    tasks = cluster.jobs(encode)
    assert len(tasks) == 2 and {t.state for t in tasks} == {"COMPLETED"}
    assert_no_crash(jobs_env, scan)
    assert_no_crash(jobs_env, encode)
    logs = job_logs(jobs_env)
    assert "task 0/2" in logs and "task 1/2" in logs  # each array task took its own share
    assert "verify: OK" in logs
    index = load_index(out)
    assert index["totals"]["files"] == 7 and index["totals"]["failures"] == 1
    assert index["totals"]["hours"] == pytest.approx(0.5 + 51 / 3600, abs=0.01)
    assert verify(out) == []


# -- training ------------------------------------------------------------------------------------
STEPS = 240  # long enough to signal or kill a run midway on 2 CPU cores


def train_args(prepared, codec_path, runs_dir, *extra: str) -> list[str]:
    return [f"data.dataset_dir={prepared}", f"codec.source={codec_path}", "codec.device=cpu", f"runs_dir={runs_dir}",
            "experiment=demo_coarse", "data.num_workers=0", "data.window_seconds=2.0", "data.batch_size=8",
            "data.val_max_windows=8", "data.batches_per_epoch=1000", "trainer.enable_progress_bar=false",
            f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=20", "checkpoint.every_n_train_steps=40", *extra]


def checkpoint_step(path: Path) -> int:
    from vampnet_pl.training.export import read_checkpoint

    return int(read_checkpoint(path)["global_step"])


def final_weights(run_dir: Path) -> dict:
    from vampnet_pl.training.export import model_from_checkpoint

    return model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt").state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def submit_training(env: dict, args: list[str], run_name: str, **extra_env: str) -> str:
    (job,) = submit("train.sh", env, *args, GPUS_PER_NODE="0", TASKS_PER_NODE="2", RUN_NAME=run_name, **extra_env)
    return job


@pytest.fixture(scope="module")
def reference_run(cluster, prepared, codec_path, tmp_path_factory):
    """An uninterrupted DDP run through slurm/train.sh: the weights every interrupted run must reach."""
    runs = tmp_path_factory.mktemp("reference")
    env = jobs_environment(cluster, runs / "logs")
    job = submit_training(env, train_args(prepared, codec_path, runs, "strategy=ddp"), "ddp")
    assert_completed(cluster, job, env, timeout=600)
    return runs / "ddp", job_logs(env)


def test_ddp_training_with_two_tasks_writes_checkpoints(cluster, reference_run):
    run_dir, log = reference_run
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == STEPS


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def requeue_steps(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"SIGUSR1 received: saving .* at step (\d+)", log)]


def test_preempted_training_checkpoints_requeues_and_resumes_exactly(cluster, jobs_env, reference_run, prepared,
                                                                      codec_path, tmp_path):
    job = submit_training(jobs_env, train_args(prepared, codec_path, tmp_path, "strategy=ddp"), "ddp")
    last = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 300, "the first periodic checkpoint")
    cluster.run("scancel", "--signal=USR1", job)  # what a preemption with a grace period sends
    cluster.wait_for_restart(job, 1, timeout=180)
    assert_completed(cluster, job, jobs_env, timeout=600)
    log = job_logs(jobs_env)
    (stopped_at,) = requeue_steps(log)
    assert 0 < stopped_at < STEPS
    assert "restart 1" in log and f"resuming from {last}" in log
    assert cluster.job(job).restarts == 1
    assert checkpoint_step(last) == STEPS
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(reference_run[0]))


def test_fsdp2_training_with_two_tasks_checkpoints_shards_and_requeues(cluster, jobs_env, prepared, codec_path,
                                                                       tmp_path):
    steps = 120
    args = train_args(prepared, codec_path, tmp_path, "strategy=fsdp2", f"trainer.max_steps={steps}")
    job = submit_training(jobs_env, args, "fsdp2")
    last = tmp_path / "fsdp2" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 300, "the first periodic checkpoint")
    cluster.run("scancel", "--signal=USR1", job)
    cluster.wait_for_restart(job, 1, timeout=180)
    assert_completed(cluster, job, jobs_env, timeout=600)
    (stopped_at,) = requeue_steps(job_logs(jobs_env))
    assert 0 < stopped_at < steps
    assert last.is_dir() and (last / "meta.pt").is_file()  # sharded: one folder, written whole
    assert not list(last.parent.glob("*.partial")) and not list(last.parent.glob("*.previous"))
    assert checkpoint_step(last) == steps
    from vampnet_pl.training.export import export_checkpoint
    from vampnet_pl.model import load_exported

    assert load_exported(export_checkpoint(last, tmp_path / "coarse.pt")).cfg.n_codebooks == 4


def test_time_limit_checkpoints_requeues_and_resumes(cluster, jobs_env, prepared, codec_path, tmp_path):
    steps = 720  # still training when the shortened time limit comes near
    job = submit_training(jobs_env, train_args(prepared, codec_path, tmp_path, "strategy=ddp",
                                               f"trainer.max_steps={steps}"), "ddp", TIME="30")
    last = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 300, "the first periodic checkpoint")
    # Bring the limit within 2 minutes: slurmctld sends the --signal=SIGUSR1@90 when 90 s remain.
    elapsed = int(cluster.job(job).fields["RunTime"].split(":")[-2]) + 1  # whole minutes, rounded up
    cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed + 1}")
    wait_for(lambda: cluster.job(job).restarts >= 1, 240, "the job to requeue itself before its time limit")
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")  # the requeued run gets time to finish
    cluster.wait_for_restart(job, 1, timeout=180)
    assert_completed(cluster, job, jobs_env, timeout=600)
    log = job_logs(jobs_env)
    (stopped_at,) = requeue_steps(log)
    assert 0 < stopped_at < steps
    assert "DUE TO TIME LIMIT" not in log
    assert checkpoint_step(last) == steps


def test_without_requeue_the_signal_checkpoints_stops_and_a_resubmission_resumes(cluster, jobs_env, reference_run,
                                                                                  prepared, codec_path, tmp_path):
    """slurm.requeue=off: train.sbatch still asks for SIGUSR1, whose default action would end the job at once, without
    a checkpoint. The job checkpoints at the step boundary, is not requeued, ends FAILED with status 75 (not COMPLETED:
    it is unfinished), and a resubmission resumes it exactly."""
    from vampnet_pl.training.slurm import NOT_REQUEUED_EXIT

    args = train_args(prepared, codec_path, tmp_path, "strategy=ddp", "slurm.requeue=off")
    job = submit_training(jobs_env, args, "ddp")
    last = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 300, "the first periodic checkpoint")
    cluster.run("scancel", "--signal=USR1", job)
    (stopped,) = cluster.wait(job, timeout=120)
    log = job_logs(jobs_env)
    assert stopped.state == "FAILED" and stopped.restarts == 0, f"{stopped.fields}\n{log[-4000:]}"
    assert stopped.exit_code == f"{NOT_REQUEUED_EXIT}:0", stopped.fields
    (stopped_at,) = requeue_steps(log)
    assert 0 < stopped_at < STEPS and checkpoint_step(last) == stopped_at
    assert_no_crash(jobs_env, job)

    again = submit_training(jobs_env, args, "ddp")  # resubmit the same run by its name
    assert_completed(cluster, again, jobs_env, timeout=600)
    assert checkpoint_step(last) == STEPS
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(reference_run[0]))


def test_a_killed_rank_fails_the_job_and_a_resubmission_resumes(cluster, jobs_env, reference_run, prepared,
                                                                codec_path, tmp_path):
    args = train_args(prepared, codec_path, tmp_path, "strategy=ddp", "strategy.timeout_minutes=2")
    job = submit_training(jobs_env, args, "ddp")
    last = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 300, "the first periodic checkpoint")
    ranks = cluster.task_pids(job, "vampnet-pl train")
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)  # a node dying under rank 1
    (failed,) = cluster.wait(job, timeout=120)
    assert failed.state == "FAILED" and failed.restarts == 0
    saved = checkpoint_step(last)
    assert 0 < saved < STEPS

    again = submit_training(jobs_env, args, "ddp")  # resubmit the same run by its name
    assert_completed(cluster, again, jobs_env, timeout=600)
    assert f"Restored all states from the checkpoint at {last}" in job_logs(jobs_env)
    assert checkpoint_step(last) == STEPS
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(reference_run[0]))


def test_hydra_multirun_through_the_submitit_launcher(cluster, jobs_env, prepared, codec_path, tmp_path):
    args = train_args(prepared, codec_path, tmp_path, "trainer=cpu", "trainer.max_steps=20", "masking=cosine,span")
    env = {**jobs_env, "GPUS_PER_NODE": "0", "TASKS_PER_NODE": "1", "TIME_MINUTES": "20"}
    done = subprocess.run([sys.executable, "-m", "vampnet_pl.training.app", "-m", "hydra/launcher=slurm", *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = tmp_path / "multirun" / "demo_coarse"
    logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert logs.count("requeue by submitit") == 2, logs[-3000:]
    runs = sorted(p for p in tmp_path.glob("demo_coarse-*") if p.is_dir())
    assert len(runs) == 2  # one run directory per job
    assert {checkpoint_step(r / "checkpoints" / "last.ckpt") for r in runs} == {20}
    overrides = [(sweep / str(n) / ".hydra" / "overrides.yaml").read_text() for n in (0, 1)]
    assert "masking=cosine" in overrides[0] and "masking=span" in overrides[1]


def test_eval_job_scores_an_exported_model(cluster, jobs_env, reference_run, prepared, codec_path, tmp_path):
    from vampnet_pl.training.export import export_checkpoint

    coarse = export_checkpoint(reference_run[0] / "checkpoints" / "last.ckpt", tmp_path / "coarse.pt")
    out = tmp_path / "eval"
    (job,) = submit("eval.sh", jobs_env, f"coarse={coarse}", f"codec.source={codec_path}", "codec.device=cpu",
                    f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=2", "batch_size=2", "eval_protocol.passes=2",
                    "eval_protocol.passes_sweep=[1,2]", "prompts=[periodic:8,prefix:0.5]", f"out_dir={out}",
                    f"hydra.run.dir={tmp_path / 'hydra'}", GPUS="0")
    assert_completed(cluster, job, jobs_env, timeout=300)
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("prompt") and any(r.startswith("periodic:8,") for r in rows)
    assert len(list(out.glob("*.png"))) == 2


def test_ablation_sweep_runs_as_submitit_jobs(cluster, jobs_env, prepared, codec_path, tmp_path):
    import json

    import yaml

    steps = 10
    base = train_args(prepared, codec_path, tmp_path / "unused", "trainer=cpu", f"trainer.max_steps={steps}",
                      "data.batches_per_epoch=10", "checkpoint.every_n_train_steps=10")
    spec = {"name": "slurm", "sweep_dir": str(tmp_path / "sweep"), "launcher": "slurm",
            "base": [o for o in base if not o.startswith("runs_dir=")], "grid": {"masking.schedule": ["cosine", "linear"]},
            "seeds": [0], "slurm": {"gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 20}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "vampnet_pl.cli", "ablate", "run", str(tmp_path / "spec.yaml")],
                          env=jobs_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    sweep = tmp_path / "sweep"
    logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs[-3000:]
    assert logs.count("requeue by submitit") == 2, logs[-3000:]  # one SLURM job per run, submitit owns requeue
    for run in ("schedule-cosine_seed-0", "schedule-linear_seed-0"):
        result = json.loads((sweep / "runs" / run / "results.json").read_text())
        assert result["final_step"] == result["metrics_step"] == steps and "val/loss" in result["metrics"]
    again = subprocess.run([sys.executable, "-m", "vampnet_pl.cli", "ablate", "run", str(tmp_path / "spec.yaml")],
                           env=jobs_env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2, again.stdout + again.stderr[-2000:]
