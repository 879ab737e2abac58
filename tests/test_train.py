"""Training: it learns, it is reproducible, it resumes exactly, it exports, it fails clearly."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from vampnet_pl.config import conf_dir
from vampnet_pl.data.datamodule import CodecMismatch
from vampnet_pl.training.export import export_checkpoint, model_from_checkpoint
from vampnet_pl.model import load_exported
from vampnet_pl.training.app import run


def overrides(prepared, codec_path, runs_dir, *extra) -> list[str]:
    return [f"data.dataset_dir={prepared}", f"codec.source={codec_path}", "codec.device=cpu", f"runs_dir={runs_dir}",
            "experiment=demo_coarse", "data.num_workers=0", "data.window_seconds=1.0", "data.batch_size=8",
            "data.val_max_windows=16", "trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1",
            *extra]


def compose(args: list[str]):
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra.compose("train", overrides=args, return_hydra_config=False)


def train(args: list[str]):
    return run(compose(args))


def logged(run_dir: Path, key: str) -> list[float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_tiny_coarse_model_learns_well_above_chance(prepared, codec_path, tmp_path):
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=120", "data.batches_per_epoch=60",
                              "data.window_seconds=2.0", "data.batch_size=16", "checkpoint.every_n_train_steps=1000"))
    accuracy = float(trainer.callback_metrics["val/acc1"])
    chance = 1 / 1024
    assert accuracy > 30 * chance, accuracy
    losses = logged(tmp_path / "demo_coarse-local", "train/loss_step")
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0  # the loss falls


def test_same_seed_gives_the_same_first_losses(prepared, codec_path, tmp_path):
    first = [*overrides(prepared, codec_path, tmp_path / "a", "trainer.max_steps=3", "data.batches_per_epoch=3")]
    second = [*overrides(prepared, codec_path, tmp_path / "b", "trainer.max_steps=3", "data.batches_per_epoch=3")]
    train(first)
    train(second)
    a, b = logged(tmp_path / "a" / "demo_coarse-local", "train/loss_step"), logged(tmp_path / "b" / "demo_coarse-local", "train/loss_step")
    assert len(a) == 3 and a == b
    third = overrides(prepared, codec_path, tmp_path / "c", "trainer.max_steps=3", "data.batches_per_epoch=3", "seed=1")
    train(third)
    assert logged(tmp_path / "c" / "demo_coarse-local", "train/loss_step") != a


def assert_same_final_weights(runs_dir: Path, other_runs_dir: Path) -> None:
    """Bit for bit: the training step is deterministic on the CPU."""
    last = Path("demo_coarse-local") / "checkpoints" / "last.ckpt"
    a, b = model_from_checkpoint(runs_dir / last).state_dict(), model_from_checkpoint(other_runs_dir / last).state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_continues_exactly_where_it_stopped(prepared, codec_path, tmp_path):
    common = ["data.batches_per_epoch=3", "checkpoint.every_n_train_steps=3"]
    train(overrides(prepared, codec_path, tmp_path / "straight", "trainer.max_steps=6", *common))
    train(overrides(prepared, codec_path, tmp_path / "stopped", "trainer.max_steps=3", *common))
    train(overrides(prepared, codec_path, tmp_path / "stopped", "trainer.max_steps=6", *common))  # resume=true
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")
    checkpoint = torch.load(tmp_path / "stopped" / "demo_coarse-local" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6


def test_a_learning_rate_changed_on_resume_takes_effect(prepared, codec_path, tmp_path):
    """The restored optimiser and scheduler carry the checkpoint's base lr; the configured one replaces it, times
    the schedule's multiplier at the resumed step (warmup: 1/4, 2/4, 3/4, 4/4)."""
    common = ["data.batches_per_epoch=4", "checkpoint.every_n_train_steps=2", "optim.scheduler=constant",
              "optim.warmup_steps=4"]
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", "optim.lr=1e-4", *common))
    assert logged(tmp_path / "demo_coarse-local", "lr") == pytest.approx([0.25e-4, 0.5e-4], rel=1e-6)
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "optim.lr=1e-3", *common))
    assert logged(tmp_path / "demo_coarse-local", "lr") == pytest.approx([0.75e-3, 1e-3], rel=1e-6)  # the resumed steps
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-3, 1e-3]


