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
from vampnet_pl.model.attention import (RelativeBias, _compiled_flex_attention, attend, attention_keep, dense_bias,
                                        draw_dropout_seed, keep_threshold, relative_bucket, resolve_backend)

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


def hashed_keep_mask(seed, batch, heads, frames, dropout_p):
    """flex attention's dropout keep mask, materialised: ``[batch, heads, frames, frames]`` bools (seed's device)."""
    index = [torch.arange(n, device=seed.device).view([n if axis == i else 1 for axis in range(4)])
             for i, n in enumerate((batch, heads, frames, frames))]
    return attention_keep(seed, *index, heads, frames, keep_threshold(dropout_p))


def masked_reference(q, k, v, bias, keep, dropout_p):
    """``dropout(softmax(q k^T / sqrt(d) + bias)) v`` with the given keep mask, written out."""
    probs = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias.materialise(), dim=-1)
    return (probs * keep / (1 - dropout_p)) @ v


def forward_backward(backend, q, k, v, table, n_buckets=32, max_distance=128, dropout_p=0.0):
    """``backend`` "flex" or "sdpa", or "masked": the written-out math with flex's dropout mask."""
    for leaf in (q, k, v, table):
        leaf.grad = None
    batch, heads, frames, _ = q.shape
    bias = RelativeBias.from_table(table, frames, n_buckets, max_distance, materialise=backend == "sdpa")
    torch.manual_seed(7)
    if backend == "masked":
        keep = hashed_keep_mask(draw_dropout_seed("cpu"), batch, heads, frames, dropout_p)
        out = masked_reference(q, k, v, bias, keep, dropout_p)
    else:
        out = attend(q, k, v, position_bias=bias, backend=backend, dropout_p=dropout_p)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad.clone() for leaf in (q, k, v, table)]


