"""What parallelism does to the optimiser's view of the model: FSDP (1) on CPU ranks (gloo), as Lightning's
``fsdp`` strategy wraps the model before it calls ``configure_optimizers`` (that strategy refuses the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import on_two_ranks


def _fsdp1_rank(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from vampnet_pl.model import TransformerBlock, VampNet, VampNetConfig
    from vampnet_pl.training.optim import parameter_groups
    from vampnet_pl.training.parallel import gradient_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = VampNet(VampNetConfig(codebook_size=32, latent_dim=4, d_model=32, n_layers=2, n_heads=2, dropout=0.0))
        names = {id(p): n for n, p in model.named_parameters()}
        groups = lambda: [sorted(names[id(p)] for p in g["params"]) for g in parameter_groups(model, 0.1)]  # noqa: E731
        unwrapped = groups()
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({TransformerBlock}), use_orig_params=True,
                       device_id=torch.device("cpu"))
        codes, mask = torch.randint(0, 32, (2, 4, 16)), torch.rand(2, 4, 16) < 0.5
        wrapped(codes, mask).float().square().mean().backward()
        results[rank] = {"groups_kept": groups() == unwrapped and len(unwrapped[0]) > 0,
                         "norm": gradient_norm(model.parameters(), slices_per_rank=True).item(),
                         "local": gradient_norm(model.parameters()).item(),
                         "fsdp": wrapped.clip_grad_norm_(1e9).item()}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp1_keeps_the_weight_decay_groups_and_the_gradient_norm_is_global():
    """Under FSDP (1) every parameter is a flat 1-d slice: shape no longer tells a matrix from a norm, and each
    rank's gradients are its slices only."""
    results = on_two_ranks(_fsdp1_rank)
    assert all(r["groups_kept"] for r in results.values())
    assert all(r["norm"] == pytest.approx(r["fsdp"], rel=1e-5) for r in results.values())
    assert any(r["local"] != pytest.approx(r["fsdp"], rel=1e-3) for r in results.values())  # the slices alone


def _token_mean_rank(rank: int, port: int, results: dict, strategy: str) -> None:
    """One SGD step (lr 1) on two ranks, each with its half of the batch of ``test_module``'s fixed masks."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from test_module import _fixed_masks, module
    from vampnet_pl.training.parallel import fsdp2_strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # as a launcher sets them: Lightning starts no process
    codes, ratios = _token_mean_batch()
    m = module(label_smoothing=0.0)
    _, m.masker = _fixed_masks(codes, ratios)
    m.configure_optimizers = lambda: torch.optim.SGD(m.model.parameters(), lr=1.0)
    m.on_train_start = lambda: None
    full = lambda: torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()  # noqa: E731
                              for p in m.model.parameters()])
    before = torch.cat([p.detach().flatten() for p in m.model.parameters()])
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, gradient_clip_val=None, logger=False,
                        strategy=DDPStrategy() if strategy == "ddp" else fsdp2_strategy(), use_distributed_sampler=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, DataLoader([{"codes": c} for c in codes[2 * rank : 2 * rank + 2]], batch_size=2))
    results[rank] = before - full()


def _token_mean_batch() -> tuple[torch.Tensor, tuple[float, ...]]:
    codes = torch.randint(0, 64, (4, 4, 16), generator=torch.Generator().manual_seed(1))
    return codes, (0.1, 0.1, 0.9, 0.9)  # rank 0 masks few tokens, rank 1 many


def _ddp_token_mean_rank(rank: int, port: int, results: dict) -> None:
    _token_mean_rank(rank, port, results, "ddp")


def _fsdp2_token_mean_rank(rank: int, port: int, results: dict) -> None:
    _token_mean_rank(rank, port, results, "fsdp2")


@pytest.mark.distributed
@pytest.mark.parametrize("worker", [_ddp_token_mean_rank, _fsdp2_token_mean_rank], ids=["ddp", "fsdp2"])
def test_ranks_with_different_masked_token_counts_give_the_global_batch_token_mean(worker):
    """Two ranks of 2 examples step as one batch of 4 does: by the mean over all masked tokens (14 on one rank, 89
    on the other), not by the average of the ranks' means (a gradient 106 % apart)."""
    from test_module import _fixed_masks, module

    codes, ratios = _token_mean_batch()
    m = module(label_smoothing=0.0)
    _, m.masker = _fixed_masks(codes, ratios)
    loss = m.masked_loss(codes, sampled=False).loss
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.model.parameters()))])
    results = on_two_ranks(worker)
    for update in results.values():
        torch.testing.assert_close(update, gradient, rtol=1e-4, atol=1e-6)
