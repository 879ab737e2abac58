"""Generation: prompt -> coarse tokens -> fine tokens (c2f) -> audio. No Lightning here.

Signals longer than a model's training window are generated in overlapping windows: each
window's first ``overlap`` frames are the end of the previous window's output, kept as prompt,
so every token is written exactly once and no context is duplicated at the seams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vampnet_pl.codec import Codec
from vampnet_pl.model import VampNet
from vampnet_pl.generation.sampling import SamplingConfig, sample


class CodecMismatch(ValueError):
    """A model trained on tokens of another codec than the one given."""


def sample_windowed(model: VampNet, codes: torch.Tensor, mask: torch.Tensor, cfg: SamplingConfig, window: int,
                    overlap: int, n_conditioning: int = 0) -> torch.Tensor:
    """:func:`sample` over ``[B, K, T]`` in windows of ``window`` frames overlapping by ``overlap``."""
    frames = codes.shape[-1]
    if frames <= window:
        return sample(model, codes, mask, cfg, n_conditioning)
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window): {overlap} vs {window}")
    codes, mask = codes.clone(), mask.clone()
    start = 0
    while True:
        stop = min(start + window, frames)
        start = max(0, stop - window)  # the last window is full length, its head taken from the previous one
        window_mask = mask[..., start:stop].clone()
        codes[..., start:stop] = sample(model, codes[..., start:stop], window_mask, cfg, n_conditioning)
        mask[..., start:stop] = False  # generated: the next window's context
        if stop == frames:
            return codes
        start = stop - overlap


@dataclass
class GenerationConfig:
    coarse: SamplingConfig = field(default_factory=lambda: SamplingConfig(passes=24))
    c2f: SamplingConfig = field(default_factory=lambda: SamplingConfig(passes=12, mask_temperature=1.0))
    window_seconds: float = 10.0  # the models' training window
    overlap_seconds: float = 2.0


class VampPipeline:
    """Coarse model + optional c2f model + codec: token prompts in, audio out."""

    def __init__(self, coarse: VampNet, c2f: VampNet | None, codec: Codec, cfg: GenerationConfig | None = None):
        for name, model in (("coarse", coarse), ("c2f", c2f)):
            if model is not None and model.cfg.codec_fingerprint != codec.fingerprint:
                raise CodecMismatch(f"the {name} model was trained on codec {model.cfg.codec_fingerprint[:16]}, "
                                    f"the codec given is {codec.fingerprint[:16]}")
        if c2f is not None and c2f.cfg.n_conditioning_codebooks != coarse.cfg.n_codebooks:
            raise ValueError(f"c2f is conditioned on {c2f.cfg.n_conditioning_codebooks} codebooks, "
                             f"the coarse model makes {coarse.cfg.n_codebooks}")
        self.coarse, self.c2f, self.codec = coarse.eval(), c2f.eval() if c2f is not None else None, codec
        self.cfg = cfg or GenerationConfig()

    @property
    def n_codebooks(self) -> int:
        return (self.c2f or self.coarse).cfg.n_codebooks

    def generate(self, codes: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[B, >=n_codebooks, T]``, ``prompt_mask`` ``[B, K_coarse, T]`` -> ``[B, n_codebooks, T]``."""
        window = self.codec.frames_for(self.cfg.window_seconds)
        overlap = min(self.codec.frames_for(self.cfg.overlap_seconds), window - 1)
        n_coarse = self.coarse.cfg.n_codebooks
        coarse = sample_windowed(self.coarse, codes[:, :n_coarse].long(), prompt_mask[:, :n_coarse], self.cfg.coarse,
                                 window, overlap)
        if self.c2f is None:
            return coarse
        full = torch.zeros(codes.shape[0], self.c2f.cfg.n_codebooks, codes.shape[-1], dtype=torch.long)
        full[:, :n_coarse] = coarse
        fine_mask = torch.ones_like(full, dtype=torch.bool)
        fine_mask[:, :n_coarse] = False
        return sample_windowed(self.c2f, full, fine_mask, self.cfg.c2f, window, 0, n_conditioning=n_coarse)

    def to_audio(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(codes)
