"""The Descript Audio Codec (DAC) behind every token: load, encode, decode, fingerprint.

A codec is loaded from a pretrained name (``44khz``/``24khz``/``16khz``, downloaded by
``dac.utils.download``) or from a checkpoint path (``DAC.load``). Offline, a small seeded,
randomly initialised DAC is built once with :func:`make_synthetic_codec` and then loaded
from its path exactly like a real checkpoint.

Codes are ``uint16`` tensors shaped ``[..., n_codebooks, frames]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vampnet_pl.utils.atomic import atomic_path

log = logging.getLogger(__name__)

# DAC builds its layers with the deprecated torch.nn.utils.weight_norm; the warning is not ours to fix.
warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)

class CodecMismatch(ValueError):
    """Tokens, shards or a model made by another codec (or with other codebooks) than the one in use."""


def fingerprints_apart(first: object, second: str) -> tuple[str, str]:
    """Two codec fingerprints for a message: their first 16 characters, or as many more as it takes to tell them
    apart (a damaged record can differ from the right one in a single late character)."""
    first = str(first)
    same = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    width = max(16, same + 1)
    return first[:width], second[:width]


# Entries of torchaudio's exact resampling filter beyond which a wave is resampled by FFmpeg instead: the filter
# is (target rate / gcd) x (source rate / gcd), built in float64 several times over (~32 bytes an entry), so an
# odd rate (44101 Hz) would take tens of GB. Every standard rate (8 to 384 kHz) to every DAC rate is far below
# (the most: 0.3 M entries) and keeps torchaudio's filter; legacy ones such as 44056 or 11127 Hz go to FFmpeg.
MAX_SINC_FILTER_ENTRIES = 1 << 24


def sinc_filter_entries(sample_rate: int, target_rate: int) -> int:
    divisor = math.gcd(sample_rate, target_rate)
    return (sample_rate // divisor) * (target_rate // divisor)


PRETRAINED_MODEL_TYPES = ("44khz", "24khz", "16khz")


@dataclass
class SyntheticCodecSpec:
    """Architecture of a small random DAC for tests and the offline demo."""

    n_codebooks: int = 14
    codebook_size: int = 1024
    codebook_dim: int = 8
    sample_rate: int = 44100
    encoder_dim: int = 8
    encoder_rates: list[int] = field(default_factory=lambda: [2, 4, 8, 8])
    decoder_dim: int = 32
    decoder_rates: list[int] = field(default_factory=lambda: [8, 8, 4, 2])
    seed: int = 0


def make_synthetic_codec(path: str | Path, spec: SyntheticCodecSpec | None = None) -> Path:
    """Build a seeded random DAC and save it (atomically) as a regular DAC checkpoint."""
    import dac

    spec = spec or SyntheticCodecSpec()
    kwargs = {k: v for k, v in asdict(spec).items() if k != "seed"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = dac.DAC(**kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        model.save(str(tmp), package=False)
    return path


def _load_dac(source: str):
    import dac

    if source in PRETRAINED_MODEL_TYPES:
        source = str(dac.utils.download(model_type=source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"codec checkpoint not found: {source!r} (give a DAC .pth path or one of {PRETRAINED_MODEL_TYPES})"
        )
    from vampnet_pl.lac_codec import lac_from_payload, refusal_reason

    try:
        payload = peek_checkpoint(path)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects a weights-only load refuses ({refusal_reason(err)}). If it is VampNet's "
                         "LAC codec.pth, convert it first with `vampnet-pl import-vampnet --codec PATH --out-dir DIR "
                         "--trust-pickle` (only for a file from a source you trust: unpickling can run code)") from None
    lac = lac_from_payload(payload, path)  # VampNet's codec, converted by `vampnet-pl import-vampnet`
    if lac is not None:
        return lac
    state = _dac_state(payload, path)
    try:
        model = dac.DAC.load(str(path))
    except RuntimeError as err:  # e.g. weights of other shapes than the metadata's architecture
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"{path} is not a DAC codec checkpoint: {' '.join(lines[:2])[:300]}") from None
    missing = sorted(set(model.state_dict()) - set(state)) if state is not None else []
    if missing:  # audiotools loads with strict=False: they would stay random, silently
        raise ValueError(f"{path} is not a complete DAC checkpoint: it lacks {len(missing)} of the codec's "
                         f"{len(model.state_dict())} weights, such as {missing[:3]} (a model file given as the codec?)")
    return model


def peek_checkpoint(path: Path):
    """A codec file's ``torch.load(weights_only=True)`` (memory-mapped), or None for a torch.package (a packaged DAC:
    DAC's own loader reads it). ``ValueError`` for a file that is no zip archive (truncated, or another kind);
    ``pickle.UnpicklingError`` for metadata that needs full unpickling (an original LAC ``codec.pth``)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a codec checkpoint (not a torch.save zip archive: a truncated file, or "
                         "another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a torch.package: not a plain zip checkpoint
        return None


def _dac_state(payload, path: Path) -> dict | None:
    """The state dict of an audiotools DAC checkpoint (``{"state_dict", "metadata": {"kwargs"}}``), None for a
    torch.package DAC (it holds the whole module); ``ValueError`` for any other payload, which audiotools' loader
    would fail on with a bare ``KeyError`` or ``RuntimeError``."""
    if payload is None:
        return None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict) or "kwargs" not in (payload.get("metadata") or {}):
        found = sorted(map(str, payload))[:6] if isinstance(payload, dict) else f"a {type(payload).__name__}"
        raise ValueError(f"{path} is not a DAC codec checkpoint (expected audiotools' 'state_dict' and "
                         f"'metadata.kwargs', found {found}; an exported model or a training checkpoint is not a codec)")
    return state


