"""The synthetic music generator: determinism, shape, audible tempo, and the on-disk catalog."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from vampnet_pl.synth import SongSpec, random_song_spec, render_song, write_catalog

SR = 22050


def onset_autocorrelation(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """Normalised autocorrelation of the rectified frame-RMS rise (10 ms hop), and the hop."""
    hop = sample_rate // 100
    frames = audio[: audio.size // hop * hop].astype(np.float64).reshape(-1, hop)
    rms = np.sqrt((frames**2).mean(axis=1))
    onset = np.maximum(np.diff(rms), 0)
    onset -= onset.mean()
    ac = np.correlate(onset, onset, "full")[onset.size - 1 :]
    return ac / ac[0], hop


def test_random_spec_is_plausible_and_deterministic():
    specs = [random_song_spec(seed) for seed in range(50)]
    assert specs[7] == random_song_spec(7)
    for spec in specs:
        assert 80 <= spec.tempo_bpm <= 150
        assert spec.scale in ("major", "minor")
        assert all(1 <= degree <= 7 for degree in spec.chord_progression)
        assert spec.bars % len(spec.chord_progression) == 0
    assert len({spec.tempo_bpm for spec in specs}) > 10
    assert {spec.scale for spec in specs} == {"major", "minor"}


def test_render_is_bit_identical_for_the_same_spec():
    spec = random_song_spec(3)
    first = render_song(spec, 4.0, SR)
    second = render_song(spec, 4.0, SR)
    assert first.tobytes() == second.tobytes()


def test_different_seeds_give_different_audio():
    base = random_song_spec(1)
    same_spec_other_seed = SongSpec(**{**base.__dict__, "seed": base.seed + 1})
    a = render_song(base, 3.0, SR)
    assert not np.array_equal(a, render_song(same_spec_other_seed, 3.0, SR))
    assert not np.array_equal(a, render_song(random_song_spec(2), 3.0, SR))


@pytest.mark.parametrize("seconds, sample_rate", [(2.5, 44100), (1.0, 16000), (0.3, 22050)])
def test_shape_dtype_and_range(seconds, sample_rate):
    audio = render_song(random_song_spec(5), seconds, sample_rate)
    assert audio.shape == (1, round(seconds * sample_rate))
    assert audio.dtype == np.float32
    peak = np.abs(audio).max()
    assert peak <= 1.0
    assert peak == pytest.approx(10 ** (-1 / 20), rel=1e-3)  # about -1 dBFS
    assert audio.std() > 0.05  # not silence


def test_stereo_has_two_distinct_channels():
    audio = render_song(random_song_spec(4), 2.0, SR, stereo=True)
    assert audio.shape == (2, 2 * SR)
    assert audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0
    assert not np.array_equal(audio[0], audio[1])  # panning
    assert np.corrcoef(audio[0], audio[1])[0, 1] > 0.5  # but mostly the same mix


def test_invalid_spec_is_refused():
    with pytest.raises(ValueError):
        SongSpec(tempo_bpm=120, key_root_midi=60, scale="dorian", chord_progression=(1, 4), bars=4, seed=0)
    with pytest.raises(ValueError):
        SongSpec(tempo_bpm=120, key_root_midi=60, scale="major", chord_progression=(1, 8), bars=4, seed=0)


@pytest.mark.parametrize("tempo, seed", [(84.0, 11), (112.0, 0), (147.0, 5)])
def test_tempo_is_audible_in_the_onset_envelope(tempo, seed):
    spec = SongSpec(tempo_bpm=tempo, key_root_midi=52, scale="minor", chord_progression=(1, 6, 3, 7), bars=4, seed=seed)
    ac, hop = onset_autocorrelation(render_song(spec, 12.0, SR)[0], SR)
    beat = 60 / tempo * SR / hop  # beat period in frames
    lo, hi = int(0.7 * beat), int(1.3 * beat) + 1
    lag = lo + int(np.argmax(ac[lo:hi]))
    assert abs(lag - beat) <= max(1.0, 0.03 * beat)
    # a clear peak at the beat, and none between the eighth-note grid lines
    assert ac[lag] > 0.1
    for off_grid in (0.75 * beat, 1.25 * beat):
        assert ac[lag] > ac[int(round(off_grid))] + 0.1


def test_write_catalog_layout_formats_and_rerun(tmp_path):
    seconds, rate = 1.5, 22050
    paths = write_catalog(
        tmp_path, n_files=6, seconds=seconds, seed=3, sample_rate=rate, formats=("flac", "wav", "ogg"), stereo_every=3
    )
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == [
        "song_0000.flac",
        "sub_a/song_0001.wav",
        "sub_a/sub_b/song_0002.ogg",
        "song_0003.flac",
        "sub_a/song_0004.wav",
        "sub_a/sub_b/song_0005.ogg",
    ]
    for i, path in enumerate(paths):
        info = sf.info(path)
        assert info.samplerate == rate
        assert info.channels == (2 if i % 3 == 2 else 1)
        assert info.frames == round(seconds * rate)
        audio, _ = sf.read(path, dtype="float32", always_2d=True)
        assert np.abs(audio).max() > 0.3
    # different files hold different songs
    a, _ = sf.read(paths[0])
    b, _ = sf.read(paths[3])
    assert not np.array_equal(a, b)

    on_disk = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == sorted(paths)  # no leftover temp files
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))

    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_catalog(
        tmp_path, n_files=6, seconds=seconds, seed=3, sample_rate=rate, formats=("flac", "wav", "ogg"), stereo_every=3
    ) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_write_catalog_is_deterministic(tmp_path, fmt):
    """OGG files differed in their random stream serial numbers: the demo's songs changed content hash, hence
    train/val/test split, from one run to the next."""
    first = write_catalog(tmp_path / "a", n_files=2, seconds=0.5, seed=9, sample_rate=16000, formats=(fmt,))
    second = write_catalog(tmp_path / "b", n_files=2, seconds=0.5, seed=9, sample_rate=16000, formats=(fmt,))
    for x, y in zip(first, second):
        assert x.read_bytes() == y.read_bytes()
        audio, _ = sf.read(x, dtype="float32")  # a valid file: libogg checks every page's CRC
        assert np.abs(audio).max() > 0.3


def test_write_catalog_refuses_unknown_format(tmp_path):
    with pytest.raises(ValueError):
        write_catalog(tmp_path, n_files=1, seconds=0.5, formats=("xyz",))
