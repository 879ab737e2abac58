"""Iterative parallel decoding (MaskGIT / VampNet): pure functions over a model, no Lightning.

Each pass runs the model once, samples a token for every masked position, then re-masks the
least confident of them so that ``schedule(pass / passes)`` of each example's originally masked
tokens stay masked. Prompt (unmasked) tokens are never changed.

Per pass, for the masked positions only (their rows of the logits):

1. **filters** on the model's distribution: top-k, nucleus (top-p), locally typical
   (``typical_p`` with at least ``typical_min_tokens`` tokens kept);
2. **temperature**: the filtered logits divided by ``temperature``; this is the distribution
   sampled from;
3. **token**: drawn from it (inverse CDF: one uniform number per position) while
   ``pass / passes <= sample_cutoff``, its argmax afterwards (and always at ``temperature <= 0``);
4. **confidence**: the log-probability of the token under that same distribution, plus Gumbel
   noise scaled by ``mask_temperature * (1 - progress)`` (annealed to zero over the passes);
5. **re-mask** the lowest-confidence tokens: ``floor(schedule(progress) * masked_at_start)`` of each
   example; before the last pass at least one token is committed and at least one stays
   masked (as the original does).

Intended differences from the original VampNet ``generate`` (``vampnet/modules/transformer.py``):

- the number of tokens re-masked is counted **per example**; the original sums the masked
  tokens over the whole batch, so a batch of different prompts decodes on a wrong schedule;
- the typical filter **filters** (the original computes it and discards the result);
- tokens are drawn by inverse CDF from our own generators, not ``torch.multinomial`` on the global
  RNG: the same distribution, another random stream. With a ``seed``, **each example has its own
  stream** (:func:`example_generators`), so its result does not depend on the other examples of its
  batch: an evaluation scores the same at any batch size or number of ranks;
- re-masking is by exact rank (ties broken by position); the original masks the tokens strictly
  below a cut-off, so ties re-mask fewer;
- ``temperature <= 0`` means greedy (argmax); the original then samples at temperature 1;
- the nucleus keeps the smallest set whose mass reaches ``top_p`` (the original's, except that a
  set reaching exactly ``top_p`` is not extended by one token);
- the defaults (``vampnet-pl vamp``, ``GenerationConfig``): coarse 24 passes at mask temperature 10.5,
  c2f 12 at 1.0; the original's ``generate`` defaults to 36 passes and 10.5 for both stages.

Where the algorithms are meant to agree (argmax tokens, ``mask_temperature=0``, batch 1, no
ties) the tokens are the original's; ``tests/test_sampling.py`` checks this against a fixture
made by running the original's ``generate``.

Speed: the output head runs only on frames with a masked token, and filtering, the softmax,
sampling and noise touch only the masked rows (the masked count shrinks every pass). On the CPU
the head and the draw go a cache-sized block of frames at a time (:func:`sample_by_frames`). With
``cuda_graphs=True`` on a CUDA device the model's fixed-shape forward pass is captured once
per call and replayed on every pass (no effect, and a log line, elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vampnet_pl.masking.schedules import get_schedule
from vampnet_pl.model.vampnet import VampNet, check_token_range

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    passes: int = 24
    temperature: float = 1.0  # <= 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None  # locally typical sampling (Meister et al. 2022): the mass kept
    typical_min_tokens: int = 1  # typical filtering keeps at least this many tokens
    mask_temperature: float = 10.5  # scale of the Gumbel noise on confidences at the first pass
    schedule: str = "cosine"
    sample_cutoff: float = 1.0  # tokens are sampled on passes i with i / passes <= sample_cutoff, argmax after
    seed: Optional[int] = None
    cuda_graphs: bool = False  # replay the model's forward pass as a CUDA graph (CUDA devices only)

    def __post_init__(self) -> None:
        for name, value, ok, allowed in (
                ("passes", self.passes, self.passes >= 1, ">= 1"),
                ("top_k", self.top_k, self.top_k is None or self.top_k >= 1, ">= 1 or null"),
                ("top_p", self.top_p, self.top_p is None or 0 < self.top_p <= 1, "in (0, 1] or null"),
                ("typical_p", self.typical_p, self.typical_p is None or 0 < self.typical_p <= 1, "in (0, 1] or null"),
                ("typical_min_tokens", self.typical_min_tokens, self.typical_min_tokens >= 1, ">= 1"),
                ("mask_temperature", self.mask_temperature, self.mask_temperature >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"sampling {name} must be {allowed}, got {value!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  typical_p: float | None = None, typical_min_tokens: int = 1) -> torch.Tensor:
    """Set to -inf every logit outside the top-k / nucleus (top-p) / typical set (last axis)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), -float("inf"))
    if typical_p is not None and typical_p < 1.0:
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(0.0, neginf=0.0)).sum(-1, keepdim=True)
        order = (-log_probs - entropy).abs().argsort(dim=-1)  # most typical first
        sorted_probs = probs.gather(-1, order)
        remove = sorted_probs.cumsum(-1) - sorted_probs >= typical_p
        remove[..., : max(1, typical_min_tokens)] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), -float("inf"))
    return logits


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniform numbers in [0, 1)."""
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))


def sample_rows(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, V]`` -> (token ``[N]``, its log-probability under the distribution sampled from ``[N]``).

    That distribution is softmax(filtered logits / temperature). ``uniform`` ``[N]`` in [0, 1): the
    token is drawn by inverse CDF; ``None`` (or ``temperature <= 0``) takes the argmax.
    """
    logits = filter_logits(logits.float(), cfg.top_k, cfg.top_p, cfg.typical_p, cfg.typical_min_tokens)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    probs = logits.softmax(-1)  # filtered tokens are exactly 0
    if uniform is not None and cfg.temperature > 0:
        cdf = probs.cumsum(-1)
        token = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
        token = token.clamp_(max=logits.shape[-1] - 1).squeeze(-1)
    else:
        token = logits.argmax(-1)
    confidence = probs.gather(-1, token[:, None]).squeeze(-1).log()
    return token, confidence


