"""How a run's batch is split: examples per optimiser step over all ranks, micro-batch, gradient accumulation.

``global batch = micro-batch x accumulation x ranks``. The global batch is the recipe (what the optimiser
sees): ``batch_sizing.global_batch``, or by default ``data.batch_size x trainer.accumulate_grad_batches x
ranks``. The split is hardware. ``batch_sizing.mode``:

- ``fixed``: micro-batches of ``data.batch_size`` (with ``global_batch`` set: the largest divisor of a rank's
  share that is at most ``data.batch_size``); accumulation makes up the rest.
- ``auto`` (default): on CUDA, :class:`AutoBatchSize` measures the peak memory of training steps (forward
  and backward of the heaviest step, plus AdamW's state) at a few micro-batch sizes and takes the largest
  divisor of a rank's share that stays under ``memory_fraction`` of the GPU; accumulation makes up the
  rest. One recipe then runs unchanged on a 24 GB or an 80 GB GPU, each filled as far as the recipe allows.
  On other devices, and under strategies whose model a probe cannot call (Lightning's FSDP, DeepSpeed), it
  acts as ``fixed``.

An epoch keeps its optimiser steps, ``data.batches_per_epoch / trainer.accumulate_grad_batches``, whatever the
global batch, its split and the number of ranks (:meth:`CodesDataModule.serve_micro_batches`). Every rank takes the same decisions: each measurement is
the maximum over ranks, and a probe that fails on one rank stops all. Checkpoints carry their split, and a
resumed run keeps it.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from vampnet_pl.config import BatchSizing, BatchSizingConfig
from vampnet_pl.training.checkpointing import checkpoint_metadata
from vampnet_pl.training.parallel import tell_deepspeed_micro_batch


class BatchDoesNotFit(RuntimeError):
    """Not even a micro-batch of one example fits in the memory budget."""


@dataclass(frozen=True)
class BatchSplit:
    micro_batch: int
    accumulation: int
    ranks: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.ranks


def per_rank_batch(global_batch: int, ranks: int) -> int:
    if global_batch < 1 or global_batch % ranks:
        raise ValueError(f"batch_sizing.global_batch={global_batch} must be a positive multiple of the {ranks} ranks")
    return global_batch // ranks


def split_for(global_batch: int, ranks: int, micro_batch: int) -> BatchSplit:
    """The split of ``global_batch`` over ``ranks`` with this micro-batch (it must divide the per-rank batch)."""
    per_rank = per_rank_batch(global_batch, ranks)
    if per_rank % micro_batch:
        raise ValueError(f"micro-batches of {micro_batch} do not divide the {per_rank} examples a rank takes "
                         f"of a global batch of {global_batch}")
    return BatchSplit(micro_batch, per_rank // micro_batch, ranks)


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


@dataclass
class MicroBatchFit:
    micro_batch: int
    peaks: dict[int, Optional[int]] = field(default_factory=dict)  # bytes per probed size; None: out of memory


def fit_micro_batch(per_rank: int, budget: int, measure: Callable[[int], Optional[int]],
                    cautious: bool = False, fixed: int = 0) -> MicroBatchFit:
    """The largest divisor of ``per_rank`` whose measured peak memory stays within ``budget`` bytes.

    ``measure(b)``: the peak bytes of a training step on ``b`` examples, or None when it ran out of memory.
    It first tries ``per_rank`` itself (one probe when it fits), then grows from the smallest size: the line
    through the two largest sizes that fit predicts the largest next one, which a probe verifies (where the
    line predicts none, the next size is tried all the same); a size that does not fit bounds the search.
    ``cautious`` (when running out of memory mid-probe is risky, as under FSDP2, where the other ranks would
    wait in a collective): no first try of ``per_rank``, and only sizes ``s`` whose bound
    ``fixed + (peak(best) - fixed) x s / best`` stays within the budget, ``best`` the largest size that fits
    and ``fixed`` the bytes held whatever the size (weights, optimiser state). A peak that is ``fixed``, a
    step's own constant and an amount per example never exceeds that bound.
    """
    sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    found = MicroBatchFit(0)

    def fits(size: int) -> bool:
        if size not in found.peaks:
            found.peaks[size] = measure(size)
        peak = found.peaks[size]
        return peak is not None and peak <= budget

    failed = None  # the smallest size that did not fit
    if not cautious:
        if fits(sizes[-1]):
            found.micro_batch = sizes[-1]
            return found
        failed = sizes[-1]
    if not fits(sizes[0]):
        raise BatchDoesNotFit(f"a training step on {sizes[0]} example(s) needs {_gib(found.peaks[sizes[0]])}, "
                              f"over the budget of {_gib(budget)}")
    fitting = [sizes[0]]
    while candidates := [s for s in sizes if fitting[-1] < s and (failed is None or s < failed)]:
        best = fitting[-1]
        if cautious:
            within = [s for s in candidates if fixed * best + (found.peaks[best] - fixed) * s <= budget * best]
        elif len(fitting) == 1:
            within = candidates[:1]  # a second point for the line
        else:
            slope = (found.peaks[best] - found.peaks[fitting[-2]]) / (best - fitting[-2])
            within = [s for s in candidates if found.peaks[best] + slope * (s - best) <= budget] or candidates[:1]
        if not within:
            break
        if fits(within[-1]):
            fitting.append(within[-1])
        else:
            failed = within[-1]
    found.micro_batch = fitting[-1]
    return found


def _over_ranks(strategy, value: int, op: str) -> int:
    """``value`` reduced over all ranks (``op``: min or max)."""
    return int(strategy.reduce(torch.tensor(value, device=strategy.root_device), reduce_op=op).item())


def _gib(value: Optional[int]) -> str:
    return "more memory than the device has" if value is None else f"{value / 2**30:.2f} GiB"


class CudaMemory:
    """Peak memory of one probe on a CUDA device, from torch's caching allocator."""

    def __init__(self, device: torch.device):
        self.device = device

    def capacity(self) -> int:
        """Bytes this process can use: the device's total minus what lies outside torch's allocator (other
        processes, the CUDA context)."""
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)
        return total - max(0, outside)

    def in_use(self) -> int:
        """Bytes held before a probe (weights, the optimiser's state once allocated)."""
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    def start(self, batch_size: int) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device)

    @staticmethod
    def is_out_of_memory(err: BaseException) -> bool:
        return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def optimizer_state_bytes(optimizers) -> int:
    """Bytes that Adam-family optimisers will allocate at their first step (two moments per trained
    parameter, as the parameter's local shard); 0 for state already allocated."""
    total = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if "betas" not in group:
                continue
            for param in group["params"]:
                if param.requires_grad and not optimizer.state.get(param):
                    local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: a DTensor shard
                    total += 2 * local.numel() * local.element_size()
    return total


