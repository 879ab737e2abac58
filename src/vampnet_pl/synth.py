"""Deterministic synthetic music: an offline catalog for training without a real data set.

A masked acoustic token model needs audio with musical structure to learn from: a steady
tempo, drums on the beat, a bass line and chords that follow a progression, a melody in a
key, and sections that repeat. This module renders such songs from a small :class:`SongSpec`
with numpy alone (vectorised; 30 s at 44.1 kHz renders in a fraction of a second) and writes
a catalog of them in several formats and nested folders, so the data pipeline (recursive
scanning, decoding, resampling, stereo downmix) is exercised end to end.

The same spec, length and sample rate always give bit-identical audio, and the same catalog arguments
bit-identical files (so the same content hashes, hence the same train/val/test split in data prep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from vampnet_pl.utils.atomic import atomic_path

SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),  # natural minor
}

# Scale degrees, 1-based (I-V-vi-IV is (1, 5, 6, 4)).
PROGRESSIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "major": ((1, 5, 6, 4), (1, 6, 4, 5), (6, 4, 1, 5), (1, 4, 5, 4), (2, 5, 1, 1), (1, 4, 1, 5)),
    "minor": ((1, 6, 3, 7), (1, 4, 5, 1), (1, 7, 6, 7), (1, 4, 7, 3), (1, 6, 7, 1)),
}

# libsndfile container for each file extension; soundfile needs it explicitly for a temp name.
SOUNDFILE_FORMATS: dict[str, str] = {
    "flac": "FLAC",
    "wav": "WAV",
    "ogg": "OGG",
    "aiff": "AIFF",
    "mp3": "MP3",
}

SUBFOLDERS = ("", "sub_a", "sub_a/sub_b")  # file i goes into SUBFOLDERS[i % 3]

EIGHTHS_PER_BAR = 8  # 4/4 time on an eighth-note grid
PEAK_DBFS = -1.0


@dataclass(frozen=True)
class SongSpec:
    """Everything that defines a song; details (patterns, motif, sounds) are drawn from ``seed``.

    ``bars`` is the length of one section; the progression repeats within and across sections,
    and the melody (when ``melody`` is set) plays in every second section.
    """

    tempo_bpm: float
    key_root_midi: int
    scale: str
    chord_progression: tuple[int, ...]
    bars: int
    seed: int
    melody: bool = True

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {self.scale!r}")
        if not self.chord_progression or not all(1 <= d <= 7 for d in self.chord_progression):
            raise ValueError(f"chord_progression needs scale degrees 1..7, got {self.chord_progression}")
        if self.tempo_bpm <= 0 or self.bars < 1:
            raise ValueError("tempo_bpm must be positive and bars at least 1")


def random_song_spec(seed: int) -> SongSpec:
    """A plausible song: tempo 80-150 BPM, any key, a common progression, 4 or 8 bar sections."""
    rng = np.random.default_rng(seed)
    scale = str(rng.choice(sorted(SCALES)))
    options = PROGRESSIONS[scale]
    progression = options[int(rng.integers(len(options)))]
    return SongSpec(
        tempo_bpm=float(rng.integers(80, 151)),
        key_root_midi=int(rng.integers(48, 60)),
        scale=scale,
        chord_progression=progression,
        bars=len(progression) * int(rng.integers(1, 3)),
        seed=seed,
        melody=bool(rng.random() < 0.8),
    )


def render_song(spec: SongSpec, seconds: float, sample_rate: int = 44100, stereo: bool = False) -> np.ndarray:
    """Render ``seconds`` of ``spec`` as float32 ``[channels, samples]`` peaking at -1 dBFS."""
    n = int(round(seconds * sample_rate))
    if n < 1:
        raise ValueError(f"seconds must give at least one sample, got {seconds}")
    rng = np.random.default_rng((spec.seed, 1))  # a stream apart from random_song_spec's
    eighth = 60.0 / spec.tempo_bpm / 2 * sample_rate  # samples per eighth note
    n_bars = math.ceil(n / (eighth * EIGHTHS_PER_BAR))
    degrees = np.resize(np.asarray(spec.chord_progression), n_bars)

    stems = [
        *_drum_stems(rng, spec, n_bars, eighth, n, sample_rate),
        (_bass(rng, spec, degrees, eighth, n, sample_rate), 0.0, 0.55),
        *_pad_stems(rng, spec, degrees, eighth, n, sample_rate),
    ]
    if spec.melody:
        stems.append((_melody(rng, spec, degrees, eighth, n, sample_rate), -0.25, 0.3))

    mix = np.zeros((2 if stereo else 1, n))
    for signal, pan, gain in stems:
        if stereo:
            angle = (pan + 1) * math.pi / 4  # constant-power pan
            mix[0] += gain * math.cos(angle) * signal
            mix[1] += gain * math.sin(angle) * signal
        else:
            mix[0] += gain * signal
    peak = np.abs(mix).max()
    if peak > 0:
        mix *= 10 ** (PEAK_DBFS / 20) / peak
    return mix.astype(np.float32)


def write_catalog(
    out_dir: str | Path,
    n_files: int,
    seconds: float,
    seed: int = 0,
    sample_rate: int = 44100,
    formats: tuple[str, ...] = ("flac",),
    stereo_every: int = 0,
) -> list[Path]:
    """Write ``n_files`` songs as ``song_{i:04d}.{ext}`` under ``out_dir``; return their paths.

    Formats cycle through ``formats``; file ``i`` goes into ``SUBFOLDERS[i % 3]`` (the root,
    ``sub_a/`` or ``sub_a/sub_b/``); every ``stereo_every``-th file is stereo when it is > 0.
    Each file is written to a hidden temp file beside it and renamed into place; a file that
    already exists is left alone, so re-running is cheap.
    """
    unknown = set(formats) - set(SOUNDFILE_FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {sorted(SOUNDFILE_FORMATS)}, got {formats}")
    out_dir = Path(out_dir)
    paths = []
    for i in tqdm(range(n_files), desc="synthetic catalog", unit="file"):
        ext = formats[i % len(formats)]
        path = out_dir / SUBFOLDERS[i % len(SUBFOLDERS)] / f"song_{i:04d}.{ext}"
        paths.append(path)
        if path.exists():
            continue
        song_seed = int(np.random.SeedSequence((seed, i)).generate_state(1)[0])
        stereo = stereo_every > 0 and i % stereo_every == stereo_every - 1
        audio = render_song(random_song_spec(song_seed), seconds, sample_rate, stereo=stereo)
        with atomic_path(path) as tmp:
            sf.write(tmp, audio.T, sample_rate, format=SOUNDFILE_FORMATS[ext])
            if ext == "ogg":  # libsndfile draws the stream's serial number at random: the same song, other bytes
                tmp.write_bytes(with_ogg_serial(tmp.read_bytes(), song_seed % 2**32))
    return paths


def _ogg_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
        table.append(crc)
    return table


_OGG_CRC_TABLE = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    """The CRC of an Ogg page (polynomial 0x04C11DB7, not reflected, initial value 0), its CRC field zeroed."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def with_ogg_serial(data: bytes, serial: int) -> bytes:
    """An Ogg file's bytes with every page's stream serial number set to ``serial`` (its CRC recomputed): a single
    stream file written twice then has the same bytes, hence the same content hash and data split."""
    out, offset = bytearray(data), 0
    while offset < len(out):
        if out[offset : offset + 4] != b"OggS" or offset + 27 > len(out):
            raise ValueError(f"not an Ogg page at byte {offset}")
        segments = out[offset + 26]
        end = offset + 27 + segments + sum(out[offset + 27 : offset + 27 + segments])
        out[offset + 14 : offset + 18] = serial.to_bytes(4, "little")
        out[offset + 22 : offset + 26] = bytes(4)
        out[offset + 22 : offset + 26] = ogg_crc(bytes(out[offset:end])).to_bytes(4, "little")
        offset = end
    return bytes(out)