def assert_flex_equals_reference(q, k, v, table, n_buckets=32, max_distance=128, dropout_p=0.0):
    """flex against the materialised-bias SDPA reference; with dropout, against the written-out math with
    flex's own mask (SDPA draws another)."""
    flex_out, flex_grads = forward_backward("flex", q, k, v, table, n_buckets, max_distance, dropout_p)
    ref_out, ref_grads = forward_backward("sdpa" if dropout_p == 0 else "masked", q, k, v, table, n_buckets,
                                          max_distance, dropout_p)
    torch.testing.assert_close(flex_out, ref_out, rtol=1e-5, atol=1e-5)
    for name, flex_grad, ref_grad in zip("qkv", flex_grads, ref_grads):
        torch.testing.assert_close(flex_grad, ref_grad, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
    torch.testing.assert_close(flex_grads[3], ref_grads[3], rtol=1e-4, atol=1e-3, msg="grad of the bias table")
    assert flex_grads[3].abs().sum() > 0


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_flex_equals_reference_forward_and_backward_at_861_frames(dropout_p, flex_backward_on_cpu):
    assert_flex_equals_reference(*leaves(batch=2, heads=2, frames=861, head_dim=8), dropout_p=dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_flex_equals_reference_for_every_preset(preset, dropout_p, flex_backward_on_cpu):
    values = {k: v for k, v in yaml.safe_load(preset.read_text()).items() if k != "defaults"}
    cfg = VampNetConfig(**values)  # the preset's heads and bucket settings
    frames = 2 * cfg.relative_max_distance + 3  # odd, and past the last log bucket
    q, k, v, table = leaves(1, cfg.n_heads, frames, head_dim=4, n_buckets=cfg.relative_buckets)
    assert_flex_equals_reference(q, k, v, table, cfg.relative_buckets, cfg.relative_max_distance, dropout_p)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_flex_dropout_mask_drops_its_share_independently(dropout_p):
    batch, heads, frames = 2, 4, 301
    keep = hashed_keep_mask(torch.tensor(123), batch, heads, frames, dropout_p).float()
    n = keep.numel()
    assert abs(1 - keep.mean().item() - dropout_p) < 5 * (dropout_p * (1 - dropout_p) / n) ** 0.5
    centred = keep - keep.mean()

    def correlation(a, b):
        return ((a * b).mean() / (a.std() * b.std())).item()

    for axis in range(4):  # neighbours along batch, head, query and key
        first, second = centred.narrow(axis, 0, keep.shape[axis] - 1), centred.narrow(axis, 1, keep.shape[axis] - 1)
        assert abs(correlation(first, second)) < 0.02, axis
    assert abs(correlation(centred, centred.transpose(-2, -1))) < 0.02  # (q, k) and (k, q)
    other = hashed_keep_mask(torch.tensor(124), batch, heads, frames, dropout_p).float()
    assert abs(correlation(centred, other - other.mean())) < 0.02  # the next seed: a new mask
    assert torch.equal(keep, hashed_keep_mask(torch.tensor(123), batch, heads, frames, dropout_p).float())


def test_flex_dropout_follows_the_torch_seed_and_dropping_everything_gives_zeros(flex_backward_on_cpu):
    q, k, v, table = leaves(1, 2, 40, 4)
    bias = RelativeBias.from_table(table, 40, 32, 128)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(attend(q, k, v, position_bias=bias, backend="flex", dropout_p=0.2))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    everything_dropped = attend(q, k, v, position_bias=bias, backend="flex", dropout_p=1.0)
    assert torch.equal(everything_dropped, torch.zeros_like(q)) and everything_dropped.grad_fn is not None  # for DDP


def test_flex_dropout_recomputes_the_same_mask_under_activation_checkpointing(flex_backward_on_cpu):
    """Checkpointing reruns the forward pass in backward; the mask (and so the gradients) must not change.
    Reentrant here: the non-reentrant form (``checkpoint_wrapper``'s) would rerun the forward pass inside the
    CPU reference backward's vmap, which refuses random ops; on a GPU flex's backward is compiled, no vmap."""
    torch.manual_seed(0)
    model = VampNet(VampNetConfig(codebook_size=64, latent_dim=8, d_model=32, n_layers=1, n_heads=4, dropout=0.2,
                                  attention_backend="flex")).train()
    block, x = model.blocks[0], torch.randn(2, 45, 32, requires_grad=True)

    def gradients(checkpointed):
        block.zero_grad()
        bias = model.position_bias(45, materialise=False)
        torch.manual_seed(3)
        out = (torch.utils.checkpoint.checkpoint(block, x, bias, None, use_reentrant=True) if checkpointed
               else block(x, bias, None))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in block.parameters()]

    (plain_out, plain), (checkpointed_out, checkpointed) = gradients(False), gradients(True)
    torch.testing.assert_close(checkpointed_out, plain_out, rtol=0, atol=0)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backend_choice():
    assert resolve_backend("auto", "cpu", has_bias=True) == "sdpa"  # no flex backward on CPU
    assert resolve_backend("auto", "cuda", has_bias=True) == "flex"
    assert resolve_backend("auto", "cuda", has_bias=True, dropout_p=0.1) == "sdpa"  # flex dropout: not yet measured
    assert resolve_backend("flex", "cuda", has_bias=True, dropout_p=0.1) == "flex"
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


def test_compiled_flex_attention_stays_compiled_over_many_shapes():
    """Sampling calls it with many batch sizes and lengths; compiled with dynamic=False it stopped
    compiling after torch._dynamo's recompile_limit (8) shapes and ran flex's unfused path."""
    graphs, runs = [], []

    def counting(gm, example_inputs):  # dynamo's graphs, run as they are: counts compiles and compiled calls
        graphs.append(gm)
        return lambda *args: (runs.append(1), gm.forward(*args))[1]

    torch._dynamo.reset()
    compiled = _compiled_flex_attention(counting)
    shapes = [(1, 40)] * 2 + [(1, t) for t in range(41, 53)] + [(b, 40) for b in (2, 3, 4, 64)] + [(5, 17), (1, 3)]
    table = torch.randn(32, 2)
    for batch, frames in shapes:
        q, k, v = torch.randn(3, batch, 2, frames, 16).unbind(0)
        bias = RelativeBias.from_table(table, frames, 32, 128)
        before = len(runs)
        out = compiled(q, k, v, score_mod=bias.score_mod())
        assert len(runs) > before, f"batch {batch}, {frames} frames ran uncompiled"
    assert len(graphs) < torch._dynamo.config.recompile_limit
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4 + bias.materialise(), -1) @ v
    torch.testing.assert_close(out, reference)
    torch._dynamo.reset()


