"""Named prompt presets (``periodic:16``, ``prefix:1.0``, ``beat:2`` ...), as the vamp command,
the evaluation callback and the eval app take them.

``periodic:P[:W]`` keep W frames centred on every P-th frame (P 0: unconditional); ``prefix:S`` /
``suffix:S`` keep the first / last S seconds; ``inpaint:S1:S2`` keep both; ``compression:N:P`` keep
N codebooks every P frames; ``random:R`` mask a fraction R; ``beat[:W[:B]]`` / ``onset[:W[:B]]`` keep W frames from
B (default 0) ahead of each beat / onset, found in each example's own audio (the original's onset mask of width w
is ``onset:2w:w``). With ``random_roll`` the periodic and compression prompts
start at a random phase per example (the original's app always rolls).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vampnet_pl.codec import Codec
from vampnet_pl.masking import prompts


LARGEST_ARGUMENT = 1e9  # seconds or frames, far beyond any signal
MOST_ARGUMENTS = {"periodic": 2, "prefix": 1, "suffix": 1, "inpaint": 2, "compression": 2, "random": 1, "beat": 2,
                  "onset": 2}


def prompt_arguments(spec: str, n_codebooks: int | None = None) -> tuple[str, list[float | int]]:
    """A preset's name and its checked arguments (seconds stay seconds): what :func:`build_prompt` builds from.

    Needs no audio or codec, so configs can refuse a wrong preset before anything runs. ``n_codebooks``, where the
    model's depth is known: ``compression:N:P`` keeping more codebooks than it has is refused (it kept them all)."""
    name, *args = spec.split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bad prompt {spec!r}: arguments must be numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"bad prompt {spec!r}: arguments must be finite numbers")
    for position, value in enumerate(values):  # beyond it, seconds or frames overflow the frame arithmetic
        if value > LARGEST_ARGUMENT:
            raise ValueError(f"bad prompt {spec!r}: argument {position + 1} must be at most {LARGEST_ARGUMENT:g}, "
                             f"got {value:g}")

    def number(position: int, lowest: float, highest: float = float("inf")) -> float:
        value = values[position]
        if not lowest <= value <= highest:
            raise ValueError(f"bad prompt {spec!r}: argument {position + 1} must lie in [{lowest:g}, {highest:g}], "
                             f"got {value:g}")
        return value

    def count(position: int, lowest: int, default: int | None = None) -> int:
        """A whole-number argument (a period, a width, a codebook count), at least ``lowest``."""
        if position >= len(values) and default is not None:
            return default
        value = values[position]
        if not value.is_integer() or value < lowest:
            raise ValueError(f"bad prompt {spec!r}: argument {position + 1} must be a whole number >= {lowest}, got {value:g}")
        return int(value)

    def codebooks(kept: int) -> int:
        if n_codebooks is not None and kept > n_codebooks:
            raise ValueError(f"bad prompt {spec!r}: keeps {kept} codebooks, but the model has {n_codebooks}")
        return kept

    readers = {
        "periodic": lambda: [count(0, 0), count(1, 1, 1)],
        "prefix": lambda: [number(0, 0.0)],
        "suffix": lambda: [number(0, 0.0)],
        "inpaint": lambda: [number(0, 0.0), number(1, 0.0)],
        "compression": lambda: [codebooks(count(0, 0)), count(1, 1)],
        "random": lambda: [number(0, 0.0, 1.0)],
        "beat": lambda: [count(0, 1, 1), count(1, 0, 0)],
        "onset": lambda: [count(0, 1, 1), count(1, 0, 0)],
    }
    if name not in readers:
        raise ValueError(f"unknown prompt {name!r}; use one of {sorted(readers)}")
    if len(values) > MOST_ARGUMENTS[name]:  # a stray one was dropped without a word
        raise ValueError(f"bad prompt {spec!r}: {name} takes at most {MOST_ARGUMENTS[name]} argument(s)")
    try:
        return name, readers[name]()
    except IndexError:
        raise ValueError(f"prompt {spec!r} needs more arguments (see vampnet-pl vamp --help)") from None


def build_prompt(spec: str, shape: tuple[int, int, int], audio: np.ndarray, codec: Codec,
                 generator: torch.Generator | None = None, random_roll: bool = False) -> torch.Tensor:
    """One prompt preset (see the module docstring) as a mask ``[B, K, T]`` (True = generate).

    ``audio``: the examples' audio at the codec rate, ``[samples]`` (the same for all) or
    ``[B, samples]``; only beat and onset prompts read it.
    """
    name, args = prompt_arguments(spec, shape[1])
    frames = lambda seconds: prompts.seconds_to_frames(seconds, codec.frame_rate)  # noqa: E731
    builders = {
        "periodic": lambda period, width: prompts.periodic(shape, period, width, random_roll, generator),
        "prefix": lambda seconds: prompts.inpaint(shape, prefix_frames=frames(seconds)),
        "suffix": lambda seconds: prompts.inpaint(shape, suffix_frames=frames(seconds)),
        "inpaint": lambda start, end: prompts.inpaint(shape, frames(start), frames(end)),
        "compression": lambda n, period: prompts.compression(shape, n, period, random_roll, generator),
        "random": lambda ratio: prompts.random_prompt(shape, ratio, generator),
        "beat": lambda width, before: prompts.beat_prompt(shape, audio, codec.sample_rate, codec.hop_length, width,
                                                          before=before),
        "onset": lambda width, before: prompts.onset_prompt(shape, audio, codec.sample_rate, codec.hop_length, width,
                                                            before=before),
    }
    return builders[name](*args)