def test_a_resumed_run_keeps_the_csv_log_of_its_earlier_attempt(prepared, codec_path, tmp_path):
    """Lightning's CSVLogger deleted the metrics.csv it found on a restart: a requeued run lost its earlier curve."""
    from vampnet_pl.training.csv_logs import attempt_logs

    common = ["data.batches_per_epoch=4", "checkpoint.every_n_train_steps=2"]
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", *common))
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", *common))
    run_dir = tmp_path / "demo_coarse-local"
    (earlier,) = attempt_logs(run_dir)
    assert earlier == run_dir / "curves" / "attempt-0.csv"
    assert [int(r["step"]) for r in csv.DictReader(open(earlier)) if r.get("train/loss_step")] == [0, 1]
    assert [int(r["step"]) for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("train/loss_step")] == [2, 3]
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", "resume=false", *common))  # starts over
    assert attempt_logs(run_dir) == [earlier]  # another run's log is not kept as an attempt of this one


def test_last_checkpoint_holds_the_last_step_when_max_steps_falls_between_checkpoints(prepared, codec_path, tmp_path):
    """Lightning writes last.ckpt at the end only when it never wrote it: a run of 3 steps with
    every_n_train_steps=2 left it at step 2, so export (and the demo, and the ablation's results) took step 2's
    weights, and a finished run looked unfinished."""
    common = ["data.batches_per_epoch=2", "checkpoint.every_n_train_steps=2", "trainer.accumulate_grad_batches=2"]
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=3", *common))
    last = tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    assert trainer.global_step == 3 and torch.load(last, weights_only=False)["global_step"] == 3
    assert trainer.checkpoint_callback.last_model_path == str(last)
    exported = model_from_checkpoint(last).state_dict()
    assert all(torch.equal(v, trainer.lightning_module.plain_model().state_dict()[k]) for k, v in exported.items())


def test_a_run_ending_mid_epoch_validates_its_final_weights(prepared, codec_path, tmp_path):
    """Lightning validates at an epoch's end only: a run whose max_steps fell mid-epoch ended without validating
    its final weights, so its last val/ metrics (the ablation's final scores), its best checkpoints and the
    scores recorded in last.ckpt were of older weights."""
    from vampnet_pl.ablation.results import final_metrics, read_curves

    common = ["data.batches_per_epoch=4", "checkpoint.every_n_train_steps=3"]  # last.ckpt written at step 6 too
    trainer = train(overrides(prepared, codec_path, tmp_path / "mid", "trainer.max_steps=6", *common))
    run_dir = tmp_path / "mid" / "demo_coarse-local"
    curves = read_curves(run_dir)
    assert sorted(curves["val/loss"]) == [4, 6]  # the epoch's end, then the final step
    assert final_metrics(curves).metrics_step == 6
    assert (run_dir / "checkpoints" / "step0000006.ckpt").exists()  # scored by its own validation (save_top_k=2)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    (best,) = [state for key, state in last["callbacks"].items() if "'monitor': 'val/loss'" in key]
    assert float(best["current_score"]) == pytest.approx(curves["val/loss"][6])  # written after that validation
    assert trainer.global_step == 6
    train(overrides(prepared, codec_path, tmp_path / "end", "trainer.max_steps=4", *common))  # ends with its epoch
    assert sorted(read_curves(tmp_path / "end" / "demo_coarse-local")["val/loss"]) == [4]  # validated once


class Killed(Exception):
    """Stands for a SIGKILL (a node failure): raised right after a last.ckpt write, before anything else runs."""


def kill_after_the_last_checkpoint_write_at(step: int, monkeypatch) -> None:
    from vampnet_pl.training.checkpointing import LastCheckpoint

    save = LastCheckpoint._save_last_checkpoint

    def save_then_die(self, trainer, candidates):
        save(self, trainer, candidates)
        if trainer.global_step == step:
            raise Killed

    monkeypatch.setattr(LastCheckpoint, "_save_last_checkpoint", save_then_die)


def all_validations(run_dir: Path) -> list[int]:
    """The step of every val/loss row of every attempt (Lightning's 0-based index, as logged)."""
    from vampnet_pl.training.csv_logs import attempt_logs

    files = [*attempt_logs(run_dir), run_dir / "csv" / "metrics.csv"]
    return [int(r["step"]) for f in files if f.is_file() for r in csv.DictReader(open(f)) if r.get("val/loss")]


