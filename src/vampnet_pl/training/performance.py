"""Training speed as metrics: tokens/s, examples/s, model TFLOP/s, MFU and peak GPU memory (``perf/*``).

FLOPs are counted as the benchmarks count them (:meth:`VampNet.flops_per_token`: 6N + attention, as for full
training), against the device's dense bf16 peak. Measured between log points, every
``trainer.log_every_n_steps`` optimiser steps, with one host synchronisation there and none in between;
validation time is left out (checkpoint writes and generation scores taken during training are not).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from vampnet_pl.training.callbacks import LogPoints, log_step

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, by a part of the device name.
DENSE_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def dense_bf16_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, TFLOP/s, or None for a device not in :data:`DENSE_BF16_TFLOPS`."""
    return next((peak for part, peak in DENSE_BF16_TFLOPS.items() if part.lower() in device_name.lower()), None)


class PerformanceMonitor(L.Callback):
    """Logs ``perf/tokens_per_s`` (all ranks), ``perf/examples_per_s`` (all ranks), ``perf/tflops_per_device``,
    ``perf/mfu`` and, on CUDA, ``perf/peak_memory_gib`` (this rank, since the previous log point).

    ``peak_tflops``: the device's peak for MFU. None: the dense bf16 peak of a known GPU under bf16 or fp16
    precision; otherwise no MFU is logged.
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self._flops_per_token: dict[int, float] = {}
        self.log_points = LogPoints()
        self._reset(0.0)

    def _reset(self, start: float) -> None:
        self.start, self.paused = start, 0.0
        self.examples = self.tokens = 0
        self.flops = 0.0

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _peak(self, trainer: L.Trainer) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops
        device = trainer.strategy.root_device
        if device.type != "cuda" or not str(trainer.precision).startswith(("bf16", "16")):
            return None
        return dense_bf16_tflops(torch.cuda.get_device_name(device))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(self._now(trainer))
        self.log_points.start(trainer)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        examples, frames = batch["codes"].shape[0], batch["codes"].shape[-1]
        if frames not in self._flops_per_token:
            self._flops_per_token[frames] = pl_module.model.flops_per_token(frames)
        self.examples += examples
        self.tokens += examples * frames
        self.flops += self._flops_per_token[frames] * examples * frames
        if not self.log_points(trainer):
            return
        now = self._now(trainer)
        seconds = now - self.start - self.paused
        ranks = trainer.world_size
        metrics = {"perf/tokens_per_s": self.tokens * ranks / seconds, "perf/examples_per_s": self.examples * ranks / seconds,
                   "perf/tflops_per_device": self.flops / seconds / 1e12}
        if peak := self._peak(trainer):
            metrics["perf/mfu"] = metrics["perf/tflops_per_device"] / peak
        device = trainer.strategy.root_device
        if device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))
        self._reset(now)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation_start = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.paused += self._now(trainer) - self.validation_start
