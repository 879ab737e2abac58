"""Pure helpers that cut fixed-length windows of codes out of variable-length samples."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def window_frames(window_seconds: float, sample_rate: int, hop_length: int) -> int:
    """Frames in a window of ``window_seconds`` for a codec of this rate and hop."""
    frames = int(round(window_seconds * sample_rate / hop_length))
    if frames < 1:
        raise ValueError(f"window of {window_seconds} s is shorter than one codec frame")
    return frames


def random_window_starts(n_frames: int, length: int, max_windows: int, rng: random.Random) -> list[int]:
    """Up to ``max_windows`` random starts (one per ``length`` frames available); none if too short."""
    if n_frames < length:
        return []
    count = max(1, min(max_windows, n_frames // length))
    return [rng.randint(0, n_frames - length) for _ in range(count)]


def fixed_window_starts(n_frames: int, length: int, max_windows: int) -> list[int]:
    """Deterministic, non-overlapping starts from the beginning of the sample."""
    return [i * length for i in range(min(max_windows, n_frames // length))]


def collate_windows(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch ``{"codes": LongTensor[batch, codebooks, frames]}``."""
    return {"codes": torch.from_numpy(np.stack(windows).astype(np.int64))}


def window_loudness(track: list[float], start: int, length: int, frame_rate: float) -> float:
    """Loudness (LUFS) of frames ``[start, start + length)`` from a per-second loudness track: the
    power mean of the seconds the window touches (BS.1770 without its relative gate)."""
    first, last = int(start // frame_rate), int(math.ceil((start + length) / frame_rate))
    values = np.asarray(track[first:last], dtype=np.float64)
    if values.size == 0:
        return -math.inf
    return float(10 * np.log10(np.mean(10 ** (values / 10))))