def test_a_run_killed_before_its_final_validation_validates_when_resumed(prepared, codec_path, tmp_path, monkeypatch):
    """last.ckpt is written at the last step before that step's validation: a run killed in between resumed from
    it and ended at once, unscored (its final val/ metrics, best checkpoints and the ablation's scores of step 4)."""
    from vampnet_pl.ablation.results import final_metrics, read_curves

    common = ["data.batches_per_epoch=4", "checkpoint.every_n_train_steps=3", "trainer.max_steps=6"]
    train(overrides(prepared, codec_path, tmp_path / "straight", *common))
    kill_after_the_last_checkpoint_write_at(6, monkeypatch)
    with pytest.raises(Killed):
        train(overrides(prepared, codec_path, tmp_path / "killed", *common))
    monkeypatch.undo()
    run_dir = tmp_path / "killed" / "demo_coarse-local"
    assert all_validations(run_dir) == [3] and not (run_dir / "checkpoints" / "step0000006.ckpt").exists()
    trainer = train(overrides(prepared, codec_path, tmp_path / "killed", *common))  # resumes at step 6
    assert trainer.global_step == 6 and all_validations(run_dir) == [3, 5]
    curves = read_curves(run_dir)
    assert curves["val/loss"] == read_curves(tmp_path / "straight" / "demo_coarse-local")["val/loss"]  # bit for bit
    assert final_metrics(curves).metrics_step == 6
    assert (run_dir / "checkpoints" / "step0000006.ckpt").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (best,) = [state for key, state in last["callbacks"].items() if "'monitor': 'val/loss'" in key]
    assert last["global_step"] == 6 and float(best["current_score"]) == pytest.approx(curves["val/loss"][6])
    assert last["callbacks"]["FinalValidation"] == {"validated_step": 6}
    train(overrides(prepared, codec_path, tmp_path / "killed", *common))  # finished: not validated again
    assert all_validations(run_dir) == [3, 5]
    train(overrides(prepared, codec_path, tmp_path / "killed", *common[:2], "trainer.max_steps=8"))  # goes on
    assert all_validations(run_dir) == [3, 5, 7]
    assert [int(r["step"]) for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("train/loss_step")] == [6, 7]


def test_an_older_checkpoint_without_the_validation_record_is_validated_when_written_before_it(
        prepared, codec_path, tmp_path, monkeypatch):
    """A checkpoint of a version that did not record its validation: Lightning's progress in it tells one written at
    a training batch's end (before that step's validation) from one written at the end of training (after it)."""
    from vampnet_pl.training.callbacks import validated_step_unrecorded

    common = ["data.batches_per_epoch=4", "checkpoint.every_n_train_steps=3", "trainer.max_steps=6"]

    def older(run_dir: Path) -> dict:
        path = run_dir / "checkpoints" / "last.ckpt"
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint["callbacks"]["FinalValidation"]
        torch.save(checkpoint, path)
        return checkpoint

    train(overrides(prepared, codec_path, tmp_path / "finished", *common))
    finished = tmp_path / "finished" / "demo_coarse-local"
    assert validated_step_unrecorded(older(finished)) == 6
    train(overrides(prepared, codec_path, tmp_path / "finished", *common))
    assert all_validations(finished) == [3, 5]  # not validated again
    kill_after_the_last_checkpoint_write_at(6, monkeypatch)
    with pytest.raises(Killed):
        train(overrides(prepared, codec_path, tmp_path / "killed", *common))
    monkeypatch.undo()
    killed = tmp_path / "killed" / "demo_coarse-local"
    assert validated_step_unrecorded(older(killed)) is None
    train(overrides(prepared, codec_path, tmp_path / "killed", *common))
    assert all_validations(killed) == [3, 5]


@pytest.mark.slow
def test_resume_is_exact_when_the_accumulation_does_not_divide_the_configured_epoch(prepared, codec_path, tmp_path):
    """3 batches an epoch, 2 a step: the epoch is served as 4 (whole steps), so a resumed run's
    ``global_step * accumulation`` is the number of batches it consumed."""
    common = ["data.batches_per_epoch=3", "trainer.accumulate_grad_batches=2", "checkpoint.every_n_train_steps=2"]
    train(overrides(prepared, codec_path, tmp_path / "straight", "trainer.max_steps=4", *common))
    train(overrides(prepared, codec_path, tmp_path / "stopped", "trainer.max_steps=2", *common))
    trainer = train(overrides(prepared, codec_path, tmp_path / "stopped", "trainer.max_steps=4", *common))
    assert trainer.datamodule.train_batches_per_epoch == 4
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")


