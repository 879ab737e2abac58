"""The LightningModule's pieces: loss on masked tokens only, parameter groups, schedules, checkpointing."""

from __future__ import annotations


import pytest
import torch

from vampnet_pl.training.module import MaskedTokenModule
from vampnet_pl.training.optim import OptimConfig, lr_multiplier, parameter_groups

MODEL = {"n_codebooks": 4, "n_conditioning_codebooks": 1, "codebook_size": 64, "latent_dim": 8, "d_model": 32,
         "n_layers": 2, "n_heads": 4, "dropout": 0.0}


def module(**kwargs) -> MaskedTokenModule:
    torch.manual_seed(0)
    m = MaskedTokenModule(MODEL, codebook_tables=torch.randn(4, 64, 8), **kwargs)
    m.log = lambda *a, **k: None
    return m


def test_loss_ignores_unmasked_targets():
    m = module(label_smoothing=0.0)
    codes = torch.randint(0, 64, (2, 4, 20))
    mask = torch.zeros(2, 4, 20, dtype=torch.bool)
    mask[:, 1:, :10] = True
    m.masker = lambda c, *a, **k: (mask, torch.full((2,), 0.5))
    loss = m._step({"codes": codes}, "train")
    logits = m.model(codes, mask)[:, :, :10]  # predicted codebooks 1..3, masked frames
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), codes[:, 1:, :10].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)
    # Targets of unmasked tokens do not enter the loss: with the logits fixed, changing them changes nothing.
    m.model.forward = lambda c, msk: logits_full
    logits_full = m.model.__class__.forward(m.model, codes, mask)
    changed = codes.clone()
    changed[:, 1:, 10:] = (changed[:, 1:, 10:] + 1) % 64
    assert torch.allclose(m._step({"codes": changed}, "train"), loss, atol=1e-5)


def test_no_weight_decay_on_norms_embeddings_and_mask_vectors():
    m = module()
    decay, no_decay = parameter_groups(m.model, 0.1)
    names = {id(p): n for n, p in m.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith(("qkv.weight", "out.weight", "ffn_in.weight", "ffn_out.weight", "proj.weight", "head.weight"))
               for n in decayed)
    assert {"embedding.mask_embedding", "position_bias.table.weight", "norm.weight"} <= spared
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_schedules():
    cosine = lr_multiplier(OptimConfig(scheduler="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1), 110, 64)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55, abs=0.01) and cosine(110) == pytest.approx(0.1)
    noam = lr_multiplier(OptimConfig(scheduler="noam", warmup_steps=100), 1000, 256)
    peak = 256**-0.5 * 100**-0.5
    assert noam(99) == pytest.approx(peak) and noam(399) == pytest.approx(peak / 2)
    assert noam(10) < noam(50) < noam(99)
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_multiplier(OptimConfig(scheduler="step"), 10, 8)


def test_activation_checkpointing_gives_the_same_gradients():
    plain, checkpointed = module(), module(activation_checkpointing=True)
    checkpointed.configure_model()
    assert all(hasattr(b, "_checkpoint_wrapped_module") for b in checkpointed.model.blocks)
    codes = torch.randint(0, 64, (2, 4, 16))
    mask = torch.rand(2, 4, 16) < 0.5
    for m in (plain, checkpointed):
        m.model(codes, mask).float().square().mean().backward()
    grads = [p.grad for p in plain.model.parameters()], [p.grad for p in checkpointed.model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_validation_masks_are_deterministic():
    m = module()
    codes = torch.randint(0, 64, (4, 4, 16))
    m.model.eval()
    torch.manual_seed(1)
    first = m._step({"codes": codes}, "val", batch_idx=3)
    torch.manual_seed(2)
    assert torch.equal(first, m._step({"codes": codes}, "val", batch_idx=3))


def test_run_dir_is_keyed_on_the_slurm_job(monkeypatch, prepared):
    import hydra

    from vampnet_pl.config import conf_dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=["runs_dir=/r", f"data.dataset_dir={prepared}"])
    assert cfg.run_dir == "/r/vampnet-4242"


def test_gpu_defaults_compile_and_fused_adamw_stay_off_on_cpu():
    from vampnet_pl.training.optim import build_optimizer, use_fused

    assert module().compile_blocks is False  # None: on only when training on CUDA
    assert module(compile=True).compile_blocks is True
    m = module()
    assert not use_fused(m.model, None)  # CPU parameters: foreach AdamW
    assert use_fused(m.model, True)
    optimizer, _ = build_optimizer(m.model, OptimConfig(), 100, 32)
    assert not optimizer.defaults["fused"]


def test_a_non_finite_loss_is_caught_on_cpu_steps_and_sampled_accelerator_steps(monkeypatch):
    m = module(train_metrics_every_n_steps=5)
    m.model.forward = lambda codes, mask: torch.full((*codes[:, 1:].shape, 64), float("nan"))
    with pytest.raises(FloatingPointError, match="train loss is nan"):
        m._step({"codes": torch.randint(0, 64, (2, 4, 20))}, "train")
    assert all(metric.nan_strategy == "disable" for group in m.metrics.values() for metric in group.values())
