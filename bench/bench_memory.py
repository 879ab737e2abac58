"""Per-rank parameter + optimiser memory: FSDP2 (fully_shard per block) vs DDP, 2 CPU ranks (gloo).

    .venv/bin/python bench/bench_memory.py --size small

Counts the bytes of the tensors each rank holds after one AdamW step: its parameters (for
FSDP2 the local shard of each DTensor) and its optimiser state (exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES  # noqa: E402


def local_bytes(tensor: torch.Tensor) -> int:
    tensor = tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor
    return tensor.numel() * tensor.element_size()


def rank_main(rank: int, world: int, port: int, size: str, strategy: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from vampnet_pl.model import VampNet, VampNetConfig
    from vampnet_pl.training.parallel import parallelize

    torch.manual_seed(0)
    model = VampNet(VampNetConfig(n_codebooks=4, codebook_size=1024, latent_dim=128, **SIZES[size]), torch.randn(4, 1024, 128))
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
        parallelize(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(0, 1024, (2, 4, 64))
    mask = torch.rand(2, 4, 64) < 0.5
    model(codes, mask).float().mean().backward()
    optimizer.step()
    params = sum(local_bytes(p) for p in model.parameters())
    states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    results[(strategy, rank)] = (params, states)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    results = mp.Manager().dict()
    for strategy in ("ddp", "fsdp2"):
        mp.spawn(rank_main, args=(2, free_port(), args.size, strategy, results), nprocs=2, join=True)
    mib = 1024**2
    print(f"model size {args.size}, 2 ranks, fp32, AdamW\n")
    print("| strategy | rank | parameters (MiB) | optimiser state (MiB) | total (MiB) |\n|---|---|---|---|---|")
    totals = {}
    for (strategy, rank), (params, states) in sorted(results.items()):
        totals[strategy] = max(totals.get(strategy, 0), params + states)
        print(f"| {strategy} | {rank} | {params / mib:.1f} | {states / mib:.1f} | {(params + states) / mib:.1f} |")
    print(f"\nFSDP2 / DDP, largest rank: {totals['fsdp2'] / totals['ddp']:.3f}")


if __name__ == "__main__":
    main()
