"""The submit scripts in slurm/ run against a fake ``sbatch`` on PATH (no cluster: tests/test_slurm.py has the real one).

The fake records each call's arguments, one line per call, and answers with a job id, or fails from call ``fail_at`` on.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SBATCH = """#!/bin/bash
n=$(( $(wc -l < "$CALLS" 2>/dev/null || echo 0) + 1 ))
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
if [ -n "${FAIL_AT:-}" ] && [ "$n" -ge "$FAIL_AT" ]; then
  echo "sbatch: error: invalid partition specified: nope" >&2; exit 1
fi
printf '%s\\n' "${SBATCH_OUTPUT-$((1000 + n));cluster}"
"""


# The overrides each submit script requires (prep.sh: catalog, out_dir; eval.sh: coarse, dataset_dir).
REQUIRED = ("catalog=/c", "out_dir=/o", "coarse=/m.pt", "dataset_dir=/d")


def fake_bin(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def empty_venv(tmp_path: Path) -> Path:
    """A VAMPNET_VENV whose activation changes nothing (the fake vampnet-pl on PATH stays first)."""
    (tmp_path / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    return tmp_path / "venv"


def submit(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run ``slurm/<script>`` with the fake sbatch; returns the process and each sbatch call's arguments."""
    calls = tmp_path / "sbatch_calls"
    calls.unlink(missing_ok=True)
    folder = fake_bin(tmp_path, "sbatch", FAKE_SBATCH)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", CALLS=str(calls), LOG_DIR=str(tmp_path / "logs"), **env)
    done = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, [shlex.split(line) for line in lines]


def test_submit_scripts_print_the_job_ids(tmp_path):
    done, calls = submit(tmp_path, "prep.sh", "catalog=/c", "out_dir=/o")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1001", "1002", "1003"]
    assert "--dependency=afterok:1001" in calls[1] and "--dependency=afterok:1002" in calls[2]
    done, calls = submit(tmp_path, "train.sh", "experiment=vampnet_coarse")
    assert done.returncode == 0 and done.stdout.split() == ["1001"], done.stderr


@pytest.mark.parametrize("script", ["train.sh", "eval.sh", "prep.sh"])
def test_a_failed_sbatch_fails_the_submit_script(script, tmp_path):
    done, calls = submit(tmp_path, script, *REQUIRED, FAIL_AT="1")
    assert done.returncode != 0
    assert "sbatch failed" in done.stderr and "invalid partition" in done.stderr
    assert done.stdout.strip() == ""  # no empty job id for a caller to read
    assert len(calls) == 1  # prep.sh submits no dependent job after a failed one


def test_prep_stops_at_the_first_failed_submission_and_names_the_queued_jobs(tmp_path):
    done, calls = submit(tmp_path, "prep.sh", "catalog=/c", "out_dir=/o", FAIL_AT="2")
    assert done.returncode != 0 and len(calls) == 2  # the finalize job is never submitted
    assert "already submitted: 1001" in done.stderr


def test_an_sbatch_that_prints_no_job_id_fails_the_submit_script(tmp_path):
    done, calls = submit(tmp_path, "train.sh", "experiment=vampnet_coarse", SBATCH_OUTPUT="")
    assert done.returncode != 0 and "printed no job id" in done.stderr and len(calls) == 1


@pytest.mark.parametrize("out_dir", ["out_dir='{dir}'", "out_dir=${{oc.env:CODES_DIR}}"])
def test_the_finalize_job_verifies_the_out_dir_that_hydra_parsed(out_dir, prepared, synthetic_catalog, codec_path,
                                                                 tmp_path):
    """prep.sbatch finalize, run as the job runs it (no SLURM needed): a quoted out_dir (a comma needs the quotes)
    or an interpolated one is the folder that finalize wrote and that verify checks, not the override's raw text."""
    import shutil
    import sys

    codes = tmp_path / "codes,v2"
    shutil.copytree(prepared, codes)
    folder = fake_bin(tmp_path, "vampnet-pl", f'#!/bin/bash\nexec "{sys.executable}" -m vampnet_pl.cli "$@"\n')
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", VAMPNET_ROOT=str(ROOT), VAMPNET_VENV=str(empty_venv(tmp_path)),
                       PYTHONPATH=str(ROOT / "src"), CODES_DIR=str(codes), OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", str(ROOT / "slurm" / "prep.sbatch"), "finalize", f"catalog={synthetic_catalog}",
         out_dir.format(dir=codes), f"codec.source={codec_path}", "codec.device=cpu", "files_per_unit=2",
         "shard_max_samples=4", "segment_seconds=8.0", "split.val_fraction=0.25", "split.test_fraction=0.0",
         "channels=mono"], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "verify: OK" in done.stdout