# --- instruments -------------------------------------------------------------------------


def _drum_stems(rng, spec: SongSpec, n_bars: int, eighth: float, n: int, sr: int) -> list:
    """Kick on beats 1 and 3 (plus a seeded off-beat kick), snare on 2 and 4, hats on eighths."""
    kick_slots = [0, 4] + ([int(rng.choice([3, 5, 7]))] if rng.random() < 0.5 else [])
    hat_velocity = np.where(np.arange(EIGHTHS_PER_BAR) % 2 == 0, 1.0, 0.6) * rng.uniform(0.85, 1.0, EIGHTHS_PER_BAR)
    snare_fill = np.zeros(EIGHTHS_PER_BAR)
    snare_fill[[2, 6]] = 1.0
    snare_fill[7] = 0.5  # the "and" of 4 in a section's last bar leads into the next

    bar_index = np.repeat(np.arange(n_bars), EIGHTHS_PER_BAR)
    slot = np.tile(np.arange(EIGHTHS_PER_BAR), n_bars)
    onsets = np.round((bar_index * EIGHTHS_PER_BAR + slot) * eighth).astype(np.int64)
    last_bar_of_section = bar_index % spec.bars == spec.bars - 1

    kick_vel = np.isin(slot, kick_slots) * np.where(slot % 4 == 0, 1.0, 0.7)
    snare_vel = np.where(last_bar_of_section, snare_fill[slot], np.isin(slot, [2, 6]) * 1.0)
    hat_vel = hat_velocity[slot]
    return [
        (_place(_kick(sr), onsets, kick_vel, n), 0.0, 1.0),
        (_place(_snare(rng, sr), onsets, snare_vel, n), 0.0, 0.5),
        (_place(_hat(rng, sr), onsets, hat_vel, n), 0.3, 0.15),
    ]


