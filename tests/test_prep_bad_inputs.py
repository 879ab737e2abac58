"""A bad file never stops a run: each kind is skipped with a specific reason in failures.jsonl."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from vampnet_pl.config import ChannelMode
from vampnet_pl.data.index import load_index
from vampnet_pl.prep.index import NothingUsable
from vampnet_pl.prep.run import run_all

from conftest import prep_config, write_tone


def _samples_by_source(out_dir):
    import webdataset as wds

    index = load_index(out_dir)
    found = {}
    for split in index["splits"].values():
        for shard in split["shards"]:
            for sample in wds.WebDataset(str(out_dir / shard["path"]), shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                found.setdefault(meta["source"], []).append((meta, np.load(io.BytesIO(sample["codes.npy"]))))
    return found


@pytest.fixture(scope="module")
def bad_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_catalog")
    write_tone(root / "good.wav", 3.0)
    write_tone(root / "rates" / "eight_khz.wav", 2.0, sample_rate=8000)
    write_tone(root / "rates" / "ninety_six_khz.flac", 2.0, sample_rate=96000)
    write_tone(root / "six_channels.wav", 2.0, channels=6)
    (root / "empty.wav").write_bytes(b"")
    (root / "text.mp3").write_text("definitely not an mp3 file\n" * 40)
    sf.write(str(root / "few_samples.wav"), np.zeros(7, np.float32) + 0.1, 44100)
    nan = np.full(44100 * 2, 0.2, np.float32)
    nan[30000] = np.nan
    nan[40000] = np.inf
    sf.write(str(root / "nan_inf.wav"), nan, 44100, subtype="FLOAT")
    good = write_tone(root / "tmp_corrupt_src.flac", 4.0).read_bytes()
    corrupt = bytearray(good)
    rng = random.Random(0)
    for i in range(len(corrupt) // 3, len(corrupt) // 3 + 2000):
        corrupt[i] = rng.randrange(256)
    (root / "corrupt.flac").write_bytes(bytes(corrupt))
    (root / "tmp_corrupt_src.flac").unlink()
    sf.write(str(root / "silence.wav"), np.zeros(44100 * 2, np.float32), 44100)
    (root / "dangling.ogg").symlink_to(root / "gone.ogg")  # unreadable: its target does not exist
    (root / "folder.flac").mkdir()  # unreadable: not a file
    whole_mp3 = write_tone(root / "tmp_whole.mp3", 3.0, format="MP3").read_bytes()
    (root / "truncated.mp3").write_bytes(whole_mp3[: len(whole_mp3) // 2])  # decodes cleanly, up to the cut
    (root / "tmp_whole.mp3").unlink()
    return root


@pytest.fixture(scope="module")
def bad_run(bad_catalog, tmp_path_factory, codec_path):
    out = tmp_path_factory.mktemp("bad_out")
    index = run_all(prep_config(bad_catalog, out, codec_path, files_per_unit=3))
    failures = {f["path"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    return out, index, failures


@pytest.mark.parametrize(
    "name, stage, reason",
    [
        ("empty.wav", "scan", "empty file"),
        ("text.mp3", "scan", "not decodable as audio"),
        ("few_samples.wav", "encode", "too short"),
        ("nan_inf.wav", "encode", "non-finite samples"),
        ("corrupt.flac", "encode", "decode error"),
        ("silence.wav", "encode", "silent"),
        ("dangling.ogg", "scan", "does not exist"),
        ("folder.flac", "scan", "not a regular file"),
        ("truncated.mp3", "encode", "truncated: decoded"),
    ],
)
def test_each_bad_file_is_logged_with_its_reason(bad_run, name, stage, reason):
    _, _, failures = bad_run
    assert name in failures, sorted(failures)
    assert failures[name]["stage"] == stage and reason in failures[name]["reason"]


def test_good_files_of_any_rate_and_channel_count_are_encoded(bad_run, codec):
    out, index, failures = bad_run
    samples = _samples_by_source(out)
    assert set(samples) == {"good.wav", "rates/eight_khz.wav", "rates/ninety_six_khz.flac", "six_channels.wav"}
    for source, seconds in [("rates/eight_khz.wav", 2.0), ("rates/ninety_six_khz.flac", 2.0), ("six_channels.wav", 2.0)]:
        (meta, codes), = samples[source]
        assert meta["channel"] == "mix"
        assert codes.dtype == np.uint16 and codes.shape[0] == 14
        assert codes.shape[1] == pytest.approx(seconds * codec.frame_rate, abs=1)
    assert index["totals"]["failures"] == len(failures) == 9


def test_keep_each_channel_as_its_own_example(tmp_path, codec_path):
    catalog = tmp_path / "c"
    write_tone(catalog / "six.wav", 1.5, channels=6)
    out = tmp_path / "o"
    index = run_all(prep_config(catalog, out, codec_path, channels=ChannelMode.each))
    (metas) = [m for m, _ in _samples_by_source(out)["six.wav"]]
    assert sorted(m["channel"] for m in metas) == list(range(6))
    # hours are audio time, each segment once (they were multiplied by the channel count)
    assert index["totals"]["samples"] == 6
    assert index["totals"]["hours"] * 3600 == pytest.approx(1.5)
    assert sum(split["hours"] for split in index["splits"].values()) * 3600 == pytest.approx(1.5)


def test_catalog_with_nothing_usable_fails(tmp_path, codec_path):
    catalog = tmp_path / "c"
    catalog.mkdir()
    (catalog / "a.wav").write_text("junk")
    sf.write(str(catalog / "b.wav"), np.zeros(100, np.float32), 44100)
    with pytest.raises(NothingUsable):
        run_all(prep_config(catalog, tmp_path / "o", codec_path))
    assert not (tmp_path / "o" / "index.json").exists()


def _hour_long_wav(path, sample_rate=44100):
    block = sample_rate * 60
    t = np.arange(block) / sample_rate
    with sf.SoundFile(str(path), "w", sample_rate, 1, subtype="PCM_16") as handle:
        for minute in range(60):
            handle.write((0.2 * np.sin(2 * np.pi * (110 + minute) * t)).astype(np.float32))
    return path


@pytest.mark.slow
def test_one_hour_file_is_encoded_in_bounded_memory(tmp_path, fast_codec_path):
    """Peak memory for a 1 h file stays near that of a 1 min file (its decoded audio alone is 635 MB)."""
    catalog_hour, catalog_minute = tmp_path / "hour", tmp_path / "minute"
    catalog_hour.mkdir()
    catalog_minute.mkdir()
    _hour_long_wav(catalog_hour / "hour.wav")
    write_tone(catalog_minute / "minute.wav", 60.0)
    script = (
        "import resource, sys, json\n"
        "from vampnet_pl.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': code, 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    peaks = {}
    for name, catalog in (("hour", catalog_hour), ("minute", catalog_minute)):
        args = ["prep", "all", f"catalog={catalog}", f"out_dir={tmp_path / ('out_' + name)}", f"codec.source={fast_codec_path}",
                "codec.device=cpu", "scan_workers=1"]
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["rc"] == 0
        peaks[name] = result["peak_mb"]
    index = load_index(tmp_path / "out_hour")
    assert index["totals"]["hours"] == pytest.approx(1.0, abs=0.01)
    assert index["totals"]["samples"] == 60  # segments of 60 s
    assert peaks["hour"] < peaks["minute"] + 250, peaks


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path, fast_codec_path):
    """Linux names are bytes: a Latin-1 ``caf\\xe9.wav`` once stopped the whole scan (UnicodeEncodeError)."""
    catalog = tmp_path / "c"
    write_tone(catalog / "plain.wav", 2.0)
    write_tone(catalog / "latin1.wav", 2.0, freq=330.0)
    try:
        os.rename(os.fsencode(catalog / "latin1.wav"), os.fsencode(catalog) + b"/caf\xe9.wav")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "o"
    run_all(prep_config(catalog, out, fast_codec_path))
    assert not (out / "failures.jsonl").read_text().strip()
    assert set(_samples_by_source(out)) == {"plain.wav", os.fsdecode(b"caf\xe9.wav")}


def test_a_file_at_an_odd_sample_rate_is_encoded_in_bounded_memory(tmp_path, fast_codec_path):
    """torchaudio's exact filter from 44101 to 16000 Hz is a 16000 x 44135 float64 table (5.6 GB, several times
    over): one such file stopped the run (or the kernel killed it), and every re-run again."""
    catalog = tmp_path / "c"
    write_tone(catalog / "odd.wav", 2.0, sample_rate=44101)
    write_tone(catalog / "plain.wav", 2.0, sample_rate=44100, freq=330.0)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"  # an allocation past it fails, harmlessly
        "from vampnet_pl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "o"
    args = ["prep", "all", f"catalog={catalog}", f"out_dir={out}", f"codec.source={fast_codec_path}", "codec.device=cpu",
            "scan_workers=1", "split.val_fraction=0", "split.test_fraction=0"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "failures.jsonl").read_text().strip()
    samples = _samples_by_source(out)
    (meta, codes), = samples["odd.wav"]
    assert meta["source_sample_rate"] == 44101 and codes.shape[1] == samples["plain.wav"][0][1].shape[1]


def test_ffmpeg_resampling_keeps_length_and_waveform():
    from vampnet_pl.audio_io import resample

    for rate, target in [(44101, 16000), (44101, 44100), (11127, 44100)]:
        wave = np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate).astype(np.float32)
        out = resample(wave, rate, target)
        expected = np.sin(2 * np.pi * 440 * np.arange(3 * target) / target)
        assert out.dtype == np.float32 and out.shape == expected.shape
        middle = slice(target // 2, -target // 2)  # away from the edges, where the filter sees zeros
        assert np.abs(out[middle] - expected[middle]).max() < 1e-3