def test_prep_verify_reads_a_quoted_or_interpolated_out_dir(prepared, monkeypatch, capsys):
    from vampnet_pl.cli import main

    monkeypatch.setenv("CODES_DIR", str(prepared))
    for override in (f"out_dir='{prepared}'", "out_dir=${oc.env:CODES_DIR}", f"out_dir={prepared}"):
        assert main(["prep", "verify", override]) == 0, capsys.readouterr()


def compose_sweep_job(monkeypatch, overrides: list[str], **env: str):
    """A job's config of ``vampnet-pl train -m hydra/launcher=slurm OVERRIDES`` (the launcher section included)."""
    from hydra import compose, initialize_config_dir

    from vampnet_pl.config import conf_dir

    for name in ("GPUS_PER_NODE", "TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", ["hydra/launcher=slurm", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("env, tasks", [({"GPUS_PER_NODE": "0"}, 1), ({"GPUS_PER_NODE": "2"}, 2), ({}, 1),
                                        ({"GPUS_PER_NODE": "0", "TASKS_PER_NODE": "3"}, 3),
                                        ({"GPUS_PER_NODE": "a100:2"}, 2)])
def test_the_submitit_launcher_runs_one_task_per_gpu_and_one_on_cpus(env, tasks, monkeypatch):
    cfg = compose_sweep_job(monkeypatch, ["experiment=demo_coarse", "data.dataset_dir=codes"], **env)
    assert int(cfg.hydra.launcher.tasks_per_node) == tasks


@pytest.mark.parametrize("gpus, per_node, gres", [("2", 2, None), ("0", 0, None), ("a100:2", None, "gpu:a100:2"),
                                                  ("a100:0", None, None)])
def test_the_submitit_launcher_takes_a_typed_gpu_count_as_train_sh_does(gpus, per_node, gres, monkeypatch):
    """GPUS_PER_NODE=a100:2 (slurm/train.sh takes it): gpus_per_node is an int in the launcher's schema, and the sweep
    stopped on 'Value 'a100:2' of type 'str' could not be converted to Integer'."""
    launcher = compose_sweep_job(monkeypatch, ["experiment=demo_coarse", "data.dataset_dir=codes"],
                                 GPUS_PER_NODE=gpus).hydra.launcher
    assert launcher.gpus_per_node == per_node and launcher.gres == gres


def test_the_submitit_launcher_refuses_a_gpu_count_that_is_no_count(monkeypatch):
    from omegaconf.errors import InterpolationResolutionError

    launcher = compose_sweep_job(monkeypatch, ["experiment=demo_coarse", "data.dataset_dir=codes"],
                                 GPUS_PER_NODE="two").hydra.launcher
    with pytest.raises(InterpolationResolutionError, match="GPUS_PER_NODE=two: give a GPU count"):
        launcher.gpus_per_node


def test_the_guides_submitit_sweep_trains_on_the_gpus_it_asks_for(monkeypatch):
    """The example in slurm/README.md, composed as its first job: GPUs asked for are GPUs trained on."""
    text = (ROOT / "slurm" / "README.md").read_text()
    block = text.split("## Hydra sweeps on SLURM")[1].split("```bash\n")[1].split("```")[0]
    words = shlex.split(block.replace("\\\n", " "))
    command = next(i for i, word in enumerate(words) if word.endswith("vampnet-pl"))
    env = dict(word.split("=", 1) for word in words[:command])
    overrides = [w.split(",")[0] for w in words[command + 1:] if "=" in w]  # the first job of each swept value
    assert "hydra/launcher=slurm" in overrides and int(env["GPUS_PER_NODE"]) > 0
    cfg = compose_sweep_job(monkeypatch, overrides, GPUS_PER_NODE=env["GPUS_PER_NODE"])
    assert cfg.hydra.launcher.gpus_per_node == int(env["GPUS_PER_NODE"])
    assert cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize("script, variable, first_call", [("train.sh", "GPUS_PER_NODE", 0), ("eval.sh", "GPUS", 0),
                                                          ("prep.sh", "GPUS_PER_TASK", 1)])
def test_a_typed_gpu_count_is_passed_to_gres_and_counted(script, variable, first_call, tmp_path):
    done, calls = submit(tmp_path, script, *REQUIRED, **{variable: "a100:2"})
    assert done.returncode == 0, done.stderr
    call = calls[first_call]  # prep.sh: the encode array
    assert "--gres=gpu:a100:2" in call
    if script == "train.sh":
        assert "--ntasks-per-node=2" in call and "trainer=gpu" in call
    if script == "prep.sh":
        assert "workers=2" in call


@pytest.mark.parametrize("value", ["two", "a100", "a100:", "2.5"])
def test_a_gpu_count_that_is_no_count_is_refused(value, tmp_path):
    done, calls = submit(tmp_path, "train.sh", "experiment=vampnet_coarse", GPUS_PER_NODE=value)
    assert done.returncode == 2 and f"GPUS_PER_NODE={value}: give a GPU count" in done.stderr and calls == []


FAKE_SRUN = '#!/bin/bash\nprintf "%s\\n" "$@" > "$CALLS"\n'


@pytest.mark.parametrize("slurm_env, devices", [({}, "1"), ({"SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2"}, "2"),
                                                ({"SLURM_NTASKS_PER_NODE": "3", "SLURM_NTASKS": "3"}, "3")])
def test_train_sbatch_submitted_directly_gives_srun_its_layout(slurm_env, devices, tmp_path):
    """`sbatch slurm/train.sbatch ...` (the guide allows it) without --ntasks: SLURM sets no SLURM_NTASKS, and srun
    starts one task per node; the job script must not stop on the unset variable."""
    calls = tmp_path / "srun_args"
    fake_bin(tmp_path, "vampnet-pl", "#!/bin/bash\n")
    folder = fake_bin(tmp_path, "srun", FAKE_SRUN)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", CALLS=str(calls), VAMPNET_ROOT=str(ROOT),
                       VAMPNET_VENV=str(empty_venv(tmp_path)), SLURM_JOB_ID="7", **slurm_env)
    done = subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), "experiment=vampnet_coarse"],
                          capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    args = calls.read_text().split()
    assert f"trainer.devices={devices}" in args and "experiment=vampnet_coarse" in args
    assert f"trainer.num_nodes={slurm_env.get('SLURM_JOB_NUM_NODES', '1')}" in args