def probe_supported(strategy) -> bool:
    """Strategies whose model a probe can run directly: one device, DDP, FSDP2 (ModelParallelStrategy)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass whose engine owns the model
        return False
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy))


def recorded_split(checkpoint: str | Path) -> BatchSplit | None:
    """The split a checkpoint was trained with (``checkpoint["batch_split"]``; a file, or a sharded folder's
    ``meta.pt``); None for checkpoints written without one."""
    try:
        state = checkpoint_metadata(checkpoint) or {}
        return BatchSplit(**state["batch_split"]) if "batch_split" in state else None
    except Exception as err:  # noqa: BLE001 (the resume itself reports a damaged checkpoint)
        rank_zero_warn(f"could not read the batch split of {checkpoint}: {err}")
        return None


class AutoBatchSize(L.Callback):
    """Sets the run's micro-batch and gradient accumulation before training (see the module docstring).

    ``setup`` settles the split that needs no measurement (before the strategy builds anything from
    ``trainer.accumulate_grad_batches``, as DeepSpeed does); ``on_fit_start``, with the model on its device,
    measures. The probe runs the heaviest training step (every token's logits, as on metric steps) on random
    tokens of the training window, forward and backward, under the run's precision, compile and checkpointing,
    then frees the gradients and restores the random state and the modules' modes. With ``torch.compile`` on
    and several sizes probed, compiled graphs are reset afterwards, so that training compiles once, for its
    own shape.

    Checkpoints carry the split (``batch_split``). A run resumed from one (``resume_from``) keeps it, since its
    step and epoch counters are in those micro-batches; if the micro-batch no longer fits, it stops with the
    bytes it needs. ``memory``: how peaks are read (default: :class:`CudaMemory` on CUDA; tests pass their own).
    """

    def __init__(self, config: BatchSizingConfig | None = None, resume_from: str | Path | None = None, memory=None):
        self.config = config or BatchSizingConfig()
        self.resume_from = resume_from
        self.memory = memory
        self.split: BatchSplit | None = None
        self.fit: MicroBatchFit | None = None
        self.budget: int | None = None
        self.configured: tuple[int, int] | None = None  # (data.batch_size, accumulate_grad_batches) as set
        self.kept = False  # the split is a resumed run's own

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or not hasattr(datamodule, "serve_micro_batches"):
            if stage == "fit":
                rank_zero_warn("batch sizing needs the CodesDataModule; the batch is left as the loader serves it")
            return
        if self.configured is None:
            self.configured = (datamodule.hparams.batch_size, trainer.accumulate_grad_batches)
        micro, accumulation = self.configured
        ranks = trainer.world_size
        split = BatchSplit(micro, accumulation, ranks)
        if self.config.global_batch:  # micro-batches of at most data.batch_size that divide a rank's share
            per_rank = per_rank_batch(self.config.global_batch, ranks)
            split = split_for(self.config.global_batch, ranks, largest_divisor(per_rank, micro))
        self.kept = False
        if self.resume_from is not None:
            # one reading for all ranks: they must agree on the accumulation
            recorded = trainer.strategy.broadcast(recorded_split(self.resume_from) if trainer.is_global_zero else None)
            if recorded is not None and recorded.global_batch == split.global_batch and recorded.ranks == ranks:
                split, self.kept = recorded, True
            elif recorded is not None:
                rank_zero_warn(f"resuming with {split.global_batch} examples a step over {ranks} rank(s), not the "
                               f"checkpoint's {recorded.global_batch} over {recorded.ranks}: the batch is split anew, "
                               "the data stream does not continue exactly, and the first step may take another "
                               "number of examples")
            else:
                self.kept = True  # written before checkpoints carried their split: the split without measuring
        self._apply(trainer, split)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.split is None:
            return
        memory = self.memory
        if memory is None and trainer.strategy.root_device.type == "cuda":
            memory = CudaMemory(trainer.strategy.root_device)
        if self.config.mode == BatchSizing.auto and memory is not None:
            if not probe_supported(trainer.strategy):
                rank_zero_warn(f"batch_sizing.mode=auto cannot probe under {type(trainer.strategy).__name__}; "
                               f"micro-batches of {self.split.micro_batch}")
            else:
                self._apply(trainer, self._measure(trainer, pl_module, memory))
        rank_zero_info(f"batch: {self.split.global_batch} examples per optimiser step = micro-batch "
                       f"{self.split.micro_batch} x accumulation {self.split.accumulation} x {self.split.ranks} rank(s)"
                       + (" (the checkpoint's, resumed)" if self.kept else ""))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.split is not None:
            checkpoint["batch_split"] = dataclasses.asdict(self.split)

    def _apply(self, trainer: L.Trainer, split: BatchSplit) -> None:
        """Serve ``split``'s micro-batches; the configured split leaves the loader as configured."""
        if (split.micro_batch, split.accumulation) == self.configured:
            trainer.datamodule.serve_configured_batches(split.accumulation)
        else:
            trainer.datamodule.serve_micro_batches(split.micro_batch, split.accumulation, self.configured[1])
        trainer.accumulate_grad_batches = split.accumulation
        tell_deepspeed_micro_batch(trainer.strategy, split.micro_batch)
        self.split = split

    def _measure(self, trainer, pl_module, memory) -> BatchSplit:
        strategy = trainer.strategy
        frames = trainer.datamodule.window_frames
        extra = optimizer_state_bytes(trainer.optimizers)
        budget = int(self.config.memory_fraction * memory.capacity())
        self.budget = budget = _over_ranks(strategy, budget, "min")
        out_of_memory, failed = 2**62, 2**62 + 1

        def measure(batch_size: int) -> int | None:
            """The largest peak over ranks; every rank learns of a failed probe, so none waits for another."""
            error = None
            try:
                peak = self._probe(trainer, pl_module, memory, batch_size, frames)
                local = out_of_memory if peak is None else peak + extra
            except Exception as err:  # noqa: BLE001 (re-raised below, after the other ranks are told)
                error, local = err, failed
            worst = _over_ranks(strategy, local, "max")
            if error is not None:
                raise error
            if worst == failed:
                raise RuntimeError(f"a batch probe of {batch_size} example(s) failed on another rank; see its log")
            return None if worst >= out_of_memory else worst

        split = self.split
        if self.kept:  # a resumed run's own split: check that it still fits (under FSDP2 a probe that runs out of
            if isinstance(strategy, ModelParallelStrategy):  # memory would leave the other ranks waiting: not there)
                return split
            peak = measure(split.micro_batch)
            if peak is None or peak > budget:
                raise BatchDoesNotFit(
                    f"this run's micro-batch of {split.micro_batch} (kept on resume: its progress counts those "
                    f"micro-batches) needs {_gib(peak)}, over the budget of {_gib(budget)} on this device; resume "
                    "on a device with more memory, raise batch_sizing.memory_fraction, or start a new run directory")
            self.fit = MicroBatchFit(split.micro_batch, {split.micro_batch: peak})
            return split
        # Under FSDP2 a probe runs collectives, and one rank running out of memory mid-step would leave the
        # others waiting: grow cautiously from the smallest size instead of trying the largest first.
        fixed = _over_ranks(strategy, memory.in_use() + extra, "min")
        self.fit = fit_micro_batch(split.micro_batch * split.accumulation, budget, measure,
                                   cautious=isinstance(strategy, ModelParallelStrategy), fixed=fixed)
        if len(self.fit.peaks) > 1 and getattr(pl_module, "compile_blocks", False):
            torch._dynamo.reset()  # several shapes made the graphs dynamic; training compiles for its one shape
        for size, peak in sorted(self.fit.peaks.items()):
            rank_zero_info(f"batch probe: micro-batch {size} needs {_gib(peak)} (budget {_gib(budget)})")
        return split_for(split.global_batch, split.ranks, self.fit.micro_batch)

    @staticmethod
    def _probe(trainer, pl_module, memory, batch_size: int, frames: int) -> int | None:
        """Peak bytes of one forward and backward on ``batch_size`` windows, or None when out of memory."""
        cfg = pl_module.cfg
        device = trainer.strategy.root_device
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.train()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                codes = torch.randint(0, cfg.codebook_size, (batch_size, cfg.n_codebooks, frames), device=device)
                memory.start(batch_size)
                with trainer.precision_plugin.train_step_context():
                    loss = pl_module.masked_loss(codes, sampled=True).loss
                loss.backward()
                del loss
                return memory.peak()
        except Exception as err:
            if not memory.is_out_of_memory(err):
                raise
            return None
        finally:
            pl_module.zero_grad(set_to_none=True)
            for module, training in modes.items():
                module.training = training
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
