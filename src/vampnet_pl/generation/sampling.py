"""Iterative parallel decoding (MaskGIT / VampNet): pure functions over a model, no Lightning.

Each pass predicts every masked token, samples, then re-masks the least confident of the newly
sampled tokens so that ``schedule(pass / passes)`` of each example's originally masked tokens
stay masked. Gumbel noise on the confidences, annealed to zero over the passes, keeps early
passes exploratory ("mask temperature"). Prompt (unmasked) tokens are never changed, and the
schedule is computed per example, so a batch of prompts with different masked counts decodes
correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vampnet_pl.masking.schedules import get_schedule


@dataclass
class SamplingConfig:
    passes: int = 24
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None  # locally typical sampling (Meister et al. 2022)
    mask_temperature: float = 10.5  # scale of the Gumbel noise on confidences at the first pass
    schedule: str = "cosine"
    argmax_from: Optional[float] = None  # fraction of passes after which tokens are taken by argmax
    seed: Optional[int] = None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  typical_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k / nucleus (top-p) / typical set (last axis)."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits[logits < threshold] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(remove, -float("inf")))
    if typical_p is not None and typical_p < 1.0:
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(0.0)).sum(-1, keepdim=True)
        surprise_gap = (-log_probs - entropy).abs()
        gap_sorted, order = surprise_gap.sort(dim=-1)
        cumulative = probs.gather(-1, order).cumsum(-1)
        remove = cumulative - probs.gather(-1, order) >= typical_p
        removed = torch.zeros_like(remove).scatter(-1, order, remove)
        logits = logits.masked_fill(removed, -float("inf"))
    return logits


def _gumbel(shape, generator, device) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    codes: torch.Tensor,
    mask: torch.Tensor,
    cfg: SamplingConfig,
    n_conditioning: int = 0,
) -> torch.Tensor:
    """Fill the masked tokens of ``codes`` ``[B, K, T]`` (``mask`` True = generate) in ``cfg.passes`` passes.

    ``model(codes, mask)`` returns logits ``[B, K - n_conditioning, T, V]``. Conditioning codebooks
    are never generated.
    """
    device = codes.device
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    schedule = get_schedule(cfg.schedule)
    codes, mask = codes.clone(), mask.clone()
    mask[:, :n_conditioning] = False
    batch = codes.shape[0]
    initial = mask[:, n_conditioning:].flatten(1).sum(1)  # [B] masked count per example
    for step in range(cfg.passes):  # always every pass: sharded models need the same calls on every rank
        progress = (step + 1) / cfg.passes
        logits = model(codes, mask).float()  # [B, P, T, V]
        filtered = filter_logits(logits / max(cfg.temperature, 1e-5), cfg.top_k, cfg.top_p, cfg.typical_p)
        if cfg.argmax_from is not None and progress > cfg.argmax_from:
            sampled = filtered.argmax(-1)
        else:
            noise = _gumbel(filtered.shape, generator, device)
            sampled = (filtered + noise).argmax(-1)  # Gumbel-max: a sample from softmax(filtered)
        confidence = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)  # [B, P, T]
        predicted_mask = mask[:, n_conditioning:]
        target = codes[:, n_conditioning:]
        target[predicted_mask] = sampled[predicted_mask]
        # How many stay masked after this pass, per example.
        keep_masked = (schedule(torch.full((batch,), progress, device=device)) * initial).floor().long()
        anneal = cfg.mask_temperature * (1 - progress)
        score = confidence + anneal * _gumbel(confidence.shape, generator, device)
        score = score.masked_fill(~predicted_mask, float("inf")).flatten(1)  # prompt tokens never re-masked
        rank = score.argsort(dim=1).argsort(dim=1)
        remask = (rank < keep_masked[:, None]).view_as(predicted_mask) & predicted_mask
        mask[:, n_conditioning:] = remask
    return codes