@pytest.mark.slow
def test_resume_is_exact_with_two_loader_workers_at_an_odd_batch(prepared, codec_path, tmp_path):
    """Stopped after 3 batches of 6, with 2 workers: the resumed loader's first batch is its worker 1's."""
    def args(run: str, steps: int) -> list[str]:
        return [a if a != "data.num_workers=0" else "data.num_workers=2" for a in overrides(
            prepared, codec_path, tmp_path / run, f"trainer.max_steps={steps}", "data.batches_per_epoch=6",
            "checkpoint.every_n_train_steps=3")]

    train(args("straight", 6))
    train(args("stopped", 3))
    train(args("stopped", 6))
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")


def test_best_checkpoints_are_scored_by_their_own_validation(prepared, codec_path, tmp_path):
    """Saved at a train step before validation, each carried the previous validation's val/loss."""
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=6", "data.batches_per_epoch=2",
                    "checkpoint.every_n_train_steps=2", "checkpoint.save_top_k=5"))
    folder = tmp_path / "demo_coarse-local" / "checkpoints"
    state = next(v for k, v in torch.load(folder / "step0000006.ckpt", weights_only=False)["callbacks"].items()
                 if "val/loss" in k)  # the newest best checkpoint's record of all of them
    scores = [float(score) for _, score in sorted((Path(p).name, s) for p, s in state["best_k_models"].items())]
    assert sorted(Path(p).name for p in state["best_k_models"]) == ["step0000002.ckpt", "step0000004.ckpt",
                                                                    "step0000006.ckpt"]
    assert scores == pytest.approx(logged(tmp_path / "demo_coarse-local", "val/loss"))  # validations in order


def test_a_run_folder_holding_another_runs_checkpoint_is_not_resumed(prepared, codec_path, tmp_path):
    """Run folders are named by experiment: another model or masking there silently continued the first run."""
    from vampnet_pl.training.checkpointing import ResumeMismatch

    common = ["data.batches_per_epoch=2", "checkpoint.every_n_train_steps=2"]
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", *common))
    with pytest.raises(ResumeMismatch, match=r"masking.kind 'random' -> 'span'.*run_name="):
        train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "masking.kind=span", *common))
    with pytest.raises(ResumeMismatch, match=r"model.n_layers 2 -> 3"):
        train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "model.n_layers=3", *common))
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "optim.lr=0.001",
                              "model.attention_backend=sdpa", *common))  # what a resume may change
    assert trainer.global_step == 4


