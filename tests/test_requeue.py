"""Requeue on a signal at the step boundary, SLURM detection, per-batch seeds, atomic checkpoint folders
(in-process; tests/test_slurm.py runs the same paths as real SLURM jobs)."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import CRASH_MARKERS
from test_train import assert_same_final_weights, compose, overrides, training_process
from vampnet_pl.config import RequeueMode
from vampnet_pl.training.export import read_checkpoint
from vampnet_pl.training.slurm import (NOT_REQUEUED_EXIT, SharedSignals, SlurmRequeue, checkpoint_on_signal,
                                      cluster_plugins, describe, requeue_enabled, share_signals, slurm_layout,
                                      stopped_on_sigterm)
from vampnet_pl.training.app import build, last_checkpoint
from vampnet_pl.training.callbacks import batch_seed
from vampnet_pl.utils.atomic import previous_folder, replace_folder


@pytest.fixture
def slurm_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key == "SUBMITIT_EXECUTOR":
            monkeypatch.delenv(key)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))

    return set_env


def test_requeue_mode_follows_slurm_and_submitit(slurm_env):
    assert not requeue_enabled(RequeueMode.auto) and cluster_plugins() == []
    assert describe(RequeueMode.auto) == "not a SLURM job"
    assert not checkpoint_on_signal(RequeueMode.off) and checkpoint_on_signal(RequeueMode.on)
    slurm_env(SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=2, SLURM_JOB_NAME="vampnet-train", SLURM_JOB_ID=17)
    assert requeue_enabled(RequeueMode.auto) and not requeue_enabled(RequeueMode.off)
    (environment,) = cluster_plugins()
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue  # Lightning's own is off
    assert "requeue by this run" in describe(RequeueMode.auto)
    # train.sbatch sends the signal whatever the setting: without a requeue the job still checkpoints and stops
    assert checkpoint_on_signal(RequeueMode.off) and "checkpoint and stop" in describe(RequeueMode.off)
    slurm_env(SUBMITIT_EXECUTOR="slurm")
    assert not requeue_enabled(RequeueMode.auto) and "requeue by submitit" in describe(RequeueMode.auto)
    assert not checkpoint_on_signal(RequeueMode.auto) and not checkpoint_on_signal(RequeueMode.off)  # submitit's signal
    assert requeue_enabled(RequeueMode.on)


def test_a_slurm_job_with_gpus_that_trains_on_cpus_is_warned(slurm_env):
    from vampnet_pl.training.slurm import gpus_left_unused

    assert gpus_left_unused("cpu") is None  # not a job with GPUs
    slurm_env(SLURM_GPUS_ON_NODE=2)
    assert "2 GPU(s) per node but trains on CPUs" in gpus_left_unused("cpu") and "trainer=gpu" in gpus_left_unused("cpu")
    assert gpus_left_unused("gpu") is None
    slurm_env(SLURM_GPUS_ON_NODE=0)
    assert gpus_left_unused("cpu") is None


def test_slurm_layout_gives_processes_per_node_and_nodes(slurm_env):
    assert slurm_layout() is None
    slurm_env(SLURM_NTASKS=8, SLURM_JOB_NAME="train", SLURM_JOB_NUM_NODES=2, SLURM_NTASKS_PER_NODE="4(x2)")
    assert slurm_layout() == (4, 2)
    os.environ.pop("SLURM_NTASKS_PER_NODE")
    assert slurm_layout() == (4, 2)


def test_batch_seeds_differ_by_rank_and_batch_and_repeat_exactly():
    seeds = {batch_seed(0, rank, batch) for rank in range(4) for batch in range(100)}
    assert len(seeds) == 400
    assert batch_seed(3, 1, 42) == batch_seed(3, 1, 42) != batch_seed(4, 1, 42)


class SignalAtStep(L.Callback):
    """Sends the requeue signal (or ``signum``) to this process while step ``step`` is under way; counts validation
    runs after."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1):
        self.step, self.signum = step, signum
        self.validations_after = 0

    def on_before_backward(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer, *args) -> None:
        self.validations_after += trainer.global_step > self.step