@pytest.mark.slow
def test_flex_dropout_score_mod_compiles_to_the_eager_values():
    """Inductor lowers the keep-bit hash (int64 shifts, xors, masked products) as eager computes it: here its
    CPU flex kernel (forward; a GPU compiles the same score_mod to Triton)."""
    from torch.nn.attention.flex_attention import flex_attention

    from vampnet_pl.model.attention import flex_dropout_inputs

    q, k, v, table = (t.detach() for t in leaves(2, 4, 128, 16))
    bias = RelativeBias.from_table(table, 128, 32, 128)
    k2, v2, with_dropout = flex_dropout_inputs(q, k, v, bias.score_mod(), 0.1, torch.tensor(12345))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        eager = flex_attention(q, k2, v2, score_mod=with_dropout)
    compiled = torch.compile(flex_attention, dynamic=False)(q, k2, v2, score_mod=with_dropout)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    keep = hashed_keep_mask(torch.tensor(12345), 2, 4, 128, 0.1)
    unscaled = masked_reference(q, k, v, bias, keep, 0.1) * (1 - 0.1)  # flex_dropout_inputs leaves out 1 / (1 - p)
    torch.testing.assert_close(eager, unscaled, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_flex_dropout_on_cuda_equals_the_math_with_its_mask():
    """The Triton kernel's keep bits (forward and backward) are the mask the eager hash gives."""
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, table = (t.detach().cuda().requires_grad_() for t in leaves(2, 4, 861, 64))
    weights = torch.randn(2, 4, 861, 64, device="cuda")
    bias = RelativeBias.from_table(table, 861, 32, 128)
    torch.manual_seed(7)
    out = attend(q, k, v, position_bias=bias, backend="flex", dropout_p=0.1)
    flex_grads = torch.autograd.grad((out * weights).sum(), (q, k, v, table))
    torch.manual_seed(7)
    keep = hashed_keep_mask(draw_dropout_seed("cuda"), 2, 4, 861, 0.1)
    ref = masked_reference(q, k, v, RelativeBias.from_table(table, 861, 32, 128), keep, 0.1)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v, table))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    for name, got, expected in zip(("q", "k", "v", "table"), flex_grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, msg=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_checkpointed_block_with_flex_dropout_differentiates_its_own_forward_on_cuda():
    """Compiled and activation-checkpointed, as training runs it: the backward pass uses the forward's masks
    (checked against a central difference, the masks fixed by the torch seed)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = VampNet(VampNetConfig(codebook_size=64, latent_dim=8, d_model=64, n_layers=1, n_heads=4, dropout=0.2,
                                  attention_backend="flex")).cuda().train()
    block = torch.compile(checkpoint_wrapper(model.blocks[0]))
    bias = model.position_bias(203, materialise=False)
    x, direction, weights = (torch.randn(2, 203, 64, device="cuda") for _ in range(3))

    def loss(inputs):
        torch.manual_seed(3)
        return (block(inputs, bias, None) * weights).sum()

    x.requires_grad_()
    (grad,) = torch.autograd.grad(loss(x), x)
    with torch.no_grad():
        eps = 1e-2
        numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=2e-2, atol=1e-2)
