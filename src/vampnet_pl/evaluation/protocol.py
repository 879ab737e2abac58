"""The evaluation protocol, generation side, and the one naming convention of every protocol score.

A protocol is a named, versioned config (``conf/eval_protocol/v1.yaml``, schema
``masking.protocol.EvalProtocolConfig``, id ``"v1"``); every score carries its id: the
``protocol`` hyperparameter of a training run, the ``protocol`` column of ``results.csv``.

Token metrics (validation of every training run, ``training/module.py``), over the protocol's
masks on the fixed validation windows:

- ``val/loss``, ``val/acc1``, ``val/acc25``: masked cross-entropy (no label smoothing), top-1 and
  top-25 accuracy on masked tokens, mean over (window, condition) of the window's mean;
- per mask ratio: ``val/loss/ratio_0.10`` ... ``val/loss/ratio_1.00`` (and ``acc1``, ``acc25``);
- per prompt mask: ``val/loss/prompt_<prompt>`` (and ``acc1``, ``acc25``), prompts ``periodic_4``,
  ``periodic_8``, ``periodic_16``, ``periodic_32``, ``prefix``, ``suffix``, ``inpaint``, ``compression``;
- per predicted codebook (pooled over its masked tokens, all conditions): ``val/loss/codebook_<k>``,
  ``val/acc1/codebook_<k>``, ``val/acc25/codebook_<k>`` (k counts from 0 over all codebooks).

Generation metrics (training-time callback ``callbacks=with_eval`` and ``vampnet-pl eval``), audio
decoded from tokens generated under each prompt at ``protocol.passes`` passes, against the codec's
full-depth decoding of the real tokens: ``gen/<score>/<prompt>`` with score one of

- ``mel`` (this project's MelDistance), ``mel_dac`` (audiotools' MelSpectrogramLoss as DAC reports
  it), ``mel_vampnet`` (as VampNet's evaluation computed it), ``fad``, ``kad``, ``n_embeddings``
  (embeddings per side behind FAD and KAD);

for the protocol prompts, plus the reference points ``ceiling_codec`` (the real tokens at the
model's depth) and ``baseline_noisy`` (real tokens with half replaced at random), and the
extra presets of the eval app and the callback (``beat`` ..., named by their spec). Quality against passes: ``gen/<score>/passes_<n>``
for n in ``protocol.passes_sweep`` (1, 4, 12, 36), under ``protocol.sweep_prompt`` (periodic_16).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from tqdm import tqdm

from vampnet_pl.evaluation.scoring import score
from vampnet_pl.generation.sampling import example_generators
from vampnet_pl.masking.presets import build_prompt
from vampnet_pl.masking.protocol import EvalProtocolConfig, prompt_mask

log = logging.getLogger(__name__)

# (full-depth codes [B, K, T], the windows' ids) -> tokens to decode. A window's id names its random streams
# (``generation.sampling.example_generators``), so its result does not depend on the batch or the rank it is in.
TokensFn = Callable[[torch.Tensor, list[int]], torch.Tensor]
GenerateFn = Callable[[torch.Tensor, torch.Tensor, int, list[int]], torch.Tensor]  # (codes, mask, passes, ids)


def gen_key(score_name: str, condition: str) -> str:
    return f"gen/{score_name}/{condition}"


def passes_name(passes: int) -> str:
    return f"passes_{passes}"


def rows_to_metrics(rows: list[dict]) -> dict[str, float]:
    """``gen/<score>/<condition>`` for every score of every row (see the module docstring)."""
    return {gen_key(name, row["prompt"]): value for row in rows for name, value in row.items()
            if name not in ("protocol", "prompt", "coarse_passes")}


def protocol_jobs(protocol: EvalProtocolConfig, mask_shape_of: Callable[[torch.Tensor], tuple], n_conditioning: int,
                  generate: GenerateFn) -> list[tuple[str, int, TokensFn]]:
    """(condition, passes, tokens function) for every protocol prompt, then the passes sweep."""
    def generated(name: str, passes: int) -> TokensFn:
        def run(codes: torch.Tensor, ids: list[int]) -> torch.Tensor:
            mask = prompt_mask(protocol, name, mask_shape_of(codes)).to(codes.device)
            mask[:, :n_conditioning] = False
            return generate(codes, mask, passes, ids)
        return run

    jobs = [(name, protocol.passes, generated(name, protocol.passes)) for name in protocol.prompt_names]
    jobs += [(passes_name(n), n, generated(protocol.sweep_prompt, n)) for n in protocol.passes_sweep]
    return jobs


def preset_jobs(specs: list[str], mask_shape_of: Callable[[torch.Tensor], tuple], audio_of: Callable, codec,
                seed: int, generate: GenerateFn, passes: int) -> list[tuple[str, int, TokensFn]]:
    """(spec, passes, tokens function) for extra prompt presets (``beat``, ``onset:2``, ``random:0.5`` ...):
    audio-driven prompts are found in each window's own audio (``audio_of(codes)`` -> ``[B, samples]``), random
    ones drawn from each window's own stream."""
    def generated(spec: str) -> TokensFn:
        def run(codes: torch.Tensor, ids: list[int]) -> torch.Tensor:
            audio = audio_of(codes).cpu().numpy()
            _, depth, frames = mask_shape_of(codes)
            streams = example_generators(seed, ids, "cpu", "prompt", spec)
            mask = torch.cat([build_prompt(spec, (1, depth, frames), audio[i : i + 1], codec, stream)
                              for i, stream in enumerate(streams)]).to(codes.device)
            return generate(codes, mask, passes, ids)
        return run

    return [(spec, passes, generated(spec)) for spec in specs]


def evaluate_generation(
    protocol: EvalProtocolConfig,
    windows: torch.Tensor,
    jobs: list[tuple[str, int | None, TokensFn]],
    decode: Callable[[torch.Tensor], torch.Tensor],
    sample_rate: int,
    embed: torch.nn.Module,
    batch_size: int | None = None,
    window_ids: list[int] | None = None,
    should_stop: Callable[[str], bool] | None = None,
    on_audio: Callable[[str, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Score every job on ``windows`` (full-depth codes ``[N, K, T]``): one row per job with the protocol id,
    the condition, its coarse passes and :data:`vampnet_pl.evaluation.scoring.SCORES`. ``window_ids``
    (default ``range(N)``): the windows' ids over every rank, which name their random streams.

    ``should_stop(name)`` is asked before each job (a time budget); ``on_audio(name, audio)`` gets the audio."""
    ids = list(range(len(windows))) if window_ids is None else list(window_ids)
    if len(ids) != len(windows):
        raise ValueError(f"{len(ids)} window ids for {len(windows)} windows")
    size = batch_size or len(windows)
    batches = list(zip(windows.split(size), [ids[i : i + size] for i in range(0, len(ids), size)]))
    reference = torch.cat([decode(b) for b, _ in batches])
    rows = []
    for name, passes, tokens_fn in tqdm(jobs, desc=f"protocol {protocol.id}", unit="condition", disable=not progress):
        if should_stop is not None and should_stop(name):
            break
        audio = torch.cat([decode(tokens_fn(b, batch_ids)) for b, batch_ids in batches])
        rows.append({"protocol": protocol.id, "prompt": name, "coarse_passes": passes or "",
                     **score(audio, reference, sample_rate, embed)})
        if on_audio is not None:
            on_audio(name, audio)
    return rows
