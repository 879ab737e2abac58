"""SLURM integration for training: the cluster environment and checkpoint-and-requeue on a signal.

``slurm/train.sbatch`` asks for ``--signal=SIGUSR1@90`` and ``--requeue``. On that signal (a time
limit or a preemption ahead, or ``scancel --signal=USR1``) :class:`SlurmRequeue` waits for the first
optimiser step boundary after the ranks have exchanged it (one to two batches later; before a validation
or an epoch end, at once), then every rank saves ``checkpoints/last.ckpt`` together, rank 0 runs
``scontrol requeue``, and training stops. The requeued job keeps its job id, so its run directory is the
same and it resumes from that checkpoint: no step is lost, none is applied twice. A signal in the last step
(``trainer.max_steps``) is ignored: the run finishes as usual, final validation included, with nothing to requeue.
A signal during start-up is recorded from the moment ``app.build`` has the config (:meth:`SlurmRequeue.listen`)
and acted on at the first step boundary; left to its default action it would end the job unrequeued.

With ``slurm.requeue=off`` a SLURM job still checkpoints and stops on the signal, but is not requeued: the sbatch
script asks for the signal whatever the setting, and its default action would end the job at once, without a
checkpoint, up to 90 s before the time limit. The run exits with :data:`NOT_REQUEUED_EXIT`; resubmitting it with
the same run_name resumes from the checkpoint.

Lightning's own ``auto_requeue`` saves from inside the signal handler, wherever each rank happens
to be (mid-step, or inside a collective the other rank has not reached), so it is switched off here.
Under Hydra's submitit launcher, submitit owns the signal and the requeue; this callback stays out.

Both handlers only set a flag (:class:`SharedSignals`); the ranks exchange the flags at every training batch
start without waiting for the GPU, and act on them together. SIGTERM (``scancel``, the kill that follows
``scontrol requeue``, a preemption, a local ``timeout``) stops every rank at the same batch (:func:`share_signals`).
With ``checkpoint.on_sigterm`` (the default; not under submitit) :class:`SlurmRequeue` acts on it as on the requeue
signal, without the requeue: every rank saves ``checkpoints/last.ckpt`` at the first step boundary after the ranks
have exchanged it, and training stops (``vampnet-pl train`` exits 143). A SIGTERM after a requeue checkpoint has
stopped training (the kill that follows ``scontrol requeue``) writes nothing more.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vampnet_pl.config import RequeueMode
from vampnet_pl.training.checkpointing import LastCheckpoint

log = logging.getLogger(__name__)


def under_slurm() -> bool:
    return SLURMEnvironment.detect()


def under_submitit() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_enabled(mode: RequeueMode) -> bool:
    if mode == RequeueMode.auto:
        return under_slurm() and not under_submitit()
    return mode == RequeueMode.on


def checkpoint_on_signal(mode: RequeueMode) -> bool:
    """Whether this run checkpoints and stops on the requeue signal: when it requeues itself, and in a SLURM job
    that does not (``slurm.requeue=off``; not under submitit, which owns the signal there)."""
    return requeue_enabled(mode) or (under_slurm() and not under_submitit())


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
        "submitit" if under_submitit() else "nobody (slurm.requeue=off: checkpoint and stop at the step boundary)")
    return f"SLURM job {slurm_job_id()}, restart {os.environ.get('SLURM_RESTART_COUNT', 0)}: requeue by {who}"


def gpus_left_unused(accelerator: str) -> str | None:
    """A warning when this SLURM job was given GPUs but trains on CPUs (``trainer=cpu``, the default of
    ``vampnet-pl train``: a submitit sweep without ``trainer=gpu``), else None."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "0")
    if accelerator != "cpu" or gpus in ("", "0"):
        return None
    return (f"this SLURM job has {gpus} GPU(s) per node but trains on CPUs (trainer.accelerator=cpu): "
            "add trainer=gpu to train on them")


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class SharedSignals:
    """Signals that any rank's handler recorded, acted on by every rank at the same training batch.

    A handler only records (:meth:`record`: no collective, no logging). With several ranks, :meth:`exchange` runs
    on every rank at the start of every training batch: one all-reduce (max) of the flags, in a small tensor on
    the rank's device, whose result is read on the host one batch later. On a GPU the all-reduce and the copy to
    pinned host memory queue behind the previous step and nothing waits for them: by the next batch start they
    have long finished (the step's masked-token selection waits for the GPU in between). Every rank reads the
    same exchange at the same batch, so all act together, one to two batches after the first rank got the
    signal, and no step waits for the GPU on their account. :meth:`flush` exchanges at once, for a decision
    that cannot wait (a requeue checkpoint before a validation). With one rank, a recorded signal counts at once."""

    names = ("sigterm", "requeue")

    def __init__(self) -> None:
        self.local = dict.fromkeys(self.names, False)  # this rank's handlers
        self.shared = dict.fromkeys(self.names, False)  # any rank's, as of the last exchange read
        self.installed = False
        self.checkpoint_on_sigterm = False  # SlurmRequeue acts on SIGTERM at a step boundary; Lightning's loops do not
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._host: list[torch.Tensor] = []  # two pinned buffers, used in turn: one being written, one read

    def record(self, name: str) -> None:
        self.local[name] = True

    def received(self, name: str, world_size: int) -> bool:
        return self.shared[name] or (world_size == 1 and self.local[name])

    def exchange(self, device: torch.device) -> None:
        """Start this batch's all-reduce (every rank calls this at the same point); read the previous one."""
        previous, self._pending = self._pending, self._start(device)
        if previous is not None:
            values, done = previous
            if done is not None:
                done.synchronize()  # queued before the previous step, whose masked-token selection waited for it
            self._read(values)

    def flush(self, device: torch.device) -> None:
        """An exchange read at once, for a decision that cannot wait a batch (every rank calls it at the same point;
        on a GPU, a wait for the step)."""
        self._read(self._all_reduce(device))

    def _read(self, values: torch.Tensor) -> None:
        for name, value in zip(self.names, values.tolist()):
            self.shared[name] = self.shared[name] or bool(value)

    def _all_reduce(self, device: torch.device) -> torch.Tensor:
        flags = torch.zeros(len(self.names), dtype=torch.int32, device=device)
        for index, name in enumerate(self.names):
            if self.local[name]:
                flags[index].fill_(1)  # a fill on the device, no copy from the host (that would wait for the GPU)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def _start(self, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        flags = self._all_reduce(device)
        if device.type != "cuda":
            return flags, None
        if not self._host:  # allocated once (a pinned allocation may wait for the GPU)
            self._host = [torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True) for _ in range(2)]
        host = self._host[0]
        self._host.reverse()  # read at the next exchange, rewritten at the one after
        host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done


