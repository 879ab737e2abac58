"""Reading audio files of any common format, in bounded memory.

libsndfile (through ``soundfile``) reads WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF and more;
anything it refuses is tried with FFmpeg (through PyAV), which reads nearly everything else
(M4A/AAC, WMA, ...). Files are read as a stream of fixed-length blocks so that a one-hour
file never sits in memory whole. File names need not be valid UTF-8 (Linux allows any bytes):
libsndfile gets the name's raw bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Iterator

import numpy as np
import soundfile as sf


class AudioReadError(Exception):
    """A file that cannot be used as audio; the message says why."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    backend: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _check_readable_file(path: Path) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise AudioReadError("file does not exist" + (" (dangling link)" if path.is_symlink() else "")) from None
    except OSError as err:  # ELOOP: a link loop
        raise AudioReadError(f"cannot open: {err.strerror or err}") from None
    if not S_ISREG(stat.st_mode):
        raise AudioReadError("not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioReadError("permission denied")
    if stat.st_size == 0:
        raise AudioReadError("empty file (0 bytes)")


def _sf_name(path: Path) -> bytes | str:
    """The name to give libsndfile: raw bytes on POSIX (soundfile encodes a str as strict UTF-8, which
    fails on names such as ``caf\\xe9.wav`` from Latin-1 systems)."""
    return os.fsencode(path) if os.name == "posix" else str(path)


def probe(path: str | Path) -> AudioInfo:
    """Header facts of an audio file, or :class:`AudioReadError` with a specific reason."""
    path = Path(path)
    _check_readable_file(path)
    try:
        info = sf.info(_sf_name(path))
        return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), "soundfile")
    except (sf.LibsndfileError, RuntimeError, TypeError):
        pass
    return _probe_av(path)


def _probe_av(path: Path) -> AudioInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioReadError("no audio stream in file")
            stream = container.streams.audio[0]
            rate, channels = int(stream.rate or 0), int(stream.channels or 0)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000
            else:
                seconds = 0.0
    except AudioReadError:
        raise
    except Exception as err:  # PyAV raises many error types for undecodable input
        raise AudioReadError(f"not decodable as audio: {type(err).__name__}: {err}") from None
    if rate <= 0 or channels <= 0:
        raise AudioReadError("audio stream without sample rate or channels")
    return AudioInfo(rate, channels, int(round(seconds * rate)), "av")


# Decoders may deliver a little less than the header promises (encoder priming and padding, an MP3 length
# estimated from its bit rate); more than this is a truncated file.
TRUNCATION_TOLERANCE = 0.01  # of the probed frames
TRUNCATION_TOLERANCE_SECONDS = 0.1


def iter_blocks(path: str | Path, block_frames: int, info: AudioInfo | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start_frame, block)`` with ``block`` float32 ``[channels, <=block_frames]``.

    Raises :class:`AudioReadError` ("truncated: ...") after the last block when clearly fewer frames decoded
    than probed (a cut-off MP3 decodes without any error, up to where it was cut).
    """
    path = Path(path)
    info = info or probe(path)
    if info.backend == "soundfile":
        blocks = _iter_blocks_soundfile(path, block_frames)
    else:
        blocks = _iter_blocks_av(path, block_frames, info)
    decoded = 0
    for start, block in blocks:
        decoded += block.shape[1]
        yield start, block
    allowed_shortfall = max(TRUNCATION_TOLERANCE * info.frames, TRUNCATION_TOLERANCE_SECONDS * info.sample_rate)
    if info.frames - decoded > allowed_shortfall:
        raise AudioReadError(f"truncated: decoded {decoded} of {info.frames} frames "
                             f"({decoded / info.sample_rate:.2f} of {info.duration:.2f} s)")


def _iter_blocks_soundfile(path: Path, block_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    start = 0
    try:
        with sf.SoundFile(_sf_name(path)) as handle:
            while True:
                block = handle.read(block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    return
                yield start, np.ascontiguousarray(block.T)
                start += block.shape[0]
    except sf.LibsndfileError as err:
        raise AudioReadError(f"decode error after {start} frames: {err}") from None


def _iter_blocks_av(path: Path, block_frames: int, info: AudioInfo) -> Iterator[tuple[int, np.ndarray]]:
    import av

    pending: list[np.ndarray] = []
    pending_frames, start = 0, 0
    try:
        with av.open(str(path)) as container:
            resampler = av.AudioResampler(format="fltp", layout=None, rate=info.sample_rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    array = out.to_ndarray().astype(np.float32, copy=False)
                    pending.append(array)
                    pending_frames += array.shape[1]
                    while pending_frames >= block_frames:
                        joined = np.concatenate(pending, axis=1)
                        yield start, joined[:, :block_frames]
                        start += block_frames
                        pending, pending_frames = [joined[:, block_frames:]], joined.shape[1] - block_frames
    except AudioReadError:
        raise
    except Exception as err:
        raise AudioReadError(f"decode error after {start} frames: {type(err).__name__}: {err}") from None
    if pending_frames:
        yield start, np.concatenate(pending, axis=1)


def resample(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """A mono float32 wave at ``target_rate``, by FFmpeg's resampler (libswresample, through PyAV).

    Its cost does not depend on how the two rates divide, unlike an exact sinc filter's (torchaudio's, from
    44101 to 44100 Hz, is a 44100 x 44115 table).
    """
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None], format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=target_rate)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame) + resampler.resample(None)]  # None: flush
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A whole (short) file as float32 ``[channels, frames]`` and its sample rate."""
    info = probe(path)
    blocks = [block for _, block in iter_blocks(path, 1 << 20, info)]
    if not blocks:
        raise AudioReadError("no samples decoded")
    return np.concatenate(blocks, axis=1), info.sample_rate
