"""RMSNorm: ``nn.RMSNorm``, with a CPU autograd function that makes fewer passes over memory.

torch 2.11 has no fused RMSNorm kernel on the CPU. There ``nn.RMSNorm`` is composed of ``pow``, ``mean``,
``add``, ``rsqrt`` and two products, and its backward pass of about ten more ops, most of them a pass over
the whole activation. ``_RMSNorm`` computes the same ``x * rsqrt(mean(x^2) + eps) * weight`` with one
reduction and two passes forward, and two reductions and five passes backward, writing in place where it
owns the tensor: on a ``[2752, 512]`` activation, forward and backward take 2-3x less time
(BENCHMARKS.md, ``bench/bench_cpu_layers.py``). It applies to float32 CPU tensors outside autocast,
tracing and ``torch.compile``; all else (GPU, bf16, tensor subclasses) is ``nn.RMSNorm``'s own forward.
No double backward on that path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return (weight is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.is_autocast_enabled("cpu"))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        rstd = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(rows, weight, rstd)
        ctx.input_shape = x.shape
        return torch.mul(rows, rstd).mul_(weight).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        width = rows.shape[-1]
        grad = grad.reshape(-1, width)
        grad_normed = grad * weight  # the gradient with respect to x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mul(rows, rstd).mul_(grad).sum(0)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        # d/dx of x * rstd: rstd * (g - x * rstd^2 * mean(g * x))
        coefficient = torch.linalg.vecdot(grad_normed, rows, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(width)
        grad_x = grad_normed.mul_(rstd).addcmul_(rows, coefficient, value=-1)
        return grad_x.view(ctx.input_shape), grad_weight, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) whose CPU fp32 path is one autograd function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and _applies(x, self.weight):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return _RMSNorm.apply(x, self.weight, eps)
        return super().forward(x)
