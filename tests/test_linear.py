"""model/linear.py: the oneDNN CPU path equals nn.Linear's products, forward and backward, and is taken
exactly where it should be."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import on_two_ranks
from vampnet_pl.model import VampNet, VampNetConfig
from vampnet_pl.model.linear import MIN_ROWS, Linear, linear, onednn_available, use_onednn

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="needs oneDNN on an x86 CPU")


def takes_onednn(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "OneDnnLinear" in type(y.grad_fn).__name__


def grads(layer_fn, x, weight, bias, upstream):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = layer_fn(x, weight, bias)
    y.backward(upstream)
    return y, x.grad, weight.grad, None if bias is None else bias.grad


INPUTS = {"contiguous": lambda: torch.randn(3, 100, 256), "2-d": lambda: torch.randn(300, 256),
          "sliced": lambda: torch.randn(3, 5, 120, 256)[:, :, :100],
          "transposed": lambda: torch.randn(3, 256, 100).transpose(1, 2)}


@needs_onednn
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", list(INPUTS))
def test_onednn_linear_equals_f_linear_forward_and_backward(with_bias, layout):
    torch.manual_seed(0)
    x = INPUTS[layout]()
    weight, bias = torch.randn(384, 256) / 16, torch.randn(384) if with_bias else None
    upstream = torch.randn(384, *x.shape[:-1]).movedim(0, -1)  # a non-contiguous incoming gradient
    ours = grads(linear, x, weight, bias, upstream)
    reference = grads(F.linear, x, weight, bias, upstream)
    assert takes_onednn(ours[0]) and not takes_onednn(reference[0])
    for got, want in zip(ours, reference):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_frozen_weight_and_double_backward():
    torch.manual_seed(1)
    x, weight = torch.randn(2, MIN_ROWS, 256, requires_grad=True), torch.randn(512, 256) / 16
    y = linear(x, weight)  # a frozen weight (LoRA's base layer): only the input's gradient
    assert takes_onednn(y)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(F.linear(x, weight).square().sum(), x)[0],
                               rtol=1e-5, atol=1e-4)

    def hessian_vector(fn):  # d/dW of <dL/dx, v>: differentiates through the backward pass
        w = weight.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, w).square().sum(), x, create_graph=True)
        return torch.autograd.grad((gx * torch.ones_like(gx)).sum(), w)[0]

    torch.testing.assert_close(hessian_vector(linear), hessian_vector(F.linear), rtol=1e-4, atol=1e-2)

    def weight_grad_by_input(fn):  # d/dx of <dL/dW, v>: the weight gradient's dependence on x
        inputs, w = x.detach().clone().requires_grad_(), weight.clone().requires_grad_()
        (gw,) = torch.autograd.grad(fn(inputs, w).square().sum(), w, create_graph=True)
        return torch.autograd.grad(gw.sum(), inputs)[0]

    torch.testing.assert_close(weight_grad_by_input(linear), weight_grad_by_input(F.linear), rtol=1e-4, atol=1e-2)


@needs_onednn
@pytest.mark.parametrize("shape", [(MIN_ROWS, 256), (2, MIN_ROWS, 256)])
def test_the_output_may_be_modified_in_place(shape):
    x, weight = torch.randn(shape, requires_grad=True), torch.randn(512, 256, requires_grad=True)
    y = linear(x, weight)
    assert takes_onednn(y)
    y.add_(1.0).relu_()  # as nn.Linear's output allows (peft variants add into it)
    y.sum().backward()
    reference = F.linear(x, weight).add_(1.0).relu_()
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_is_taken_only_where_it_pays():
    weight = torch.randn(512, 256, requires_grad=True)
    big = torch.randn(MIN_ROWS, 256)
    assert takes_onednn(linear(big, weight))
    assert not takes_onednn(linear(big[: MIN_ROWS - 1], weight))  # few rows: MKL is faster
    assert not takes_onednn(linear(torch.randn(4096, 64), torch.randn(192, 64, requires_grad=True)))  # small weight
    assert not takes_onednn(linear(big, weight, onednn=False))
    assert not takes_onednn(Linear(256, 512, cpu_matmul="aten")(big))
    assert takes_onednn(Linear(256, 512, cpu_matmul="auto")(big))
    assert not takes_onednn(linear(big.double(), weight.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(big, weight)
    assert not takes_onednn(y) and y.dtype == torch.bfloat16


def test_cpu_matmul_choice_is_validated():
    with pytest.raises(ValueError, match="cpu_matmul"):
        VampNetConfig(cpu_matmul="mkl")
    with pytest.raises(ValueError, match="cpu_matmul"):
        use_onednn("blas")
    assert use_onednn("aten") is False
    assert use_onednn("auto") is onednn_available()
    assert isinstance(Linear(4, 4), torch.nn.Linear)  # init, peft and FSDP see an nn.Linear


def test_onednn_requested_where_torch_lacks_it_warns_and_uses_f_linear(monkeypatch):
    import vampnet_pl.model.linear as module

    monkeypatch.setattr(module, "onednn_available", lambda: False)
    with pytest.warns(UserWarning, match="no oneDNN linear kernel"):
        layer = Linear(256, 512, cpu_matmul="onednn")
    assert layer.onednn is False and not takes_onednn(layer(torch.randn(MIN_ROWS, 256)))


@needs_onednn
def test_model_with_onednn_equals_the_aten_model():
    """Logits of selected tokens and every parameter's gradient, one training-mode step with frozen dropout."""
    cfg = dict(d_model=256, n_layers=2, n_heads=4, dropout=0.0, codebook_size=1024, latent_dim=8, ffn_mult=3.0)
    torch.manual_seed(0)
    ours = VampNet(VampNetConfig(**cfg, cpu_matmul="onednn"), torch.randn(4, 1024, 8)).train()
    reference = VampNet(VampNetConfig(**cfg, cpu_matmul="aten")).train()
    reference.load_state_dict(ours.state_dict())
    codes = torch.randint(0, 1024, (4, 4, 100))
    mask = torch.rand(4, 4, 100) < 0.7
    taken = []
    ours.blocks[0].ffn.ffn_in.register_forward_hook(lambda m, i, o: taken.append(takes_onednn(o)))
    ours.blocks[0].attn_norm.register_forward_hook(lambda m, i, o: taken.append("RMSNorm" in type(o.grad_fn).__name__))
    outputs = []
    for model in (ours, reference):
        logits = model(codes, mask, select=mask)
        logits.logsumexp(-1).sum().backward()
        outputs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert taken == [True, True]  # the model's layers took the CPU functions (its norm: model/norm.py)
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    for name, grad in outputs[1][1].items():
        torch.testing.assert_close(outputs[0][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _fsdp2_rank(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layers = torch.nn.Sequential(Linear(256, 512, cpu_matmul="onednn"), Linear(512, 256, cpu_matmul="onednn"))
        reference = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
        reference.load_state_dict(layers.state_dict())
        for layer in layers:
            fully_shard(layer)
        fully_shard(layers)
        x = torch.randn(2, MIN_ROWS, 256)
        y = layers(x)
        y.square().sum().backward()
        reference(x).square().sum().backward()
        seen = []
        layers[0].register_forward_hook(lambda m, i, o: seen.append(takes_onednn(o)))
        layers(x)
        for name, param in layers.named_parameters():  # each rank holds its shard of the gradient
            want = dict(reference.named_parameters())[name].grad
            got = param.grad.full_tensor()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        results[rank] = seen == [True]
    finally:
        dist.destroy_process_group()


@needs_onednn
@pytest.mark.distributed
def test_fsdp2_shards_train_through_the_onednn_path():
    assert on_two_ranks(_fsdp2_rank) == {0: True, 1: True}