def test_training_loop_reads_tensors_on_the_host_only_at_log_points(prepared, codec_path, tmp_path, monkeypatch):
    """On a GPU, reading a tensor on the host waits for the step, and so does copying a Python value to the device.
    Counted: ``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, and ``torch.tensor`` or ``torch.as_tensor``
    onto a device, called from Lightning or this project's training and evaluation code while the trainer trains
    (validation aside), progress bar on. The model's own (the masked-token selection, CPU-only dropout) and the
    data's (CPU tensors) are not the loop's, nor the loss's finiteness check, which reads every step on the CPU
    only (on a GPU on the sampled steps)."""
    import sys

    from vampnet_pl.training.app import build
    from vampnet_pl.training.callbacks import LogPointProgressBar
    from vampnet_pl.training.module import MaskedTokenModule

    args = [a for a in overrides(prepared, codec_path, tmp_path, "trainer.max_steps=12", "data.batches_per_epoch=6",
                                 "trainer.log_every_n_steps=5", "train_metrics_every_n_steps=5")
            if a not in ("trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1")]
    module, datamodule, trainer, _ = build(compose(args))
    loop_code = (f"{os.sep}lightning{os.sep}", f"vampnet_pl{os.sep}training{os.sep}", f"vampnet_pl{os.sep}evaluation{os.sep}")
    reads = []

    def note(name: str) -> None:  # called from a wrapper: its caller is the code that reads
        caller = sys._getframe(2)
        if (trainer.training and any(part in caller.f_code.co_filename for part in loop_code)
                and caller.f_code is not MaskedTokenModule._masked_step.__code__):
            reads.append((trainer.global_step, name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def read(self, *a, _original=getattr(torch.Tensor, name), _name=name):
            note(_name)
            return _original(self, *a)

        monkeypatch.setattr(torch.Tensor, name, read)
    for name in ("tensor", "as_tensor"):  # from Python data onto a device: on a GPU a copy that waits for the step
        def made(*a, _original=getattr(torch, name), _name=name, **kw):
            if kw.get("device") is not None:
                note(_name)
            return _original(*a, **kw)

        monkeypatch.setattr(torch, name, made)
    sampled_steps, masked_loss = [], module.masked_loss
    monkeypatch.setattr(module, "masked_loss", lambda codes, sampled: (
        sampled and trainer.training and sampled_steps.append(trainer.global_step + 1)) or masked_loss(codes, sampled))
    trainer.fit(module, datamodule=datamodule)
    monkeypatch.undo()
    assert trainer.global_step == 12 and reads
    assert sampled_steps == [5, 10]  # the top-k metrics of the steps the log points log
    assert {step for step, *_ in reads} <= {0, 5, 6, 10, 12}, reads  # the start, log points, epoch ends
    bar = next(c for c in trainer.callbacks if isinstance(c, LogPointProgressBar))
    loss = logged(tmp_path / "demo_coarse-local", "train/loss_step")
    assert bar.latest["train/loss_step"] == pytest.approx(loss[-1]) and len(loss) == 2  # as logged at step 10


def test_every_log_point_logs_the_top_k_metrics_of_its_own_step(prepared, codec_path, tmp_path, monkeypatch):
    """Lightning logs a metric's last value at every log point: one on a step that computed no top-k metrics
    would log an earlier step's accuracy as its own. Log points (every 3rd step) are sampled too."""
    from vampnet_pl.training.app import build

    args = [a for a in overrides(prepared, codec_path, tmp_path, "trainer.max_steps=6", "data.batches_per_epoch=6",
                                 "trainer.log_every_n_steps=3", "train_metrics_every_n_steps=2",
                                 "checkpoint.every_n_train_steps=100") if a != "trainer.log_every_n_steps=1"]
    module, datamodule, trainer, _ = build(compose(args))
    sampled_steps, masked_loss = [], module.masked_loss
    monkeypatch.setattr(module, "masked_loss", lambda codes, sampled: (
        sampled and trainer.training and sampled_steps.append(trainer.global_step + 1)) or masked_loss(codes, sampled))
    trainer.fit(module, datamodule=datamodule)
    rows = csv.DictReader(open(tmp_path / "demo_coarse-local" / "csv" / "metrics.csv"))
    logged_steps = [int(r["step"]) + 1 for r in rows if r.get("train/top1_masked_step")]
    assert logged_steps == [3, 6] and sampled_steps == [2, 3, 4, 6]

def test_a_training_step_waits_for_the_device_only_to_select_the_masked_tokens(prepared, codec_path, tmp_path):
    """Op by op, whatever the caller (Lightning, torchmetrics, this project): in the steps that are not sampled for
    metrics, the only operations that would wait for a GPU, those whose output shape or value the host must know
    (``nonzero``, boolean indexing, ``item``...), are the model's masked-token selection and the target's packing
    into its order. Aside: CPU-only code (the CPU dropout's seed, the loss's finiteness check)."""
    import sys
    from collections import Counter

    import lightning.pytorch as L
    from torch.utils._python_dispatch import TorchDispatchMode

    from vampnet_pl.training.app import build

    waits_for_device = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if waits_for_device & set(func.tags) and not (  # indexing by integer tensors has a known shape
                    func is torch.ops.aten.index.Tensor and all(i is None or i.dtype not in (torch.bool, torch.uint8)
                                                                 for i in args[1])):
                frame = sys._getframe(1)
                while frame and not any(part in frame.f_code.co_filename for part in ("vampnet_pl", "lightning",
                                                                                      "torchmetrics")):
                    frame = frame.f_back
                steps[-1][(func.__name__, frame.f_code.co_name if frame else "?")] += 1
            return func(*args, **(kwargs or {}))

    class RecordSteps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(Counter())
            self.mode = Record()
            self.mode.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.mode.__exit__(None, None, None)

    steps = []
    args = [a for a in overrides(prepared, codec_path, tmp_path, "trainer.max_steps=6", "data.batches_per_epoch=6",
                                 "trainer.log_every_n_steps=5", "train_metrics_every_n_steps=5")
            if a != "trainer.log_every_n_steps=1"]
    module, datamodule, trainer, _ = build(compose(args))
    trainer.callbacks.append(RecordSteps())
    trainer.fit(module, datamodule=datamodule)
    cpu_only = {("_local_scalar_dense.default", "random_lanes"), ("_local_scalar_dense.default", "_masked_step")}
    selection = {("nonzero.default", "classify_selected"), ("bincount.default", "classify_selected"),
                 ("index.Tensor", "packed")}
    assert len(steps) == 6 and set(steps[4]) - cpu_only - selection  # step 5 is sampled: top-k metrics' indexing
    for step in (0, 1, 2, 3, 5):
        assert set(steps[step]) - cpu_only == selection, (step, steps[step])
        assert steps[step][("nonzero.default", "classify_selected")] == 1


def test_export_makes_one_portable_file(prepared, codec_path, codec, tmp_path):
    train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", "data.batches_per_epoch=2"))
    out = export_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt", tmp_path / "coarse.pt")
    model = load_exported(out)
    assert model.cfg.codec_fingerprint == codec.fingerprint and model.cfg.n_codebooks == 4
    assert torch.equal(model.embedding.codebook_tables, codec.codebook_tables()[:4])


def test_a_failed_checkpoint_write_keeps_the_previous_one(prepared, codec_path, tmp_path, monkeypatch):
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", "data.batches_per_epoch=2"))
    last = tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt" and not p.name.startswith("step")]


def test_fine_tune_with_lora_trains_adapters_only_and_exports_merged(prepared, codec_path, tmp_path):
    train(overrides(prepared, codec_path, tmp_path / "base", "trainer.max_steps=2", "data.batches_per_epoch=2"))
    base = export_checkpoint(tmp_path / "base" / "demo_coarse-local" / "checkpoints" / "last.ckpt", tmp_path / "base.pt")
    trainer = train(overrides(prepared, codec_path, tmp_path / "lora", "trainer.max_steps=3", "data.batches_per_epoch=3",
                              f"init_from={base}", "lora=default", "lora.r=4", "optim.lr=0.05", "optim.warmup_steps=1"))
    module = trainer.lightning_module
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tuned = export_checkpoint(tmp_path / "lora" / "demo_coarse-local" / "checkpoints" / "last.ckpt", tmp_path / "tuned.pt")
    before, after = load_exported(base).state_dict(), load_exported(tuned).state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(("qkv.weight", "out.weight", "ffn_in.weight", "ffn_out.weight")) for k in changed)


def test_a_resume_from_another_init_from_is_refused(prepared, codec_path, tmp_path):
    """The checkpoint's weights win on resume: a rerun in the same folder with init_from another model trained on
    from the first one (a LoRA run's frozen base included) and recorded the new init_from in its checkpoint."""
    from vampnet_pl.model import save_exported
    from vampnet_pl.training.checkpointing import ResumeMismatch

    common = ["data.batches_per_epoch=2", "checkpoint.every_n_train_steps=2"]
    train(overrides(prepared, codec_path, tmp_path / "base", "trainer.max_steps=2", *common))
    base = export_checkpoint(tmp_path / "base" / "demo_coarse-local" / "checkpoints" / "last.ckpt", tmp_path / "base.pt")
    other = load_exported(base)
    with torch.no_grad():
        other.head.weight.add_(0.1)
    save_exported(tmp_path / "other.pt", other)
    lora = ["lora=default", "lora.r=4", *common]
    train(overrides(prepared, codec_path, tmp_path / "lora", "trainer.max_steps=2", f"init_from={base}", *lora))
    with pytest.raises(ResumeMismatch, match=r"init_from '.*base.pt' \(sha256 \w+\) -> '.*other.pt' .*another model"):
        train(overrides(prepared, codec_path, tmp_path / "lora", "trainer.max_steps=4", f"init_from={tmp_path / 'other.pt'}", *lora))
    moved = tmp_path / "moved" / "base.pt"
    moved.parent.mkdir()
    base.rename(moved)  # the same model elsewhere resumes
    assert train(overrides(prepared, codec_path, tmp_path / "lora", "trainer.max_steps=4", f"init_from={moved}", *lora)).global_step == 4
    with pytest.raises(ResumeMismatch, match=r"init_from None -> '.*base.pt'"):  # a from-scratch run's folder
        train(overrides(prepared, codec_path, tmp_path / "base", "trainer.max_steps=4", f"init_from={moved}", *common))


def test_bad_configs_and_data_fail_clearly(prepared, codec_path, tmp_path):
    from vampnet_pl.codec import SyntheticCodecSpec, make_synthetic_codec

    other = make_synthetic_codec(tmp_path / "other.pth", SyntheticCodecSpec(seed=5))
    with pytest.raises(CodecMismatch, match="the model expects"):
        train(overrides(prepared, other, tmp_path, "trainer.max_steps=1"))
    with pytest.raises(ValueError, match="train shards for 1 ranks x 64 workers"):
        train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=1", "data.num_workers=64"))
    with pytest.raises(ValueError, match="longer than every train sample"):
        train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=1", "data.window_seconds=60"))
    with pytest.raises(Exception, match="max_stepz"):
        compose(overrides(prepared, codec_path, tmp_path, "trainer.max_stepz=1"))
    with pytest.raises(Exception, match="n_layers"):
        compose(overrides(prepared, codec_path, tmp_path, "model.n_layers=many"))


def test_nan_loss_stops_with_the_step(prepared, codec_path, tmp_path):
    from vampnet_pl.training.module import MaskedTokenModule

    module = MaskedTokenModule({"n_codebooks": 4, "codebook_size": 1024, "latent_dim": 8})
    module.model.head.weight.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at global step 0"):
        module._step({"codes": torch.randint(0, 1024, (2, 4, 30))}, "train")


LAUNCHER_VARS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def training_process(command: list[str], timeout: int = 600, start_new_session: bool = False,
                     **env: str) -> subprocess.CompletedProcess:
    """``python COMMAND`` in a process of its own, with ``env`` added and without the launcher variables that
    in-process runs of this session leave behind (Lightning relaunches the command for every rank)."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout,
                          env=environment, start_new_session=start_new_session)


def _cli_train(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = training_process(["-m", "vampnet_pl.training.app", *args], timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_cpu_processes_train_save_resume_and_export(strategy, prepared, codec_path, tmp_path):
    args = overrides(prepared, codec_path, tmp_path, "trainer.devices=2", f"strategy={strategy}",
                     "data.batches_per_epoch=2", "checkpoint.every_n_train_steps=2", "data.val_max_windows=8")
    _cli_train([*args, "trainer.max_steps=2"])
    run_dir = tmp_path / "demo_coarse-local"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (strategy == "fsdp2")  # sharded checkpoints are folders
    resumed = _cli_train([*args, "trainer.max_steps=4"])
    assert "Restored all states" in resumed.stdout + resumed.stderr
    from vampnet_pl.training.export import read_checkpoint

    assert read_checkpoint(last)["global_step"] == 4
    model = load_exported(export_checkpoint(last, tmp_path / "model.pt"))
    assert model.cfg.n_codebooks == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_two_cpu_processes_validate_at_a_last_step_mid_epoch(prepared, codec_path, tmp_path):
    """The final validation under DDP: every rank stops at the same step, so all take part in it."""
    from vampnet_pl.ablation.results import read_curves
    from vampnet_pl.training.export import read_checkpoint

    _cli_train(overrides(prepared, codec_path, tmp_path, "trainer.devices=2", "strategy=ddp", "trainer.max_steps=3",
                         "data.batches_per_epoch=4", "checkpoint.every_n_train_steps=3", "data.val_max_windows=8"))
    run_dir = tmp_path / "demo_coarse-local"
    curves = read_curves(run_dir)
    assert sorted(curves["val/loss"]) == [3]
    last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (best,) = [state for key, state in last["callbacks"].items() if "'monitor': 'val/loss'" in key]
    assert last["global_step"] == 3 and float(best["current_score"]) == pytest.approx(curves["val/loss"][3])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry", ["module", "script"])
def test_vampnet_pl_train_starts_the_other_processes_of_a_multi_device_run(entry, prepared, codec_path, tmp_path):
    """Lightning starts each other rank as ``python <sys.argv[0]> <sys.argv[1:]>`` (or ``-m <module>``): through
    ``vampnet-pl train`` that was ``<cwd>/vampnet-pl train`` (no such file) or ``-m vampnet_pl.cli`` without the
    stage (an argparse error), and rank 0 was killed waiting for them."""
    args = overrides(prepared, codec_path, tmp_path, "trainer.devices=2", "strategy=ddp", "data.batches_per_epoch=1",
                     "trainer.max_steps=1", "data.val_max_windows=8")
    script = tmp_path / "vampnet-pl"  # what pip writes for the console script
    script.write_text("import sys\nfrom vampnet_pl.cli import main\nsys.exit(main())\n")
    command = ["-m", "vampnet_pl.cli"] if entry == "module" else [str(script)]
    done = training_process([*command, "train", *args], PYTHONPATH=os.pathsep.join(sys.path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert read_checkpoint_step(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt") == 1


def read_checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_gpu_strategies_train_and_export(strategy, prepared, codec_path, tmp_path):
    args = overrides(prepared, codec_path, tmp_path, "trainer=gpu", "trainer.devices=1", f"strategy={strategy}",
                     "data.batches_per_epoch=2", "checkpoint.every_n_train_steps=2", "trainer.max_steps=2")
    _cli_train(args)
    model = load_exported(export_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt", tmp_path / "m.pt"))
    assert model.cfg.n_codebooks == 4


SMALL_PROTOCOL = ["eval_protocol.periods=[8]", "eval_protocol.sweep_prompt=periodic_8", "eval_protocol.passes=2",
                  "eval_protocol.passes_sweep=[1,2]"]


def test_prompt_evaluation_during_training_logs_the_protocol_scores(prepared, codec_path, tmp_path):
    """Once at step 2 (its second micro-batch, not again at the next one, which still counts step 2), logged at
    the step of that validation's rows (an ablation report matches them to the checkpoint's step)."""
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=3", "data.batches_per_epoch=4",
                              "trainer.accumulate_grad_batches=2", "callbacks=with_eval",
                              "callbacks.prompt_eval.every_n_steps=2", "callbacks.prompt_eval.n_windows=2",
                              *SMALL_PROTOCOL))
    rows = list(csv.DictReader(open(tmp_path / "demo_coarse-local" / "csv" / "metrics.csv")))
    gen_steps = [r["step"] for r in rows if r.get("gen/fad/periodic_8")]
    assert gen_steps == [r["step"] for r in rows if r.get("val/loss")][:1] == ["1"]
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "PromptEvalCallback")
    scores = callback.last_scores
    conditions = ["ceiling_codec", "baseline_noisy", "periodic_8", "prefix", "suffix", "inpaint", "compression",
                  "passes_1", "passes_2", "beat"]  # beat: the callback's extra preset (conf/callbacks/with_eval.yaml)
    assert set(scores) == {f"gen/{s}/{c}" for s in ("mel", "mel_dac", "mel_vampnet", "fad", "kad", "n_embeddings")
                           for c in conditions}
    assert all(math.isfinite(v) for v in scores.values())
    assert {r["protocol"] for r in callback.last_rows} == {"v1"} and scores["gen/n_embeddings/prefix"] == 2
    for mel in ("mel", "mel_dac"):
        assert scores[f"gen/{mel}/ceiling_codec"] < scores[f"gen/{mel}/baseline_noisy"]
    values = logged(tmp_path / "demo_coarse-local", "gen/fad/periodic_8")
    assert values and values[-1] == pytest.approx(scores["gen/fad/periodic_8"])
    again = callback.evaluate(trainer, trainer.lightning_module)  # the step-3 weights now
    assert callback.evaluate(trainer, trainer.lightning_module) == again  # deterministic given the seed


def test_runs_with_different_masking_are_validated_on_byte_identical_masks(prepared, codec_path, tmp_path):
    digests, losses = {}, {}
    for kind in ("span", "codebook_level"):
        trainer = train(overrides(prepared, codec_path, tmp_path / kind, f"masking={kind}", f"seed={len(kind)}",
                                  "trainer.max_steps=2", "data.batches_per_epoch=2"))
        module = trainer.lightning_module
        assert module.masking_cfg.kind == kind and module.hparams.protocol == "v1"
        digests[kind] = module.protocol_digest  # sha256 of the window indices, codes and every mask it scored
        losses[kind] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert digests["span"] is not None and digests["span"] == digests["codebook_level"]
    for scores in losses.values():
        assert {"val/loss", "val/acc1", "val/acc25", "val/loss/ratio_0.10", "val/acc1/ratio_1.00",
                "val/loss/prompt_periodic_16", "val/acc1/codebook_0", "val/loss/codebook_3"} <= set(scores)
    hparams = (tmp_path / "span" / "demo_coarse-local" / "csv" / "hparams.yaml").read_text()
    assert "protocol: v1" in hparams


def test_prompt_evaluation_writes_table_audio_and_spectrograms_to_tensorboard(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vampnet_pl.evaluation.callback import PromptEvalCallback

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = SimpleNamespace(logger=logger, global_step=7)
    rows = [{"protocol": "v1", "prompt": "periodic_8", "coarse_passes": 12, "mel": 1.5, "mel_dac": 2.0, "mel_vampnet": 3.0,
             "fad": 0.25, "kad": 0.1, "n_embeddings": 8}]
    PromptEvalCallback._log_table(trainer, rows)
    PromptEvalCallback._log_media(trainer, "periodic:8", torch.randn(16000) * 0.1, 16000)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "audio": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert "media/periodic:8/audio" in tags["audio"] and "media/periodic:8/spectrogram" in tags["images"]
    assert any(tag.startswith("media/gen_table") for tag in tags["tensors"])


def test_the_progress_bar_names_the_epoch_without_a_negative_last_one():
    """Runs end at max_steps (max_epochs=-1): Lightning's bar read "Epoch 0/-2"."""
    from types import SimpleNamespace

    from vampnet_pl.training.callbacks import LogPointProgressBar

    bar = LogPointProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
