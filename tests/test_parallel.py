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
