"""Shared fixtures: a small seeded codec, a synthetic catalog, and a prepared shard set."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec
from vampnet_pl.config import ChannelMode, CodecConfig, PrepConfig, SplitConfig

DEBIAN_MP3 = sorted(glob.glob("/usr/share/games/asc/music/*.mp3"))
# What a process that died hard prints (with PYTHONFAULTHANDLER, which slurm/env.sh sets): faulthandler, a C++
# terminate, glibc's heap checks.
CRASH_MARKERS = ("Fatal Python error", "terminate called", "Segmentation fault", "double free or corruption",
                 "corrupted size vs", "corrupted double-linked list", "malloc(): ", "free(): invalid")

DEBIAN_OGG = sorted(glob.glob("/usr/share/scummvm/drascula/audio/*.ogg"))


@pytest.fixture(scope="session")
def codec_path(tmp_path_factory) -> Path:
    """The demo's small DAC: 14 codebooks, hop 512, 44.1 kHz, random but seeded."""
    return make_synthetic_codec(tmp_path_factory.mktemp("codec") / "synthetic_dac.pth", SyntheticCodecSpec(seed=0))


@pytest.fixture(scope="session")
def codec(codec_path) -> Codec:
    return Codec.load(str(codec_path), device="cpu")


@pytest.fixture(scope="session")
def fast_codec_path(tmp_path_factory) -> Path:
    """An even smaller 16 kHz DAC (4 codebooks) for tests that push a lot of audio through."""
    spec = SyntheticCodecSpec(sample_rate=16000, encoder_dim=2, decoder_dim=16, n_codebooks=4, seed=1)
    return make_synthetic_codec(tmp_path_factory.mktemp("fast_codec") / "fast_dac.pth", spec)


def write_tone(path: Path, seconds: float, sample_rate: int = 44100, channels: int = 1, freq: float = 220.0, **kwargs) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    data = np.stack([wave * (1 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sample_rate, **kwargs)
    return path


def prep_config(catalog: Path, out_dir: Path, codec_source: Path, **overrides) -> PrepConfig:
    """A PrepConfig for tests: small units and shards, no subprocesses unless asked."""
    values = dict(
        catalog=str(catalog),
        out_dir=str(out_dir),
        codec=CodecConfig(source=str(codec_source), device="cpu"),
        files_per_unit=2,
        shard_max_samples=4,
        scan_workers=1,
        segment_seconds=8.0,
        split=SplitConfig(val_fraction=0.25, test_fraction=0.0),
        channels=ChannelMode.mono,
    )
    values.update(overrides)
    return PrepConfig(**values)


@pytest.fixture(scope="session")
def synthetic_catalog(tmp_path_factory) -> Path:
    from vampnet_pl.synth import write_catalog

    root = tmp_path_factory.mktemp("catalog")
    write_catalog(root, n_files=8, seconds=12.0, seed=0, formats=("flac", "wav", "ogg"))
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic_catalog, codec_path) -> Path:
    """A finished shard set of the synthetic catalog (shared, read-only for tests)."""
    from vampnet_pl.prep.run import run_all

    out = tmp_path_factory.mktemp("prepared")
    run_all(prep_config(synthetic_catalog, out, codec_path))
    return out


def on_two_ranks(worker) -> dict:
    """``worker(rank, port, results)`` in two processes (each starts its gloo group on ``port``); ``results``
    as they left it. ``worker`` must be a module-level function (the processes import it)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(port, results), nprocs=2)
        return dict(results)
