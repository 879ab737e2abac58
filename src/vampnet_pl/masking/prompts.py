"""Prompt masks for generation: which tokens of a real signal are kept as the prompt.

Each builder returns a bool mask ``[batch, codebooks, frames]`` (True = generate). Combine
them with :func:`keep_union` / :func:`keep_intersection` and restrict with the codebook helpers.
"""

from __future__ import annotations

import numpy as np
import torch


def full_mask(shape, device=None) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool, device=device)


def random_prompt(shape, ratio: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Mask each token independently with probability ``ratio``."""
    noise = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return (noise < ratio).to(device)


def inpaint(shape, prefix_frames: int = 0, suffix_frames: int = 0, device=None) -> torch.Tensor:
    """Keep the first ``prefix_frames`` and the last ``suffix_frames`` frames; generate the middle."""
    mask = full_mask(shape, device)
    frames = shape[-1]
    mask[..., : max(0, min(prefix_frames, frames))] = False
    if suffix_frames > 0:
        mask[..., max(0, frames - suffix_frames) :] = False
    return mask


def seconds_to_frames(seconds: float, frame_rate: float) -> int:
    return int(round(seconds * frame_rate))


def periodic(
    shape, period: int, width: int = 1, random_roll: bool = False, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Keep ``width`` frames every ``period`` frames (VampNet's periodic prompt), optionally at a random phase."""
    if period < 1:
        raise ValueError("period must be at least 1")
    batch, _, frames = shape
    phase = torch.zeros(batch, dtype=torch.long, device=device)
    if random_roll:
        phase = torch.randint(0, period, (batch,), generator=generator, device=generator.device if generator else device).to(device)
    position = (torch.arange(frames, device=device)[None] + phase[:, None]) % period
    kept = position < width  # [batch, frames]
    return (~kept)[:, None, :].expand(shape).clone()


def keep_codebooks(mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep (unmask) the first ``n_keep`` codebook levels everywhere."""
    mask = mask.clone()
    mask[:, :n_keep] = False
    return mask


def mask_codebooks(mask: torch.Tensor, from_level: int) -> torch.Tensor:
    """Mask every codebook level from ``from_level`` up."""
    mask = mask.clone()
    mask[:, from_level:] = True
    return mask


def compression(shape, n_keep_codebooks: int, period: int, device=None) -> torch.Tensor:
    """Keep ``n_keep_codebooks`` levels every ``period`` frames, generate the rest (VampNet's compression prompt)."""
    return mask_codebooks(periodic(shape, period, device=device), n_keep_codebooks)


def dropout(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additionally mask each kept token with probability ``p``."""
    noise = torch.rand(mask.shape, generator=generator, device=generator.device if generator else mask.device)
    return mask | (noise.to(mask.device) < p)


def keep_union(*masks: torch.Tensor) -> torch.Tensor:
    """A token is kept if any mask keeps it."""
    out = masks[0]
    for mask in masks[1:]:
        out = out & mask
    return out


def keep_intersection(*masks: torch.Tensor) -> torch.Tensor:
    """A token is kept only if every mask keeps it."""
    out = masks[0]
    for mask in masks[1:]:
        out = out | mask
    return out


def frames_to_mask(shape, kept_frames: np.ndarray | list[int], width: int = 1, device=None) -> torch.Tensor:
    """Keep ``width`` frames starting at each of ``kept_frames``; the same for every example."""
    batch, codebooks, frames = shape
    kept = torch.zeros(frames, dtype=torch.bool, device=device)
    for frame in np.asarray(kept_frames, dtype=int):
        kept[max(0, frame) : max(0, frame) + width] = True
    return (~kept)[None, None, :].expand(batch, codebooks, frames).clone()


def onset_frames(audio: np.ndarray, sample_rate: int, hop_length: int) -> np.ndarray:
    """Codec frames at note onsets of ``audio`` (librosa onset detection at the codec's hop)."""
    import librosa

    return librosa.onset.onset_detect(y=np.asarray(audio, np.float32), sr=sample_rate, hop_length=hop_length, units="frames")


def beat_frames(audio: np.ndarray, sample_rate: int, hop_length: int) -> np.ndarray:
    """Codec frames at beats of ``audio`` (librosa beat tracking at the codec's hop)."""
    import librosa

    _, beats = librosa.beat.beat_track(y=np.asarray(audio, np.float32), sr=sample_rate, hop_length=hop_length, units="frames")
    return np.asarray(beats, dtype=int)


def onset_prompt(shape, audio: np.ndarray, sample_rate: int, hop_length: int, width: int = 1, device=None) -> torch.Tensor:
    return frames_to_mask(shape, onset_frames(audio, sample_rate, hop_length), width, device)


def beat_prompt(shape, audio: np.ndarray, sample_rate: int, hop_length: int, width: int = 1, device=None) -> torch.Tensor:
    return frames_to_mask(shape, beat_frames(audio, sample_rate, hop_length), width, device)
