"""Mask-ratio schedules gamma(r) and samplers of r, in registries so ablations can add their own.

A schedule maps r in [0, 1] to the fraction of tokens masked; training draws r per example
from a sampler; decoding walks r from 0 to 1 over its passes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    def add(fn: Schedule) -> Schedule:
        SCHEDULES[name] = fn
        return fn

    return add


@register_schedule("cosine")  # VampNet / MaskGIT
def cosine(r: torch.Tensor) -> torch.Tensor:
    return torch.cos(r * math.pi / 2)


@register_schedule("linear")
def linear(r: torch.Tensor) -> torch.Tensor:
    return 1 - r


@register_schedule("square")
def square(r: torch.Tensor) -> torch.Tensor:
    return 1 - r**2


@register_schedule("cubic")
def cubic(r: torch.Tensor) -> torch.Tensor:
    return 1 - r**3


@register_schedule("sqrt")
def square_root(r: torch.Tensor) -> torch.Tensor:
    return 1 - r.clamp_min(0).sqrt()


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise KeyError(f"unknown mask schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def schedule_slope(schedule: Schedule, r: torch.Tensor) -> torch.Tensor:
    """|d gamma / d r| at ``r`` (autograd; an infinite slope, as sqrt's at 0, becomes a large finite one)."""
    with torch.enable_grad():
        point = r.detach().float().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(schedule(point).sum(), point)
    return grad.abs().nan_to_num(nan=0.0, posinf=1e6).to(r.dtype)


def truncate(r: torch.Tensor, r_min: float = 0.0, r_max: float = 1.0) -> torch.Tensor:
    """Map r in [0, 1) to [r_min, r_max): a truncated schedule draws its r from that range only."""
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
    return r_min + (r_max - r_min) * r


@contextmanager
def float32_default():
    """float32 as torch's default dtype inside (Lightning's ``bf16-true`` makes it bf16 in the steps)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


class RatioSampler:
    """Draws r in [0, 1) per example: ``uniform``, or ``sobol``: a scrambled Sobol sequence per batch,
    spread evenly over [0, 1). Stateless: the draws come from ``generator`` (else torch's global RNG)."""

    KINDS = ("uniform", "sobol")

    def __init__(self, kind: str = "uniform"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown r sampler {kind!r}; use 'uniform' or 'sobol'")
        self.kind = kind

    def __call__(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        source = generator.device if generator is not None else None
        if self.kind == "sobol":
            seed = int(torch.randint(2**62, (1,), generator=generator, device=source))
            with float32_default():  # the engine computes its first point in the default dtype
                engine = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
            return engine.draw(batch_size, dtype=torch.float32).squeeze(1).to(device)
        return torch.rand(batch_size, generator=generator, device=source, dtype=torch.float32).to(device)
