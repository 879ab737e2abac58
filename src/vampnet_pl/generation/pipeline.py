"""Generation: prompt -> coarse tokens -> fine tokens (c2f) -> audio. No Lightning here.

Coarse: signals longer than the coarse window are generated in overlapping windows: each
window's first ``overlap`` frames are the end of the previous window's output, kept as prompt,
so every token is written exactly once and no context is duplicated at the seams.
c2f: independent chunks of its own length (3 s, as the original), all decoded as one batch;
frames the prompt keeps whole keep the input's fine tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from vampnet_pl.codec import Codec, CodecMismatch, fingerprints_apart
from vampnet_pl.model import VampNet
from vampnet_pl.generation.sampling import SamplingConfig, example_generators, sample


def window_bounds(frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """The (start, stop) frames of each coarse window: each starts ``overlap`` frames before the previous one's end;
    the last is full length, its head taken from the previous one (one window when ``frames <= window``)."""
    if frames <= window:
        return [(0, frames)]
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window): {overlap} vs {window}")
    bounds, start = [], 0
    while True:
        stop = min(start + window, frames)
        bounds.append((max(0, stop - window), stop))
        if stop == frames:
            return bounds
        start = stop - overlap


def sample_windowed(model: VampNet, codes: torch.Tensor, mask: torch.Tensor, cfg: SamplingConfig, window: int,
                    overlap: int, n_conditioning: int = 0, example_ids: Sequence[int] | None = None,
                    on_pass: Callable[[], object] | None = None) -> torch.Tensor:
    """:func:`sample` over ``[B, K, T]`` in windows of ``window`` frames overlapping by ``overlap``, each
    example's random stream (``example_ids``, default ``range(B)``) running through all of them. ``on_pass``: called
    after every pass of every window (a progress bar's update)."""
    frames = codes.shape[-1]
    ids = range(codes.shape[0]) if example_ids is None else example_ids
    generators = example_generators(cfg.seed, ids, codes.device)
    if frames <= window:
        return sample(model, codes, mask, cfg, n_conditioning, generators, on_pass=on_pass)
    codes, mask = codes.clone(), mask.clone()
    for start, stop in window_bounds(frames, window, overlap):
        window_mask = mask[..., start:stop].clone()
        codes[..., start:stop] = sample(model, codes[..., start:stop], window_mask, cfg, n_conditioning, generators,
                                        on_pass=on_pass)
        mask[..., start:stop] = False  # generated: the next window's context
    return codes


def chunk_starts(frames: int, chunk: int) -> list[int]:
    """The first frame of each c2f chunk: every ``chunk`` frames, then the signal's last ``chunk`` frames."""
    starts = list(range(0, frames - chunk + 1, chunk))
    if starts[-1] + chunk < frames:
        starts.append(frames - chunk)
    return starts


DEFAULT_OVERLAP_SECONDS = 2.0


@dataclass
class GenerationConfig:
    coarse: SamplingConfig = field(default_factory=lambda: SamplingConfig(passes=24))
    c2f: SamplingConfig = field(default_factory=lambda: SamplingConfig(passes=12, mask_temperature=1.0))
    window_seconds: float = 10.0  # the coarse model's window; longer signals go in overlapping windows
    overlap_seconds: float | None = None  # each window's context from the one before; None: 2 s, at most half the window
    c2f_chunk_seconds: float = 3.0  # the c2f model's chunk (the original trains and generates c2f on 3 s)
    c2f_max_batch: int = 64  # c2f chunks decoded together (all chunks of all examples, up to this many)

    def __post_init__(self) -> None:
        for name in ("window_seconds", "c2f_chunk_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.overlap_seconds is None:  # a fixed 2 s would leave a short window one new frame each
            self.overlap_seconds = min(DEFAULT_OVERLAP_SECONDS, self.window_seconds / 2)
        if not 0 <= self.overlap_seconds < self.window_seconds:
            raise ValueError(f"overlap_seconds must be in [0, window_seconds={self.window_seconds}), got "
                             f"{self.overlap_seconds}: each window must add new frames")
        if self.c2f_max_batch < 1:
            raise ValueError(f"c2f_max_batch must be >= 1, got {self.c2f_max_batch}")


class VampPipeline:
    """Coarse model + optional c2f model + codec: token prompts in, audio out.

    Everything runs on ``device`` (default: the codec's): the models are moved there and every
    tensor of :meth:`generate` is made there.
    """

    def __init__(self, coarse: VampNet, c2f: VampNet | None, codec: Codec, cfg: GenerationConfig | None = None,
                 device: str | torch.device | None = None):
        for name, model in (("coarse", coarse), ("c2f", c2f)):
            if model is not None and model.cfg.codec_fingerprint != codec.fingerprint:
                trained, given = fingerprints_apart(model.cfg.codec_fingerprint, codec.fingerprint)
                raise CodecMismatch(f"the {name} model was trained on codec {trained}, the codec given is {given}")
        if coarse.cfg.n_conditioning_codebooks:
            raise ValueError(f"the coarse model is conditioned on {coarse.cfg.n_conditioning_codebooks} codebooks: "
                             "a c2f model given as the coarse one?")
        if c2f is not None and c2f.cfg.n_conditioning_codebooks != coarse.cfg.n_codebooks:
            raise ValueError(f"c2f is conditioned on {c2f.cfg.n_conditioning_codebooks} codebooks, "
                             f"the coarse model makes {coarse.cfg.n_codebooks}")
        self.device = torch.device(device) if device is not None else codec.device
        self.coarse = coarse.to(self.device).eval()
        self.c2f = c2f.to(self.device).eval() if c2f is not None else None
        self.codec = codec
        self.cfg = cfg or GenerationConfig()

    @property
    def n_codebooks(self) -> int:
        return (self.c2f or self.coarse).cfg.n_codebooks

    def window_and_overlap(self) -> tuple[int, int]:
        """The coarse window and the overlap of consecutive windows, in frames."""
        window = self.codec.frames_for(self.cfg.window_seconds)
        if window < 1:
            raise ValueError(f"window_seconds={self.cfg.window_seconds} is under one codec frame "
                             f"({self.codec.hop_length / self.codec.sample_rate:.4f} s)")
        return window, min(self.codec.frames_for(self.cfg.overlap_seconds), window - 1)

    def c2f_chunk(self, frames: int) -> int:
        return min(max(1, self.codec.frames_for(self.cfg.c2f_chunk_seconds)), frames)

    def passes_for(self, frames: int, batch: int) -> int:
        """How many model passes :meth:`generate` makes for ``batch`` signals of ``frames`` (a progress bar's total)."""
        window, overlap = self.window_and_overlap()
        total = len(window_bounds(frames, window, overlap)) * self.cfg.coarse.passes
        if self.c2f is not None:
            pieces = len(chunk_starts(frames, self.c2f_chunk(frames))) * batch
            total += math.ceil(pieces / self.cfg.c2f_max_batch) * self.cfg.c2f.passes
        return total

    def generate(self, codes: torch.Tensor, prompt_mask: torch.Tensor, example_ids: Sequence[int] | None = None,
                 on_pass: Callable[[], object] | None = None) -> torch.Tensor:
        """``codes`` ``[B, K, T]``, ``prompt_mask`` ``[B, >=K_coarse, T]`` (True = generate) -> ``[B, n_codebooks, T]``.

        The coarse model generates the masked coarse tokens; c2f then generates the fine tokens of
        every frame that is not kept whole: a frame whose coarse tokens are all kept keeps the
        input's fine tokens too (``codes`` must then have them; codebooks ``codes`` lacks are generated).
        A deeper ``prompt_mask`` says itself which fine tokens to keep (as the original's full-depth
        masks): its fine rows are used as they are, the frame rule only for codebooks it lacks.
        ``example_ids`` (default ``range(B)``) name each example's random streams (see
        :func:`~vampnet_pl.generation.sampling.example_generators`): with seeds set, an example's result
        does not depend on what else is in the batch. ``on_pass`` is called after each of the
        :meth:`passes_for` model passes.
        """
        codes, prompt_mask = codes.to(self.device).long(), prompt_mask.to(self.device)
        ids = list(range(codes.shape[0]) if example_ids is None else example_ids)
        if len(ids) != codes.shape[0]:
            raise ValueError(f"{len(ids)} example ids for a batch of {codes.shape[0]}")
        window, overlap = self.window_and_overlap()
        n_coarse = self.coarse.cfg.n_codebooks
        coarse = sample_windowed(self.coarse, codes[:, :n_coarse], prompt_mask[:, :n_coarse], self.cfg.coarse,
                                 window, overlap, example_ids=ids, on_pass=on_pass)
        if self.c2f is None:
            return coarse
        batch, frames, depth = codes.shape[0], codes.shape[-1], self.c2f.cfg.n_codebooks
        full = torch.zeros(batch, depth, frames, dtype=torch.long, device=self.device)
        full[:, :n_coarse] = coarse
        given = min(codes.shape[1], depth)
        full[:, n_coarse:given] = codes[:, n_coarse:given]
        fine_mask = torch.zeros_like(full, dtype=torch.bool)
        fine_mask[:, n_coarse:] = prompt_mask[:, :n_coarse].any(1, keepdim=True)  # frames not kept whole
        deep = min(prompt_mask.shape[1], depth)
        fine_mask[:, n_coarse:deep] = prompt_mask[:, n_coarse:deep]  # fine rows the prompt gives itself
        fine_mask[:, given:] = True
        return self.coarse_to_fine(full, fine_mask, ids, on_pass)

    def coarse_to_fine(self, codes: torch.Tensor, mask: torch.Tensor, example_ids: Sequence[int] | None = None,
                       on_pass: Callable[[], object] | None = None) -> torch.Tensor:
        """c2f over ``[B, K, T]`` in chunks of ``c2f_chunk_seconds``, all chunks decoded as one batch.

        Chunks start every chunk length; the last one is the signal's last chunk-length frames
        (it keeps only the frames no earlier chunk wrote; the original zero-pads to whole chunks instead). Each chunk of each example has its own random
        stream, named by its example id and chunk number.
        """
        frames = codes.shape[-1]
        chunk = self.c2f_chunk(frames)
        starts = chunk_starts(frames, chunk)
        pieces = torch.cat([codes[..., s : s + chunk] for s in starts])  # [n_chunks * B, K, chunk]
        piece_masks = torch.cat([mask[..., s : s + chunk] for s in starts])
        n_conditioning = self.c2f.cfg.n_conditioning_codebooks
        step = self.cfg.c2f_max_batch
        ids = range(codes.shape[0]) if example_ids is None else example_ids
        generators = [g for chunk_index in range(len(starts))  # in the pieces' (chunk, example) order
                      for g in example_generators(self.cfg.c2f.seed, ids, codes.device, "c2f", chunk_index)]
        done = torch.cat([sample(self.c2f, pieces[i : i + step], piece_masks[i : i + step], self.cfg.c2f, n_conditioning,
                                 generators[i : i + step], on_pass=on_pass) for i in range(0, pieces.shape[0], step)])
        out, batch, written = codes.clone(), codes.shape[0], 0
        for index, start in enumerate(starts):
            piece = done[index * batch : (index + 1) * batch]
            out[..., written : start + chunk] = piece[..., written - start :]
            written = start + chunk
        return out

    def to_audio(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(codes)
