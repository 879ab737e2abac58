"""perf/* metrics: the window arithmetic with a fake clock, and a real run's logged values."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from test_train import overrides, train
from vampnet_pl.training import performance
from vampnet_pl.training.performance import PerformanceMonitor, dense_bf16_tflops


def test_dense_bf16_peaks_by_device_name():
    assert dense_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_tflops("NVIDIA H200") == 989.4
    assert dense_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_tflops("NVIDIA GeForce RTX 3090") is None


class Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_the_window_counts_all_ranks_leaves_validation_out_and_waits_for_the_optimiser_step(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0])
    monkeypatch.setattr(performance.time, "perf_counter", lambda: next(clock))
    logger = Recorder()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_step=0,
                              log_every_n_steps=2, world_size=2, loggers=[logger], precision="32-true",
                              sanity_checking=False)
    module = SimpleNamespace(model=SimpleNamespace(flops_per_token=lambda frames: 1e12))
    monitor = PerformanceMonitor(peak_tflops=4.0)
    batch = {"codes": torch.zeros(3, 4, 10, dtype=torch.long)}  # 3 examples of 10 frames
    monitor.on_train_start(trainer, module)  # t = 0
    for step in (1, 2):  # two optimiser steps of two micro-batches each; the clock is read at step 2 only
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    (step, metrics), = logger.logged  # at t = 1: 4 micro-batches, 12 examples, 120 tokens on this rank
    assert step == 1 and metrics == {"perf/tokens_per_s": 240.0, "perf/examples_per_s": 24.0,
                                     "perf/tflops_per_device": 120.0, "perf/mfu": 30.0}
    monitor.on_validation_start(trainer, module)  # t = 2
    monitor.on_validation_end(trainer, module)  # t = 3: one second left out
    for step in (3, 4):
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    step, metrics = logger.logged[-1]  # t = 4: 3 s since the last log point, 1 of them validation
    assert step == 3 and metrics["perf/tokens_per_s"] == 2 * 60 / 2


def test_a_run_logs_consistent_throughput(prepared, codec_path, tmp_path):
    trainer = train(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                              "trainer.accumulate_grad_batches=2", "data.batches_per_epoch=8",
                              "callbacks.performance.peak_tflops=0.5"))
    logged = list(csv.DictReader(open(tmp_path / "demo_coarse-local" / "csv" / "metrics.csv")))
    rows = [r for r in logged if r.get("perf/tokens_per_s")]
    # at Lightning's log step of the step that ends the window, as its train/ rows of that step (steps 2 and 4)
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in logged if r.get("train/loss_step")] == [1, 3]
    frames = trainer.datamodule.window_frames
    flops_per_token = trainer.lightning_module.model.flops_per_token(frames)
    for row in rows:
        tokens_per_s = float(row["perf/tokens_per_s"])
        assert tokens_per_s > 0 and not row.get("perf/peak_memory_gib")  # no GPU memory on the CPU
        assert float(row["perf/examples_per_s"]) * frames == pytest.approx(tokens_per_s)
        assert float(row["perf/tflops_per_device"]) == pytest.approx(tokens_per_s * flops_per_token / 1e12)
        assert float(row["perf/mfu"]) == pytest.approx(float(row["perf/tflops_per_device"]) / 0.5)


def test_frozen_weights_cost_four_of_the_six_flops_per_parameter():
    from vampnet_pl.model import VampNet, VampNetConfig

    model = VampNet(VampNetConfig(n_codebooks=4, codebook_size=32, latent_dim=8, d_model=32, n_layers=2, n_heads=4))
    counted = sum(p.numel() for name, p in model.named_parameters() if "mask_embedding" not in name)
    attention = 12 * 2 * 32 * 100
    assert model.flops_per_token(100) == 6 * counted + attention
    model.requires_grad_(False)
    assert model.flops_per_token(100) == 4 * counted + attention


def test_log_points_are_the_steps_that_complete_a_multiple_of_log_every_n_steps():
    from vampnet_pl.training.callbacks import LogPoints

    trainer = SimpleNamespace(global_step=4, log_every_n_steps=5)
    points, data_health = LogPoints(), LogPoints(every_when_not_logging=1)
    points.start(trainer)  # resumed at step 4
    seen = []
    for step in (4, 5, 5, 6, 10, 10):  # batch ends; a repeated step is a gradient accumulation's micro-batch
        trainer.global_step = step
        seen.append(points(trainer))
    assert seen == [False, True, False, False, True, False]
    trainer.log_every_n_steps = 0  # logging off: no log points, except for a rule that asks for a cadence
    data_health.start(trainer)
    for step in (11, 12):
        trainer.global_step = step
        assert not points(trainer) and data_health(trainer)
