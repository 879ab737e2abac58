"""Per-second loudness recorded at prep, and the train stream's loudness cut-off (the original's excerpt rule)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import webdataset as wds

from vampnet_pl.data.datamodule import NoLoudWindows, TrainWindowStream
from vampnet_pl.data.windows import window_loudness
from vampnet_pl.prep.encode import LOUDNESS_FLOOR, loudness_per_second


def test_loudness_per_second_follows_the_level():
    rate = 8000
    t = torch.arange(3 * rate + rate // 2) / rate
    wave = 0.5 * torch.sin(2 * math.pi * 440 * t)
    wave[rate : 2 * rate] *= 0.01  # the second second is 40 dB quieter
    wave[2 * rate : 3 * rate] = 0.0  # the third is silent
    track = loudness_per_second(wave, rate)
    assert len(track) == 4  # the last half second (>= 400 ms) counts
    assert track[0] - track[1] == pytest.approx(40, abs=0.5)
    assert track[2] == LOUDNESS_FLOOR and track[3] == pytest.approx(track[0], abs=0.5)


def test_window_loudness_is_the_power_mean_of_the_seconds_it_touches():
    assert window_loudness([-20.0, -20.0, -70.0], 0, 10, 10.0) == pytest.approx(-20.0)
    assert window_loudness([-20.0, -20.0], 5, 10, 10.0) == pytest.approx(-20.0)  # touches both seconds
    assert window_loudness([-20.0, -70.0], 10, 10, 10.0) == pytest.approx(-70.0)
    assert window_loudness([-20.0, -30.0], 0, 20, 10.0) == pytest.approx(10 * np.log10((0.01 + 0.001) / 2))
    assert window_loudness([], 0, 10, 10.0) == -math.inf


def _shard(path, with_track: bool, loud_seconds: int = 10):
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as writer:
        for i in range(4):
            meta = {"codec_fingerprint": "f" * 64, "frames": 200, "source": f"s{i}"}
            if with_track:  # 10 frames per second: the first 10 seconds loud, the last 10 silent
                meta["loudness_lufs_per_second"] = [-20.0] * loud_seconds + [LOUDNESS_FLOOR] * (20 - loud_seconds)
            codes = rng.integers(0, 64, size=(2, 200), dtype=np.uint16)
            codes[:, :100] = 1  # loud half marked with code 1, quiet half with code 2
            codes[:, 100:] = 2
            writer.write({"__key__": f"k{i}", "codes.npy": codes, "json": meta})
    return str(path)


def _windows(url, cutoff):
    stream = TrainWindowStream([url], window_frames=20, n_codebooks=2, batch_size=4, batches_per_worker=10,
                               fingerprint="f" * 64, shuffle_buffer=8, loudness_cutoff=cutoff, frame_rate=10.0)
    return torch.cat([b["codes"] for b in stream]), stream


def test_quiet_windows_are_not_drawn(tmp_path):
    url = _shard(tmp_path / "a.tar", with_track=True)
    codes, stream = _windows(url, -30.0)
    assert (codes[..., 0] == 1).all()  # every window starts in the loud half (one wholly in the quiet half is skipped)
    assert stream.quiet_windows > 0
    codes, _ = _windows(url, None)
    assert (codes[..., 0] == 2).any()  # without a cut-off, quiet windows are drawn


def test_shards_without_a_loudness_track_warn_and_keep_every_window(tmp_path, caplog):
    url = _shard(tmp_path / "old.tar", with_track=False)
    with caplog.at_level(logging.WARNING):
        codes, _ = _windows(url, -30.0)
    assert (codes[..., 0] == 2).any()
    assert sum("loudness_cutoff=-30.0 is not applied" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="frame_rate"):
        TrainWindowStream([url], 20, 2, 4, 10, loudness_cutoff=-30.0)


def test_a_cutoff_above_every_window_stops_with_a_clear_error(tmp_path):
    """It would otherwise search the shards forever, with no error and no first batch."""
    url = _shard(tmp_path / "a.tar", with_track=True)  # the loudest window is -20 LUFS
    with pytest.raises(NoLoudWindows, match=r"quieter than data.loudness_cutoff=-10.0 LUFS"):
        _windows(url, -10.0)


def test_a_worker_whose_own_shards_are_quiet_reads_the_others(tmp_path, caplog):
    """The cut-off was judged per worker (10,000 quiet windows in a row): a rank whose own shards were all quiet
    stopped the whole run while the other ranks' data passed."""
    quiet, loud = _shard(tmp_path / "quiet.tar", True, loud_seconds=0), _shard(tmp_path / "loud.tar", True)
    stream = TrainWindowStream([quiet, loud], window_frames=20, n_codebooks=2, batch_size=4, batches_per_worker=5,
                               fingerprint="f" * 64, shuffle_buffer=8, loudness_cutoff=-30.0, frame_rate=10.0,
                               rank=0, world_size=2)  # rank 0 owns quiet.tar
    with caplog.at_level(logging.WARNING):
        codes = torch.cat([b["codes"] for b in stream])
    assert codes.shape[0] == 20 and (codes[..., 0] == 1).all()  # loud windows, from the other rank's shard
    assert any("quiet.tar gave no window as loud as data.loudness_cutoff=-30.0 LUFS in 3 reads" in r.message
               for r in caplog.records)