def _kick(sr: int) -> np.ndarray:
    """A sine swept from ~160 Hz down to 45 Hz with an exponential decay."""
    t = np.arange(int(0.35 * sr)) / sr
    freq = 45 + 115 * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.12) * _fade_out(t.size, sr)


def _snare(rng, sr: int) -> np.ndarray:
    """Band-passed noise (1-7 kHz) plus a short 190 Hz body, peaking at 1."""
    t = np.arange(int(0.25 * sr)) / sr
    noise = rng.standard_normal(t.size)
    band = _lowpass(noise, 7000, sr) - _lowpass(noise, 1000, sr)
    body = 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)
    snare = (band * np.exp(-t / 0.06) + body) * _fade_out(t.size, sr)
    return snare / np.abs(snare).max()


def _hat(rng, sr: int) -> np.ndarray:
    """A short burst of high-passed (above ~7 kHz) noise, peaking at 1."""
    t = np.arange(int(0.06 * sr)) / sr
    noise = rng.standard_normal(t.size)
    hat = (noise - _lowpass(noise, 7000, sr)) * np.exp(-t / 0.012) * _fade_out(t.size, sr)
    return hat / np.abs(hat).max()


def _bass(rng, spec: SongSpec, degrees: np.ndarray, eighth: float, n: int, sr: int) -> np.ndarray:
    """Chord roots on a seeded 8th-note pattern, saw or square through a one-pole lowpass."""
    pattern = rng.random(EIGHTHS_PER_BAR) < 0.6
    pattern[0] = True
    octave_up = (rng.random(EIGHTHS_PER_BAR) < 0.2) & (np.arange(EIGHTHS_PER_BAR) > 0)
    wave = "saw" if rng.random() < 0.5 else "square"
    cutoff = rng.uniform(350, 900)

    scale = np.asarray(SCALES[spec.scale])
    root_class = (spec.key_root_midi + scale[degrees - 1]) % 12
    midi = 36 + np.repeat(root_class, EIGHTHS_PER_BAR) + 12 * np.tile(octave_up, degrees.size)
    midi = np.where(np.tile(pattern, degrees.size), midi, np.nan)
    voice = _render_notes(midi[None], np.ones(midi.size, bool), eighth, n, sr, wave, (0.003, 0.35, 0.01), gate=0.85)
    return _lowpass(voice[0], cutoff, sr)


