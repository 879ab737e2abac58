"""The CPU dropout mask: a Bernoulli keep mask, seeded by torch, and its use in the model and in attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vampnet_pl.model import VampNet, VampNetConfig
from vampnet_pl.model.attention import attend, attention_with_dropout
from vampnet_pl.model.dropout import Dropout, drop_threshold, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    count = 1_000_003  # not a multiple of the four lanes of a word
    keep = keep_mask((count,), p)
    assert keep.dtype == torch.bool and keep.shape == (count,)
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # independent lanes: neighbours (same word and across words) are uncorrelated
    pairs = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / count)
    lanes = keep[: count - count % 4].view(-1, 4).float().mean(0)  # each of the four 16-bit lanes of a word
    assert torch.all((lanes - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (count // 4)))


def test_keep_mask_follows_torch_seeding_and_differs_between_draws():
    torch.manual_seed(3)
    first, second = keep_mask((4, 50), 0.3), keep_mask((4, 50), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((4, 50), 0.3), first)
    assert not torch.equal(first, second)
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(keep_mask((9,), 0.5, generator), keep_mask((9,), 0.5, torch.Generator().manual_seed(7)))


def test_drop_probability_is_p_rounded_to_sixteen_bits():
    assert drop_threshold(0.0) == -(2**15)  # nothing is below the smallest lane
    assert drop_threshold(0.5) == 0
    assert (drop_threshold(0.1) + 2**15) / 2**16 == pytest.approx(0.1, abs=2**-17)
    with pytest.raises(ValueError, match="dropout probability"):
        drop_threshold(1.5)


def test_dropout_zeroes_dropped_elements_and_scales_the_rest_forward_and_backward():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25)
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.25)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(keep, 1 / 0.75, 0.0))


def test_dropout_is_the_identity_in_eval_and_at_zero_and_f_dropout_elsewhere():
    x = torch.randn(10, 10)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x.to("meta"), 0.3).device.type == "meta"  # not the CPU: F.dropout
    module = Dropout(0.3).eval()
    assert module(x) is x and "p=0.3" in repr(module)
    with pytest.raises(ValueError):
        Dropout(-0.1)


def reference_attention(q, k, v, mask, keep, p):
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask, -1)
    return (probs * keep / (1 - p)) @ v


def test_attention_dropout_drops_probabilities_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 3, 29, 29, requires_grad=True)
    torch.manual_seed(5)
    ours = attention_with_dropout(q, k, v, mask, 0.2)
    torch.manual_seed(5)
    keep = keep_mask((2, 3, 29, 29), 0.2)
    expected = reference_attention(q, k, v, mask, keep, 0.2)
    torch.testing.assert_close(ours, expected)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v, mask), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v, mask), grad)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_attention_dropout_without_a_mask_with_a_frozen_mask_and_non_contiguous_inputs():
    torch.manual_seed(0)
    qkv = torch.randn(2, 21, 3, 3, 8, requires_grad=True)  # [batch, frames, 3, heads, head_dim], as the model
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    frozen = torch.randn(1, 3, 21, 21)
    for mask in (None, frozen):
        torch.manual_seed(3)
        ours = attention_with_dropout(q, k, v, mask, 0.4)
        torch.manual_seed(3)
        keep = keep_mask((2, 3, 21, 21), 0.4)
        expected = reference_attention(q, k, v, 0.0 if mask is None else mask, keep, 0.4)
        torch.testing.assert_close(ours, expected)
        grad = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, qkv, grad)[0], torch.autograd.grad(expected, qkv, grad)[0])


def test_attention_dropout_refuses_a_second_backward_through_a_retained_graph():
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    out = attention_with_dropout(q, k, v, None, 0.2).sum()
    out.backward(retain_graph=True)  # the backward pass drops the saved probabilities in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_attention_dropout_under_cpu_autocast_matches_the_bf16_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 17, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 17, 17, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        ours = attention_with_dropout(q, k, v, mask, 0.3)
        torch.manual_seed(4)
        expected = reference_attention(q, k, v, mask, keep_mask((2, 2, 17, 17), 0.3), 0.3)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected.float(), atol=0.05, rtol=0.05)
    grad = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, (q, k, v, mask), grad), torch.autograd.grad(expected, (q, k, v, mask), grad)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)


def test_attend_on_cpu_with_dropout_is_unbiased_and_equals_sdpa_without():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    mask = torch.randn(1, 2, 16, 16)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask, 0.0), exact)
    mean = torch.stack([attention_with_dropout(q, k, v, mask, 0.3) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, exact, atol=0.05, rtol=0)
    torch.manual_seed(2)
    through_attend = attend(q, k, v, dropout_p=0.3, backend="sdpa")
    torch.manual_seed(2)
    torch.testing.assert_close(through_attend, attention_with_dropout(q, k, v, None, 0.3))


def test_model_dropout_is_deterministic_under_a_seed_and_off_in_eval():
    cfg = VampNetConfig(n_codebooks=2, codebook_size=16, latent_dim=4, d_model=16, n_layers=2, n_heads=2, dropout=0.3)
    torch.manual_seed(0)
    model = VampNet(cfg, torch.randn(2, 16, 4)).train()
    codes = torch.randint(0, 16, (2, 2, 12))
    mask = torch.rand(2, 2, 12) < 0.5
    torch.manual_seed(1)
    first = model(codes, mask)
    torch.manual_seed(1)
    assert torch.equal(model(codes, mask), first)
    assert not torch.equal(model(codes, mask), first)
    model.eval()
    assert torch.equal(model(codes, mask), model(codes, mask))


def test_a_training_block_with_dropout_compiles_whole_on_the_cpu():
    """``compile=true`` on the CPU: the NumPy mask cannot be traced (it broke the graph, and aot_autograd then
    failed on its int16 view of the words); a compiled block keeps torch's dropout and SDPA's, in its graph."""
    torch.manual_seed(0)
    cfg = VampNetConfig(n_codebooks=2, codebook_size=16, latent_dim=4, d_model=32, n_layers=1, n_heads=2, dropout=0.3)
    model = VampNet(cfg, torch.randn(2, 16, 4)).train()
    block = model.blocks[0]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 13, 32, requires_grad=True)
    torch.manual_seed(3)
    first = compiled(x, model.position_bias(13))
    grads = torch.autograd.grad(first.square().sum(), [x, *block.parameters()])
    assert all(torch.isfinite(grad).all() for grad in grads)
    torch.manual_seed(3)
    assert torch.equal(compiled(x, model.position_bias(13)), first)  # seeded
    assert not torch.equal(compiled(x, model.position_bias(13)), first)  # dropout is on
    drop = torch.compile(lambda t: dropout(t, 0.25), backend="aot_eager", fullgraph=True)
    y = drop(torch.ones(200_000))
    assert abs((y == 0).float().mean().item() - 0.25) < 0.005 and torch.allclose(y[y != 0], torch.tensor(1 / 0.75))


def test_attention_dropping_everything_gives_zeros_as_sdpa_on_the_cpu():
    """p = 1 (``attend`` called directly; ``model.dropout`` stops below 1): zeros and zero gradients, as SDPA's and
    F.dropout's; it divided by zero."""
    q, k, v = (torch.randn(2, 2, 7, 4, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, dropout_p=1.0, backend="sdpa")
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    for grad in torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v)):
        assert torch.equal(grad, torch.zeros_like(grad))