class DeviceUnavailable(ValueError):
    """A device setting names a device torch does not know, or one this machine lacks: the user's mistake, found
    before anything moves there (``config.usage_errors_exit`` reports it in one line)."""


def resolve_device(device: str, setting: str = "device") -> torch.device:
    """``auto`` (CUDA when present) or a torch device name. :class:`DeviceUnavailable` for a name torch does not
    know, or a CUDA device this machine lacks (torch would fail with a traceback only when a model moves there);
    ``setting`` names the option in the message (``codec.device``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown {setting} {device!r}: use auto, cpu, cuda or cuda:N") from None
    check_cuda_device(resolved, f"{setting} {device!r}")
    return resolved


def check_cuda_device(device: torch.device, named: str) -> None:
    """:class:`DeviceUnavailable`, with ``named`` (the setting and its value), where ``device`` is a CUDA device this
    machine lacks."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(f"{named}: this machine has no CUDA GPU (use auto or cpu)")
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"{named}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                                f"(cuda:0 to cuda:{count - 1})")


def _apply_in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    units: int,
    in_per_unit: int,
    out_per_unit: int,
    chunk_units: int,
    context_units: int,
) -> torch.Tensor:
    """Run a convolutional ``fn`` over the last axis of ``x`` in overlapping chunks.

    ``x`` holds ``units * in_per_unit`` steps; ``fn`` maps ``n * in_per_unit`` steps to
    ``n * out_per_unit``. Each chunk sees ``context_units`` extra on both sides (where the
    signal has them), which are cut from its output, so memory is bounded by the chunk size.
    """
    if units <= chunk_units:
        return fn(x)
    outputs = []
    for start in range(0, units, chunk_units):
        stop = min(start + chunk_units, units)
        lo, hi = max(0, start - context_units), min(units, stop + context_units)
        y = fn(x[..., lo * in_per_unit : hi * in_per_unit])
        outputs.append(y[..., (start - lo) * out_per_unit : (stop - lo) * out_per_unit])
    return torch.cat(outputs, dim=-1)


