"""The attention core: flex attention with a table-lookup score_mod equals the materialised-bias reference."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import torch.nn.attention.flex_attention as flex_module
from vampnet_pl.model import VampNet, VampNetConfig
from vampnet_pl.model.attention import RelativeBias, attend, dense_bias, relative_bucket, resolve_backend

PRESETS = sorted((Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch 2.11 refuses flex backward on CPU because its compiled CPU kernel has none; its unfused
    reference implementation (what runs uncompiled) has one, and that is what these checks use."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def t5_bucket(relative: int, n_buckets: int, max_distance: int) -> int:
    """Scalar T5 bidirectional bucketing, written independently of the tensor version."""
    half = n_buckets // 2
    exact = half // 2
    offset = half if relative > 0 else 0
    distance = abs(relative)
    if distance < exact:
        return offset + distance
    far = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return offset + min(far, half - 1)


@pytest.mark.parametrize("n_buckets,max_distance", [(32, 128), (16, 64)])
def test_relative_bucket_is_t5_bidirectional(n_buckets, max_distance):
    relative = torch.arange(-400, 401)
    expected = [t5_bucket(r, n_buckets, max_distance) for r in relative.tolist()]
    assert relative_bucket(relative, n_buckets, max_distance).tolist() == expected
    assert relative_bucket(relative, n_buckets, max_distance).max() == n_buckets - 1


def test_dense_bias_reads_the_table_by_bucket_of_key_minus_query():
    torch.manual_seed(0)
    table = torch.randn(32, 3)
    frames = 300
    dense = RelativeBias.from_table(table, frames, 32, 128, materialise=True).dense
    assert dense.shape == (1, 3, frames, frames)
    for query, key in [(0, 0), (5, 0), (0, 5), (10, 299), (299, 10), (150, 151)]:
        torch.testing.assert_close(dense[0, :, query, key], table[t5_bucket(key - query, 32, 128)])


def leaves(batch, heads, frames, head_dim, n_buckets=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, frames, head_dim, generator=generator).requires_grad_() for _ in range(3))
    table = (torch.randn(n_buckets, heads, generator=generator)).requires_grad_()
    return q, k, v, table


def forward_backward(backend, q, k, v, table, n_buckets=32, max_distance=128):
    for leaf in (q, k, v, table):
        leaf.grad = None
    frames = q.shape[-2]
    bias = RelativeBias.from_table(table, frames, n_buckets, max_distance, materialise=backend == "sdpa")
    out = attend(q, k, v, position_bias=bias, backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad.clone() for leaf in (q, k, v, table)]


def assert_flex_equals_reference(q, k, v, table, n_buckets=32, max_distance=128):
    flex_out, flex_grads = forward_backward("flex", q, k, v, table, n_buckets, max_distance)
    ref_out, ref_grads = forward_backward("sdpa", q, k, v, table, n_buckets, max_distance)
    torch.testing.assert_close(flex_out, ref_out, rtol=1e-5, atol=1e-5)
    for name, flex_grad, ref_grad in zip("qkv", flex_grads, ref_grads):
        torch.testing.assert_close(flex_grad, ref_grad, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
    torch.testing.assert_close(flex_grads[3], ref_grads[3], rtol=1e-4, atol=1e-3, msg="grad of the bias table")
    assert flex_grads[3].abs().sum() > 0


def test_flex_equals_reference_forward_and_backward_at_861_frames(flex_backward_on_cpu):
    assert_flex_equals_reference(*leaves(batch=2, heads=2, frames=861, head_dim=8))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_flex_equals_reference_for_every_preset(preset, flex_backward_on_cpu):
    values = {k: v for k, v in yaml.safe_load(preset.read_text()).items() if k != "defaults"}
    cfg = VampNetConfig(**values)  # the preset's heads and bucket settings
    frames = 2 * cfg.relative_max_distance + 3  # odd, and past the last log bucket
    q, k, v, table = leaves(1, cfg.n_heads, frames, head_dim=4, n_buckets=cfg.relative_buckets)
    assert_flex_equals_reference(q, k, v, table, cfg.relative_buckets, cfg.relative_max_distance)


def test_backend_choice():
    assert resolve_backend("auto", "cpu", has_bias=True) == "sdpa"  # no flex backward on CPU
    assert resolve_backend("auto", "cuda", has_bias=True) == "flex"
    assert resolve_backend("auto", "cuda", has_bias=True, dropout_p=0.1) == "sdpa"  # flex has no attention dropout
    assert resolve_backend("flex", "cuda", has_bias=False) == "sdpa"  # rotary / no bias: fused SDPA
    assert resolve_backend("flex", "cpu", has_bias=True) == "flex"
    with pytest.raises(ValueError, match="attention backend"):
        resolve_backend("flash", "cpu", has_bias=True)
    with pytest.raises(ValueError, match="attention_backend"):
        VampNetConfig(attention_backend="flash")


def test_forced_flex_says_how_to_train_on_cpu():
    q, k, v, table = leaves(1, 2, 33, 4)
    with pytest.raises(NotImplementedError, match="attention_backend=auto or sdpa"):
        attend(q, k, v, position_bias=RelativeBias.from_table(table, 33, 32, 128), backend="flex")


def test_model_logits_agree_across_backends():
    torch.manual_seed(0)
    cfg = dict(n_codebooks=4, codebook_size=64, latent_dim=8, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    reference = VampNet(VampNetConfig(**cfg, attention_backend="sdpa")).eval()
    flex = VampNet(VampNetConfig(**cfg, attention_backend="flex")).eval()
    flex.load_state_dict(reference.state_dict())
    codes = torch.randint(0, 64, (2, 4, 203))
    mask = torch.rand(2, 4, 203) < 0.5
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch.testing.assert_close(flex(codes, mask), reference(codes, mask), rtol=1e-4, atol=1e-4)


def test_bias_is_built_once_per_forward_and_materialised_only_for_sdpa():
    torch.manual_seed(0)
    model = VampNet(VampNetConfig(codebook_size=64, latent_dim=8, d_model=32, n_layers=3, n_heads=4)).eval()
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model(torch.randint(0, 64, (1, 4, 50)), torch.zeros(1, 4, 50, dtype=torch.bool))
    assert len(seen) == 3 and all(bias is seen[0] for bias in seen)
    assert seen[0].dense.shape == (1, 4, 50, 50)
    torch.testing.assert_close(seen[0].dense, dense_bias(seen[0].by_offset, 50))
    assert model.position_bias(50, materialise=False).dense is None


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_block_compiles_whole_with_the_bias_object(backend):
    """Regional compile: one graph per block (no graph break at the attention call or the bias object)."""
    torch.manual_seed(0)
    model = VampNet(VampNetConfig(codebook_size=64, latent_dim=8, d_model=32, n_layers=1, n_heads=4, dropout=0.0,
                                  attention_backend=backend)).eval()
    block = model.blocks[0]
    x = torch.randn(2, 45, 32)
    bias = model.position_bias(45, materialise=backend == "sdpa")
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch.testing.assert_close(compiled(x, bias), block(x, bias), rtol=1e-5, atol=1e-5)