@pytest.mark.parametrize("accumulate", [1, 2])
def test_signal_checkpoints_at_the_step_boundary_and_stops(accumulate, prepared, codec_path, tmp_path, caplog):
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=20", "data.batches_per_epoch=20",
                            "checkpoint.every_n_train_steps=100", "slurm.requeue=on",
                            f"trainer.accumulate_grad_batches={accumulate}"))
    previous = signal.getsignal(signal.SIGUSR1)  # before build, which installs the requeue handler
    module, datamodule, trainer, _ = build(cfg)
    trainer.callbacks.append(signaller := SignalAtStep(5))
    with caplog.at_level(logging.INFO, logger="vampnet_pl.training.slurm"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 6  # the step under way when the signal came was finished, not cut
    assert signaller.validations_after == 0  # no validation pass in the grace time before the job is killed
    assert trainer.limit_val_batches == cfg.trainer.limit_val_batches  # and the trainer as it was, after fit
    last = tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 6
    assert "SIGUSR1 received" in caplog.text and "not a SLURM job" in caplog.text
    # after training, a late signal is ignored rather than killing the finished process
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_IGN, previous)
    signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("every", [4, 100])
def test_a_requeue_writes_last_checkpoint_once(every, prepared, codec_path, tmp_path, monkeypatch):
    """last.ckpt was written twice at the requeue's step, the second time inside the signal's grace time (after
    scontrol requeue, racing the kill that follows it): by the periodic save due at the same step (every=4), and,
    before this job's first periodic save (every=100), by Lightning's save of a last checkpoint at the end."""
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=20", "data.batches_per_epoch=20",
                            f"checkpoint.every_n_train_steps={every}", "slurm.requeue=on"))
    previous = signal.getsignal(signal.SIGUSR1)
    module, datamodule, trainer, _ = build(cfg)
    trainer.callbacks.append(SignalAtStep(3))  # the requeue at step 4
    saves, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, *args, **kwargs: (
        saves.append((trainer.global_step, Path(path).name)), save(path, *args, **kwargs))[1])
    trainer.fit(module, datamodule=datamodule)
    signal.signal(signal.SIGUSR1, previous)
    assert saves == [(4, "last.ckpt")]
    assert read_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_signal_in_the_last_step_lets_the_run_finish_without_a_requeue(prepared, codec_path, tmp_path,
                                                                         monkeypatch):
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "data.batches_per_epoch=4",
                            "checkpoint.every_n_train_steps=100", "slurm.requeue=on", "data.val_max_windows=8"))
    previous = signal.getsignal(signal.SIGUSR1)
    module, datamodule, trainer, _ = build(cfg)
    trainer.callbacks.append(signaller := SignalAtStep(3))  # the last step
    requeued = []
    monkeypatch.setattr(SlurmRequeue, "requeue", staticmethod(lambda: requeued.append(True)))
    trainer.fit(module, datamodule=datamodule)
    signal.signal(signal.SIGUSR1, previous)
    assert trainer.global_step == 4 and requeued == []
    assert signaller.validations_after == 1  # the final validation ran


def test_a_requeue_before_the_first_periodic_save_leaves_one_last_checkpoint(prepared, codec_path, tmp_path,
                                                                           slurm_env):
    """The requeue writes last.ckpt before the periodic callback has saved: its saves still go to last.ckpt (not
    last-v1.ckpt, which resume would never read), so the next job resumes from the newest step."""
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "data.batches_per_epoch=4",
                            "checkpoint.every_n_train_steps=2", "slurm.requeue=on", "data.val_max_windows=8"))
    previous = signal.getsignal(signal.SIGUSR1)
    module, datamodule, trainer, resume = build(cfg)
    trainer.callbacks.append(SignalAtStep(0))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and resume is None
    module, datamodule, trainer, resume = build(cfg)  # the requeued job
    assert resume.name == "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume))  # saves at steps 2 and 4
    folder = tmp_path / "demo_coarse-local" / "checkpoints"
    assert [p.name for p in folder.glob("last*")] == ["last.ckpt"]
    _, _, _, resume = build(cfg)
    assert read_checkpoint(resume)["global_step"] == 4
    signal.signal(signal.SIGUSR1, previous)


