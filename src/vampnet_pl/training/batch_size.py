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

An epoch keeps its ``data.batch_size x data.batches_per_epoch`` windows whatever the split. Every rank
takes the same decisions: each measurement is the maximum over ranks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from vampnet_pl.config import BatchSizing, BatchSizingConfig


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
                    largest_first: bool = True) -> MicroBatchFit:
    """The largest divisor of ``per_rank`` whose measured peak memory stays within ``budget`` bytes.

    ``measure(b)``: the peak bytes of a training step on ``b`` examples, or None when it ran out of memory.
    ``largest_first``: try ``per_rank`` itself first (one probe when it fits). Otherwise, and when it does not
    fit, the peak is extrapolated linearly from the smallest sizes, and each prediction is verified by a
    probe: the line through the smallest size and the largest verified one predicts the next, until it
    predicts nothing larger or a probe fails.
    """
    sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    found = MicroBatchFit(0)

    def fits(size: int) -> bool:
        if size not in found.peaks:
            found.peaks[size] = measure(size)
        peak = found.peaks[size]
        return peak is not None and peak <= budget

    failed = None  # the smallest size that did not fit
    if largest_first:
        if fits(sizes[-1]):
            found.micro_batch = sizes[-1]
            return found
        failed = sizes[-1]
    smallest = best = sizes[0]
    if not fits(smallest):
        raise BatchDoesNotFit(f"a training step on {smallest} example(s) needs {_gib(found.peaks[smallest])}, "
                              f"over the budget of {_gib(budget)}")
    while candidates := [s for s in sizes if best < s and (failed is None or s < failed)]:
        if best == smallest:
            guess = candidates[0]  # a second point for the line
        else:
            slope = (found.peaks[best] - found.peaks[smallest]) / (best - smallest)
            room = budget - found.peaks[smallest]
            within = [s for s in candidates if slope <= 0 or slope * (s - smallest) <= room]
            if not within:
                break
            guess = within[-1]
        if fits(guess):
            best = guess
        else:
            failed = guess
    found.micro_batch = best
    return found


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


class AutoBatchSize(L.Callback):
    """Sets the run's micro-batch and gradient accumulation at the start of fit (see the module docstring).

    The probe runs the heaviest training step (every token's logits, as on metric steps) on random tokens of
    the training window, forward and backward, under the run's precision, compile and checkpointing, then
    frees the gradients and restores the random state. With ``torch.compile`` on and several sizes probed,
    compiled graphs are reset afterwards, so that training compiles once, for its own shape. ``memory``: how peaks are read (default:
    :class:`CudaMemory` on CUDA; tests pass their own).
    """

    def __init__(self, config: BatchSizingConfig | None = None, memory=None):
        self.config = config or BatchSizingConfig()
        self.memory = memory
        self.split: BatchSplit | None = None
        self.fit: MicroBatchFit | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "serve_micro_batches"):
            rank_zero_warn("batch sizing needs the CodesDataModule; the batch is left as the data loader serves it")
            return
        configured = datamodule.hparams.batch_size
        ranks = trainer.world_size
        global_batch = self.config.global_batch or configured * trainer.accumulate_grad_batches * ranks
        split = None
        if self.config.global_batch:  # micro-batches of at most data.batch_size that divide the rank's share
            split = split_for(global_batch, ranks, largest_divisor(per_rank_batch(global_batch, ranks), configured))
        memory = self.memory
        if memory is None and trainer.strategy.root_device.type == "cuda":
            memory = CudaMemory(trainer.strategy.root_device)
        if self.config.mode == BatchSizing.auto and memory is not None:
            if probe_supported(trainer.strategy):
                split = self._measure(trainer, pl_module, memory, global_batch, ranks)
            else:
                rank_zero_warn(f"batch_sizing.mode=auto cannot probe under {type(trainer.strategy).__name__}; "
                               f"micro-batches of data.batch_size={configured}")
        split = split or BatchSplit(configured, trainer.accumulate_grad_batches, ranks)
        if (split.micro_batch, split.accumulation) != (configured, trainer.accumulate_grad_batches):
            datamodule.serve_micro_batches(split.micro_batch, split.accumulation)
            trainer.accumulate_grad_batches = split.accumulation
        self.split = split
        rank_zero_info(f"batch: {split.global_batch} examples per optimiser step = micro-batch {split.micro_batch} "
                       f"x accumulation {split.accumulation} x {ranks} rank(s)")

    def _measure(self, trainer, pl_module, memory, global_batch: int, ranks: int) -> BatchSplit:
        strategy = trainer.strategy
        frames = trainer.datamodule.window_frames
        extra = optimizer_state_bytes(trainer.optimizers)
        budget = int(self.config.memory_fraction * memory.capacity())
        budget = int(strategy.reduce(torch.tensor(budget, device=strategy.root_device), reduce_op="min").item())
        never_fits = 2**62

        def measure(batch_size: int) -> int | None:
            peak = self._probe(trainer, pl_module, memory, batch_size, frames)
            local = never_fits if peak is None else peak + extra
            worst = int(strategy.reduce(torch.tensor(local, device=strategy.root_device), reduce_op="max").item())
            return None if worst >= never_fits else worst

        # Under FSDP2 a probe runs collectives, and one rank running out of memory mid-step would leave the
        # others waiting: grow from the smallest size instead of trying the largest first.
        sharded = isinstance(strategy, ModelParallelStrategy)
        self.fit = fit_micro_batch(per_rank_batch(global_batch, ranks), budget, measure, largest_first=not sharded)
        if len(self.fit.peaks) > 1 and getattr(pl_module, "compile_blocks", False):
            torch._dynamo.reset()  # several shapes made the graphs dynamic; training compiles for its one shape
        for size, peak in sorted(self.fit.peaks.items()):
            rank_zero_info(f"batch probe: micro-batch {size} needs {_gib(peak)} (budget {_gib(budget)})")
        return split_for(global_batch, ranks, self.fit.micro_batch)

    @staticmethod
    def _probe(trainer, pl_module, memory, batch_size: int, frames: int) -> int | None:
        """Peak bytes of one forward and backward on ``batch_size`` windows, or None when out of memory."""
        cfg = pl_module.cfg
        device = trainer.strategy.root_device
        was_training = pl_module.training
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
            pl_module.train(was_training)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
