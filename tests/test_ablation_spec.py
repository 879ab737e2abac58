"""Ablation specs: grid expansion, baseline choice, and a clear error for every kind of bad spec, before any run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vampnet_pl.ablation import runner
from vampnet_pl.ablation.spec import SpecError, expand, load_spec, validate
from vampnet_pl.cli import main

BASE = ["experiment=demo_coarse", "data.dataset_dir=codes", "data.batches_per_epoch=4", "trainer.max_steps=8", "data.num_workers=0"]


def write_spec(tmp_path: Path, **fields) -> Path:
    spec = {"name": "t", "sweep_dir": str(tmp_path / "sweep"), "base": BASE,
            "grid": {"masking.schedule": ["cosine", "linear"]}, "seeds": [0, 1], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_of(tmp_path, **fields):
    return expand(load_spec(write_spec(tmp_path, **fields)))


def test_grid_times_seeds_with_folders_overrides_and_baseline(tmp_path):
    sweep = sweep_of(tmp_path, grid={"masking.kind": ["span", "random"], "masking.schedule": ["linear", "cosine"],
                                     "optim.lr": [0.001]}, seeds=[3, 7])
    assert len(sweep.runs) == 2 * 2 * 1 * 2
    first = sweep.runs[0]
    assert first.run_id == "kind-span_schedule-linear_lr-0.001_seed-3"
    assert first.run_dir == (tmp_path / "sweep" / "runs" / first.run_id).resolve()
    assert first.overrides[0] == "logger=sweep"  # CSV curves for the report
    assert {"masking.kind=span", "masking.schedule=linear", "optim.lr=0.001", "seed=3", "resume=true"} <= set(first.overrides)
    assert f"run_dir={first.run_dir}" in first.overrides
    # default baseline: VampNet's random / cosine where the grid has them
    assert sweep.baseline_id == "kind-random_schedule-cosine_lr-0.001"
    assert len(validate(sweep, progress=False)) == 8


def test_explicit_baseline_and_logger_choice(tmp_path):
    sweep = sweep_of(tmp_path, baseline={"masking.schedule": "linear"}, base=[*BASE, "logger=csv"])
    assert sweep.baseline_id == "schedule-linear"
    assert "logger=sweep" not in sweep.runs[0].overrides
    validate(sweep, progress=False)


@pytest.mark.parametrize("grid, message", [
    ({"masking.schedule": ["cosnie", "cosine"]}, "unknown masking schedule 'cosnie'"),
    ({"masking.kind": ["spam", "random"]}, "unknown masking kind 'spam'"),
    ({"masking.sampler": ["halton", "uniform"]}, "unknown masking sampler 'halton'"),
    ({"masking.shedule": ["cosine"]}, "Could not override 'masking.shedule'"),
    ({"masking": ["nope", "cosine"]}, "Could not find 'masking/nope'"),
    ({"trainer.max_stesp": [4]}, "max_stesp"),
])
def test_unknown_names_and_keys_fail_before_anything_runs(tmp_path, grid, message):
    sweep = sweep_of(tmp_path, grid=grid)
    with pytest.raises(SpecError, match=message) as err:
        validate(sweep, progress=False)
    assert "run " in str(err.value)  # says which run
    assert not (tmp_path / "sweep").exists()


def test_a_typo_in_the_base_overrides_fails(tmp_path):
    with pytest.raises(SpecError, match="optim.lrr|lrr"):
        validate(sweep_of(tmp_path, base=[*BASE, "optim.lrr=0.1"]), progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"grdi": {"masking.schedule": ["cosine"]}}, "Key 'grdi' not in 'AblationConfig'"),
    ({"seeds": "zero"}, "seeds"),
    ({"launcher": "kubernetes"}, "launcher"),
])
def test_a_malformed_spec_file_fails(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, **fields))


@pytest.mark.parametrize("fields, message", [
    ({"seeds": []}, "no seeds"),
    ({"seeds": [1, 1]}, "seeds repeat"),
    ({"seed_keys": []}, "seed_keys is empty"),
    ({"grid": {"masking.schedule": []}}, "has no values"),
    ({"grid": {"masking.schedule": ["cosine", "cosine"]}}, "repeats a value"),
    ({"grid": {"seed": [1, 2]}}, "is a seed key"),
    ({"grid": {"x": ["a b", "a-b"]}}, "same folder name"),
    ({"baseline": {"masking.schedule": "square"}}, "not in the grid"),
    ({"baseline": {"masking.kind": "random"}}, "does not vary"),
    ({"parallel": 0}, "parallel"),
    ({"primary_metric": "data/skip_rate"}, "primary_metric 'data/skip_rate' is bookkeeping"),
])
def test_inconsistent_specs_fail(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        sweep_of(tmp_path, **fields)


def test_runs_need_a_csv_log_and_may_end_mid_epoch(tmp_path):
    with pytest.raises(SpecError, match="writes no CSV"):
        validate(sweep_of(tmp_path, base=[*BASE, "logger=tensorboard"]), progress=False)
    # a run validates at its last step, mid-epoch too (training.callbacks.FinalValidation): no longer refused
    assert validate(sweep_of(tmp_path, base=[*BASE, "trainer.max_steps=6"]), progress=False)


def test_a_finished_run_with_other_overrides_is_refused(tmp_path):
    sweep, _ = runner.prepare(load_spec(write_spec(tmp_path)), progress=False)
    run = sweep.runs[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "results.json").write_text('{"overrides": ["trainer.max_steps=2"]}')
    with pytest.raises(SpecError, match="other overrides"):
        runner.prepare(load_spec(write_spec(tmp_path)), progress=False)


def test_the_dry_run_refuses_what_the_run_refuses_and_names_the_finished_runs(tmp_path, capsys):
    """`--dry-run` said 'spec OK' for a spec whose finished runs were trained with other overrides; `ablate run`
    then refused it (exit 2)."""
    import json

    spec = write_spec(tmp_path)
    sweep = expand(load_spec(spec))
    for run in sweep.runs[:1]:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "results.json").write_text(json.dumps({"overrides": list(run.overrides)}))
    assert main(["ablate", "run", str(spec), "--dry-run", "optim.lr=0.01"]) == 2
    assert "1 run(s) were trained or submitted with other overrides than this spec gives them" in capsys.readouterr().err
    assert main(["ablate", "run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{sweep.runs[0].run_id} (finished: skipped): vampnet-pl train" in out
    assert f"{sweep.runs[1].run_id}: vampnet-pl train" in out and "spec OK: 4 runs (1 finished, 0 diverged, 0 running)" in out


def test_a_diverged_run_is_kept_unless_retried(tmp_path, capsys, monkeypatch):
    """A diverged run was resumed by every `ablate run` (seeded: it diverges again), so the sweep never exited 0
    until its folder was deleted. It is now a result, kept as it is; --retry-diverged resumes it."""
    import json

    spec = write_spec(tmp_path)
    sweep = expand(load_spec(spec))
    diverged = sweep.runs[1]
    diverged.run_dir.mkdir(parents=True)
    (diverged.run_dir / "failure.json").write_text(json.dumps(
        {"status": "diverged", "reason": "diverged: train loss is nan at global step 6 (exit status 1)"}))
    assert main(["ablate", "run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{diverged.run_id} (diverged: skipped): vampnet-pl train" in out
    assert "spec OK: 4 runs (0 finished, 1 diverged, 0 running)" in out
    assert main(["ablate", "run", str(spec), "--dry-run", "--retry-diverged"]) == 0
    assert "(0 finished, 0 diverged, 0 running)" in capsys.readouterr().out
    # its earlier SLURM job still trains it: running, as `ablate run` reports it (the dry run said diverged)
    monkeypatch.setattr(runner, "earlier_jobs", lambda runs: {diverged: "job 77"} if diverged in runs else {})
    assert main(["ablate", "run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{diverged.run_id} (running: skipped)" in out and "(0 finished, 0 diverged, 1 running)" in out
    monkeypatch.undo()

    trained = []

    def fake_run_local(runs, configs, parallel, progress=True):
        trained.extend(run.run_id for run in runs)
        return [runner.Outcome(run, "finished") for run in runs]

    monkeypatch.setattr(runner, "run_local", fake_run_local)
    assert main(["ablate", "run", str(spec)]) == 0  # a diverged run is the setting's result, not a failed sweep
    assert diverged.run_id not in trained and len(trained) == 3
    assert f"diverged  {diverged.run_id} before, not retrained (--retry-diverged retrains it): diverged: train loss" \
        in capsys.readouterr().out
    trained.clear()
    assert main(["ablate", "run", str(spec), "--retry-diverged"]) == 0
    assert diverged.run_id in trained


def test_a_run_that_diverged_under_other_overrides_is_trained_under_this_spec(tmp_path, monkeypatch):
    """A diverged run was kept whatever overrides it diverged under: one that diverged before its first checkpoint
    (nothing for the override check to refuse) was kept, as the result of a spec changed since (optim.lr lowered to
    stop the divergence), and never trained with it."""
    from vampnet_pl.ablation import results

    spec = write_spec(tmp_path)
    diverged = expand(load_spec(spec)).runs[1]
    diverged.run_dir.mkdir(parents=True)
    results.write_run_record(diverged)
    results.write_failure(diverged, "exit status 1", f"{results.ATTEMPT_MARKER}x\nFloatingPointError: train loss is "
                                                     "nan at global step 6: lower optim.lr\n")
    trained = []

    def fake_run_local(runs, configs, parallel, progress=True):
        trained.extend(run.run_id for run in runs)
        return [runner.Outcome(run, "finished") for run in runs]

    monkeypatch.setattr(runner, "run_local", fake_run_local)
    assert main(["ablate", "run", str(spec), "optim.lr=0.0001"]) == 0
    assert diverged.run_id in trained
    trained.clear()
    assert main(["ablate", "run", str(spec)]) == 0  # the overrides it diverged under: kept
    assert diverged.run_id not in trained


def test_a_moved_sweep_folder_keeps_its_finished_runs(tmp_path):
    """Every run's overrides hold its absolute ``run_dir``: a sweep folder copied from the cluster had every
    finished run refused as trained with other overrides."""
    import json
    import shutil

    sweep, _ = runner.prepare(load_spec(write_spec(tmp_path, sweep_dir=str(tmp_path / "here"))), progress=False)
    for run in sweep.runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "results.json").write_text(json.dumps({"overrides": list(run.overrides)}))
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved, _ = runner.prepare(load_spec(write_spec(tmp_path, sweep_dir=str(tmp_path / "there"))), progress=False)
    assert all(runner.finished(run) for run in moved.runs)


def test_a_local_sweep_needs_no_submitit(tmp_path, monkeypatch):
    """submitit is the `slurm` extra: only a run with a SLURM job record makes the runner import it."""
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    sweep, earlier = runner.prepare(load_spec(write_spec(tmp_path)), progress=False)
    assert earlier == {} and sweep.runs


def test_a_started_run_is_not_resumed_under_other_overrides(tmp_path, monkeypatch):
    """A run killed mid-way resumes from its checkpoint at the next `ablate run`: under a changed spec it would go on
    with other settings than its first steps had (and record only the new ones), so that is refused too."""
    import sys

    import torch

    started = []
    monkeypatch.setattr(runner, "train_command", lambda run: started.append(run.run_id) or [sys.executable, "-c", "1/0"])
    spec = load_spec(write_spec(tmp_path, base=[*BASE, "optim.lr=0.001"], seeds=[0]))
    assert [o.status for o in runner.run_sweep(spec, progress=False)] == ["failed", "failed"]  # killed mid-way
    cosine = expand(spec).runs[0]
    (cosine.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4}, cosine.run_dir / "checkpoints" / "last.ckpt")  # linear left no checkpoint
    changed = load_spec(write_spec(tmp_path, base=[*BASE, "optim.lr=0.1"], seeds=[0]))
    with pytest.raises(SpecError, match=r"1 run\(s\) were trained or submitted with other overrides than this spec "
                                        r"gives them \(schedule-cosine_seed-0; schedule-cosine_seed-0: "
                                        r"\['optim.lr=0.001'\] then, \['optim.lr=0.1'\] now\): finished, with a "
                                        r"checkpoint to resume"):
        runner.run_sweep(changed, progress=False)
    started.clear()
    runner.run_sweep(spec, progress=False)  # the spec it started under resumes it
    assert set(started) == {"schedule-cosine_seed-0", "schedule-linear_seed-0"}


def test_cli_dry_run_and_errors(tmp_path, capsys):
    assert main(["ablate", "run", str(write_spec(tmp_path)), "--dry-run", "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "spec OK: 4 runs" in out and "optim.lr=0.01" in out
    bad = write_spec(tmp_path, grid={"masking.kind": ["spam"]})
    assert main(["ablate", "run", str(bad)]) == 2
    assert "unknown masking kind 'spam'" in capsys.readouterr().err
    assert main(["ablate", "report", str(tmp_path / "nothing")]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["0", "-1"])
def test_parallel_below_one_is_refused_before_the_sweep_starts(parallel, tmp_path, capsys, monkeypatch):
    """`--parallel 0` ran the spec's number of runs at a time (`0 or spec.parallel`); `--dry-run` said OK."""
    used = []
    monkeypatch.setattr(runner, "run_local", lambda runs, configs, parallel, progress=True: used.append(parallel) or [])
    for dry in ([], ["--dry-run"]):
        assert main(["ablate", "run", str(write_spec(tmp_path)), "--parallel", parallel, *dry]) == 2
        assert f"--parallel must be at least 1, got {parallel}" in capsys.readouterr().err
    assert used == [] and not (tmp_path / "sweep").exists()


