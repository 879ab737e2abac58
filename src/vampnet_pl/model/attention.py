"""The attention core: one function, :func:`attend`, with two interchangeable backends.

``sdpa`` (the reference): ``F.scaled_dot_product_attention``. A T5 relative position bias is
materialised as a ``[1, heads, T, T]`` float mask (once per forward, shared by every layer),
which keeps SDPA on its math / memory-efficient kernels. Without a bias (rotary, or none),
SDPA uses its fused flash kernels.

``flex``: ``torch.nn.attention.flex_attention`` with a ``score_mod`` that adds
``bias[key - query, head]``, read from a ``[2T - 1, heads]`` vector gathered once per forward
from the learned ``[buckets, heads]`` table. Nothing of size ``T x T`` is ever stored, and
gradients reach the table through flex attention's captured-buffer gradient. Compiled on CUDA.

Dropout on attention probabilities (VampNet trains with 0.1) under ``flex``: flex attention has no
dropout of its own, and a score of -inf would also take the dropped key out of the softmax's
denominator. So the keys are given twice and the values once, then zeros: ``[k; k]`` and ``[v; 0]``.
A kept key scores in the first copy (-inf in the second), a dropped one in the second (-inf in the
first), so every key counts once in the denominator and only kept keys reach the output: exactly
``dropout(softmax(scores)) v`` (times ``1 / (1 - p)``), at twice the attention work. The keep mask is
a hash of (seed, batch, head, query, key) (:func:`attention_keep`), computed inside the kernel and again
in its backward pass; nothing ``T x T`` is stored. The seed is drawn from torch's generator, so
``torch.manual_seed`` and activation checkpointing's recompute reproduce the mask.

Backend choice (``backend="auto"``): ``flex`` on CUDA when there is a relative bias and no
attention dropout, ``sdpa`` otherwise (until flex with dropout is measured faster on a GPU:
BENCHMARKS.md). torch 2.11 has no flex attention
backward on CPU (and compiles its CPU forward slowly), so ``auto`` uses ``sdpa`` there. On the CPU,
with attention dropout (training), ``sdpa`` runs SDPA's math as one autograd function
(:func:`attention_with_dropout`), so that the mask comes from :mod:`vampnet_pl.model.dropout` (SDPA's
CPU dropout draws it with ``bernoulli_``, several times slower, and checks every row for -inf) and
few ``T x T`` tensors are allocated. Code that ``torch.compile`` traces keeps SDPA's own dropout (the
NumPy draw cannot be traced).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vampnet_pl.model.dropout import keep_factors, keep_scale, random_lanes

BACKENDS = ("auto", "flex", "sdpa")


def relative_bucket(relative: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 bidirectional bucket of ``relative = key - query``.

    Half the buckets per direction; within a half, distances below a quarter of the buckets get a
    bucket each, longer ones share log-spaced buckets up to ``max_distance`` (the last bucket beyond).
    """
    half = n_buckets // 2
    exact = half // 2
    direction = (relative > 0).long() * half
    distance = relative.abs()
    log_ratio = torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


@dataclass(frozen=True)
class RelativeBias:
    """A T5 relative position bias without its ``T x T`` matrix.

    ``by_offset[key - query + frames - 1, head]`` is the bias of one (query, key) pair: the bucket
    table gathered once for the ``2T - 1`` offsets. ``dense`` is the materialised ``[1, heads, T, T]``
    mask, present only when the reference path will run (built once, shared by every layer).
    """

    by_offset: torch.Tensor  # [2T - 1, heads]
    frames: int
    dense: torch.Tensor | None = None

    @classmethod
    def from_table(cls, table: torch.Tensor, frames: int, n_buckets: int, max_distance: int,
                   materialise: bool = False) -> RelativeBias:
        """``table``: the learned ``[n_buckets, heads]`` weights; ``materialise``: also build ``dense``."""
        offsets = torch.arange(1 - frames, frames, device=table.device)
        by_offset = table[relative_bucket(offsets, n_buckets, max_distance)]
        return cls(by_offset, frames, dense_bias(by_offset, frames) if materialise else None)

    def materialise(self) -> torch.Tensor:
        return self.dense if self.dense is not None else dense_bias(self.by_offset, self.frames)

    def score_mod(self):
        by_offset, last = self.by_offset, self.frames - 1

        def add_relative_bias(score, batch, head, query, key):
            return score + by_offset[key - query + last, head].to(score.dtype)

        return add_relative_bias