def fake_scontrol(tmp_path: Path, body: str) -> str:
    """A PATH whose ``scontrol`` runs ``body`` (bash), before the rest of PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scontrol").write_text(f"#!/bin/bash\n{body}\n")
    (folder / "scontrol").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


REQUEUE_DISABLED = 'echo "scontrol: error: Requested operation is presently disabled for job $2" >&2; exit 1'


def test_a_failed_missing_or_hanging_scontrol_makes_requeue_return_false(tmp_path, monkeypatch, slurm_env, caplog):
    """Training has already stopped and saved when scontrol runs: a failure is reported, never raised."""
    slurm_env(SLURM_JOB_ID=4242)
    with_scontrol = {body: fake_scontrol(tmp_path / str(i), body) for i, body in
                     enumerate([REQUEUE_DISABLED, "exec sleep 30", "exit 0"])}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a node without the SLURM client
    with caplog.at_level(logging.ERROR, logger="vampnet_pl.training.slurm"):
        assert SlurmRequeue.requeue() is False
        assert "FileNotFoundError" in caplog.text
        monkeypatch.setenv("PATH", with_scontrol[REQUEUE_DISABLED])
        assert SlurmRequeue.requeue() is False
        assert "presently disabled for job 4242" in caplog.text
        monkeypatch.setenv("PATH", with_scontrol["exec sleep 30"])
        monkeypatch.setattr("vampnet_pl.training.slurm.REQUEUE_TIMEOUT_S", 0.5)
        assert SlurmRequeue.requeue() is False
        assert "TimeoutExpired" in caplog.text
    monkeypatch.setenv("PATH", with_scontrol["exit 0"])
    assert SlurmRequeue.requeue() is True
    slurm_env()  # slurm.requeue=on outside SLURM: nothing was requeued, the run is unfinished
    monkeypatch.delenv("SLURM_JOB_ID")
    assert SlurmRequeue.requeue() is False


def train_signalled_at_step_2(prepared, codec_path, tmp_path, monkeypatch) -> tuple[int, int]:
    """``vampnet-pl train`` (slurm.requeue=on, 20 steps) given SIGUSR1 at step 2: its exit status and the step of
    the ``last.ckpt`` it left."""
    from vampnet_pl.cli import main
    from vampnet_pl.training import app

    build_app = app.build

    def build_with_signal(cfg):
        module, datamodule, trainer, resume = build_app(cfg)
        trainer.callbacks.append(SignalAtStep(2))
        return module, datamodule, trainer, resume

    monkeypatch.setattr(app, "build", build_with_signal)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["train", *overrides(prepared, codec_path, tmp_path, "trainer.max_steps=20",
                                      "data.batches_per_epoch=20", "checkpoint.every_n_train_steps=100",
                                      "slurm.requeue=on")])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    [last] = tmp_path.glob("*/checkpoints/last.ckpt")
    return stopped.value.code, read_checkpoint(last)["global_step"]


def test_a_failed_requeue_ends_train_with_a_non_zero_status(prepared, codec_path, tmp_path, monkeypatch, slurm_env):
    """Exit 0 would make the job COMPLETED to SLURM (afterok dependents start on an unfinished model)."""
    slurm_env(SLURM_JOB_ID=4242)
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path, REQUEUE_DISABLED))
    assert train_signalled_at_step_2(prepared, codec_path, tmp_path, monkeypatch) == (NOT_REQUEUED_EXIT, 3)
    assert (tmp_path / "demo_coarse-4242" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_stopped_on_the_signal_outside_slurm_does_not_exit_0(prepared, codec_path, tmp_path, monkeypatch,
                                                                   slurm_env):
    """slurm.requeue=on outside SLURM: the signal stops training with a checkpoint and there is no job to requeue; a
    caller that reads exit 0 as finished (a script, a pipeline) must not take the unfinished run for done."""
    assert train_signalled_at_step_2(prepared, codec_path, tmp_path, monkeypatch) == (NOT_REQUEUED_EXIT, 3)
    assert (tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt").is_file()


def test_a_requeue_signal_during_start_up_is_kept_and_acted_on_at_the_first_step(prepared, codec_path, tmp_path,
                                                                                 monkeypatch, slurm_env):
    """The signal's default action ends the process: one that comes while the codec, model or data load (before
    fit) must not kill the job unrequeued, but checkpoint and requeue it at the first step boundary."""
    from vampnet_pl.cli import main
    from vampnet_pl.training import app

    slurm_env(SLURM_JOB_ID=4243)
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path, f'echo "$@" > {tmp_path}/requeued'))
    build_app = app.build

    def build_then_signal(cfg):
        built = build_app(cfg)
        os.kill(os.getpid(), signal.SIGUSR1)  # start-up, before fit
        return built

    monkeypatch.setattr(app, "build", build_then_signal)
    def ended(signum, frame):  # the default action, without ending pytest
        raise SystemExit("the process ended on SIGUSR1")

    previous = signal.signal(signal.SIGUSR1, ended)
    try:
        main(["train", *overrides(prepared, codec_path, tmp_path, "trainer.max_steps=20", "data.batches_per_epoch=20",
                                  "checkpoint.every_n_train_steps=100", "slurm.requeue=on")])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert read_checkpoint(tmp_path / "demo_coarse-4243" / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4243"]


SIGTERM_RUN = ("data.batches_per_epoch=4", "checkpoint.every_n_train_steps=100", "data.val_max_windows=8")


def sigterm_at_step(cfg, step: int, monkeypatch, signum: int = signal.SIGTERM) -> tuple[L.Trainer, list]:
    """``cfg`` trained in this process, SIGTERM (or ``signum``) sent to it in step ``step``: the trainer and the
    (step, file name) of every checkpoint it saved."""
    module, datamodule, trainer, resume = build(cfg)
    trainer.callbacks.append(SignalAtStep(step, signum))
    saves, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, *args, **kwargs: (
        saves.append((trainer.global_step, Path(path).name)), save(path, *args, **kwargs))[1])
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    except SIGTERMException:  # Lightning's own stop (checkpoint.on_sigterm=false)
        pass
    return trainer, saves


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_checkpoints_at_the_step_boundary_and_resuming_gives_the_uninterrupted_weights(
        accumulate, prepared, codec_path, tmp_path, monkeypatch, caplog):
    """SIGTERM (scancel, a preemption, ``timeout``) stopped training without a checkpoint: the steps since the last
    periodic last.ckpt were lost. Every rank now saves last.ckpt at the step boundary, then stops."""
    common = (*SIGTERM_RUN, f"trainer.accumulate_grad_batches={accumulate}")
    with caplog.at_level(logging.INFO, logger="vampnet_pl.training.slurm"):
        trainer, saves = sigterm_at_step(compose(overrides(prepared, codec_path, tmp_path / "stopped",
                                                           "trainer.max_steps=8", *common)), 2, monkeypatch)
    assert trainer.global_step == 3  # the step under way was finished, not cut
    assert [save for save in saves if save[1] == "last.ckpt"] == [(3, "last.ckpt")] and saves[-1] == (3, "last.ckpt")
    assert stopped_on_sigterm(trainer) and "SIGTERM received: saving" in caplog.text
    assert trainer.limit_val_batches == 1.0  # no validation in the grace time; the trainer as it was, after fit
    assert read_checkpoint(tmp_path / "stopped" / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == 3
    module, datamodule, trainer, resume = build(compose(overrides(prepared, codec_path, tmp_path / "stopped",
                                                                  "trainer.max_steps=8", *common)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume))
    module, datamodule, trainer, _ = build(compose(overrides(prepared, codec_path, tmp_path / "straight",
                                                             "trainer.max_steps=8", *common)))
    trainer.fit(module, datamodule=datamodule)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")


class SigtermAt(L.Callback):
    """Sends SIGTERM to this process as training starts, or in the first validation after training started."""

    def __init__(self, where: str):
        self.where, self.sent, self.validation_batches = where, False, 0

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_start(self, trainer, *args) -> None:
        if self.where == "start":
            self._send()

    def on_validation_batch_start(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self.validation_batches += 1
            if self.where == "validation":
                self._send()


@pytest.mark.parametrize("where, stopped_at", [("start", 1), ("validation", 5)])
def test_sigterm_before_the_first_step_or_during_validation_checkpoints_at_the_next_step_boundary(
        where, stopped_at, prepared, codec_path, tmp_path, monkeypatch):
    """A validation under way finishes (its scores are whole), then the next step is the boundary."""
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", *SIGTERM_RUN,
                            "data.val_batch_size=2"))
    module, datamodule, trainer, _ = build(cfg)
    trainer.callbacks.append(sender := SigtermAt(where))
    saves, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, *args, **kwargs: (
        saves.append((trainer.global_step, Path(path).name)), save(path, *args, **kwargs))[1])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == stopped_at and stopped_on_sigterm(trainer)
    assert [s for s in saves if s[1] == "last.ckpt"] == [(stopped_at, "last.ckpt")]
    assert sender.validation_batches == (0 if where == "start" else 4)  # the validation (8 windows, 4 batches) ran whole
    assert read_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == stopped_at


def test_with_checkpoint_on_sigterm_off_sigterm_stops_without_a_checkpoint(prepared, codec_path, tmp_path,
                                                                          monkeypatch):
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", "checkpoint.on_sigterm=false",
                            *SIGTERM_RUN))
    trainer, saves = sigterm_at_step(cfg, 2, monkeypatch)
    assert trainer.received_sigterm and trainer.global_step == 3 and saves == []
    assert not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks)  # nothing listens outside SLURM


def test_sigterm_in_the_last_step_lets_the_run_finish(prepared, codec_path, tmp_path, monkeypatch):
    """As the requeue signal: the last step's own last.ckpt is written before the final validation, nothing else."""
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", *SIGTERM_RUN))
    trainer, saves = sigterm_at_step(cfg, 3, monkeypatch)
    assert trainer.global_step == 4 and not stopped_on_sigterm(trainer) and not trainer.received_sigterm
    assert {step for step, _ in saves} == {4}  # the periodic saves of the last step, and the best checkpoint's
    assert next(c for c in trainer.callbacks if isinstance(c, SignalAtStep)).validations_after == 1  # the final one


