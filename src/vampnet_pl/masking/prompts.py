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
    noise = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device,
                       dtype=torch.float32)
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
    """Rounded to the nearest frame (the original's ``Interface.s2t`` rounds up)."""
    return int(round(seconds * frame_rate))


def periodic(
    shape, period: int, width: int = 1, random_roll: bool = False, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Keep ``width`` frames centred on every ``period``-th frame (VampNet's periodic prompt).

    The centres are frames 0, P, 2P, ... or, with ``random_roll``, shifted by a random phase in
    [0, P) per example. ``width`` frames run from ``centre - width // 2`` (an even width has one
    more frame before the centre than after; the original keeps ``width + 1`` frames then).
    ``period`` 0 keeps nothing: unconditional generation. The original's ``random_roll`` rolls the whole mask by
    one offset for the batch (``torch.roll``): frames rolled past the end come back at the start, so the kept
    frames are not periodic across that seam when ``period`` does not divide the frame count; ours shifts the centres.
    """
    if period < 0 or width < 0:
        raise ValueError(f"period and width must be >= 0, got period={period}, width={width}")
    batch, _, frames = shape
    if period == 0:
        return full_mask(shape, device)
    phase = torch.zeros(batch, dtype=torch.long, device=device)
    if random_roll:
        source = generator.device if generator is not None else device
        phase = torch.randint(0, period, (batch,), generator=generator, device=source).to(device)
    centre = (torch.arange(frames, device=device)[None] - phase[:, None]) % period == 0  # [batch, frames]
    kept = torch.zeros_like(centre)
    for offset in range(-(width // 2), width - width // 2):  # dilate each centre to its width, clipped at the ends
        if abs(offset) >= frames:  # wider than the signal: this shift moves every centre out of it
            continue
        if offset < 0:
            kept[:, : frames + offset] |= centre[:, -offset:]
        else:
            kept[:, offset:] |= centre[:, : frames - offset]
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


def compression(shape, n_keep_codebooks: int, period: int, random_roll: bool = False,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Keep ``n_keep_codebooks`` levels every ``period`` frames, generate the rest (VampNet's compression prompt)."""
    return mask_codebooks(periodic(shape, period, random_roll=random_roll, generator=generator, device=device),
                          n_keep_codebooks)


def dropout(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additionally mask each kept token with probability ``p``."""
    noise = torch.rand(mask.shape, generator=generator, device=generator.device if generator else mask.device,
                       dtype=torch.float32)
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


def frames_to_mask(shape, kept_frames, width: int = 1, device=None, before: int = 0) -> torch.Tensor:
    """Keep ``width`` frames starting ``before`` frames ahead of each of ``kept_frames`` (clipped at the ends): one
    list for every example, or one list per example (a list of ``batch`` arrays)."""
    if width < 0 or before < 0:
        raise ValueError(f"width and before must be >= 0, got width={width}, before={before}")
    batch, codebooks, frames = shape
    per_example = isinstance(kept_frames, (list, tuple)) and len(kept_frames) == batch and all(
        isinstance(f, (list, tuple, np.ndarray)) for f in kept_frames)
    rows = kept_frames if per_example else [kept_frames] * batch
    kept = torch.zeros(batch, frames, dtype=torch.bool, device=device)
    for row, row_frames in enumerate(rows):
        for frame in np.asarray(row_frames, dtype=int).reshape(-1):
            start = frame - before
            kept[row, max(0, start) : max(0, start + width)] = True
    return (~kept)[:, None, :].expand(batch, codebooks, frames).clone()


def onset_frames(audio: np.ndarray, sample_rate: int, hop_length: int) -> np.ndarray:
    """Codec frames at note onsets of ``audio`` (librosa onset detection at the codec's hop)."""
    import librosa

    return librosa.onset.onset_detect(y=np.asarray(audio, np.float32), sr=sample_rate, hop_length=hop_length, units="frames")


def beat_frames(audio: np.ndarray, sample_rate: int, hop_length: int) -> np.ndarray:
    """Codec frames at beats of ``audio`` (librosa beat tracking at the codec's hop)."""
    import librosa

    _, beats = librosa.beat.beat_track(y=np.asarray(audio, np.float32), sr=sample_rate, hop_length=hop_length, units="frames")
    return np.asarray(beats, dtype=int)


def _per_example(detect, shape, audio: np.ndarray, sample_rate: int, hop_length: int) -> list[np.ndarray]:
    """``detect`` on each example's own audio: ``audio`` ``[samples]`` (the same for all) or ``[batch, samples]``."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        return [detect(audio, sample_rate, hop_length)] * shape[0]
    if audio.ndim != 2 or audio.shape[0] != shape[0]:
        raise ValueError(f"audio for a beat/onset prompt must be [samples] or [{shape[0]}, samples], got {audio.shape}")
    return [detect(row, sample_rate, hop_length) for row in audio]


def onset_prompt(shape, audio: np.ndarray, sample_rate: int, hop_length: int, width: int = 1, device=None,
                 before: int = 0) -> torch.Tensor:
    """Keep ``width`` frames, from ``before`` frames ahead of each onset of each example's audio (``[samples]`` or
    ``[batch, samples]``). The original's ``onset_mask(width=w)`` keeps ``2w`` frames from ``w`` ahead: ``width=2w,
    before=w`` (its detector is madmom's RNN, ours librosa's; an onset within ``w`` frames of the start keeps nothing
    there, a negative slice, where ours keeps the frames from 0)."""
    return frames_to_mask(shape, _per_example(onset_frames, shape, audio, sample_rate, hop_length), width, device, before)


def beat_prompt(shape, audio: np.ndarray, sample_rate: int, hop_length: int, width: int = 1, device=None,
                before: int = 0) -> torch.Tensor:
    """Keep ``width`` frames, from ``before`` frames ahead of each beat of each example's audio (``[samples]`` or
    ``[batch, samples]``)."""
    return frames_to_mask(shape, _per_example(beat_frames, shape, audio, sample_rate, hop_length), width, device, before)
