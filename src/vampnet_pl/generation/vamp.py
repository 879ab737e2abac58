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
from tqdm import tqdm

from vampnet_pl.audio_io import read_audio
from vampnet_pl.codec import Codec
from vampnet_pl.generation.pipeline import GenerationConfig, VampPipeline
from vampnet_pl.generation.sampling import example_generators
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


def loudness(waves: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Integrated loudness (ITU-R BS.1770, LUFS) of mono waveforms ``[..., samples]``; -inf for silence."""
    import torchaudio.functional as AF

    min_samples = int(0.4 * sample_rate) + 1  # one gating block
    if waves.shape[-1] < min_samples:
        waves = torch.nn.functional.pad(waves, (0, min_samples - waves.shape[-1]))
    flat = waves.reshape(-1, 1, waves.shape[-1]).float()
    return torch.stack([AF.loudness(w, sample_rate) for w in flat]).reshape(waves.shape[:-1])


def match_loudness(waves: torch.Tensor, target_lufs: float, sample_rate: int) -> torch.Tensor:
    """Scale each waveform ``[B, samples]`` to ``target_lufs`` (silent outputs are left as they are)."""
    gain_db = (target_lufs - loudness(waves, sample_rate)).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return waves * (10 ** (gain_db / 20))[:, None]


AUDIO_PROMPTS = ("beat", "onset")  # prompts found in the input's audio: they may find nothing


def prompt_masks(specs: list[str], shape: tuple[int, int, int], audio: np.ndarray, codec: Codec, seed: int,
                 random_roll: bool) -> list[torch.Tensor]:
    """Each preset's mask ``[variations, K, T]``. Each variation draws (random tokens, rolled phases) from its own
    stream, named by the seed and its number, through the specs in order: variation i's prompt does not depend on
    how many are made. Beat and onset prompts draw nothing: found once, the same for every variation."""
    streams = example_generators(seed, range(shape[0]), "cpu", "prompt")
    row = (1, *shape[1:])
    return [build_prompt(spec, shape, audio, codec) if spec.split(":")[0] in AUDIO_PROMPTS
            else torch.cat([build_prompt(spec, row, audio, codec, stream, random_roll) for stream in streams])
            for spec in specs]


def output_paths(input_path: Path, out_dir: Path, variations: int, loops: int) -> list[Path]:
    stem = Path(input_path).stem
    if loops:
        return [out_dir / f"{stem}_loop_x{loops}.wav"]
    return [out_dir / f"{stem}_vamp_{i:02d}.wav" for i in range(max(variations, 1))]


def output_folder(out_dir: Path) -> Path:
    """``out_dir``, created if need be; ``ValueError`` naming it where it cannot be (a file, or under one)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output folder {out_dir} is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    return out_dir


def vamp_file(pipeline: VampPipeline, input_path: Path, out_dir: Path, prompt_specs: list[str], variations: int = 1,
              loops: int = 0, seed: int = 0, random_roll: bool = False, loudness_match: bool = True,
              overwrite: bool = False) -> list[Path]:
    """Write ``variations`` WAV files (or, with ``loops`` > 0, one file of the input followed by ``loops`` vamps).

    Each output is mono at the codec's sample rate and as long as the input. ``random_roll``: periodic
    prompts start at a random phase per variation. ``loudness_match``: each output is scaled to the input's
    integrated loudness (as the original's app does). Existing outputs are kept (``FileExistsError``)
    unless ``overwrite``.
    """
    codec = pipeline.codec
    specs = prompt_specs or ["periodic:16"]
    paths = output_paths(input_path, out_dir, variations, loops)
    if existing := [p for p in paths if p.exists()] if not overwrite else []:
        raise FileExistsError(f"{len(existing)} output(s) exist already ({existing[0]} ...): choose another output "
                              "folder, or overwrite them")
    audio, rate = read_audio(input_path)
    if not np.isfinite(audio).all():
        raise ValueError(f"{input_path} has {int((~np.isfinite(audio)).sum())} NaN or infinite samples")
    mono = torch.from_numpy(audio.mean(0))
    rms = float(mono.square().mean().sqrt())
    if rms == 0 or 20 * math.log10(rms) < SILENCE_DBFS:
        raise ValueError(f"{input_path} is silent (below {SILENCE_DBFS} dBFS): nothing to vamp on")
    output_folder(out_dir)  # before the generation, which can take minutes
    resampled = codec.resample(mono, rate).cpu()
    codes = codec.encode(resampled, codec.sample_rate).long()  # [K, T]
    if codes.shape[0] < pipeline.n_codebooks:
        raise ValueError(f"the codec makes {codes.shape[0]} codebooks, the models need {pipeline.n_codebooks}")
    count = loops if loops > 0 else max(variations, 1)
    batch = codes[None].repeat(count, 1, 1)
    shape = (count, pipeline.n_codebooks, codes.shape[-1])  # every codebook: compression:N:P may keep fine ones
    masks = prompt_masks(specs, shape, resampled.numpy(), codec, seed, random_roll)
    for spec, spec_mask in zip(specs, masks):
        if spec.split(":")[0] in AUDIO_PROMPTS and bool(spec_mask.all()):
            raise ValueError(f"--prompt {spec} keeps nothing: no {spec.split(':')[0]}s found in {input_path}; "
                             "choose another prompt")
    mask = prompts.keep_union(*masks)
    if not bool(mask.any()):  # e.g. inpaint:S1:S2 or prefix:S covering the input
        raise ValueError(f"--prompt {' '.join(specs)} keeps every token of {input_path}: nothing would be generated "
                         "(each output would be the input through the codec); choose a prompt that keeps less")
    pipeline.cfg.coarse.seed = seed
    pipeline.cfg.c2f.seed = seed
    total = pipeline.passes_for(codes.shape[-1], count)
    with tqdm(total=total, desc=f"vamp {Path(input_path).name}", unit="pass", dynamic_ncols=True) as progress:
        generated = pipeline.generate(batch, mask, on_pass=progress.update)
    length = resampled.shape[-1]  # the codec pads to whole frames: cut back to the input's length
    waves = pipeline.to_audio(generated)[..., :length]  # [count, samples]
    if loudness_match:
        waves = match_loudness(waves, float(loudness(resampled, codec.sample_rate)), codec.sample_rate)
    waves = waves.numpy()
    if loops:  # the input, then each vamp, every segment the input's length: the loop keeps its tempo
        joined = np.concatenate([codec.decode(codes[: pipeline.n_codebooks]).numpy()[..., :length], *waves])
        return [_write(paths[0], joined, codec.sample_rate)]
    return [_write(path, wave, codec.sample_rate) for path, wave in zip(paths, waves)]


def _write(path: Path, wave: np.ndarray, sample_rate: int) -> Path:
    peak = float(np.abs(wave).max())
    if peak > 1.0:
        wave = wave / peak
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave.astype(np.float32), sample_rate, format="WAV")
    return path
