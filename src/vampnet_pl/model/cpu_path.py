"""When a layer may take its hand-written CPU autograd function (``model/linear.py``, ``model/norm.py``)."""

from __future__ import annotations

import torch
from torch import nn


def eager_cpu_float32(*tensors: torch.Tensor | None) -> bool:
    """True when running eagerly (not compiled, traced or scripted), outside CPU autocast, and every tensor
    given (``None`` is skipped) is a plain float32 CPU tensor or parameter: no subclass such as DTensor."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # first: dynamo need not trace what follows
    return not torch.is_autocast_enabled("cpu") and all(
        t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32)
        for t in tensors)