def test_sigterm_after_a_requeue_checkpoint_writes_nothing_more(prepared, codec_path, tmp_path, monkeypatch):
    """The kill that follows ``scontrol requeue`` (SIGTERM) comes once the requeue has saved and stopped training."""
    cfg = compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", "slurm.requeue=on", *SIGTERM_RUN))
    monkeypatch.setattr(SlurmRequeue, "requeue", staticmethod(lambda: os.kill(os.getpid(), signal.SIGTERM) or True))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        trainer, saves = sigterm_at_step(cfg, 1, monkeypatch, signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert trainer.global_step == 2 and saves == [(2, "last.ckpt")] and not stopped_on_sigterm(trainer)


def test_submitit_keeps_its_signals_and_sigterm_stops_without_a_checkpoint(prepared, codec_path, tmp_path, slurm_env):
    slurm_env(SUBMITIT_EXECUTOR="slurm")
    _, _, trainer, _ = build(compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", *SIGTERM_RUN)))
    assert not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks)


def bare_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture
def sigterm_trainer(monkeypatch):
    """A trainer as one of two ranks, whose collectives are recorded: ``(trainer, collectives)``."""
    trainer = bare_trainer()
    collectives = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *args, **kwargs: collectives.append("broadcast"))
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    return trainer, collectives