_UINT32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (two multiply-xorshift rounds) of int64 tensors holding uint32 values."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _UINT32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _UINT32
    return (x >> 16) ^ x


def keep_threshold(dropout_p: float) -> int:
    """The hash value from which :func:`attention_keep` keeps an element: P(drop) = round(p * 2**32) / 2**32."""
    return round(dropout_p * 2**32)


def attention_keep(seed: torch.Tensor, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor,
                   key: torch.Tensor, heads: int, queries: int, threshold: int) -> torch.Tensor:
    """Whether flex attention's dropout keeps the probability of (``batch``, ``head``, ``query``, ``key``): a
    hash of the indices and ``seed`` at or above ``threshold`` (:func:`keep_threshold`). Elementwise on
    integer tensors (broadcast), so the kernel's ``score_mod`` and a materialised mask compute the same bits."""
    row = ((batch.long() * heads + head.long()) * queries + query.long()) & _UINT32
    return _mix32(_mix32(row ^ seed) ^ key.long()) >= threshold


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """The seed of one flex attention dropout mask: a 0-dim int64 tensor on ``device``, from torch's generator
    (no host synchronisation on a GPU)."""
    return torch.randint(0, 2**31 - 1, (), device=device)


def flex_dropout_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod, dropout_p: float,
                        seed: torch.Tensor):
    """Keys, values and ``score_mod`` for flex attention with dropout on its probabilities (module docstring):
    ``[k; k]``, ``[v; 0]``, and the score of a key in the copy that matches its keep bit (-inf in the other).
    The output is then ``dropout(softmax) v`` without the ``1 / (1 - p)`` scale."""
    heads, queries, keys = q.shape[1], q.shape[-2], k.shape[-2]
    threshold = keep_threshold(dropout_p)  # an int here: inside score_mod a float p would be traced as a tensor

    def score_with_dropout(score, b, h, query, key_copy):
        first = key_copy < keys
        key = torch.where(first, key_copy, key_copy - keys)
        keep = attention_keep(seed, b, h, query, key, heads, queries, threshold)
        return torch.where(keep == first, score_mod(score, b, h, query, key), float("-inf"))

    return torch.cat([k, k], dim=-2), torch.cat([v, torch.zeros_like(v)], dim=-2), score_with_dropout


def dense_bias(by_offset: torch.Tensor, frames: int) -> torch.Tensor:
    """``[2T - 1, heads]`` bias by offset -> the ``[1, heads, T, T]`` additive mask (query rows, key columns)."""
    position = torch.arange(frames, device=by_offset.device)
    offset_index = position[None, :] - position[:, None] + frames - 1
    return by_offset[offset_index].permute(2, 0, 1).unsqueeze(0)