def share_signals(trainer: L.Trainer, signals: SharedSignals) -> None:
    """Lightning's SIGTERM handling through ``signals``, with no collective in the handler. Call before ``fit``.

    Lightning 2.6's handler broadcasts a tensor from rank 0 inside the handler, that is at whatever point the
    signal interrupted the main thread. When that is inside another collective (DDP's buffer broadcast, a
    gradient all-reduce), the ranks' operations stop pairing up: under gloo a rank aborts ("op.preamble.length
    <= op.nbytes") or its heap is corrupted, both seen in this project's SLURM requeue tests; NCCL does not
    check sizes, so ranks would hang or exchange wrong data. Lightning also acts on each rank's own flag at
    several points, so ranks that got the signal at different moments could stop at different batches; and it
    reads its flag on the host at every batch start (on a GPU, a wait for the previous step).

    Here the handler only records the signal. One process stops as Lightning stops it. Several processes
    exchange their flags at the start of every training batch, where Lightning broadcast rank 0's
    (:meth:`SharedSignals.exchange`), and all stop at the batch where the exchange shows a SIGTERM. With
    ``signals.checkpoint_on_sigterm`` neither stops here: :class:`SlurmRequeue` saves and stops at the step boundary."""
    connector, epoch_loop = trainer._signal_connector, trainer.fit_loop.epoch_loop
    if not (callable(getattr(connector, "_sigterm_notifier_fn", None))
            and callable(getattr(epoch_loop, "_broadcast_sigterm_tensor", None))):
        log.warning("this Lightning handles SIGTERM in another way than share_signals expects; left as it is")
        return

    def on_sigterm(signum, frame) -> None:  # the handler: no collective, no logging (it would re-enter a write)
        if not signals.local["sigterm"] and (launcher := trainer.strategy.launcher) is not None:
            launcher.kill(signum)  # processes Lightning started itself, as its own handler does
        signals.record("sigterm")
        if trainer.world_size == 1 and not signals.checkpoint_on_sigterm:
            connector.received_sigterm = True  # Lightning's loops stop at their next check

    def at_batch_start() -> None:  # called by Lightning at each training batch start, on several ranks
        signals.exchange(trainer.strategy.root_device)
        if signals.shared["sigterm"] and not signals.checkpoint_on_sigterm:
            connector.received_sigterm = True
            if trainer.is_global_zero:
                log.info("SIGTERM received: training stops at this batch on every rank")
            raise SIGTERMException

    connector._sigterm_notifier_fn = on_sigterm  # read when Lightning registers its handlers, at the start of fit
    epoch_loop._broadcast_sigterm_tensor = at_batch_start
    signals.installed = True