def tokens_to_keep_masked(schedule_value: torch.Tensor, initial: torch.Tensor, current: torch.Tensor,
                          last_pass: bool) -> torch.Tensor:
    """Per example: how many of the ``current`` masked tokens stay masked after a pass.

    ``floor(schedule * initial)``; before the last pass clamped to ``[1, current - 1]`` so that
    every pass commits at least one token and none ends early (0 where nothing is masked).
    """
    count = (schedule_value * initial).floor().long()
    if last_pass:
        return torch.minimum(count, current)
    return torch.where(current > 0, torch.minimum(count, current - 1).clamp(min=1), torch.zeros_like(count))


class _GraphedForward:
    """The model's forward pass for one fixed input shape, captured as a CUDA graph and replayed."""

    def __init__(self, model: Callable, codes: torch.Tensor, mask: torch.Tensor):
        self.codes, self.mask = codes.clone(), mask.clone()
        stream = torch.cuda.Stream(codes.device)
        stream.wait_stream(torch.cuda.current_stream(codes.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (allocator, cuBLAS workspaces) outside the graph
                model(self.codes, self.mask)
        torch.cuda.current_stream(codes.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.codes, self.mask)

    def __call__(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.codes.copy_(codes)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


ROWS_PER_BLOCK = 512  # CPU: the logits of this many rows (2 MB at 1024 tokens) stay in cache from head to draw


def sample_by_frames(model: VampNet, codes: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor,
                     rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cfg: SamplingConfig,
                     uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rows` for the masked ``rows`` (``(b, p, t)``, in (example, frame, codebook) order),
    running the model's head only on frames with a masked token. On the CPU the head, the filters and
    the draw go a block of frames at a time, so that a batch's logits never leave the cache (at batch 8
    they would be 100 MB, streamed through memory by every step)."""
    frames = predicted.any(1)  # [B, T]
    hidden = model.features(codes, mask, check_range=False)[frames]  # [F, d], (example, frame) order
    b, p, t = rows
    if b.numel() == 0:  # nothing left to generate (a window or chunk the prompt keeps whole)
        return b.new_empty(0), torch.empty(0, device=codes.device)
    n_predicted = predicted.shape[1]
    position = (frames.flatten().cumsum(0) - 1).view_as(frames)[b, t]  # each row's frame in ``hidden``: sorted
    flat_row = position * n_predicted + p  # each row's row in the head's output, viewed [F * P, V]
    per_block = hidden.shape[0] if codes.device.type != "cpu" else max(1, ROWS_PER_BLOCK // n_predicted)
    starts = torch.arange(0, hidden.shape[0] + per_block, per_block, device=codes.device)
    bounds = torch.searchsorted(position, starts).tolist()  # the rows of each block of frames
    tokens, confidences = [], []
    for block, first in enumerate(range(0, hidden.shape[0], per_block)):
        lo, hi = bounds[block], bounds[block + 1]
        logits = model.classify(hidden[first : first + per_block]).flatten(0, 1)  # [frames in block * P, V]
        if hi - lo < logits.shape[0]:  # some codebooks of these frames are not masked: their rows only
            logits = logits.index_select(0, flat_row[lo:hi] - first * n_predicted)
        token, confidence = sample_rows(logits, cfg, None if uniform is None else uniform[lo:hi])
        tokens.append(token)
        confidences.append(confidence)
    return torch.cat(tokens), torch.cat(confidences)


def forward_for(model: Callable, codes: torch.Tensor, mask: torch.Tensor, cuda_graphs: bool) -> Callable:
    """The model itself, or, with ``cuda_graphs`` on a CUDA device, a graphed replay of it for this shape."""
    if not cuda_graphs:
        return model
    if codes.device.type != "cuda":
        log.info("cuda_graphs needs a CUDA device; running the model eagerly on %s", codes.device)
        return model
    try:
        return _GraphedForward(model, codes, mask)
    except RuntimeError as err:  # e.g. a host synchronisation inside the forward pass cannot be captured
        log.warning("cannot capture the model as a CUDA graph (%s); running it eagerly", err)
        return model


def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed from ``keys`` (a run seed, an example's id, a purpose ...), the same on every machine."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") >> 1


def example_generators(seed: int | None, example_ids: Sequence[int], device: torch.device | str,
                       *stream: int | str) -> list[torch.Generator | None]:
    """One random stream per example, seeded from ``(seed, example id, *stream)``: an example draws the same
    numbers whatever else shares its batch. Without a seed, torch's global generator for all (``None``)."""
    if seed is None:
        return [None] * len(example_ids)
    return [torch.Generator(device).manual_seed(stream_seed(seed, int(i), *stream)) for i in example_ids]


def per_example_uniform(generators: Sequence[torch.Generator | None], shape: tuple[int, ...],
                        device: torch.device | str) -> torch.Tensor:
    """``[len(generators), *shape]`` uniform numbers in [0, 1), row i from generator i."""
    return torch.stack([torch.rand(shape, generator=g, device=device, dtype=torch.float32) for g in generators])


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    codes: torch.Tensor,
    mask: torch.Tensor,
    cfg: SamplingConfig,
    n_conditioning: int = 0,
    generators: Sequence[torch.Generator | None] | None = None,
    on_pass: Callable[[], object] | None = None,
) -> torch.Tensor:
    """Fill the masked tokens of ``codes`` ``[B, K, T]`` (``mask`` True = generate) in ``cfg.passes`` passes.

    ``model(codes, mask)`` returns logits ``[B, K - n_conditioning, T, V]``. Conditioning codebooks
    are never generated. See the module docstring for the semantics. ``generators``: one random stream per
    example (for callers that sample a signal in several calls, or that number examples themselves); by
    default ``example_generators(cfg.seed, range(B))``. Every pass draws ``[T, K - n_conditioning]`` numbers
    from each, for the tokens and again for the confidence noise, whatever is masked. ``on_pass`` is called after
    every pass (a progress bar's update).
    """
    device = codes.device
    batch, frames = codes.shape[0], codes.shape[-1]
    if generators is None:
        generators = example_generators(cfg.seed, range(batch), device)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} random streams for a batch of {batch}")
    schedule = get_schedule(cfg.schedule)
    codes, mask = codes.clone(), mask.clone()
    mask[:, :n_conditioning] = False
    grid = (frames, codes.shape[1] - n_conditioning)  # each example's draws, in the rows' (frame, codebook) order
    initial = mask[:, n_conditioning:].flatten(1).sum(1)  # [B] masked count per example
    # The head on masked frames calls the model's parts directly: only for a plain VampNet. A sharded one (FSDP2's
    # fully_shard makes a subclass) holds its parameters outside its forward, and its ranks must make the same
    # calls: one forward a pass. CUDA graphs replay the fixed full pass.
    by_frames = model if type(model) is VampNet and not cfg.cuda_graphs else None
    if isinstance(model, VampNet):  # tokens checked once here: no host sync per pass (CUDA graphs can capture it)
        check_token_range(codes, model.cfg.codebook_size)
        model = functools.partial(model, check_range=False)
    forward = forward_for(model, codes, mask, cfg.cuda_graphs)
    with by_frames.position_bias_reused() if by_frames is not None else contextlib.nullcontext():
        for step in range(cfg.passes):  # always every pass: sharded models need the same calls on every rank
            progress = (step + 1) / cfg.passes
            predicted = mask[:, n_conditioning:]  # [B, P, T]
            b, t, p = predicted.permute(0, 2, 1).nonzero(as_tuple=True)  # rows in (example, frame, codebook) order
            rows = (b, p, t)
            draw = step / cfg.passes <= cfg.sample_cutoff and cfg.temperature > 0
            uniform = per_example_uniform(generators, grid, device)[b, t, p] if draw else None
            if by_frames is not None:
                token, confidence = sample_by_frames(by_frames, codes, mask, predicted, rows, cfg, uniform)
            else:
                token, confidence = sample_rows(forward(codes, mask)[rows], cfg, uniform)  # [B, P, T, V] -> masked rows
            codes[:, n_conditioning:][rows] = token.to(codes.dtype)
            current = predicted.flatten(1).sum(1)
            ratio = schedule(torch.full((batch,), progress, device=device, dtype=torch.float32))
            keep_masked = tokens_to_keep_masked(ratio, initial, current, step == cfg.passes - 1)
            confidence = confidence.nan_to_num(nan=-math.inf, neginf=-math.inf)  # NaN (broken logits): least confident
            anneal = cfg.mask_temperature * (1 - progress)
            if anneal > 0:
                confidence = confidence + anneal * gumbel(per_example_uniform(generators, grid, device)[b, t, p])
            # prompt tokens never re-masked
            score = torch.full(predicted.shape, float("inf"), device=device, dtype=confidence.dtype)
            score[rows] = confidence
            order = score.flatten(1).argsort(dim=1, stable=True)
            lowest = torch.arange(order.shape[1], device=device)[None] < keep_masked[:, None]
            remask = torch.zeros_like(lowest).scatter_(1, order, lowest).view_as(predicted)
            mask[:, n_conditioning:] = remask & predicted  # what was given stays given
            if on_pass is not None:
                on_pass()
    return codes