def resolve_backend(backend: str, device: torch.device | str, has_bias: bool, dropout_p: float = 0.0) -> str:
    """The backend that :func:`attend` runs: ``"flex"`` or ``"sdpa"``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if not has_bias:
        return "sdpa"  # rotary / no bias: SDPA's fused kernels are the fast path
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" and dropout_p == 0.0 else "sdpa"
    return backend


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           dropout_p: float) -> torch.Tensor:
    """SDPA's math, ``dropout(softmax(q k^T / sqrt(d) + mask)) v``, with the mask of
    :func:`~vampnet_pl.model.dropout.keep_mask` (see :class:`_AttentionWithDropout`)."""
    return _AttentionWithDropout.apply(q, k, v, mask, random_lanes((*q.shape[:-1], k.shape[-2])), dropout_p)


class _AttentionWithDropout(torch.autograd.Function):
    """Attention with dropout on its probabilities, written for few passes over ``T x T`` memory.

    Autograd's version of the same math allocates about eight ``batch x heads x T x T`` tensors a layer
    (scores, probabilities, a float copy of the mask, dropped probabilities, and their gradients), each a
    fresh pass over memory. Here the forward pass keeps one (the probabilities, softmax in place over the
    scores) and one temporary (the dropped probabilities); the backward pass computes the gradient in one
    buffer (drop, softmax backward, both in place) and drops the saved probabilities in place for ``v``'s
    gradient. Saved for backward: q, k, v, the probabilities and the mask's 16-bit random lanes (2 bytes an
    element), from which each pass rebuilds the mask as 0/1 factors: a vectorised product, where a bool
    mask would be copied to floats or go through the slower ``torch.where``. The ``1 / (1 - p)`` scale is
    applied to the (smaller) output. Once differentiable; a second backward through a retained graph raises
    (the saved probabilities were modified).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, mask, lanes, dropout_p):
        scale = q.shape[-1] ** -0.5
        probs = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:
            probs.add_(mask)
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        ctx.save_for_backward(q, k, v, probs, lanes)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.mask_shape = mask.shape if mask is not None else None
        dropped = keep_factors(lanes, dropout_p, probs.dtype).mul_(probs)  # the factors' buffer, reused
        return (dropped @ v).mul_(keep_scale(dropout_p))

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        q, k, v, probs, lanes = ctx.saved_tensors
        keep = keep_factors(lanes, ctx.dropout_p, probs.dtype)
        grad_out = grad_out * keep_scale(ctx.dropout_p)
        grad = grad_out @ v.transpose(-2, -1)  # d loss / d (dropped probabilities)
        grad.mul_(keep)  # / d probabilities
        torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=grad)  # / d scores
        grad_v = probs.mul_(keep).transpose(-2, -1) @ grad_out  # the probabilities are used up
        grad_q = (grad @ k).mul_(ctx.scale)
        grad_k = (grad.transpose(-2, -1) @ q).mul_(ctx.scale)
        grad_mask = grad.sum_to_size(ctx.mask_shape) if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_v, grad_mask, None, None


@functools.cache
def _compiled_flex_attention(backend="inductor"):
    """flex attention compiled once per process, with torch's automatic dynamic shapes (``dynamic=None``).

    Its first shape compiles with static sizes (a training run, one shape, keeps that graph); the
    first call with another batch size or length recompiles with the sizes that changed symbolic,
    so sampling (c2f batches of up to 64 chunks, partial batches, inputs of any length) compiles a
    few graphs, not one per shape. With ``dynamic=False`` every shape was a new graph, and after
    ``torch._dynamo.config.recompile_limit`` (8) of them flex ran its unfused path, materialising
    the full score matrix. ``backend``: for tests (a counting backend).
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None, backend=backend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, position_bias: RelativeBias | None = None,
           dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Bidirectional attention over ``[batch, heads, frames, head_dim]`` tensors -> same shape.

    ``dropout_p`` applies to attention probabilities (pass 0 outside training).
    """
    chosen = resolve_backend(backend, q.device, position_bias is not None, dropout_p)
    if chosen == "sdpa":
        mask = position_bias.materialise().to(q.dtype) if position_bias is not None else None
        if dropout_p > 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: SDPA's own
            return attention_with_dropout(q, k, v, mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    score_mod = position_bias.score_mod()
    if dropout_p > 0.0:
        k, v, score_mod = flex_dropout_inputs(q, k, v, score_mod, dropout_p, draw_dropout_seed(q.device))
    out = _flex(q, k, v, score_mod)
    if dropout_p == 0.0:
        return out
    return out * keep_scale(dropout_p)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod) -> torch.Tensor:
    if q.device.type != "cpu":
        if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
            from torch.nn.attention.flex_attention import flex_attention

            return flex_attention(q, k, v, score_mod=score_mod)
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod)
    from torch.nn.attention.flex_attention import flex_attention  # CPU: torch's unfused reference, for checks

    try:
        return flex_attention(q, k, v, score_mod=score_mod)
    except NotImplementedError as err:  # torch 2.11: no flex backward on CPU
        raise NotImplementedError(f"{err} (set model.attention_backend=auto or sdpa to train on CPU)") from err
