"""What the training-time callback and the offline eval app share: reference points and scoring."""

from __future__ import annotations

import itertools

import torch
from torchmetrics import SumMetric

from vampnet_pl.evaluation.metrics import (DACMelDistance, FrechetAudioDistance, KernelAudioDistance, MelDistance,
                                           VampNetMelDistance)
from vampnet_pl.masking import prompts

# The scores of one set of generated audio, in this order (see evaluation.protocol for the logged names).
SCORES = ("mel", "mel_dac", "mel_vampnet", "fad", "kad", "n_embeddings")


def noisy_tokens(codes: torch.Tensor, ratio: float, codebook_size: int, n_conditioning: int,
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """The noisy-token baseline: a fraction ``ratio`` of the (non-conditioning) tokens replaced at random,
    each example's from its own generator."""
    shape = (1, *codes.shape[1:])
    noise = torch.cat([torch.randint(0, codebook_size, shape, generator=g) for g in generators]).to(codes.device)
    replace = torch.cat([prompts.random_prompt(shape, ratio, g) for g in generators]).to(codes.device)
    replace[:, :n_conditioning] = False
    return torch.where(replace, noise, codes)


def check_embedding_count(embed: torch.nn.Module, n_windows: int, samples: int, sample_rate: int, fix: str,
                          device: torch.device | str = "cpu") -> int:
    """The embeddings per side that ``n_windows`` windows of ``samples`` give (FAD and KAD need at least 2), found
    from one silent window; else a ValueError that says what to change (``fix``) before any audio is generated."""
    seconds = samples / sample_rate
    try:
        with torch.no_grad():
            per_window = embed(torch.zeros(1, samples, device=device)).shape[0]
    except ValueError as err:  # a window shorter than one embedding patch
        raise ValueError(f"{seconds:.2f} s evaluation windows are too short for the FAD embedding ({err}): {fix}") from None
    if n_windows * per_window < 2:
        raise ValueError(f"{n_windows} evaluation window(s) of {seconds:.2f} s give {n_windows * per_window} embedding(s) "
                         f"per side; FAD and KAD need at least 2: {fix}")
    return n_windows * per_window


def module_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where ``module``'s parameters (or buffers) live; ``default`` for a module without either."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device(default)


def score(audio: torch.Tensor, reference: torch.Tensor, sample_rate: int, embed: torch.nn.Module) -> dict[str, float]:
    """Every score of ``audio`` against ``reference`` (``[N, samples]``): mel distance (this project's, DAC's and
    VampNet's configuration), FAD and KAD with the ``embed`` backend, and the number of embeddings behind them.

    Computed where ``embed`` lives (a GPU, while decoded audio comes back on the CPU); the embedding stays there."""
    device = module_device(embed, reference.device)
    audio, reference = audio.to(device), reference.to(device)
    mels = {"mel": MelDistance(sample_rate), "mel_dac": DACMelDistance(sample_rate),
            "mel_vampnet": VampNetMelDistance(sample_rate)}
    # given the embeddings, not the embedding: a metric's .to() would move its embed (the caller's) with it
    fad, kad = FrechetAudioDistance(None, embed.dim).to(device), KernelAudioDistance(None).to(device)
    with torch.no_grad():
        real, fake = embed(reference), embed(audio)
    for metric in (fad, kad):
        metric.update(real=True, embeddings=real)
        metric.update(real=False, embeddings=fake)
    scores = {}
    for name, metric in mels.items():
        metric = metric.to(device)
        metric.update(audio, reference)
        scores[name] = float(metric.compute())
    embeddings = SumMetric().to(device)  # over every rank, as the scores are (torchmetrics syncs at compute)
    embeddings.update(fake.shape[0])
    scores.update({"fad": float(fad.compute()), "kad": float(kad.compute()), "n_embeddings": int(embeddings.compute())})
    return scores