def raise_sigterm(trainer) -> None:
    trainer._signal_connector.register_signal_handlers()  # what fit does first
    try:
        signal.raise_signal(signal.SIGTERM)
    finally:
        trainer._signal_connector.teardown()


def test_lightning_sigterm_handler_runs_a_collective(sigterm_trainer):
    """Why share_signals replaces it: Lightning's handler broadcasts inside the handler, possibly in the middle of
    another collective (the ranks' operations then mismatch: abort or heap corruption). When this fails,
    Lightning has changed: check whether share_signals is still needed."""
    trainer, collectives = sigterm_trainer
    raise_sigterm(trainer)
    assert trainer.received_sigterm and collectives == ["broadcast"]


def other_rank(monkeypatch, flags: dict[str, bool]) -> list:
    """dist.all_reduce(max) as if a second rank had ``flags``; returns the list of reduced tensors."""
    reduced = []

    def all_reduce(tensor, op=None, **kwargs):
        assert op == torch.distributed.ReduceOp.MAX
        other = torch.tensor([flags.get(name, False) for name in SharedSignals.names], dtype=tensor.dtype)
        tensor.copy_(torch.maximum(tensor, other))
        reduced.append(tensor.clone())

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return reduced


@pytest.mark.parametrize("other_rank_signalled", [False, True])
def test_sigterm_is_recorded_then_shared_by_all_ranks_at_a_batch_start(other_rank_signalled, sigterm_trainer,
                                                                       monkeypatch):
    trainer, collectives = sigterm_trainer
    share_signals(trainer, signals := SharedSignals())
    signalled_here = not other_rank_signalled
    if signalled_here:
        raise_sigterm(trainer)
    assert collectives == [] and not trainer.received_sigterm  # not acted on before the ranks agree
    assert signals.local["sigterm"] == signalled_here

    reduced = other_rank(monkeypatch, {"sigterm": other_rank_signalled})
    at_batch_start = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor  # where Lightning shares it, every batch
    at_batch_start()  # the exchange starts here and is read at the next batch start (on a GPU it is still queued)
    assert not trainer.received_sigterm and len(reduced) == 1 and reduced[0].tolist() == [1, 0]
    with pytest.raises(SIGTERMException):
        at_batch_start()
    assert trainer.received_sigterm and signals.shared == {"sigterm": True, "requeue": False} and len(reduced) == 2
    assert collectives == []  # one all-reduce a batch, no broadcast