def test_negative_and_positive_values_get_their_own_condition_ids():
    from vampnet_pl.ablation.spec import condition_ids

    ids = [name for _, name in condition_ids({"optim.weight_decay": ["0.1", "-0.1"]})]
    assert ids == ["weight-decay-0.1", "weight-decay-neg0.1"]


def test_results_json_records_the_config_a_local_run_trained_with(tmp_path, monkeypatch):
    """A local run's command adds ``slurm.requeue=off``; its results.json must record that, not the spec's value."""
    import json
    import sys

    import torch

    monkeypatch.setattr(runner, "train_command", lambda run: [sys.executable, "-c", "pass"])  # "trained" at once
    spec = load_spec(write_spec(tmp_path, base=[*BASE, "slurm.requeue=on"], seeds=[0]))
    for run in expand(spec).runs:
        (run.run_dir / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": 8, "hyper_parameters": {"model": {}}}, run.run_dir / "checkpoints" / "last.ckpt")
    outcomes = runner.run_sweep(spec, progress=False)
    assert [o.status for o in outcomes] == ["finished", "finished"]
    for outcome in outcomes:
        recorded = json.loads((outcome.run.run_dir / "results.json").read_text())
        assert recorded["config"]["slurm"]["requeue"] == "off"
        assert recorded["overrides"] == list(outcome.run.overrides)  # what a re-run compares


def test_overrides_compare_as_hydra_applies_them():
    """Another order of distinct keys is the same run (it was refused, naming no change); with a key given twice
    the last one wins, so there the order counts. run_dir is never compared (a moved sweep folder)."""
    assert runner.override_changes(["a=1", "b=2", "run_dir=/x"], ("b=2", "a=1", "run_dir=/y")) is None
    assert runner.override_changes(["a=1", "a=2"], ("a=2", "a=1")) == (["(the same, in another order)"], [])
    assert runner.override_changes(["a=1", "b=2"], ("a=1", "b=3")) == (["b=2"], ["b=3"])
