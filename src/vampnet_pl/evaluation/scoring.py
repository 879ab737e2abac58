"""What the training-time callback and the offline eval app share: reference points and scoring."""

from __future__ import annotations

import torch

from vampnet_pl.masking import prompts
from vampnet_pl.evaluation.metrics import FrechetAudioDistance, MelDistance


def noisy_tokens(codes: torch.Tensor, ratio: float, codebook_size: int, n_conditioning: int,
                 generator: torch.Generator) -> torch.Tensor:
    """The noisy-token baseline: a fraction ``ratio`` of the (non-conditioning) tokens replaced at random."""
    noise = torch.randint(0, codebook_size, codes.shape, generator=generator).to(codes.device)
    replace = prompts.random_prompt(codes.shape, ratio, generator).to(codes.device)
    replace[:, :n_conditioning] = False
    return torch.where(replace, noise, codes)


def score(audio: torch.Tensor, reference: torch.Tensor, sample_rate: int, embed: torch.nn.Module) -> dict[str, float]:
    """Mel distance, and FAD with the ``embed`` backend, of ``audio`` against ``reference`` (``[N, samples]``)."""
    mel = MelDistance(sample_rate).to(reference.device)
    fad = FrechetAudioDistance(embed, embed.dim).to(reference.device)
    mel.update(audio, reference)
    fad.update(reference, real=True)
    fad.update(audio, real=False)
    return {"mel_distance": float(mel.compute()), "fad": float(fad.compute())}
