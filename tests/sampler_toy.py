"""A deterministic stand-in for a token model, for comparing samplers: the logits of a frame are a
fixed random function of that frame's and the previous frame's tokens (the mask token counts as
token ``vocab``), plus a per-position term. Used by ``scripts/make_sampler_fixture.py`` (around the
original VampNet's ``generate``) and by ``tests/test_sampling.py`` (around ours)."""

from __future__ import annotations

import torch


def toy_tables(n_codebooks: int, n_predicted: int, vocab: int, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "same_frame": torch.randn(n_codebooks, vocab + 1, n_predicted, vocab, generator=generator),
        "previous_frame": torch.randn(n_codebooks, vocab + 1, n_predicted, vocab, generator=generator) * 0.5,
        "position": torch.randn(frames, n_predicted, vocab, generator=generator),
    }


def toy_logits(tables: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``[B, K, T]`` with masked positions set to ``vocab`` -> logits ``[B, P, T, V]``."""
    previous = torch.roll(tokens, 1, dims=-1)
    logits = tables["position"][None].clone()  # [1, T, P, V]
    for k in range(tokens.shape[1]):
        logits = logits + tables["same_frame"][k][tokens[:, k]] + tables["previous_frame"][k][previous[:, k]]
    return logits.permute(0, 2, 1, 3)


class ToyModel:
    """Our sampler's model interface: ``model(codes, mask)`` -> logits ``[B, P, T, V]``."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables, self.vocab = tables, tables["position"].shape[-1]

    def __call__(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return toy_logits(self.tables, codes.masked_fill(mask, self.vocab))
