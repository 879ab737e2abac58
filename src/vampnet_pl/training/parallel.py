"""Parallelism in one place: Lightning strategies and what they do to the model.

Strategies (``conf/strategy/``): ``ddp``; ``fsdp`` (Lightning FSDPStrategy, GPU only: a
transformer block is the wrap unit, activation checkpointing, sharded checkpoints); ``fsdp2``
(ModelParallelStrategy + ``fully_shard`` per block, runs on CPU too); ``deepspeed_zero2`` and
``deepspeed_zero3`` (GPU only, optional CPU offload). Each writes a checkpoint folder whole or not
at all (:class:`AtomicFolderCheckpoints`). The model file knows none of this.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from vampnet_pl.codec import check_cuda_device
from vampnet_pl.model import TransformerBlock
from vampnet_pl.training.checkpointing import checkpoint_write_error
from vampnet_pl.utils.atomic import replace_folder

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a dead rank fails the job instead of hanging it forever


def check_accelerator(accelerator: str) -> None:
    """``trainer.accelerator=gpu`` (``trainer=gpu``) or ``cuda`` on a machine without a CUDA GPU: Lightning refuses
    it deep in building the Trainer, with a traceback. Refused here (:class:`~vampnet_pl.codec.DeviceUnavailable`, one
    line at start-up), by the check ``codec.device`` and ``vamp --device`` get. ``gpu`` is also Apple's MPS to
    Lightning. (Not in training/app.py: that module runs as ``__main__``, whose functions submitit pickles by
    value, and ``torch.backends`` is a module cloudpickle cannot pickle.)"""
    if accelerator in ("gpu", "cuda") and not (accelerator == "gpu" and torch.backends.mps.is_available()):
        check_cuda_device(torch.device("cuda"), f"trainer.accelerator {accelerator!r}")


def ddp_strategy(find_unused_parameters: bool = False, timeout_minutes: float = 30.0):
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=timedelta(minutes=timeout_minutes))


class AtomicFolderCheckpoints:
    """For a strategy that writes a checkpoint as a folder, in place (sharded FSDP2, sharded FSDP, DeepSpeed):
    the folder appears whole or not at all.

    Written in place, a crash mid-save would leave old and new shards mixed. Here every rank writes
    ``<path>.partial``, then rank 0 swaps it in (:func:`~vampnet_pl.utils.atomic.replace_folder`).
    """

    def writes_folder(self) -> bool:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        from torch.distributed.checkpoint.api import CheckpointException  # what its writer raises, an OSError inside

        path = Path(self.broadcast(str(filepath)))
        if not self.writes_folder():
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial = path.with_name(path.name + ".partial")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a crash
        self.barrier("checkpoint.partial.clean")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
        except (OSError, CheckpointException) as err:  # disk full, quota: the previous folder is intact; drop the partial
            # every failing rank, after its own writes: a rank still writing when rank 0 failed would re-create it
            shutil.rmtree(partial, ignore_errors=True)
            raise checkpoint_write_error(path, err) from err
        self.barrier("checkpoint.partial.written")
        if self.global_rank == 0:
            replace_folder(partial, path)
        self.barrier("checkpoint.swapped")


class AtomicModelParallelStrategy(AtomicFolderCheckpoints, ModelParallelStrategy):
    """FSDP2: sharded checkpoints are folders (see :class:`AtomicFolderCheckpoints`)."""

    def writes_folder(self) -> bool:
        return self._save_distributed_checkpoint


class AtomicFSDPStrategy(AtomicFolderCheckpoints, FSDPStrategy):
    """FSDP (1): sharded checkpoints are folders (see :class:`AtomicFolderCheckpoints`); full ones go through the
    trainer's :class:`~vampnet_pl.training.checkpointing.AtomicCheckpointIO`."""

    def writes_folder(self) -> bool:
        return self._state_dict_type == "sharded"


