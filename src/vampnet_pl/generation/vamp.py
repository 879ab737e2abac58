"""The ``vamp`` command: variations of a user's audio file.

    vampnet-pl vamp input.wav --coarse coarse.pt --c2f c2f.pt --codec codec.pth --prompt periodic:16 --variations 4

Prompt presets (``--prompt``, repeatable: the kept tokens of all of them are kept) are
described in :mod:`vampnet_pl.masking.presets`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from vampnet_pl.audio_io import read_audio
from vampnet_pl.codec import Codec
from vampnet_pl.generation.pipeline import GenerationConfig, VampPipeline
from vampnet_pl.masking import prompts
from vampnet_pl.masking.presets import build_prompt
from vampnet_pl.model import load_exported
from vampnet_pl.utils.atomic import atomic_path

SILENCE_DBFS = -60.0


def load_pipeline(coarse: Path, c2f: Path | None, codec_source: str, device: str = "auto",
                  cfg: GenerationConfig | None = None) -> VampPipeline:
    for path in (coarse, c2f):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"model not found: {path} (export one with `vampnet-pl export`)")
    codec = Codec.load(codec_source, device)
    return VampPipeline(load_exported(coarse), load_exported(c2f) if c2f else None, codec, cfg, device=codec.device)


def vamp_file(pipeline: VampPipeline, input_path: Path, out_dir: Path, prompt_specs: list[str], variations: int = 1,
              loops: int = 0, seed: int = 0) -> list[Path]:
    """Write ``variations`` WAV files (or, with ``loops`` > 0, one file of the input followed by ``loops`` vamps)."""
    codec = pipeline.codec
    audio, rate = read_audio(input_path)
    mono = torch.from_numpy(audio.mean(0))
    rms = float(mono.square().mean().sqrt())
    if rms == 0 or 20 * math.log10(rms) < SILENCE_DBFS:
        raise ValueError(f"{input_path} is silent (below {SILENCE_DBFS} dBFS): nothing to vamp on")
    resampled = codec.resample(mono, rate).cpu()
    codes = codec.encode(resampled, codec.sample_rate).long()  # [K, T]
    if codes.shape[0] < pipeline.n_codebooks:
        raise ValueError(f"the codec makes {codes.shape[0]} codebooks, the models need {pipeline.n_codebooks}")
    count = max(variations, loops, 1)
    batch = codes[None].repeat(count, 1, 1)
    shape = (count, pipeline.coarse.cfg.n_codebooks, codes.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    masks = [build_prompt(spec, shape, resampled.numpy(), codec, generator) for spec in prompt_specs or ["periodic:16"]]
    mask = prompts.keep_union(*masks)
    pipeline.cfg.coarse.seed = seed
    pipeline.cfg.c2f.seed = seed
    generated = pipeline.generate(batch, mask)
    out_dir.mkdir(parents=True, exist_ok=True)
    waves = pipeline.to_audio(generated).numpy()  # [count, samples]
    stem = Path(input_path).stem
    if loops:
        joined = np.concatenate([codec.decode(codes[: pipeline.n_codebooks]).numpy(), *waves])
        return [_write(out_dir / f"{stem}_loop_x{loops}.wav", joined, codec.sample_rate)]
    return [_write(out_dir / f"{stem}_vamp_{i:02d}.wav", wave, codec.sample_rate) for i, wave in enumerate(waves)]


def _write(path: Path, wave: np.ndarray, sample_rate: int) -> Path:
    peak = float(np.abs(wave).max())
    if peak > 1.0:
        wave = wave / peak
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave.astype(np.float32), sample_rate, format="WAV")
    return path
