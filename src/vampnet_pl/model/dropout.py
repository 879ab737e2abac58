"""Dropout with a mask that is cheap to draw on the CPU.

torch's CPU dropout draws its mask with ``bernoulli_``: one double from a serial Mersenne Twister per
element (6-10 ns an element for ``F.dropout`` on the 2-core benchmark machine), which made dropout 15%
of a small model's training step (attention-probability dropout alone draws ``batch x heads x T x T``
numbers a layer). On the CPU this module draws 64-bit words from NumPy's SFC64 generator, seeded from torch's
generator (so ``torch.manual_seed`` and the per-step seeding govern it, as before), cuts each word
into four signed 16-bit lanes and keeps an element when its lane is at or above
:func:`drop_threshold` (``round(p * 2**16) - 2**15``): the same Bernoulli keep mask, at about a
seventh of the cost. :func:`keep_factors` writes that mask as 0/1 floats, the form the model
multiplies by. The drop probability is ``p`` rounded to a multiple of ``2**-16`` (0.1 becomes
0.100006); kept values are scaled by ``1 / (1 - p)`` as in
``F.dropout``. Other devices use ``F.dropout`` (its fused kernels), and so does code that ``torch.compile``
traces (a compiled block: the NumPy draw cannot be traced). The random stream is not ``F.dropout``'s, so
a CPU run is reproducible against itself, not bit for bit against torch's dropout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LANES = 1 << 16


def drop_threshold(p: float) -> int:
    """The signed 16-bit lane value below which an element is dropped (P(drop) = round(p * 2**16) / 2**16)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return round(p * _LANES) - _LANES // 2


def keep_scale(p: float) -> float:
    """The factor of kept values, ``1 / (1 - p)``; 0 at ``p = 1`` (everything dropped: zeros, as ``F.dropout``)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def random_lanes(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """A CPU int16 tensor of ``shape``, uniform over all 2**16 values: SFC64 words seeded from torch's
    generator, four lanes a word."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    words = np.random.SFC64(seed).random_raw((count + 3) // 4)
    return torch.from_numpy(words.view(np.int16)[:count]).view(shape)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A CPU bool tensor of ``shape``: True (keep) with probability ``1 - p`` per element, independently."""
    return random_lanes(shape, generator) >= drop_threshold(p)


def keep_factors(lanes: torch.Tensor, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``keep_mask``'s mask from its ``lanes``, as 1.0 (keep) and 0.0 (drop) of ``dtype``: written in one pass,
    and a product with it is vectorised (a product with a bool tensor first copies it to floats)."""
    return torch.ge(lanes, drop_threshold(p), out=torch.empty(lanes.shape, dtype=dtype))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the mask of :func:`keep_mask` on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0 or torch.compiler.is_compiling():  # compiled: NumPy cannot be traced
        return F.dropout(x, p, training)
    return x * keep_factors(random_lanes(x.shape), p, x.dtype).mul_(keep_scale(p))


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        drop_threshold(p)  # validates p
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