class AtomicDeepSpeedStrategy(AtomicFolderCheckpoints, DeepSpeedStrategy):
    """DeepSpeed: every checkpoint is a folder (see :class:`AtomicFolderCheckpoints`)."""

    def writes_folder(self) -> bool:
        return True


def fsdp_strategy(activation_checkpointing: bool = True, sharded_checkpoints: bool = True, cpu_offload: bool = False,
                  sharding_strategy: str = "FULL_SHARD", timeout_minutes: float = 30.0):
    return AtomicFSDPStrategy(
        auto_wrap_policy={TransformerBlock},
        activation_checkpointing_policy={TransformerBlock} if activation_checkpointing else None,
        state_dict_type="sharded" if sharded_checkpoints else "full",
        cpu_offload=cpu_offload,
        sharding_strategy=sharding_strategy,
        timeout=timedelta(minutes=timeout_minutes),
    )


def fsdp2_strategy(timeout_minutes: float = 30.0):
    """A (nodes x devices-per-node) mesh: parameters are sharded within a node, replicated across nodes (HSDP)."""
    return AtomicModelParallelStrategy(timeout=timedelta(minutes=timeout_minutes))


def deepspeed_strategy(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False):
    """DeepSpeed's micro-batch (``train_micro_batch_size_per_gpu``) is set by batch sizing, see
    :func:`tell_deepspeed_micro_batch`; 1 until then (Lightning's own guess reads a batch sampler the loader has not)."""
    # The module overrides configure_gradient_clipping for FSDP (1) only; under DeepSpeed it changes nothing (DeepSpeed
    # clips, from trainer.gradient_clip_val), so Lightning's warning that the hook "will not actually clip" misleads.
    warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
    return AtomicDeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer,
                                   offload_parameters=offload_parameters, logging_batch_size_per_gpu=1)


def tell_deepspeed_micro_batch(strategy, micro_batch: int) -> None:
    """Under DeepSpeed, its ``train_micro_batch_size_per_gpu``: the micro-batch each rank is served, as batch sizing
    splits the global batch (``data.batch_size`` only without ``batch_sizing.global_batch`` or a resumed split).
    DeepSpeed counts samples and throughput by it (the pipeline batches, the loader does not). Before the engine
    starts (``AutoBatchSize.setup``, before the strategy's own setup); other strategies have nothing to tell."""
    if isinstance(strategy, DeepSpeedStrategy):  # its config dict exists from the start (the engine reads it later)
        strategy.config["train_micro_batch_size_per_gpu"] = micro_batch




def gradient_norm(parameters, slices_per_rank: bool = False) -> torch.Tensor:
    """The 2-norm of all the parameters' gradients, as one tensor. FSDP2's gradients are DTensors, whose norm is
    already global; under FSDP (1) each rank holds plain slices of them (``slices_per_rank``): the squares are
    summed over the ranks (every rank must call it then)."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        total = total.full_tensor() if hasattr(total, "full_tensor") else total
    else:  # a rank whose slices hold no gradient
        total = torch.zeros((), device=parameters[0].device if parameters else None)
    if slices_per_rank:
        squared = total.square()
        torch.distributed.all_reduce(squared)
        total = squared.sqrt()
    return total


def parallelize(model: nn.Module, device_mesh=None, compile: bool = False, activation_checkpointing: bool = False) -> None:
    """Apply activation checkpointing, FSDP2 sharding (when a device mesh is given) and compile, in place."""
    blocks = model.blocks if hasattr(model, "blocks") else model.get_base_model().blocks
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            if not hasattr(block, "_checkpoint_wrapped_module"):
                blocks[i] = checkpoint_wrapper(block)
    if device_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh  # 2-D: replicate over dim 0 (nodes), shard over dim 1 (devices in a node)
        if mesh.size(0) == 1:
            mesh = mesh["tensor_parallel"]  # one node: plain FSDP over its devices
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if compile:
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block)
