"""What a training run masks: one dataclass, one function."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vampnet_pl.masking.schedules import RatioSampler, get_schedule
from vampnet_pl.masking.training import TRAINING_MASKS


@dataclass
class MaskingConfig:
    schedule: str = "cosine"  # see masking.schedules.SCHEDULES
    sampler: str = "uniform"  # uniform | sobol
    kind: str = "random"  # random | span | codebook_level
    span_frames: int = 8  # for kind=span
    seed: int = 0


class TrainingMasker:
    """Draws r per example, maps it through the schedule, builds the mask; returns (mask, ratios)."""

    def __init__(self, cfg: MaskingConfig, n_conditioning: int):
        if cfg.kind not in TRAINING_MASKS:
            raise ValueError(f"unknown masking kind {cfg.kind!r}; known: {sorted(TRAINING_MASKS)}")
        self.cfg, self.n_conditioning = cfg, n_conditioning
        self.schedule = get_schedule(cfg.schedule)
        self.sampler = RatioSampler(cfg.sampler)

    def __call__(
        self, codes: torch.Tensor, generator: torch.Generator | None = None, r: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if r is None:
            r = self.sampler(codes.shape[0], generator, codes.device)
        ratios = self.schedule(r).clamp(0, 1)
        build = TRAINING_MASKS[self.cfg.kind]
        if self.cfg.kind == "span":
            mask = build(codes.shape, ratios, self.cfg.span_frames, self.n_conditioning, generator)
        else:
            mask = build(codes.shape, ratios, self.n_conditioning, generator)
        return mask, ratios
