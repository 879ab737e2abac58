"""Training masks: which tokens the model must predict for one batch. Pure tensor functions.

All take the codes' shape ``[batch, codebooks, frames]``, per-example mask ratios ``[batch]``,
and the number of conditioning codebooks (the first ones), which are never masked.
"""

from __future__ import annotations

import torch


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _keep_conditioning(mask: torch.Tensor, n_conditioning: int) -> torch.Tensor:
    mask[:, :n_conditioning] = False
    return mask


def random_mask(shape, ratios: torch.Tensor, n_conditioning: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask exactly ``round(ratio * n)`` (at least one) of each example's predicted tokens, uniformly at random."""
    batch, codebooks, frames = shape
    n = (codebooks - n_conditioning) * frames
    scores = _rand((batch, n), generator, ratios.device)
    count = (ratios * n).round().clamp(1, n).long()
    rank = scores.argsort(dim=1).argsort(dim=1)  # 0..n-1, a random permutation per example
    predicted = (rank < count[:, None]).view(batch, codebooks - n_conditioning, frames)
    mask = torch.zeros(shape, dtype=torch.bool, device=ratios.device)
    mask[:, n_conditioning:] = predicted
    return mask


def span_mask(
    shape, ratios: torch.Tensor, span_frames: int, n_conditioning: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAGNeT-style: mask whole spans of ``span_frames`` frames (all predicted codebooks) covering ~ratio of time."""
    batch, codebooks, frames = shape
    n_spans = -(-frames // span_frames)
    scores = _rand((batch, n_spans), generator, ratios.device)
    count = (ratios * n_spans).round().clamp(1, n_spans).long()
    chosen = scores.argsort(dim=1).argsort(dim=1) < count[:, None]  # [batch, n_spans]
    timeline = chosen.repeat_interleave(span_frames, dim=1)[:, :frames]
    shift = (_rand((batch,), generator, ratios.device) * span_frames).long()
    index = (torch.arange(frames, device=ratios.device)[None] - shift[:, None]) % frames  # a random phase
    timeline = timeline.gather(1, index)
    mask = timeline[:, None, :].expand(batch, codebooks, frames).clone()
    return _keep_conditioning(mask, n_conditioning)


def codebook_level_mask(
    shape, ratios: torch.Tensor, n_conditioning: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One random level per example masked at its ratio, every higher level fully masked, lower ones kept."""
    batch, codebooks, frames = shape
    levels = n_conditioning + (_rand((batch,), generator, ratios.device) * (codebooks - n_conditioning)).long()
    partial = random_mask((batch, 1, frames), ratios, 0, generator)  # [batch, 1, frames]
    level_index = torch.arange(codebooks, device=ratios.device)[None, :, None]
    chosen = level_index == levels[:, None, None]
    return (chosen & partial) | (level_index > levels[:, None, None])


TRAINING_MASKS = {"random": random_mask, "span": span_mask, "codebook_level": codebook_level_mask}