@pytest.mark.parametrize("value", ["0", "abc", "-2", "1.5", ""])
def test_a_task_count_that_is_no_count_is_refused_before_anything_is_submitted(value, tmp_path):
    """prep.sh TASKS: checked first (it submitted the scan job, then failed on the array: an orphaned scan job)."""
    done, calls = submit(tmp_path, "prep.sh", "catalog=/c", "out_dir=/o", TASKS=value)
    if value == "":  # empty is unset: the default
        assert done.returncode == 0 and "--array=0-7" in calls[1], done.stderr
        return
    assert done.returncode == 2 and f"TASKS={value}: give the number" in done.stderr and calls == []


def test_a_task_count_with_a_leading_zero_is_decimal(tmp_path):
    done, calls = submit(tmp_path, "prep.sh", "catalog=/c", "out_dir=/o", TASKS="010")
    assert done.returncode == 0 and "--array=0-9" in calls[1], done.stderr


@pytest.mark.parametrize("args", [[], ["bogus"]])
def test_prep_sbatch_without_a_known_stage_prints_its_usage(args, tmp_path):
    folder = fake_bin(tmp_path, "vampnet-pl", "#!/bin/bash\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", VAMPNET_ROOT=str(ROOT), VAMPNET_VENV=str(empty_venv(tmp_path)))
    done = subprocess.run(["bash", str(ROOT / "slurm" / "prep.sbatch"), *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "usage: prep.sbatch scan|encode|finalize" in done.stderr, done.stderr


def test_the_guide_names_the_variables_the_submitit_launcher_reads(monkeypatch):
    """slurm/README.md's list of train.sh's variables that a submitit sweep reads (it said "the same variables as
    train.sh", but MEM, SBATCH_EXTRA and VAMPNET_SETUP were silently ignored), and its overrides for the others."""
    import re

    from omegaconf import OmegaConf

    text = (ROOT / "slurm" / "README.md").read_text().split("## Hydra sweeps on SLURM")[1]
    reads = re.search(r"Of `train.sh`'s variables it reads (.*?);", text, re.S)
    ignores = re.search(r"It does not read (.*?):", text, re.S)
    assert reads and ignores, "the guide lists which variables the launcher reads"
    base = ["experiment=demo_coarse", "data.dataset_dir=codes"]
    plain = OmegaConf.to_container(compose_sweep_job(monkeypatch, base).hydra.launcher, resolve=True)
    for names, read in ((reads.group(1), True), (ignores.group(1), False)):
        for name in re.findall(r"`([A-Z_]+)`", names):
            with monkeypatch.context() as scoped:  # this variable only
                launcher = compose_sweep_job(scoped, base, **{name: "3"}).hydra.launcher
                changed = OmegaConf.to_container(launcher, resolve=True) != plain
            assert changed == read, f"{name}: the guide says the launcher {'reads' if read else 'ignores'} it"
    advice = ignores.string[ignores.end():].split("Override any field")[0]
    overrides = re.findall(r"`(\+?hydra\.launcher\.[^`]+)`", advice)
    assert len(overrides) == 3, overrides
    launcher = compose_sweep_job(monkeypatch, [*base, *(o.replace("'", "") for o in overrides)]).hydra.launcher
    assert launcher.mem_gb == 64 and launcher.additional_parameters.constraint == "a100"
    assert list(launcher.setup) == ["module load cuda/12.4"]


@pytest.mark.parametrize("script, args, missing", [
    ("prep.sh", ["out_dir=/o"], "catalog"), ("prep.sh", ["catalog=/c"], "out_dir"),
    ("prep.sh", ["codec.catalog=/c", "out_dir=/o"], "catalog"), ("eval.sh", ["dataset_dir=/d"], "coarse"),
    ("eval.sh", ["coarse=/m.pt"], "dataset_dir")])
def test_a_submit_script_without_a_required_override_submits_nothing(script, args, missing, tmp_path):
    """Required by conf/prep.yaml and conf/eval.yaml (???): the job failed on them after its wait in the queue."""
    done, calls = submit(tmp_path, script, *args)
    assert done.returncode == 2 and f"give {missing}=" in done.stderr and calls == []


def test_prep_takes_catalog_and_out_dir_given_with_a_plus(tmp_path):
    done, calls = submit(tmp_path, "prep.sh", "++catalog=/c", "+out_dir=/o")
    assert done.returncode == 0 and len(calls) == 3, done.stderr


def test_a_vampnet_venv_that_does_not_exist_stops_the_job_naming_it(tmp_path):
    """A misspelt VAMPNET_VENV was passed over: the job ran whatever vampnet-pl was on PATH (the submitting shell's,
    with --export=ALL), or said "set VAMPNET_VENV", which was set."""
    folder = fake_bin(tmp_path, "vampnet-pl", "#!/bin/bash\necho ran\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", VAMPNET_ROOT=str(ROOT), VAMPNET_VENV=str(tmp_path / "vnev"))
    done = subprocess.run(["bash", str(ROOT / "slurm" / "eval.sbatch"), "coarse=m.pt"], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and f"VAMPNET_VENV={tmp_path / 'vnev'}: no environment there" in done.stderr
    assert "ran" not in done.stdout


@pytest.mark.parametrize("name", ["coarse-123456", "a,b", "c2f(v2)", "my run", "x=y", "[1]", "group/run"])
def test_run_name_reaches_the_training_config_as_given(name, tmp_path, monkeypatch):
    """train.sh RUN_NAME: passed unquoted, a comma made a Hydra sweep and brackets a function call, and the job failed
    at its start after its wait in the queue."""
    from hydra import compose, initialize_config_dir

    from vampnet_pl.config import conf_dir

    done, calls = submit(tmp_path, "train.sh", "experiment=demo_coarse", "data.dataset_dir=codes", RUN_NAME=name)
    assert done.returncode == 0, done.stderr
    overrides = calls[0][calls[0].index(str(ROOT / "slurm" / "train.sbatch")) + 1:]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        assert compose("train", overrides).run_name == name


@pytest.mark.parametrize("name", ["it's", "a\\b"])
def test_a_run_name_hydra_cannot_quote_is_refused(name, tmp_path):
    done, calls = submit(tmp_path, "train.sh", "experiment=demo_coarse", RUN_NAME=name)
    assert done.returncode == 2 and "give a name without" in done.stderr and calls == []