def validation_may_follow(trainer: L.Trainer) -> bool:
    """Whether Lightning may validate or end the epoch after this training batch; the same answer on every rank."""
    loop = trainer.fit_loop
    if loop.epoch_loop.batch_progress.is_last_batch:
        return True
    should_check = getattr(loop.epoch_loop, "_should_check_val_fx", None)
    fetcher = getattr(loop, "_data_fetcher", None)
    if should_check is None or fetcher is None or getattr(trainer, "_val_check_time_interval", None) is not None:
        return True  # another Lightning, or a time-based interval (each rank's own clock): at every step
    return should_check(fetcher)


class SlurmRequeue(L.Callback):
    """Checkpoint at the first step boundary after the ranks have exchanged ``signal_name`` (:class:`SharedSignals`),
    then ``scontrol requeue`` the job (with ``requeue=False``: stop without it). With ``sigterm=True``, SIGTERM is
    acted on the same way, without a requeue; with ``signal_name=None``, only SIGTERM (no handler for another)."""

    def __init__(self, checkpoint_path: str | Path, signal_name: str | None = "SIGUSR1",
                 signals: SharedSignals | None = None, requeue: bool = True, sigterm: bool = False):
        self.checkpoint_path = Path(checkpoint_path)
        self.requeue_job = requeue
        self.not_requeued = False  # rank 0 stopped training on the signal and the job is not requeued
        self.stopped_on_sigterm = False  # every rank: training stopped on SIGTERM, after its checkpoint
        self.signum = signal.Signals[signal_name] if signal_name else None
        self.signals = signals or SharedSignals()  # app.build passes the trainer's (see share_signals)
        # what stops training here, the requeue signal first (its stop also requeues)
        self.acts_on = ("requeue",) * (self.signum is not None) + ("sigterm",) * sigterm
        self.signals.checkpoint_on_sigterm |= sigterm
        self._previous_handler = None
        self._listening = False  # our handler is installed (see listen)
        self._step_at_batch_start = -1
        self._limit_val_batches = None  # the trainer's, while validation is switched off for the requeue

    def _on_signal(self, signum, frame) -> None:
        self.signals.record("requeue")  # acted on at a step boundary, never here

    def listen(self) -> None:
        """Record the signal from now on; it is acted on at the first step boundary of training. ``app.build`` calls
        this first, so that a signal during start-up (loading the codec, the model, the data, the process group;
        its default action ends the process) is kept, not fatal. ``setup`` calls it for other callers."""
        if self.signum is not None and not self._listening and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.signum, self._on_signal)
            self._listening = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.signals.installed:  # before fit registers its handlers
            share_signals(trainer, self.signals)
        if stage == "fit":
            self.listen()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._listening:
            # A signal after training ends has nothing to save, and must not kill the finished job.
            keep = self._previous_handler not in (signal.SIG_DFL, None)
            signal.signal(self.signum, self._previous_handler if keep else signal.SIG_IGN)
            self._previous_handler, self._listening = None, False
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self._step_at_batch_start = trainer.global_step
        if not self.signals.installed and trainer.world_size > 1:  # a Lightning that share_signals cannot hook into
            self.signals.exchange(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: not a step boundary
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the last step: training ends (final validation included), nothing to requeue; same on every rank
        if (trainer.world_size > 1 and not any(self.signals.shared[name] for name in self.acts_on)
                and validation_may_follow(trainer)):
            self.signals.flush(trainer.strategy.root_device)  # the lagged exchange would be read after a validation
        # any rank's, as all ranks last exchanged them
        received = next((name for name in self.acts_on if self.signals.received(name, trainer.world_size)), None)
        if received is None:
            return
        if received == "sigterm":
            name, then = "SIGTERM", f"stopping (exit status {SIGTERM_EXIT})"
        else:
            name = self.signum.name
            then = "requeueing" if self.requeue_job else "stopping without a requeue (slurm.requeue=off)"
        if trainer.is_global_zero:
            log.info("%s received: saving %s at step %d, then %s", name, self.checkpoint_path, trainer.global_step, then)
        trainer.save_checkpoint(self.checkpoint_path)  # every rank, at the same step
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint) and callback.writes(self.checkpoint_path):
                callback.saved_by_requeue(trainer, self.checkpoint_path)  # not written twice in the grace time
        for logger in trainer.loggers:
            logger.save()
        self.stopped_on_sigterm = received == "sigterm"  # every rank exits with SIGTERM_EXIT, as without a checkpoint
        # rank 0 only, as it runs scontrol: another rank exiting non-zero first would have srun --kill-on-bad-exit
        # end rank 0 while it still writes the logs
        if trainer.is_global_zero and received == "requeue":
            self.not_requeued = not self.requeue() if self.requeue_job else True
            if not self.requeue_job:
                log.warning("not requeued (slurm.requeue=off): exits with status %d; resubmit with the same run_name "
                            "to resume from the checkpoint", NOT_REQUEUED_EXIT)
        trainer.should_stop = True
        # Lightning validates before an early stop; the job is ending in its grace time (restored in teardown)
        if self._limit_val_batches is None:
            self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    @staticmethod
    def requeue() -> bool:
        """``scontrol requeue`` this job; False when that failed or there is no job (the checkpoint is saved anyway).

        A failure is no SLURM job to requeue (``slurm.requeue=on`` outside SLURM), ``scontrol`` exiting non-zero
        (requeue disabled for the job or the cluster, a controller down), missing from the node (OSError), or not
        answering within ``REQUEUE_TIMEOUT_S``. Training has stopped by then, so ``vampnet-pl train`` exits with
        :data:`NOT_REQUEUED_EXIT` (see there)."""
        job_id = slurm_job_id()
        if job_id is None:
            log.warning("not a SLURM job: checkpoint saved, nothing to requeue; exits with status %d, run again to "
                        "resume", NOT_REQUEUED_EXIT)
            return False
        try:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                  timeout=REQUEUE_TIMEOUT_S)
            error = (done.stderr.strip() or f"exit status {done.returncode}") if done.returncode else None
        except (OSError, subprocess.TimeoutExpired) as err:
            error = f"{type(err).__name__}: {err}"
        if error is None:
            log.info("requeued SLURM job %s; it resumes from the checkpoint", job_id)
            return True
        log.error("scontrol requeue %s failed (%s): the checkpoint is saved, but this job is not requeued and "
                  "exits with status %d; resubmit with the same run_name to resume", job_id, error, NOT_REQUEUED_EXIT)
        return False