def test_ranks_act_on_a_requeue_signal_from_any_rank_at_the_same_exchange(monkeypatch):
    signals = SharedSignals()
    reduced = other_rank(monkeypatch, {"requeue": True})  # the signal reached the other rank only
    assert not signals.received("requeue", world_size=2)
    signals.exchange(torch.device("cpu"))
    assert not signals.received("requeue", world_size=2)  # read one batch later
    signals.exchange(torch.device("cpu"))
    assert signals.received("requeue", world_size=2) and not signals.received("sigterm", world_size=2)
    signals.exchange(torch.device("cpu"))
    assert signals.received("requeue", world_size=2) and len(reduced) == 3  # it stays received
    alone = SharedSignals()
    alone.record("requeue")
    assert alone.received("requeue", world_size=1) and not alone.received("requeue", world_size=2)


def test_the_requeue_callback_exchanges_signals_itself_where_lightning_cannot_be_hooked(sigterm_trainer, monkeypatch,
                                                                                       tmp_path):
    trainer, _ = sigterm_trainer  # as one of two ranks
    monkeypatch.delattr(type(trainer.fit_loop.epoch_loop), "_broadcast_sigterm_tensor")  # a Lightning without it
    requeue = SlurmRequeue(tmp_path / "last.ckpt")
    requeue.setup(trainer, None, "validate")
    assert not requeue.signals.installed
    reduced = other_rank(monkeypatch, {"requeue": True})
    requeue.on_train_batch_start(trainer)
    requeue.on_train_batch_start(trainer)
    assert len(reduced) == 2 and requeue.signals.received("requeue", trainer.world_size)


