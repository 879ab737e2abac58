"""The slurm/ scripts, submitted unchanged (CPU settings through their environment and overrides) to a
real single-node SLURM cluster started on localhost (tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import ClusterError, LocalSlurm, missing_binaries
from vampnet_pl.prep.index import load_index, verify

from conftest import write_tone

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


@pytest.fixture
def jobs_env(cluster, tmp_path):
    """The environment the submit scripts run in: this venv, a log folder, CPU-sized jobs."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(cluster.env, VAMPNET_VENV=sys.prefix, LOG_DIR=str(tmp_path / "logs"), CPUS_PER_TASK="1", TIME="20")
    yield env
    cluster.cancel_all()


def submit(script: str, env: dict, *args: str, **extra_env: str) -> list[str]:
    """Run slurm/<script> (a submit script); return the job ids it prints."""
    done = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], env={**env, **extra_env},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def job_logs(env: dict) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted(Path(env["LOG_DIR"]).glob("*.out")))


def assert_completed(cluster: LocalSlurm, job_id: str, env: dict, timeout: float) -> None:
    try:
        jobs = cluster.wait(job_id, timeout)
    except ClusterError as err:
        raise AssertionError(f"{err}\n{job_logs(env)}") from None
    states = {j.id: j.state for j in jobs}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{job_logs(env)}"


def test_prep_array_then_dependent_finalize_and_verify(cluster, jobs_env, tmp_path, fast_codec_path):
    catalog = tmp_path / "catalog"
    for i in range(6):
        write_tone(catalog / f"tone{i}.wav", 6.0 + i, sample_rate=22050, freq=110.0 * (i + 1))
    (catalog / "broken.flac").write_bytes(b"not audio at all")  # skipped and recorded, never fatal
    out = tmp_path / "codes"
    scan, encode, finalize = submit(
        "prep.sh", jobs_env, f"catalog={catalog}", f"out_dir={out}", f"codec.source={fast_codec_path}",
        "codec.device=cpu", "files_per_unit=2", "segment_seconds=5", "split.val_fraction=0.2", TASKS="2", MEM="3G")
    assert_completed(cluster, finalize, jobs_env, timeout=300)
    tasks = cluster.jobs(encode)
    assert len(tasks) == 2 and {t.state for t in tasks} == {"COMPLETED"}
    logs = job_logs(jobs_env)
    assert "task 0/2" in logs and "task 1/2" in logs  # each array task took its own share
    assert "verify: OK" in logs
    index = load_index(out)
    assert index["totals"]["files"] == 6 and index["totals"]["failures"] == 1
    assert verify(out) == []
