"""Training masks: which tokens the model must predict for one batch. Pure tensor functions.

All take the codes' shape ``[batch, codebooks, frames]``, per-example mask ratios ``[batch]``,
and the number of conditioning codebooks (the first ones), which are never masked.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """float32 whatever the default dtype (bf16 inside Lightning's ``bf16-true`` steps would make the draws coarse)."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float32).to(device)


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


def bernoulli_mask(shape, ratios: torch.Tensor, n_conditioning: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The original VampNet's training mask (``vampnet/mask.py`` ``random``): each predicted token masked independently
    with probability ``ratio``, so the masked count varies around ``ratio * n``. An example left with no masked token
    gets one, at random (the original keeps it empty; a batch with none at all would make its loss NaN)."""
    batch, codebooks, frames = shape
    scores = _rand((batch, codebooks - n_conditioning, frames), generator, ratios.device)
    predicted = scores < ratios[:, None, None]
    empty = ~predicted.flatten(1).any(1)
    lowest = scores.flatten(1).argmin(1)  # uniformly random position: the rescue token of an empty example
    predicted.view(batch, -1)[empty, lowest[empty]] = True
    mask = torch.zeros(shape, dtype=torch.bool, device=ratios.device)
    mask[:, n_conditioning:] = predicted
    return mask


def span_mask(
    shape, ratios: torch.Tensor, span_frames: int, n_conditioning: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAGNeT-style: whole spans of ``span_frames`` frames (all predicted codebooks), at a random phase, taken in
    random order until exactly ``round(ratio * frames)`` frames (at least one) are masked; the last span taken is
    cut to fit, and so is the window's last span when ``span_frames`` does not divide ``frames``."""
    batch, codebooks, frames = shape
    device = ratios.device
    n_spans = -(-frames // span_frames)
    lengths = (frames - torch.arange(n_spans, device=device) * span_frames).clamp(max=span_frames)
    order = _rand((batch, n_spans), generator, device).argsort(dim=1)  # the spans in the order they are taken
    in_order = lengths[order]
    before = torch.empty_like(order).scatter_(1, order, in_order.cumsum(1) - in_order)  # frames taken before each
    target = (ratios * frames).round().clamp(1, frames).long()
    taken = (target[:, None] - before).clamp(min=0).minimum(lengths)  # [batch, n_spans] frames masked in each span
    position = torch.arange(frames, device=device)
    timeline = position % span_frames < taken[:, position // span_frames]
    shift = (_rand((batch,), generator, device) * span_frames).long()
    index = (position[None] - shift[:, None]) % frames  # a random phase
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


@lru_cache(maxsize=32)
def magnet_expected_fractions(frames: int, span_frames: int) -> torch.Tensor:
    """Expected masked fraction of ``frames`` frames when ``u`` distinct span starts (u = 0..frames) are
    drawn uniformly and each masks ``span_frames`` frames from its start (clipped at the end).

    Frame t is covered by the n_t = min(t + 1, span) starts just before it, so it stays unmasked
    with probability C(frames - n_t, u) / C(frames, u); spans may overlap (MAGNeT, Ziv et al. 2024).
    """
    u = torch.arange(frames + 1, dtype=torch.float64)[:, None]
    n_t = torch.clamp(torch.arange(frames, dtype=torch.float64) + 1, max=span_frames)[None]
    free = frames - n_t
    log_choose = lambda n, k: torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)  # noqa: E731
    log_unmasked = log_choose(free, u) - log_choose(torch.tensor(float(frames), dtype=torch.float64), u)
    unmasked = torch.where(u <= free, log_unmasked.exp(), torch.zeros(()))
    return (1 - unmasked.mean(1)).clamp(0, 1)  # [frames + 1], increasing in u


def magnet_span_counts(ratios: torch.Tensor, frames: int, span_frames: int) -> torch.Tensor:
    """MAGNeT's rate-to-span-count mapping: the number of spans (at least one) whose expected masked
    fraction, overlaps accounted for, is closest to each ratio."""
    expected = magnet_expected_fractions(frames, span_frames).to(ratios.device)
    distance = (expected[None, 1:] - ratios.double()[:, None]).abs()
    return distance.argmin(1) + 1


def magnet_span_mask(
    shape, ratios: torch.Tensor, span_frames: int, n_conditioning: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAGNeT span masking: ``magnet_span_counts`` distinct random starts, each masking ``span_frames``
    frames of every predicted codebook; spans may overlap, the count is chosen so the expected fraction is the ratio."""
    batch, codebooks, frames = shape
    counts = magnet_span_counts(ratios, frames, span_frames)
    scores = _rand((batch, frames), generator, ratios.device)
    starts = (scores.argsort(dim=1).argsort(dim=1) < counts[:, None]).long()
    covered = starts.cumsum(1)
    covered = covered - torch.nn.functional.pad(covered, (span_frames, 0))[:, :frames]  # starts in (t - span, t]
    mask = (covered > 0)[:, None, :].expand(batch, codebooks, frames).clone()
    return _keep_conditioning(mask, n_conditioning)


def per_level_mask(
    shape, level_ratios: torch.Tensor, n_conditioning: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each predicted level masked at its own ratio (``level_ratios`` ``[batch, predicted levels]``), exactly
    ``round(ratio * frames)`` frames of it at random; at least one token per example."""
    batch, codebooks, frames = shape
    levels = codebooks - n_conditioning
    if level_ratios.shape != (batch, levels):
        raise ValueError(f"level_ratios must be [batch, predicted levels] = {[batch, levels]}, got {list(level_ratios.shape)}")
    scores = _rand((batch, levels, frames), generator, level_ratios.device)
    counts = (level_ratios * frames).round().clamp(0, frames).long()
    counts[:, -1] += (counts.sum(1) == 0).long()  # never an empty mask: one token of the top level
    predicted = scores.argsort(dim=2).argsort(dim=2) < counts[..., None]
    mask = torch.zeros(shape, dtype=torch.bool, device=level_ratios.device)
    mask[:, n_conditioning:] = predicted
    return mask


# Kinds of training mask, by name (``masking.kind``); see masking.config.TrainingMasker for their arguments.
TRAINING_MASKS = {"random": random_mask, "bernoulli": bernoulli_mask, "span": span_mask,
                  "magnet_span": magnet_span_mask, "codebook_level": codebook_level_mask, "per_level": per_level_mask}