@pytest.mark.gpu
def test_the_signal_exchange_does_not_wait_for_the_gpu(tmp_path):
    """On a GPU the exchange queues behind the step: it returns while the GPU is still busy (one-rank NCCL group)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        cuda = torch.device("cuda", 0)
        signals = SharedSignals()
        signals.exchange(cuda)  # the communicator starts here
        torch.cuda.synchronize()
        signals.record("sigterm")
        x = torch.randn(8192, 8192, device=cuda, dtype=torch.bfloat16)
        for _ in range(300):  # about a second of queued work on an H100
            x = (x @ x).clamp_(-1, 1)
        signals.exchange(cuda)  # reads the first exchange (nothing), starts the second
        assert not torch.cuda.current_stream().query(), "the exchange waited for the queued work"
        assert not signals.shared["sigterm"]
        torch.cuda.synchronize()
        signals.exchange(cuda)
        assert signals.shared["sigterm"]
    finally:
        torch.distributed.destroy_process_group()


def test_one_process_stops_on_sigterm_as_lightning_stops_it():
    trainer = bare_trainer()
    share_signals(trainer, SharedSignals())
    raise_sigterm(trainer)
    assert trainer.received_sigterm


def signal_one_rank(prepared, codec_path, tmp_path, signal_name: str, batches_per_epoch: int, *extra,
                    exit_status: list | None = None) -> list[dict]:
    """Two DDP processes on CPU; rank 1 sends itself ``signal_name`` between forward and backward of step 4.
    Returns how each rank ended (tests/signal_train.py); appends the exit status to ``exit_status``."""
    args = overrides(prepared, codec_path, tmp_path, "trainer.devices=2", "strategy=ddp", "trainer.max_steps=8",
                     f"data.batches_per_epoch={batches_per_epoch}", "data.val_max_windows=8",
                     "checkpoint.every_n_train_steps=100", *extra)
    done = training_process([str(Path(__file__).with_name("signal_train.py")), *args], 180,
                            SIGNAL_OUT=str(tmp_path), SIGNAL_RANK="1", SIGNAL_STEP="3", SIGNAL=signal_name)
    output = done.stdout + done.stderr
    assert done.returncode >= 0, output[-4000:]  # not killed by a signal (an abort is -6)
    assert not any(marker in output for marker in CRASH_MARKERS), output[-4000:]
    if exit_status is not None:
        exit_status.append(done.returncode)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_143_not_0(prepared, codec_path, tmp_path):
    """Stopped early, it is not finished: a caller that reads exit 0 as done (the ablation runner) must not."""
    args = overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", "data.batches_per_epoch=8",
                     "data.val_max_windows=8", "checkpoint.every_n_train_steps=100")
    done = training_process([str(Path(__file__).with_name("signal_train.py")), *args], 180,
                            SIGNAL_OUT=str(tmp_path), SIGNAL_RANK="0", SIGNAL_STEP="3", SIGNAL="SIGTERM")
    assert done.returncode == 143, (done.stdout + done.stderr)[-3000:]
    assert json.loads((tmp_path / "rank0.json").read_text())["global_step"] == 4
    # checkpoint.on_sigterm (the default): saved at the step where it stopped
    assert read_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == 4


ONE_TASK_SLURM_JOB = dict(SLURM_JOB_ID="4244", SLURM_JOB_NAME="vampnet-train", SLURM_NTASKS="1", SLURM_PROCID="0",
                         SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NUM_NODES="1")


@pytest.mark.slow
def test_a_slurm_job_without_requeue_checkpoints_and_stops_on_the_signal(prepared, codec_path, tmp_path):
    """train.sbatch asks for SIGUSR1 whatever slurm.requeue says: with the requeue off, the signal's default action
    ended the job at once, up to 90 s before its time limit and without a checkpoint. It checkpoints at the step
    boundary and exits NOT_REQUEUED_EXIT (not 0: the run is unfinished), and nothing calls scontrol."""
    args = overrides(prepared, codec_path, tmp_path, "trainer.max_steps=8", "data.batches_per_epoch=8",
                     "data.val_max_windows=8", "checkpoint.every_n_train_steps=100", "slurm.requeue=off")
    done = training_process([str(Path(__file__).with_name("signal_train.py")), *args], 180,
                            SIGNAL_OUT=str(tmp_path), SIGNAL_RANK="0", SIGNAL_STEP="3", SIGNAL="SIGUSR1",
                            PATH=fake_scontrol(tmp_path, f"touch {tmp_path}/scontrol_called; exit 1"),
                            **ONE_TASK_SLURM_JOB)
    output = done.stdout + done.stderr
    assert done.returncode == NOT_REQUEUED_EXIT, output[-3000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"ended": "finished", "global_step": 4,
                                                                 "validations_after": 0}
    assert read_checkpoint(tmp_path / "demo_coarse-4244" / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert "stopping without a requeue" in output and not (tmp_path / "scontrol_called").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_signalled_mid_step_stops_with_the_others_at_one_batch(prepared, codec_path, tmp_path):
    """SIGTERM with checkpoint.on_sigterm=false: the ranks exchange it at the next batch start and read it one batch
    later: both stop after step 5, together, no process crashes, no checkpoint is written."""
    ends = signal_one_rank(prepared, codec_path, tmp_path, "SIGTERM", 8, "checkpoint.on_sigterm=false")
    assert ends[0] == ends[1] == {"ended": "SIGTERMException", "global_step": 5, "validations_after": 0}, ends
    assert not (tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_sigterm_checkpoints_every_rank_at_one_step_and_the_resumed_run_matches(prepared, codec_path, tmp_path):
    """checkpoint.on_sigterm (the default): the ranks agree as above, finish the step under way (step 6: one more
    than without the checkpoint), save last.ckpt together, stop and exit 143; resumed, the run ends with the weights
    of an uninterrupted one, bit for bit."""
    from test_train import _cli_train

    status = []
    (tmp_path / "stopped").mkdir()
    ends = signal_one_rank(prepared, codec_path, tmp_path / "stopped", "SIGTERM", 8, exit_status=status)
    assert ends[0] == ends[1] == {"ended": "finished", "global_step": 6, "validations_after": 0}, ends
    assert status == [143]
    assert read_checkpoint(tmp_path / "stopped" / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == 6
    common = ("trainer.devices=2", "strategy=ddp", "trainer.max_steps=8", "data.batches_per_epoch=8",
              "data.val_max_windows=8", "checkpoint.every_n_train_steps=100")
    _cli_train(overrides(prepared, codec_path, tmp_path / "stopped", *common))  # resumes at step 6
    _cli_train(overrides(prepared, codec_path, tmp_path / "straight", *common))
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_requeue_signal_before_a_validation_checkpoints_before_it_on_every_rank(prepared, codec_path, tmp_path):
    """SIGUSR1 in the last step of an epoch: the ranks exchange it at once rather than a batch later, so the
    checkpoint comes at that step and no validation runs in the grace time."""
    ends = signal_one_rank(prepared, codec_path, tmp_path, "SIGUSR1", 4, "slurm.requeue=on")
    assert ends[0] == ends[1] == {"ended": "finished", "global_step": 4, "validations_after": 0}, ends
    assert read_checkpoint(tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_checkpoint_folders_are_swapped_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    first = tmp_path / "first.partial"
    first.mkdir()
    (first / "shard0").write_text("old")
    replace_folder(first, path)
    second = tmp_path / "second.partial"
    second.mkdir()
    (second / "shard0").write_text("new")
    replace_folder(second, path)
    assert (path / "shard0").read_text() == "new" and not first.exists() and not second.exists()
    assert not previous_folder(path).exists()

    # a crash between the two renames leaves the old folder, complete, where resume looks for it
    run_dir = tmp_path / "run"
    assert last_checkpoint(run_dir) is None
    (run_dir / "checkpoints").mkdir(parents=True)
    os.replace(path, previous_folder(run_dir / "checkpoints" / "last.ckpt"))
    assert last_checkpoint(run_dir) == previous_folder(run_dir / "checkpoints" / "last.ckpt")
