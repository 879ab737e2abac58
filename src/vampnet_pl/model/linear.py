"""The model's linear layers, with oneDNN's fp32 matrix product on x86 CPUs.

torch's CPU ``F.linear`` calls MKL's ``sgemm``. oneDNN, which every x86 torch build ships, has its own
JIT-compiled AVX-512 kernels. On this project's 2-core AMD Zen 4 machine MKL takes no AVX-512 path (its
verbose header names only "Intel(R) Architecture processors"): in the small model's layers, its forward
product and input gradient run at 120–185 GFLOP/s, oneDNN's at 170–210. MKL's weight gradient, whose first
operand is transposed, is as fast as oneDNN's or faster. BENCHMARKS.md has the numbers.

``Linear`` is ``nn.Linear``: same parameters, state dict, init, peft and FSDP wrapping. Its forward takes
oneDNN only where it pays: float32 tensors on the CPU, at least ``MIN_ROWS`` rows, a weight of at least
``MIN_WEIGHT`` entries, no autocast. Small products run faster in MKL. Everything else is plain ``F.linear``:
GPU, bf16, autocast, tensor subclasses (DTensor), tracing and ``torch.compile``. The results are fp32
products (no reduced-precision accumulation), equal to MKL's within float rounding. Activation-checkpoint
policies that pick ops to save by name see ``mkldnn._linear_pointwise``, not ``aten.mm``.

``VampNetConfig.cpu_matmul`` chooses: ``auto`` (oneDNN where torch has it on an x86 CPU), ``onednn`` (the
same, with a warning where torch lacks it) or ``aten`` (always ``F.linear``).
"""

from __future__ import annotations

import functools
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vampnet_pl.model.cpu_path import eager_cpu_float32

CPU_MATMUL = ("auto", "onednn", "aten")
MIN_ROWS = 256  # below: oneDNN is slower than MKL (measured at 32–192 rows: 0.4–0.9x)
MIN_WEIGHT = 1 << 16  # below (the tiny model's 64 x 192 qkv): no gain at any row count


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel and runs on an x86 CPU, where it beats MKL."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def use_onednn(cpu_matmul: str) -> bool:
    """Resolve ``VampNetConfig.cpu_matmul`` to whether CPU products go through oneDNN."""
    if cpu_matmul not in CPU_MATMUL:
        raise ValueError(f"cpu_matmul must be one of {CPU_MATMUL}, got {cpu_matmul!r}")
    if cpu_matmul == "onednn" and not onednn_available():  # e.g. a model exported on x86, loaded on ARM
        warnings.warn("cpu_matmul=onednn: this torch build has no oneDNN linear kernel for this CPU; "
                      "using F.linear (MKL or the platform's BLAS)", stacklevel=2)
    return cpu_matmul != "aten" and onednn_available()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (eager_cpu_float32(x, weight, bias) and onednn_available()  # in this order: see eager_cpu_float32
            and weight.dim() == 2 and weight.numel() >= MIN_WEIGHT and x.dim() >= 2
            and x.numel() >= MIN_ROWS * weight.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           onednn: bool = True) -> torch.Tensor:
    """``F.linear``, through oneDNN where it pays (see the module docstring) and ``onednn`` is set."""
    if onednn and _onednn_applies(x, weight, bias):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """``x @ weight.T + bias``: forward and input gradient by oneDNN, weight gradient by aten's ``mm``.

    The backward pass is made of differentiable ops on the saved inputs, so double backward works, as
    ``nn.Linear``'s does. The output is not a view (``_unsafe_view``): callers may modify it in place."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _product(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
        return out if x.dim() == 2 else torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")  # autocast as in the forward pass: off
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ weight, as a linear layer with weight.T (oneDNN reads it transposed)
            grad_x = linear(grad_rows, weight.t()).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # rows from x here, not saved, so that a double backward reaches x
            grad_weight = grad_rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU fp32 forward and input gradient may run in oneDNN (``cpu_matmul``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 cpu_matmul: str = "auto"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.onednn = use_onednn(cpu_matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.onednn)