REQUEUE_TIMEOUT_S = 30  # well inside the signal's grace time (--signal=SIGUSR1@90), after the checkpoint

# ``vampnet-pl train``'s exit status when it stopped on the signal and the job is not requeued (the requeue failed,
# or ``slurm.requeue=off``). Not 0: the run is unfinished, and a job that exits 0 is COMPLETED to SLURM, so
# ``--dependency=afterok`` jobs (an export, an evaluation) would start on an unfinished model, and a caller that reads
# 0 as "done" would stop. A non-zero status marks the job FAILED, as a killed rank does; resubmitting with the same
# run_name resumes from the saved checkpoint.
# 75 is EX_TEMPFAIL (sysexits.h): a temporary failure, try again; distinct from a crash (1) or SIGTERM (143).
NOT_REQUEUED_EXIT = 75
SIGTERM_EXIT = 128 + signal.SIGTERM  # as a shell reports a process that SIGTERM ended: the run is not finished


def requeue_pending(trainer: L.Trainer) -> bool:
    """This rank has recorded a signal that :class:`SlurmRequeue` checkpoints on (the requeue signal, or SIGTERM with
    ``checkpoint.on_sigterm``; the checkpoint waits for a step boundary): work that can be cut short (the generation
    evaluation) should end, so the checkpoint is written within the signal's grace time."""
    return any(isinstance(cb, SlurmRequeue) and any(cb.signals.local[name] or cb.signals.shared[name]
                                                    for name in cb.acts_on)
               for cb in getattr(trainer, "callbacks", None) or [])


def stopped_not_requeued(trainer: L.Trainer) -> bool:
    """Whether this process (rank 0) stopped training on the signal and the job is not requeued."""
    return any(isinstance(c, SlurmRequeue) and c.not_requeued for c in trainer.callbacks)


def stopped_on_sigterm(trainer: L.Trainer) -> bool:
    """Whether training stopped on SIGTERM after its checkpoint (``checkpoint.on_sigterm``), on this rank."""
    return any(isinstance(c, SlurmRequeue) and c.stopped_on_sigterm for c in trainer.callbacks)
