"""Batch sizing: the micro-batch search, the split of the global batch, and the callback in real runs.

Device memory is simulated on the CPU (``memory_probe_train.FakeMemory``); the probes themselves are real
training steps. ``test_auto_batch_size_on_cuda`` measures a real GPU where one is present.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from memory_probe_train import GIB, FakeMemory
from test_train import compose, overrides, training_process
from vampnet_pl.config import BatchSizingConfig, UsageError
from vampnet_pl.config import compose as compose_checked
from vampnet_pl.training.app import build
from vampnet_pl.training.batch_size import (AutoBatchSize, BatchDoesNotFit, BatchSplit, fit_micro_batch,
                                            largest_divisor, optimizer_state_bytes, probe_supported,
                                            recorded_split, split_for)


PROBE_SCRIPT = Path(__file__).with_name("memory_probe_train.py")


def affine(base: float, per_example: float, out_of_memory_above: float = float("inf")):
    probed = []

    def measure(batch: int):
        probed.append(batch)
        peak = base + per_example * batch
        return None if peak > out_of_memory_above else int(peak)

    return measure, probed


def test_the_whole_batch_is_one_probe_when_it_fits():
    measure, probed = affine(10, 3)
    assert fit_micro_batch(8, 100, measure).micro_batch == 8 and probed == [8]


def test_the_largest_divisor_under_the_budget_is_found_from_a_line_and_verified():
    measure, probed = affine(10, 3, out_of_memory_above=150)
    fit = fit_micro_batch(64, 100, measure)  # 10 + 3 b <= 100: b <= 30; the divisors of 64 below: 16
    assert fit.micro_batch == 16 and probed == [64, 1, 2, 16, 32]  # 32, predicted over, is verified all the same
    assert fit.peaks == {64: None, 1: 13, 2: 16, 16: 58, 32: 106}
    measure, probed = affine(10, 3)
    assert fit_micro_batch(12, 30, measure).micro_batch == 6  # 28 bytes; 12 would need 46


def test_cautious_growth_only_tries_sizes_that_an_affine_bound_allows():
    measure, probed = affine(10, 3)
    assert fit_micro_batch(64, 100, measure, cautious=True).micro_batch == 16 and probed == [1, 4, 16]
    measure, probed = affine(10, 3)  # knowing the 10 held whatever the size, the bound is exact
    assert fit_micro_batch(64, 100, measure, cautious=True, fixed=10).micro_batch == 16 and probed == [1, 16]
    measure, probed = affine(10, 3)  # few divisors: the jump to 11 is allowed when its bound fits
    assert fit_micro_batch(22, 1000, measure, cautious=True, fixed=10).micro_batch == 22 and probed == [1, 22]

    def quadratic(batch):  # grows faster than any line: the bound is exceeded only by a little
        return 100 + 10 * batch + batch * batch // 4

    probed = []
    fit = fit_micro_batch(720, 1200, lambda b: probed.append(b) or quadratic(b), cautious=True)
    assert fit.micro_batch == 48 and quadratic(60) > 1200  # 60, the next divisor, does not fit
    assert all(quadratic(b) <= 1200 for b in probed)


def test_a_prediction_that_does_not_fit_steps_down_and_one_that_undershoots_steps_up():
    def superlinear(batch):  # grows faster than the line through 1 and 2 predicts
        return 10 + 3 * batch + batch * batch

    fit = fit_micro_batch(32, 200, superlinear)
    assert fit.micro_batch == 8 and superlinear(8) <= 200 < superlinear(16)

    def fixed_overhead_at_one(batch):  # the first example costs more: the line from 1 and 2 is too steep
        return 100 + 10 * batch + (50 if batch == 1 else 0)

    fit = fit_micro_batch(64, 450, fixed_overhead_at_one)
    assert fit.micro_batch == 32 and fixed_overhead_at_one(32) <= 450 < fixed_overhead_at_one(64)

    def steps(batch):  # allocator rounding: the line through 1 and 2 overestimates what 8 needs
        return 266 + 79 * batch + 50 * (79 * batch // 128)

    assert fit_micro_batch(16, 1104, steps).micro_batch == 8

    def jump_after_one(batch):  # a workspace from 2 examples on: the line through 1 and 2 predicts nothing more
        return 100 + 400 * (batch > 1) + 10 * batch

    assert fit_micro_batch(64, 900, jump_after_one).micro_batch == 32


def test_random_measurements_never_give_a_size_that_did_not_fit_nor_miss_the_best():
    generator = random.Random(0)
    for _ in range(2000):
        per_rank = generator.choice([1, 6, 7, 8, 12, 22, 32, 96, 720])
        base, slope, curve = generator.uniform(0, 500), generator.uniform(0, 50), generator.choice([0, generator.uniform(0, 1)])
        jump, limit, budget = generator.choice([0, generator.uniform(0, 400)]), generator.uniform(100, 3000), generator.uniform(100, 3000)

        def measure(batch):
            peak = base + jump * (batch > 1) + slope * batch + curve * batch * batch
            return None if peak > limit else int(peak)

        sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and measure(d) is not None and measure(d) <= budget]
        for cautious in (False, True):
            if not sizes:
                with pytest.raises(BatchDoesNotFit):
                    fit_micro_batch(per_rank, budget, measure, cautious, fixed=int(base))
                continue
            fit = fit_micro_batch(per_rank, budget, measure, cautious, fixed=int(base))
            assert fit.micro_batch in sizes
            if not cautious or (curve == 0 and jump == 0):  # cautious: exact for affine peaks
                assert fit.micro_batch == max(sizes), (per_rank, base, slope, curve, jump, budget, cautious)


def test_nothing_fits_is_a_clear_error_and_one_example_a_rank_needs_one_probe():
    measure, _ = affine(50, 60)
    with pytest.raises(BatchDoesNotFit, match="1 example"):
        fit_micro_batch(8, 100, measure)
    measure, _ = affine(0, 0, out_of_memory_above=-1)
    with pytest.raises(BatchDoesNotFit, match="more memory than the device has"):
        fit_micro_batch(4, 100, measure)
    measure, probed = affine(10, 3)
    assert fit_micro_batch(1, 100, measure).micro_batch == 1 and probed == [1]


def test_the_global_batch_is_split_exactly_or_refused():
    assert split_for(64, 4, 8) == BatchSplit(8, 2, 4) and split_for(64, 4, 8).global_batch == 64
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        split_for(64, 3, 8)
    with pytest.raises(ValueError, match="do not divide"):
        split_for(24, 1, 16)
    assert largest_divisor(12, 8) == 6 and largest_divisor(8, 8) == 8 and largest_divisor(7, 4) == 1


def test_batch_sizing_settings_are_checked_at_compose_time():
    data = "data.dataset_dir=codes"  # the train schema requires one
    cfg = compose_checked("train", [data, "batch_sizing.global_batch=64", "batch_sizing.mode=fixed"])
    assert cfg.batch_sizing.global_batch == 64 and cfg.batch_sizing.mode.value == "fixed"
    for bad in ("batch_sizing.mode=largest", "batch_sizing.memory_fraction=1.5", "batch_sizing.global_batch=0",
                "batch_sizing.budget=3"):
        with pytest.raises(UsageError, match=r"batch_sizing|largest|memory_fraction|global_batch|budget"):
            compose_checked("train", [data, bad])


def test_the_counts_that_size_a_step_or_an_epoch_are_checked_at_compose_time():
    """Zeros failed deep in the run (``max() arg is an empty sequence``, a ZeroDivisionError, an empty stack) or,
    for batches_per_epoch, trained with an epoch of no batches."""
    data = "data.dataset_dir=codes"
    for bad in ("data.batch_size=0", "data.batches_per_epoch=0", "data.val_batch_size=0", "data.num_workers=-1",
                "trainer.accumulate_grad_batches=0", "trainer.log_every_n_steps=-1"):
        with pytest.raises(UsageError, match=f"{bad.split('=')[0]} must be at least "):
            compose_checked("train", [data, bad])
    compose_checked("train", [data, "data.num_workers=0", "trainer.log_every_n_steps=0"])  # allowed: off


def test_probes_run_only_under_strategies_whose_model_they_can_call():
    assert probe_supported(SingleDeviceStrategy("cpu")) and probe_supported(DDPStrategy())
    assert not probe_supported(FSDPStrategy()) and not probe_supported(DeepSpeedStrategy())


def test_optimizer_state_is_counted_until_it_exists():
    weights = torch.nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(weights.parameters())
    assert optimizer_state_bytes([optimizer]) == 2 * 110 * 4
    weights(torch.ones(2, 10)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes([optimizer]) == 0
    assert optimizer_state_bytes([torch.optim.SGD(weights.parameters(), lr=0.1)]) == 0


def _runs(tmp_path, prepared, codec_path, *extra):
    return build(compose(overrides(prepared, codec_path, tmp_path, "trainer.max_steps=2", *extra)))


def _sizer(trainer) -> AutoBatchSize:
    (sizer,) = [c for c in trainer.callbacks if isinstance(c, AutoBatchSize)]
    return sizer


def test_a_run_trains_on_the_micro_batch_that_fits_with_accumulation_making_up_the_batch(prepared, codec_path,
                                                                                          tmp_path):
    module, datamodule, trainer, _ = _runs(tmp_path, prepared, codec_path, "data.batches_per_epoch=4")
    sizer = _sizer(trainer)
    sizer.memory = FakeMemory(GIB, GIB, 8 * GIB)  # budget 0.85 x 8 GiB: 1 + b <= 6.8, and 8 examples run out
    seen = []
    trainer.callbacks.append(L.Callback())
    trainer.callbacks[-1].on_train_batch_start = lambda trainer, module, batch, index: seen.append(len(batch["codes"]))
    trainer.fit(module, datamodule=datamodule)
    assert sizer.memory.started == [8, 1, 2, 4]
    assert sizer.split == BatchSplit(4, 2, 1) and trainer.accumulate_grad_batches == 2
    assert seen == [4, 4, 4, 4] and trainer.global_step == 2  # two optimiser steps of 8 examples
    assert datamodule.train_batch_size == 4 and datamodule.train_batches_per_epoch == 8  # 32 windows an epoch, kept


def test_probes_leave_no_gradients_and_the_random_state_and_modes_as_they_were(prepared, codec_path, tmp_path,
                                                                              monkeypatch):
    module, datamodule, trainer, _ = _runs(tmp_path, prepared, codec_path)
    datamodule.setup("fit")
    trainer.strategy.connect(module)
    module.trainer = trainer
    module.eval()
    module.model.blocks[0].train()
    modes = [m.training for m in module.modules()]
    state = torch.get_rng_state()
    peak = AutoBatchSize._probe(trainer, module, FakeMemory(0, 1, 100), 2, datamodule.window_frames)
    assert peak == 2
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in module.parameters()) and [m.training for m in module.modules()] == modes
    out_of_memory = AutoBatchSize._probe(trainer, module, FakeMemory(0, 1, 1), 2, datamodule.window_frames)
    assert out_of_memory is None and all(p.grad is None for p in module.parameters())

    def runs_out_in_backward(grad):  # the forward has run and some gradients exist when memory runs out
        raise RuntimeError("CUDA out of memory (simulated, mid-backward)")

    module.model.blocks[0].attn_norm.weight.register_hook(runs_out_in_backward)
    assert AutoBatchSize._probe(trainer, module, FakeMemory(0, 1, 100), 2, datamodule.window_frames) is None
    assert all(p.grad is None for p in module.parameters()) and [m.training for m in module.modules()] == modes
    assert torch.equal(torch.get_rng_state(), state)


def test_fixed_sizing_and_cpu_runs_keep_the_micro_batch_and_make_up_a_global_batch(prepared, codec_path, tmp_path):
    module, datamodule, trainer, _ = _runs(tmp_path, prepared, codec_path, "data.batches_per_epoch=4",
                                           "batch_sizing.global_batch=16")
    trainer.fit(module, datamodule=datamodule)  # auto, but no CUDA: nothing is measured
    assert _sizer(trainer).split == BatchSplit(8, 2, 1) and trainer.accumulate_grad_batches == 2
    module, datamodule, trainer, _ = _runs(tmp_path / "b", prepared, codec_path, "batch_sizing.global_batch=12",
                                           "batch_sizing.mode=fixed", "trainer.max_steps=1")
    trainer.fit(module, datamodule=datamodule)  # at most data.batch_size=8 a micro-batch, dividing 12
    assert _sizer(trainer).split == BatchSplit(6, 2, 1) and datamodule.train_batch_size == 6


def _fit(runs_dir, prepared, codec_path, max_steps, memory=None, *extra):
    module, datamodule, trainer, resume_from = _runs(runs_dir, prepared, codec_path, "data.batches_per_epoch=3",
                                                     "checkpoint.every_n_train_steps=2", f"trainer.max_steps={max_steps}",
                                                     *extra)
    if memory is not None:
        _sizer(trainer).memory = memory
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    return module, _sizer(trainer)


def test_a_resumed_run_keeps_its_split_where_a_new_one_would_differ(prepared, codec_path, tmp_path):
    small, large = (lambda: FakeMemory(GIB, GIB, 8 * GIB)), (lambda: FakeMemory(GIB, GIB, 80 * GIB))
    straight, _ = _fit(tmp_path / "straight", prepared, codec_path, 4, small())
    _fit(tmp_path / "stopped", prepared, codec_path, 2, small())
    last = tmp_path / "stopped" / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    assert recorded_split(last) == BatchSplit(4, 2, 1)  # the checkpoint carries its split
    resumed, sizer = _fit(tmp_path / "stopped", prepared, codec_path, 4, large())  # alone, 80 GiB would take all 8
    assert sizer.kept and sizer.split == BatchSplit(4, 2, 1) and sizer.memory.started == [4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit: the step is deterministic on the CPU
    with pytest.raises(BatchDoesNotFit, match="kept on resume"):
        _fit(tmp_path / "stopped", prepared, codec_path, 6, FakeMemory(GIB, GIB, 5 * GIB))


def test_a_checkpoint_without_a_split_resumes_with_the_configured_one(prepared, codec_path, tmp_path):
    _fit(tmp_path, prepared, codec_path, 2, None, "batch_sizing.global_batch=16")
    last = tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["batch_split"]  # as written before checkpoints carried it
    torch.save(checkpoint, last)
    assert recorded_split(last) is None
    _, sizer = _fit(tmp_path, prepared, codec_path, 4, None, "batch_sizing.global_batch=16")
    assert sizer.kept and sizer.split == BatchSplit(8, 2, 1)


def test_a_sharded_checkpoint_folder_gives_its_split_from_its_metadata(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    torch.save({"global_step": 3, "batch_split": {"micro_batch": 2, "accumulation": 4, "ranks": 2}},
               tmp_path / "last.ckpt" / "meta.pt")
    assert recorded_split(tmp_path / "last.ckpt") == BatchSplit(2, 4, 2)
    assert recorded_split(tmp_path / "missing.ckpt") is None
    (tmp_path / "damaged.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="could not read the batch split"):
        assert recorded_split(tmp_path / "damaged.ckpt") is None


def test_the_accumulation_is_set_before_the_strategy_is(prepared, codec_path, tmp_path):
    module, datamodule, trainer, _ = _runs(tmp_path, prepared, codec_path, "batch_sizing.global_batch=16",
                                           "trainer.max_steps=1")
    seen = []
    setup = trainer.strategy.setup
    trainer.strategy.setup = lambda trainer: (seen.append(trainer.accumulate_grad_batches), setup(trainer))[1]
    trainer.fit(module, datamodule=datamodule)
    assert seen == [2]  # DeepSpeed copies it into its engine's configuration there


def test_an_epoch_is_whole_optimiser_steps_shared_evenly_by_the_loader_workers(prepared, codec_path, tmp_path):
    _, datamodule, _, _ = _runs(tmp_path, prepared, codec_path, "data.num_workers=2", "data.batches_per_epoch=10")
    datamodule.serve_micro_batches(8, 3, 3)  # 10 batches at 3 a step: 4 steps, 2 of 3 micro-batches per worker pair
    assert datamodule.train_batches_per_epoch == 12 and len(datamodule.train_dataset()) == 12
    datamodule.serve_micro_batches(4, 2)  # 10 steps of 2 micro-batches
    assert datamodule.train_batches_per_epoch == 20


def _datamodule(batches_per_epoch: int, workers: int):
    from vampnet_pl.data.datamodule import CodesDataModule

    return CodesDataModule(train_urls=["a.tar"], val_urls=["b.tar"], n_codebooks=4, hop_length=512, sample_rate=44100,
                           batch_size=8, batches_per_epoch=batches_per_epoch, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("batches_per_epoch", [4, 5, 7, 10])
def test_an_epoch_keeps_its_optimiser_steps_whatever_the_split(workers, batches_per_epoch):
    """``batches_per_epoch / accumulate_grad_batches`` optimiser steps, rounded up (never down) so that the loader
    workers share them; the configured split served as micro-batches is the same epoch as served as configured.
    Rounding down (a floor per worker, then to the nearest step) gave 4 x 2 with 3 workers half the steps (and
    validations) of 8 x 1."""
    datamodule = _datamodule(batches_per_epoch, workers)

    def steps(micro_batch: int, accumulation: int, configured: int | None = None) -> int:
        if configured is None:
            datamodule.serve_configured_batches(accumulation)
        else:
            datamodule.serve_micro_batches(micro_batch, accumulation, configured)
        batches = datamodule.train_batches_per_epoch
        assert datamodule.train_batch_size == micro_batch
        assert batches % accumulation == 0 and batches % max(1, workers) == 0  # whole steps, shared evenly
        return batches // accumulation

    for configured in (1, 2, 3):
        wanted = -(-batches_per_epoch // configured)
        assert steps(8, configured) == steps(8, configured, configured) >= wanted
        for micro_batch, accumulation in ((8, 1), (4, 2), (2, 4), (1, 8), (8, 2), (4, 4), (16, 1)):
            served = steps(micro_batch, accumulation, configured)
            assert served >= wanted and (workers > 1 or served == wanted)


@pytest.mark.parametrize("global_batch, batch_size, accumulation", [(24, 8, 1), (24, 8, 2), (12, 8, 1), (6, 2, 3)])
def test_a_global_batch_keeps_its_epoch_on_one_two_or_three_ranks(global_batch, batch_size, accumulation):
    """A recipe's epoch (and so its validation cadence) is the same number of optimiser steps on any number of
    ranks; it was the windows of one rank, so that 2 ranks validated half as often as one."""
    from types import SimpleNamespace

    from vampnet_pl.data.datamodule import CodesDataModule

    epochs = set()
    for ranks in (1, 2, 3):
        datamodule = CodesDataModule(train_urls=["a.tar"], val_urls=["b.tar"], n_codebooks=4, hop_length=512,
                                     sample_rate=44100, batch_size=batch_size, batches_per_epoch=6, num_workers=0)
        trainer = SimpleNamespace(datamodule=datamodule, accumulate_grad_batches=accumulation, world_size=ranks,
                                  strategy=None)
        sizer = AutoBatchSize(BatchSizingConfig(global_batch=global_batch))
        sizer.setup(trainer, None, "fit")
        assert sizer.split.global_batch == global_batch and sizer.split.ranks == ranks
        assert trainer.accumulate_grad_batches == sizer.split.accumulation
        assert datamodule.train_batch_size == sizer.split.micro_batch
        epochs.add(datamodule.train_batches_per_epoch // sizer.split.accumulation)
    assert epochs == {-(-6 // accumulation)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy, probed", [("ddp", [16, 1, 2, 4, 8]), ("fsdp2", [1, 4])])
def test_two_ranks_agree_on_the_split_the_busier_one_allows(strategy, probed, prepared, codec_path, tmp_path):
    args = overrides(prepared, codec_path, tmp_path, "trainer.devices=2", f"strategy={strategy}", "trainer.max_steps=2",
                     "data.batches_per_epoch=4", "data.val_max_windows=8", "batch_sizing.global_batch=32")
    done = training_process([str(PROBE_SCRIPT), *args], PROBE_OUT=str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 1 needs 1 + 2b GiB (rank 0: 1 + b) of a 13.6 GiB budget: 4 examples, where rank 0 alone would take 8.
    # FSDP2 (collectives inside a probe) grows from the smallest size, within a bound, rather than trying 16 first.
    for record in ranks:
        assert record["probed"] == probed
        assert record["split"] == [4, 4, 2] and record["accumulate_grad_batches"] == 4
        assert record["batches"] == [4] * 8 and record["global_step"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_a_probe_failing_on_one_rank_stops_every_rank(prepared, codec_path, tmp_path):
    args = overrides(prepared, codec_path, tmp_path, "trainer.devices=2", "strategy=ddp", "trainer.max_steps=2")
    done = training_process([str(PROBE_SCRIPT), *args], 300, PROBE_OUT=str(tmp_path), PROBE_FAILS_ON_RANK="1")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "a probe bug (simulated)" in output and "failed on another rank" in output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_size_on_cuda(prepared, codec_path, tmp_path):
    module, datamodule, trainer, _ = _runs(tmp_path, prepared, codec_path, "trainer=gpu", "trainer.devices=1",
                                           "batch_sizing.global_batch=64", "data.batches_per_epoch=8")
    trainer.fit(module, datamodule=datamodule)
    sizer = _sizer(trainer)
    assert sizer.split.global_batch == 64 and sizer.fit.peaks[sizer.split.micro_batch] is not None
    assert sizer.budget <= BatchSizingConfig().memory_fraction * torch.cuda.get_device_properties(0).total_memory
    assert sizer.fit.peaks[sizer.split.micro_batch] <= sizer.budget


@pytest.mark.parametrize("global_batch, ranks, micro_batch", [(None, 2, 8), (12, 1, 6), (20, 2, 5), (48, 2, 8)])
def test_deepspeed_is_told_the_micro_batch_each_rank_is_served(global_batch, ranks, micro_batch):
    """DeepSpeed's train_micro_batch_size_per_gpu (its throughput log and sample count) was data.batch_size, even
    when a global batch split each rank's share into smaller micro-batches (12 a rank, data.batch_size=8: 6)."""
    from types import SimpleNamespace

    import hydra
    from omegaconf import OmegaConf

    from vampnet_pl.data.datamodule import CodesDataModule

    cfg = compose(["data.dataset_dir=codes", "strategy=deepspeed_zero2", "data.batch_size=8",
                   f"batch_sizing.global_batch={global_batch or 'null'}"])
    strategy = hydra.utils.instantiate(cfg.strategy)
    datamodule = CodesDataModule(train_urls=["a.tar"], val_urls=["b.tar"], n_codebooks=4, hop_length=512,
                                 sample_rate=44100, batch_size=cfg.data.batch_size, num_workers=0)
    trainer = SimpleNamespace(datamodule=datamodule, accumulate_grad_batches=1, world_size=ranks, strategy=strategy)
    sizer = AutoBatchSize(OmegaConf.to_object(cfg).batch_sizing)
    sizer.setup(trainer, None, "fit")
    assert datamodule.train_batch_size == sizer.split.micro_batch == micro_batch
    assert strategy.config["train_micro_batch_size_per_gpu"] == micro_batch
