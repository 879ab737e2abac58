"""One ``sample`` call on the tiny coarse and c2f models (861 frames, periodic:16), for comparing two
versions of the sampler: run it with each version's sources first, alternately.

    git worktree add /tmp/base 8f0d8b4
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/bench_sampler_before_after.py   # before
    PYTHONPATH=src .venv/bin/python bench/bench_sampler_before_after.py             # after

Uses only what both versions have (``SamplingConfig(passes, seed)``); best of 2 runs.
"""

import time

import torch

from vampnet_pl.generation.sampling import SamplingConfig, sample
from vampnet_pl.masking.prompts import periodic
from vampnet_pl.model import VampNet, VampNetConfig

torch.manual_seed(0)
out = []
for n_codebooks, n_conditioning, passes in [(4, 0, 24), (14, 4, 12)]:
    cfg = VampNetConfig(n_codebooks=n_codebooks, n_conditioning_codebooks=n_conditioning, codebook_size=1024,
                        latent_dim=8, dropout=0.0, d_model=64, n_layers=2, n_heads=4)
    model = VampNet(cfg, torch.randn(n_codebooks, 1024, 8)).eval()
    for batch in [1, 8]:
        codes = torch.randint(0, 1024, (batch, n_codebooks, 861))
        mask = periodic((batch, n_codebooks, 861), 16)
        mask[:, :n_conditioning] = False
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            sample(model, codes, mask, SamplingConfig(passes=passes, seed=0), n_conditioning)
            best = min(best, time.perf_counter() - started)
        out.append(f"K={n_codebooks} b={batch}: {best:.2f} s")
print("; ".join(out))
