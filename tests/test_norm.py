"""model/norm.py: the CPU RMSNorm function equals nn.RMSNorm forward and backward, and is taken where it should be."""

from __future__ import annotations

import pytest
import torch

from vampnet_pl.model.norm import RMSNorm


def run(norm, x, upstream):
    x = x.detach().requires_grad_()
    norm.weight.grad = None
    y = norm(x)
    y.backward(upstream)
    return y, x.grad, norm.weight.grad


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cpu_rmsnorm_equals_torch_forward_and_backward(eps, layout):
    torch.manual_seed(0)
    ours, reference = RMSNorm(48, eps=eps), torch.nn.RMSNorm(48, eps=eps)
    with torch.no_grad():
        ours.weight.normal_()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 20, 48) * 3 if layout == "contiguous" else torch.randn(3, 48, 20).transpose(1, 2)
    upstream = torch.randn(3, 20, 48) if layout == "contiguous" else torch.randn(48, 3, 20).permute(1, 2, 0)
    got, want = run(ours, x, upstream), run(reference, x, upstream)
    assert "RMSNorm" in type(got[0].grad_fn).__name__ and "RMSNorm" not in type(want[0].grad_fn).__name__
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_output_may_be_modified_in_place():
    norm, x = RMSNorm(16), torch.randn(4, 16, requires_grad=True)
    y = norm(x)
    assert "RMSNorm" in type(y.grad_fn).__name__
    y.add_(1.0).relu_().sum().backward()
    reference = torch.nn.RMSNorm(16)(x.detach()).add_(1.0).relu_()
    torch.testing.assert_close(y, reference)


def test_frozen_weight_input_without_grad_and_fallbacks():
    torch.manual_seed(1)
    norm = RMSNorm(16)
    x = torch.randn(5, 16, requires_grad=True)
    norm.weight.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(norm(x).square().sum(), x)
    reference = torch.nn.RMSNorm(16).requires_grad_(False)
    torch.testing.assert_close(grad_x, torch.autograd.grad(reference(x).square().sum(), x)[0])
    norm.weight.requires_grad_(True)
    norm(x.detach()).sum().backward()  # only the weight's gradient
    torch.testing.assert_close(norm.weight.grad, reference.requires_grad_(True)(x.detach()).sum().backward()
                               or reference.weight.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast, float64: nn.RMSNorm's own forward
        assert "RMSNorm" not in type(norm(x).grad_fn).__name__
    assert "RMSNorm" not in type(norm.double()(x.double()).grad_fn).__name__
    assert isinstance(norm, torch.nn.RMSNorm)
