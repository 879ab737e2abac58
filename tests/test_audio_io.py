"""Decoding any common format, including real music from Debian packages, in bounded blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vampnet_pl.audio_io import AudioReadError, iter_blocks, probe, read_audio

from conftest import DEBIAN_MP3, DEBIAN_OGG, write_tone

needs_debian_music = pytest.mark.skipif(
    not (DEBIAN_MP3 and DEBIAN_OGG), reason="Debian asc-music / drascula-music not installed (make test installs them)"
)


@needs_debian_music
@pytest.mark.parametrize("path", (DEBIAN_MP3[:1] + DEBIAN_OGG[:1]) or ["missing"])
def test_real_music_probes_and_streams(path):
    info = probe(path)
    assert info.sample_rate in (22050, 44100) and info.channels == 2 and info.duration > 10
    seen = 0
    for start, block in iter_blocks(path, info.sample_rate * 5, info):
        assert start == seen and block.dtype == np.float32 and block.shape[0] == 2
        assert block.shape[1] <= info.sample_rate * 5
        seen += block.shape[1]
        if seen > info.sample_rate * 20:
            break
    assert seen > info.sample_rate * 10


@needs_debian_music
def test_real_mp3_resamples_to_the_codec_rate(codec):
    info = probe(DEBIAN_MP3[0])
    assert info.sample_rate == 22050
    _, block = next(iter_blocks(DEBIAN_MP3[0], info.sample_rate * 3, info))
    mono = torch.from_numpy(block.mean(0))
    resampled = codec.resample(mono, info.sample_rate)
    assert resampled.shape[-1] == pytest.approx(3 * 44100, abs=2)
    codes = codec.encode(mono, info.sample_rate)
    assert codes.shape == (14, pytest.approx(3 * codec.frame_rate, abs=1))


def test_formats_through_libsndfile(tmp_path):
    for ext, kwargs in [("wav", {}), ("flac", {}), ("ogg", {}), ("aiff", {})]:
        path = write_tone(tmp_path / f"tone.{ext}", 1.0, 22050, **kwargs)
        audio, rate = read_audio(path)
        assert rate == 22050 and audio.shape[1] == pytest.approx(22050, abs=1100), ext


def test_formats_only_ffmpeg_reads_fall_back_to_pyav(tmp_path):
    import av

    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100, layout="stereo")
        t = np.arange(44100 * 2) / 44100
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, wave.size, 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([wave[start : start + 1024]] * 2), format="fltp", layout="stereo")
            frame.rate = 44100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    info = probe(path)
    assert info.backend == "av" and info.channels == 2 and info.sample_rate == 44100
    audio, _ = read_audio(path)
    assert audio.shape[0] == 2 and abs(audio.shape[1] - 88200) < 4096
    assert np.abs(audio).max() > 0.1


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not audio\n" * 50), "not decodable"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.symlink_to(p.parent / "nowhere.wav"), "does not exist"),
    ],
)
def test_unusable_files_give_a_specific_reason(tmp_path, make, reason):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioReadError, match=reason):
        probe(path)


def test_a_truncated_mp3_is_an_error_not_half_a_file(tmp_path):
    """A cut-off MP3 decodes without error up to the cut; its header still promises the whole length."""
    whole = write_tone(tmp_path / "whole.mp3", 3.0, format="MP3")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert probe(cut).frames == 3 * 44100
    with pytest.raises(AudioReadError, match=r"truncated: decoded \d+ of 132300 frames \(1\.\d+ of 3\.00 s\)"):
        for _ in iter_blocks(cut, 44100):
            pass
    audio, _ = read_audio(whole)  # a whole MP3 is within the tolerance
    assert audio.shape[1] == pytest.approx(3 * 44100, abs=1500)
