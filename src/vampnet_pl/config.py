"""Structured-config schemas for Hydra: a typo or a wrong type fails at compose time.

The YAML files in ``conf/`` hold the values; these dataclasses hold the shape. Every schema
is registered in Hydra's ConfigStore under ``schema/<name>`` and used as the first default
of the matching YAML file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$VAMPNET_PL_CONF``, else the one beside ``src/`` in this checkout."""
    env = os.environ.get("VAMPNET_PL_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "prep.yaml").is_file():
        raise FileNotFoundError(f"Hydra config folder not found at {path}; set VAMPNET_PL_CONF")
    return path


@dataclass
class CodecConfig:
    # A pretrained DAC name (44khz, 24khz, 16khz; needs internet once) or a DAC checkpoint path.
    source: str = MISSING
    device: str = "auto"
    chunk_seconds: float = 30.0
    context_frames: int = 32


class ChannelMode(str, Enum):
    mono = "mono"  # mix all channels down to one example
    each = "each"  # every channel is an example of its own


@dataclass
class SplitConfig:
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = "vampnet-pl"


@dataclass
class PrepConfig:
    catalog: str = MISSING
    out_dir: str = MISSING
    codec: CodecConfig = field(default_factory=CodecConfig)
    extensions: list[str] = field(
        default_factory=lambda: ["wav", "flac", "mp3", "ogg", "opus", "aiff", "aif", "m4a", "aac", "wma"]
    )
    channels: ChannelMode = ChannelMode.mono
    segment_seconds: float = 60.0
    min_seconds: float = 1.0
    silence_db: float = -60.0
    loudness_lufs: Optional[float] = None
    split: SplitConfig = field(default_factory=SplitConfig)
    files_per_unit: int = 16
    shard_max_samples: int = 2000
    shard_max_bytes: int = 256 * 1024 * 1024
    workers: int = 1
    scan_workers: int = 2


@dataclass
class DataConfig:
    _target_: str = "vampnet_pl.data.datamodule.CodesDataModule"
    dataset_dir: Optional[str] = None  # a prepared shard set (reads its index.json)
    train_urls: Optional[Any] = None  # or explicit URLs: paths, brace patterns, pipe: commands
    val_urls: Optional[Any] = None
    expected_fingerprint: Optional[str] = None
    n_codebooks: Optional[int] = None  # codebooks the model reads (<= those in the shards)
    hop_length: Optional[int] = None
    sample_rate: Optional[int] = None
    window_seconds: float = 10.0
    max_windows_per_sample: int = 4
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 1000
    batches_per_epoch: int = 1000
    val_windows_per_sample: int = 2
    val_max_windows: int = 512
    val_batch_size: int = 8
    seed: int = 0


@dataclass
class DemoConfig:
    work_dir: str = "demo_out"
    catalog_files: int = 24
    catalog_seconds: float = 20.0
    seed: int = 0
    prep: PrepConfig = field(default_factory=PrepConfig)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="prep_schema", node=PrepConfig)
    store.store(name="demo_schema", node=DemoConfig)
    store.store(group="codec", name="codec_schema", node=CodecConfig)
    store.store(group="data", name="data_schema", node=DataConfig)


register_schemas()
