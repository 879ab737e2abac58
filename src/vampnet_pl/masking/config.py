"""What a training run masks: one dataclass, one masker.

Names (Hydra ``masking.*``): ``schedule`` one of ``masking.schedules.SCHEDULES``; ``sampler``
``uniform|sobol``; ``kind`` one of ``masking.training.TRAINING_MASKS``:

- ``random``: tokens at random, exactly the ratio (this project's default);
- ``bernoulli``: each token independently with probability the ratio (the original VampNet's training mask);
- ``span``: non-overlapping spans of ``span_frames`` frames at a random phase, exactly round(ratio x frames)
  frames in all (the last span taken cut to fit);
- ``magnet_span``: MAGNeT span masking, overlapping spans of ``span_frames``, span count from the rate;
- ``codebook_level``: one level at the ratio, every level above it fully masked;
- ``per_level``: each predicted level its own schedule (``level_schedules``), all of the same r.

Truncated schedules: ``r_min`` / ``r_max`` draw r from [r_min, r_max) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vampnet_pl.masking.schedules import SCHEDULES, RatioSampler, get_schedule, schedule_slope, truncate
from vampnet_pl.masking.training import TRAINING_MASKS


@dataclass
class MaskingConfig:
    schedule: str = "cosine"  # see masking.schedules.SCHEDULES
    sampler: str = "uniform"  # uniform | sobol
    kind: str = "random"  # random | bernoulli | span | magnet_span | codebook_level | per_level
    span_frames: int = 8  # for kind=span and kind=magnet_span
    level_schedules: list[str] = field(default_factory=list)  # kind=per_level: one per predicted level, the last repeats
    r_min: float = 0.0  # truncated schedule: r drawn from [r_min, r_max)
    r_max: float = 1.0

    def __post_init__(self) -> None:
        """Unknown names fail here, when the config is built (at compose time in the apps)."""
        for name in [self.schedule, *self.level_schedules]:
            if name not in SCHEDULES:
                raise ValueError(f"unknown masking schedule {name!r}; known: {sorted(SCHEDULES)}")
        if self.kind not in TRAINING_MASKS:
            raise ValueError(f"unknown masking kind {self.kind!r}; known: {sorted(TRAINING_MASKS)}")
        if self.sampler not in RatioSampler.KINDS:
            raise ValueError(f"unknown masking sampler {self.sampler!r}; known: {list(RatioSampler.KINDS)}")
        if self.span_frames < 1:
            raise ValueError(f"masking.span_frames must be at least 1, got {self.span_frames}")
        truncate(torch.zeros(1), self.r_min, self.r_max)  # checks the range


class MaskDraw(NamedTuple):
    mask: torch.Tensor  # [B, K, T] bool, True = masked
    ratios: torch.Tensor  # [B] masked fraction of the predicted tokens: span, codebook_level the mask's own, others expected
    r: torch.Tensor  # [B] the r behind it


class TrainingMasker:
    """Draws r per example, maps it through the schedule(s), builds the mask."""

    def __init__(self, cfg: MaskingConfig, n_conditioning: int):
        if cfg.kind not in TRAINING_MASKS:
            raise ValueError(f"unknown masking kind {cfg.kind!r}; known: {sorted(TRAINING_MASKS)}")
        self.cfg, self.n_conditioning = cfg, n_conditioning
        self.schedule = get_schedule(cfg.schedule)
        self.level_schedules = [get_schedule(name) for name in cfg.level_schedules] or [self.schedule]
        self.sampler = RatioSampler(cfg.sampler)

    def level_ratios(self, r: torch.Tensor, levels: int) -> torch.Tensor:
        """``[B, levels]``: level k masked at level_schedules[min(k, last)](r)."""
        pick = [self.level_schedules[min(k, len(self.level_schedules) - 1)] for k in range(levels)]
        return torch.stack([schedule(r) for schedule in pick], dim=1).clamp(0, 1)

    def expected_ratio(self, r: torch.Tensor, levels: int) -> torch.Tensor:
        """The expected masked fraction of the ``levels`` predicted levels' tokens at r. per_level: the mean over
        the levels (the last schedule repeating); codebook_level: a uniform level at the ratio, those above it whole."""
        if self.cfg.kind == "per_level":
            return self.level_ratios(r, levels).mean(1)
        ratio = self.schedule(r).clamp(0, 1)
        if self.cfg.kind == "codebook_level":
            return (ratio + (levels - 1) / 2) / levels
        return ratio

    def loss_weights(self, r: torch.Tensor, levels: int) -> torch.Tensor:
        """Masked-diffusion weights |d gamma / d r| per example, gamma the expected masked fraction of the
        ``levels`` predicted levels (see training.module, ``loss_weighting``)."""
        return schedule_slope(lambda x: self.expected_ratio(x, levels), r)

    def draw(self, codes: torch.Tensor, generator: torch.Generator | None = None, r: torch.Tensor | None = None) -> MaskDraw:
        """``r`` given: used as is; otherwise drawn from the sampler, truncated to [r_min, r_max)."""
        if r is None:
            r = truncate(self.sampler(codes.shape[0], generator, codes.device), self.cfg.r_min, self.cfg.r_max)
        shape, kind = codes.shape, self.cfg.kind
        build = TRAINING_MASKS[kind]
        if kind == "per_level":
            level_ratios = self.level_ratios(r, shape[1] - self.n_conditioning)
            return MaskDraw(build(shape, level_ratios, self.n_conditioning, generator), level_ratios.mean(1), r)
        ratios = self.schedule(r).clamp(0, 1)
        if kind in ("span", "magnet_span"):
            mask = build(shape, ratios, self.cfg.span_frames, self.n_conditioning, generator)
        else:
            mask = build(shape, ratios, self.n_conditioning, generator)
        # the mask's own fraction: codebook_level masks the levels above the drawn one whole; span rounds to frames
        if kind in ("codebook_level", "span"):
            ratios = mask[:, self.n_conditioning :].flatten(1).float().mean(1)
        return MaskDraw(mask, ratios, r)

    def __call__(
        self, codes: torch.Tensor, generator: torch.Generator | None = None, r: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draw = self.draw(codes, generator, r)
        return draw.mask, draw.ratios
