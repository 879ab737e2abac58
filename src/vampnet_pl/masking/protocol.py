"""The evaluation protocol's masks: one named, versioned set of masks that scores every run alike.

A protocol (``conf/eval_protocol/v1.yaml``, id ``"v1"``) fixes, independently of how a model was
trained (its ``masking.*``, its seed):

- random masks at each ratio of ``ratios`` (named ``ratio_0.10`` ... ``ratio_1.00``): exactly
  ``round(ratio * n)`` of a window's predicted tokens, drawn from a generator seeded by
  (``protocol.seed``, window index) only, so a window gets the same bytes whatever the batch
  size, rank count or run;
- the prompt masks (named ``periodic_4``, ``periodic_8``, ``periodic_16``, ``periodic_32``,
  ``prefix``, ``suffix``, ``inpaint``, ``compression``), built by ``masking.prompts`` in frames:
  ``prefix`` / ``suffix`` keep ``context_fraction`` of the window at its start / end,
  ``inpaint`` both, ``compression`` keeps ``compression_codebooks`` levels every
  ``compression_period`` frames.

Conditioning codebooks are never masked. Metric names built on these conditions are documented
in ``vampnet_pl.evaluation.protocol``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from vampnet_pl.masking import prompts
from vampnet_pl.masking.training import random_mask
from vampnet_pl.utils.checks import check_at_least

PROMPT_NAMES = ("periodic_4", "periodic_8", "periodic_16", "periodic_32", "prefix", "suffix", "inpaint", "compression")


@dataclass
class EvalProtocolConfig:
    id: str = "v1"  # stored with every score; change it whenever a value below changes
    seed: int = 20230710  # the masks' one seed (not the run's)
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    periods: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # periodic_<P> prompts: keep 1 frame every P
    context_fraction: float = 0.25  # prefix / suffix / inpaint keep this fraction of the window at each end
    compression_codebooks: int = 1
    compression_period: int = 8
    passes: int = 12  # coarse sampling passes for the per-prompt generation scores (c2f: the eval app's c2f_passes)
    passes_sweep: list[int] = field(default_factory=lambda: [1, 4, 12, 36])  # quality against passes
    sweep_prompt: str = "periodic_16"
    gen_windows: int = 32  # validation windows generated and scored (over all ranks together)

    def __post_init__(self) -> None:
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise ValueError(f"eval_protocol.ratios must lie in (0, 1], got {list(self.ratios)}")
        if not 0 <= self.context_fraction < 0.5:
            raise ValueError(f"eval_protocol.context_fraction must lie in [0, 0.5), got {self.context_fraction}")
        check_at_least(self, "eval_protocol", gen_windows=1)
        if self.passes < 1 or not all(n >= 1 for n in self.passes_sweep):  # 0 passes generate nothing
            raise ValueError(f"eval_protocol.passes and passes_sweep must be >= 1, got passes={self.passes}, "
                             f"passes_sweep={list(self.passes_sweep)}")
        if not all(p >= 0 for p in self.periods):  # 0: unconditional, as the periodic:0 preset
            raise ValueError(f"eval_protocol.periods must be >= 0, got {list(self.periods)}")
        check_at_least(self, "eval_protocol", compression_codebooks=0, compression_period=1)  # as compression:N:P
        if self.sweep_prompt not in self.prompt_names:
            raise ValueError(f"eval_protocol.sweep_prompt {self.sweep_prompt!r} is not one of {self.prompt_names}")

    def check_codebooks(self, n_codebooks: int) -> None:
        """The ``compression`` prompt keeps at most the model's codebooks (more kept them all: ``periodic_<P>``)."""
        if self.compression_codebooks > n_codebooks:
            raise ValueError(f"eval_protocol.compression_codebooks={self.compression_codebooks} is more than the "
                             f"model's {n_codebooks} codebooks")

    @property
    def prompt_names(self) -> list[str]:
        return [f"periodic_{p}" for p in self.periods] + ["prefix", "suffix", "inpaint", "compression"]

    @property
    def ratio_names(self) -> list[str]:
        return [ratio_name(r) for r in self.ratios]


def ratio_name(ratio: float) -> str:
    return f"ratio_{ratio:.2f}"


def window_seed(protocol_seed: int, window_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{protocol_seed}:{window_index}".encode()).digest()[:7], "little")


def prompt_mask(protocol: EvalProtocolConfig, name: str, shape) -> torch.Tensor:
    """One of the protocol's prompt masks ``[B, K, T]`` (True = generate), the same for every window."""
    frames = shape[-1]
    context = int(round(protocol.context_fraction * frames))
    if name == "compression":
        protocol.check_codebooks(shape[1])
    if name.startswith("periodic_") and int(name.split("_")[1]) in protocol.periods:
        return prompts.periodic(shape, int(name.split("_")[1]))
    builders = {
        "prefix": lambda: prompts.inpaint(shape, prefix_frames=context),
        "suffix": lambda: prompts.inpaint(shape, suffix_frames=context),
        "inpaint": lambda: prompts.inpaint(shape, context, context),
        "compression": lambda: prompts.compression(shape, protocol.compression_codebooks, protocol.compression_period),
    }
    if name not in builders:
        raise ValueError(f"unknown protocol prompt {name!r}; known: {protocol.prompt_names}")
    return builders[name]()


def protocol_masks(protocol: EvalProtocolConfig, shape, n_conditioning: int,
                   window_indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every protocol condition's mask for a batch of windows ``shape`` = ``[B, K, T]``, by name:
    ``ratio_*`` first (in ``protocol.ratios`` order), then the prompts. ``window_indices`` ``[B]``:
    each window's global index in the validation set, which alone (with the protocol's seed) picks its masks."""
    batch, codebooks, frames = shape
    if len(window_indices) != batch:
        raise ValueError(f"{len(window_indices)} window indices for a batch of {batch}")
    ratios = torch.tensor(protocol.ratios, dtype=torch.float32)
    per_window = [random_mask((len(ratios), codebooks, frames), ratios, n_conditioning,
                              torch.Generator().manual_seed(window_seed(protocol.seed, int(i))))
                  for i in window_indices]
    stacked = torch.stack(per_window, dim=1)  # [ratios, B, K, T]
    masks = {name: stacked[k] for k, name in enumerate(protocol.ratio_names)}
    for name in protocol.prompt_names:
        mask = prompt_mask(protocol, name, shape)
        mask[:, :n_conditioning] = False
        masks[name] = mask
    return masks