class Codec:
    """A loaded DAC with the facts the rest of the framework needs about it."""

    def __init__(self, model, source: str, device: str = "auto", chunk_seconds: float = 30.0, context_frames: int = 32):
        self.source = source
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.chunk_seconds = chunk_seconds
        self.context_frames = context_frames
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, source: str, device: str = "auto", chunk_seconds: float = 30.0, context_frames: int = 32) -> "Codec":
        return cls(_load_dac(source), source, device, chunk_seconds, context_frames)

    # -- facts --------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.model.hop_length)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def n_codebooks(self) -> int:
        return int(self.model.n_codebooks)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def config(self) -> dict:
        """Constructor arguments of the DAC (what a checkpoint's metadata records)."""
        return {
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "codebook_dim": int(self.model.codebook_dim),
            "latent_dim": int(self.model.latent_dim),
            "encoder_rates": list(self.model.encoder_rates),
            "decoder_rates": list(self.model.decoder_rates),
        }

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the codec config and every weight: codes from another codec won't match."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def frames_for(self, seconds: float) -> int:
        return int(round(seconds * self.frame_rate))

    @torch.no_grad()
    def codebook_tables(self, embedding: str = "projected") -> torch.Tensor:
        """Each quantizer's codebook: ``[n_codebooks, codebook_size, width]``.

        ``embedding="raw"``: the codebook vectors themselves (``codebook_dim`` wide, what the original
        VampNet embeds); ``"projected"``: after the quantizer's ``out_proj`` (``latent_dim`` wide).
        """
        if embedding not in ("raw", "projected"):
            raise ValueError(f"embedding must be 'raw' or 'projected', got {embedding!r}")
        tables = []
        for quantizer in self.model.quantizer.quantizers:
            table = quantizer.codebook.weight  # [codebook_size, codebook_dim]
            if embedding == "projected":
                table = quantizer.out_proj(table.t().unsqueeze(0)).squeeze(0).t()
            tables.append(table)
        return torch.stack(tables).float().cpu()

    def table_width(self, embedding: str = "projected") -> int:
        """The ``latent_dim`` a model with this ``embedding`` setting has on this codec."""
        return int(self.model.codebook_dim) if embedding == "raw" else int(self.model.latent_dim)

    # -- encode / decode ----------------------------------------------------------------------
    def _resampler(self, orig_rate: int):
        import torchaudio

        cache = self.__dict__.setdefault("_resamplers", {})
        if orig_rate not in cache:
            cache[orig_rate] = torchaudio.transforms.Resample(orig_rate, self.sample_rate).to(self.device)
        return cache[orig_rate]

    def resample(self, waveform: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
        """Waves ``[..., samples]`` at the codec's rate, on its device: torchaudio's exact filter, or FFmpeg's
        resampler for an odd rate whose exact filter would not fit in memory (``MAX_SINC_FILTER_ENTRIES``)."""
        waveform = torch.as_tensor(np.ascontiguousarray(waveform) if isinstance(waveform, np.ndarray) else waveform,
                                   dtype=torch.float32)
        if sinc_filter_entries(int(sample_rate), self.sample_rate) > MAX_SINC_FILTER_ENTRIES:
            from vampnet_pl.audio_io import resample

            rows = waveform.cpu().numpy()
            out = np.stack([resample(row, int(sample_rate), self.sample_rate) for row in rows.reshape(-1, rows.shape[-1])])
            return torch.from_numpy(out.reshape(*rows.shape[:-1], -1)).to(self.device)
        waveform = waveform.to(self.device)
        if sample_rate == self.sample_rate:
            return waveform
        return self._resampler(int(sample_rate))(waveform)

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
        """Mono waveforms ``[..., samples]`` at ``sample_rate`` -> uint16 codes ``[..., n_codebooks, frames]``.

        The signal is resampled to the codec rate, right-padded to whole frames, and
        encoded in chunks of ``chunk_seconds`` with ``context_frames`` of context.
        """
        audio = self.resample(waveform, sample_rate)
        lead_shape, n = audio.shape[:-1], audio.shape[-1]
        if n == 0:
            raise ValueError("cannot encode an empty waveform")
        frames = math.ceil(n / self.hop_length)
        audio = torch.nn.functional.pad(audio.reshape(-1, 1, n), (0, frames * self.hop_length - n))

        def encode_chunk(chunk: torch.Tensor) -> torch.Tensor:
            _, codes, *_ = self.model.encode(chunk)
            return codes

        codes = _apply_in_chunks(
            encode_chunk, audio, frames, self.hop_length, 1, self.frames_for(self.chunk_seconds), self.context_frames
        )
        return codes.to(torch.int32).cpu().to(torch.uint16).reshape(*lead_shape, self.n_codebooks, frames)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Codes ``[..., n_codebooks, frames]`` -> waveforms ``[..., samples]`` at the codec rate."""
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64) if isinstance(codes, np.ndarray) else codes)
        codes = codes.to(self.device, torch.long)
        lead_shape, (k, frames) = codes.shape[:-2], codes.shape[-2:]
        if k > self.n_codebooks:
            raise ValueError(f"codes have {k} codebooks, the codec has {self.n_codebooks}")

        def decode_chunk(chunk: torch.Tensor) -> torch.Tensor:
            latent, _, _ = self.model.quantizer.from_codes(chunk)
            return self.model.decode(latent)

        def decode_signals(signals: torch.Tensor) -> torch.Tensor:
            return _apply_in_chunks(decode_chunk, signals, frames, 1, self.hop_length,
                                    self.frames_for(self.chunk_seconds), self.context_frames)

        signals = codes.reshape(-1, k, frames)
        if self.device.type == "cpu" and signals.shape[0] > 1:
            # one signal per call: batched convolutions gain nothing on a CPU and spill its caches
            # (8 signals of 10 s: 3x faster one by one; BENCHMARKS.md, "Generation speed")
            audio = torch.cat([decode_signals(signals[i : i + 1]) for i in range(signals.shape[0])])
        else:
            audio = decode_signals(signals)
        return audio.reshape(*lead_shape, -1).float().cpu()
