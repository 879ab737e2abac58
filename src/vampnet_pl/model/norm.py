"""RMSNorm: ``nn.RMSNorm``, with a CPU autograd function that makes fewer passes over memory.

In torch 2.11 ``nn.RMSNorm`` on the CPU is composite (its autograd graph shows the ops): ``pow``, ``mean``,
``add``, ``rsqrt`` and two products, and its backward pass of about ten more ops, most of them a pass over
the whole activation. ``_RMSNorm`` computes the same ``x * rsqrt(mean(x^2) + eps) * weight`` with one
reduction and two passes forward, and two reductions and five passes backward, writing in place where it
owns the tensor: on a ``[2752, 512]`` activation, forward and backward take about half the time
(BENCHMARKS.md, ``bench/bench_cpu_layers.py``). It applies to float32 CPU tensors outside autocast,
tracing and ``torch.compile``; all else (GPU, bf16, tensor subclasses) is ``nn.RMSNorm``'s own forward.
No double backward on that path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vampnet_pl.model.cpu_path import eager_cpu_float32


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)  # not a view of an intermediate: callers may modify it in place

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_normed = grad * weight  # the gradient with respect to x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mul(x, rstd).mul_(grad).sum(dim=tuple(range(x.dim() - 1)))
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        # d/dx of x * rstd: rstd * (g - x * rstd^2 * mean(g * x))
        coefficient = torch.linalg.vecdot(grad_normed, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = grad_normed.mul_(rstd).addcmul_(x, coefficient, value=-1)
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) whose CPU fp32 path is one autograd function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight is not None and len(self.normalized_shape) == 1 and x.dim() >= 2
                and eager_cpu_float32(x, self.weight)):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return _RMSNorm.apply(x, self.weight, eps)
        return super().forward(x)
