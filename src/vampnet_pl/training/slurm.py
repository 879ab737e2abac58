"""SLURM integration for training: the cluster environment and checkpoint-and-requeue on a signal.

``slurm/train.sbatch`` asks for ``--signal=SIGUSR1@90`` and ``--requeue``. On that signal (a time
limit or a preemption ahead, or ``scancel --signal=USR1``) :class:`SlurmRequeue` lets the current
optimisation step finish, then every rank saves ``checkpoints/last.ckpt`` together, rank 0 runs
``scontrol requeue``, and training stops. The requeued job keeps its job id, so its run directory
is the same and it resumes from that checkpoint: no step is lost, none is applied twice.

Lightning's own ``auto_requeue`` saves from inside the signal handler, wherever each rank happens
to be (mid-step, or inside a collective the other rank has not reached), so it is switched off here.
Under Hydra's submitit launcher, submitit owns the signal and the requeue; this callback stays out.

SIGTERM (``scancel``, the kill that follows ``scontrol requeue``, a preemption): its handler only sets a
flag, which the ranks share at the next training batch and stop together (:func:`record_sigterm_only`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vampnet_pl.config import RequeueMode

log = logging.getLogger(__name__)


def under_slurm() -> bool:
    return SLURMEnvironment.detect()


def under_submitit() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_enabled(mode: RequeueMode) -> bool:
    if mode == RequeueMode.auto:
        return under_slurm() and not under_submitit()
    return mode == RequeueMode.on


def cluster_plugins() -> list:
    """Lightning's SLURM environment (rank, world size, main address from SLURM) without its own requeue."""
    return [SLURMEnvironment(auto_requeue=False)] if under_slurm() else []


def slurm_layout() -> tuple[int, int] | None:
    """(processes per node, nodes) of this SLURM job step, or None outside SLURM."""
    if not under_slurm():
        return None
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return (int(per_node) if per_node else int(os.environ["SLURM_NTASKS"]) // nodes), nodes


def describe(mode: RequeueMode) -> str:
    """One line for the log: who requeues this job."""
    if not under_slurm():
        return "not a SLURM job"
    who = "this run (checkpoint at the step boundary, scontrol requeue)" if requeue_enabled(mode) else (
        "submitit" if under_submitit() else "nobody (slurm.requeue=off)")
    return f"SLURM job {slurm_job_id()}, restart {os.environ.get('SLURM_RESTART_COUNT', 0)}: requeue by {who}"


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def record_sigterm_only(trainer: L.Trainer) -> None:
    """Lightning's SIGTERM handling without a collective inside the signal handler. Call before ``fit``.

    Lightning 2.6's handler broadcasts a tensor from rank 0 inside the handler, that is at whatever point the
    signal interrupted the main thread. When that is inside another collective (DDP's buffer broadcast, a
    gradient all-reduce), the ranks' operations stop pairing up: under gloo a rank aborts ("op.preamble.length
    <= op.nbytes") or its heap is corrupted, both seen in this project's SLURM requeue tests; NCCL does not
    check sizes, so ranks would hang or exchange wrong data. Lightning also acts on each rank's own flag at
    several points, so ranks that got the signal at different moments could stop at different batches.

    Here the handler only records the signal (:class:`_SharedSigterm`). One process stops as Lightning stops
    it. Several processes share it at the start of every training batch, where Lightning broadcast rank 0's
    flag: one all-reduce (did any rank get it?), then every rank stops at that same batch."""
    connector, epoch_loop = trainer._signal_connector, trainer.fit_loop.epoch_loop
    if not (callable(getattr(connector, "_sigterm_notifier_fn", None))
            and callable(getattr(epoch_loop, "_broadcast_sigterm_tensor", None))):
        log.warning("this Lightning handles SIGTERM in another way than record_sigterm_only expects; left as it is")
        return
    shared = _SharedSigterm(trainer)
    connector._sigterm_notifier_fn = shared.record  # read when Lightning registers its handlers, at the start of fit
    epoch_loop._broadcast_sigterm_tensor = shared.share  # called at each training batch start, on several ranks


class _SharedSigterm:
    """SIGTERM recorded by the handler and shared between ranks at a training batch start."""

    def __init__(self, trainer: L.Trainer):
        self.trainer = trainer
        self.received = False

    def record(self, signum, frame) -> None:  # the handler: no collective, no logging (it would re-enter a write)
        if not self.received and (launcher := self.trainer.strategy.launcher) is not None:
            launcher.kill(signum)  # processes Lightning started itself, as its own handler does
        self.received = True
        if self.trainer.world_size == 1:
            self.trainer._signal_connector.received_sigterm = True  # Lightning's loops stop at their next check

    def share(self) -> None:
        if self.trainer.strategy.reduce_boolean_decision(self.received, all=False):  # any rank
            self.trainer._signal_connector.received_sigterm = True
            if self.trainer.is_global_zero:
                log.info("SIGTERM received: training stops at this batch on every rank")
            raise SIGTERMException


class SlurmRequeue(L.Callback):
    """Checkpoint at the next step boundary after ``signal_name``, then ``scontrol requeue`` the job."""

    def __init__(self, checkpoint_path: str | Path, signal_name: str = "SIGUSR1"):
        self.checkpoint_path = Path(checkpoint_path)
        self.signum = signal.Signals[signal_name]
        self.signalled = False
        self._previous_handler = None
        self._step_at_batch_start = -1
        self._limit_val_batches = None  # the trainer's, while validation is switched off for the requeue

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the step boundary, never here

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            # A signal after training ends has nothing to save, and must not kill the finished job.
            keep = self._previous_handler not in (signal.SIG_DFL, None)
            signal.signal(self.signum, self._previous_handler if keep else signal.SIG_IGN)
            self._previous_handler = None
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: not a step boundary
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):  # any rank signalled
            return
        if trainer.is_global_zero:
            log.info("%s received: saving %s at step %d, then requeueing", self.signum.name, self.checkpoint_path,
                     trainer.global_step)
        trainer.save_checkpoint(self.checkpoint_path)  # every rank, at the same step
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            self.requeue()
        trainer.should_stop = True
        # Lightning validates before an early stop; the requeue is killing this job (restored in teardown)
        if self._limit_val_batches is None:
            self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    @staticmethod
    def requeue() -> None:
        job_id = slurm_job_id()
        if job_id is None:
            log.warning("not a SLURM job: checkpoint saved, nothing to requeue")
            return
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if done.returncode == 0:
            log.info("requeued SLURM job %s; it resumes from the checkpoint", job_id)
        else:
            log.error("scontrol requeue %s failed (%s); resubmit with the same run_name to resume",
                      job_id, done.stderr.strip())