def _pad_stems(rng, spec: SongSpec, degrees: np.ndarray, eighth: float, n: int, sr: int) -> list:
    """Three or four close-voiced chord tones per bar, each a detuned pair of triangles."""
    n_voices = int(rng.integers(3, 5))
    scale = np.asarray(SCALES[spec.scale])
    steps = (degrees[:, None] - 1 + np.array([0, 2, 4, 6])[:n_voices]) % 7  # stacked thirds
    low = spec.key_root_midi + 5  # fold every chord into one octave: smooth voice leading
    midi = np.sort(low + (spec.key_root_midi + scale[steps] - low) % 12, axis=1).T
    voices = _render_notes(
        midi.astype(float), np.ones(degrees.size, bool), eighth * EIGHTHS_PER_BAR, n, sr, "triangle",
        (0.08, np.inf, 0.06), gate=0.98, detune_cents=8.0,
    )
    pans = np.linspace(-0.6, 0.6, n_voices)
    return [(voice, pan, 0.35 / n_voices) for voice, pan in zip(voices, pans)]


def _melody(rng, spec: SongSpec, degrees: np.ndarray, eighth: float, n: int, sr: int) -> np.ndarray:
    """A seeded motif over one pass of the progression, repeated, in every second section."""
    n_chords = len(spec.chord_progression)
    steps = np.full(n_chords * EIGHTHS_PER_BAR, np.nan)  # scale steps above the tonic; NaN = rest
    onset = np.zeros(steps.size, bool)
    current = 7.0
    for bar, degree in enumerate(spec.chord_progression):
        for slot in range(EIGHTHS_PER_BAR):
            i = bar * EIGHTHS_PER_BAR + slot
            if slot == 0:  # start each bar on the chord tone nearest the last note
                tones = (degree - 1 + np.array([0, 2, 4]))[:, None] % 7 + np.array([0, 7, 14])
                current = float(tones.flat[np.argmin(np.abs(tones - current))])
            else:
                action = rng.random()
                if action < 0.2:
                    continue  # rest
                if action < 0.45 and not np.isnan(steps[i - 1]):
                    steps[i] = steps[i - 1]  # hold
                    continue
                current = float(np.clip(current + rng.choice([-2, -1, 1, 2]), 0, 12))
            steps[i] = current
            onset[i] = True

    scale = np.asarray(SCALES[spec.scale])
    repeats = math.ceil(degrees.size / n_chords)
    steps, onset = np.tile(steps, repeats), np.tile(onset, repeats)
    section = np.arange(steps.size) // (EIGHTHS_PER_BAR * spec.bars)
    steps[section % 2 == 0] = np.nan  # melody rests in every other section
    step_int = np.nan_to_num(steps).astype(int)
    midi = np.where(np.isnan(steps), np.nan, spec.key_root_midi + 12 + 12 * (step_int // 7) + scale[step_int % 7])
    return _render_notes(midi[None], onset, eighth, n, sr, "sine2", (0.005, 0.45, 0.02), gate=0.9)[0]


# --- building blocks ---------------------------------------------------------------------


def _render_notes(
    midi: np.ndarray,
    onset: np.ndarray,
    slot_len: float,
    n: int,
    sr: int,
    wave: str,
    envelope: tuple[float, float, float],
    gate: float,
    detune_cents: float = 0.0,
) -> np.ndarray:
    """Render note grids as ``[voices, n]``; all voices share the rhythm of ``midi[0]``.

    ``midi`` is ``[voices, slots]`` on a grid of ``slot_len`` samples (NaN = rest); a note
    starts where ``onset`` is set or after a rest and holds through the slots that follow.
    ``envelope`` is (attack, decay, release) in seconds; ``gate`` is the sounding fraction
    of a note's last slot. With ``detune_cents`` each voice is a pair of detuned oscillators.
    """
    sounding = ~np.isnan(midi[0])
    starts = sounding & (onset | ~np.r_[False, sounding[:-1]])
    start_slots = np.flatnonzero(starts)
    if start_slots.size == 0:  # all rests
        return np.zeros((midi.shape[0], n))
    breaks = np.flatnonzero(np.r_[starts[1:] | ~sounding[1:], True]) + 1
    end_slots = breaks[np.searchsorted(breaks, start_slots, side="right")]
    start_at = np.round(start_slots * slot_len)
    end_at = np.round((end_slots - 1 + gate) * slot_len)

    sample = np.arange(n)
    note = np.searchsorted(start_at, sample, side="right") - 1
    held = note >= 0
    note = np.maximum(note, 0)
    since = (sample - start_at[note]) / sr
    left = (end_at[note] - sample) / sr
    attack, decay, release = envelope
    env = np.clip(since / attack, 0, 1) * np.exp(-since / decay) * np.clip(left / release, 0, 1) * held

    freqs = 440.0 * 2 ** ((midi[:, start_slots] - 69) / 12)  # [voices, notes]
    out = np.empty((midi.shape[0], n))
    for v in range(midi.shape[0]):
        phase = np.cumsum(freqs[v][note]) / sr
        if detune_cents:
            ratio = 2 ** (detune_cents / 1200)
            out[v] = 0.5 * (_oscillator(phase * ratio, wave) + _oscillator(phase / ratio, wave))
        else:
            out[v] = _oscillator(phase, wave)
        out[v] *= env
    return out


def _oscillator(phase: np.ndarray, wave: str) -> np.ndarray:
    """A waveform in [-1, 1] at ``phase`` (in cycles)."""
    saw = 2 * (phase - np.floor(phase)) - 1
    if wave == "saw":
        return saw
    if wave == "square":
        return np.where(saw < 0, -1.0, 1.0)
    if wave == "triangle":
        return 2 * np.abs(saw) - 1
    if wave == "sine2":  # sine with a little second harmonic
        return (np.sin(2 * np.pi * phase) + 0.3 * np.sin(4 * np.pi * phase)) / 1.3
    raise ValueError(f"unknown waveform {wave!r}")


def _lowpass(x: np.ndarray, cutoff_hz: float, sr: int) -> np.ndarray:
    """One-pole lowpass ``y[t] = a x[t] + (1 - a) y[t-1]``, applied exactly in the frequency domain."""
    a = 1 - math.exp(-2 * math.pi * cutoff_hz / sr)
    tail = int(math.log(1e-7) / math.log(1 - a)) + 1  # the impulse response has died out by then
    size = 1 << (x.size + tail - 1).bit_length()  # zero padding keeps the convolution linear
    z = np.exp(-2j * np.pi * np.arange(size // 2 + 1) / size)
    return np.fft.irfft(np.fft.rfft(x, size) * (a / (1 - (1 - a) * z)), size)[: x.size]


def _place(template: np.ndarray, onsets: np.ndarray, velocity: np.ndarray, n: int) -> np.ndarray:
    """Add ``template`` scaled by ``velocity`` at each onset (in samples) into a track of ``n``."""
    track = np.zeros(n)
    for start, vel in zip(onsets, velocity):
        if vel > 0 and start < n:
            stop = min(start + template.size, n)
            track[start:stop] += vel * template[: stop - start]
    return track


def _fade_out(size: int, sr: int, seconds: float = 0.005) -> np.ndarray:
    """A gain that ramps linearly to zero over the last ``seconds`` so a one-shot ends clickless."""
    return np.clip(np.arange(size, 0, -1) / (seconds * sr), 0, 1)
