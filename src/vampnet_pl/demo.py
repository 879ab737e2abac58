"""The offline main job: synthetic catalog -> DAC codes -> WebDataset shards -> a look at them.

Everything is made here (the catalog by :mod:`vampnet_pl.synth`, a seeded random DAC), so
it runs on a fresh machine with no download.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from vampnet_pl.audio_io import read_audio
from vampnet_pl.cli import compose
from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec
from vampnet_pl.prep.index import verify
from vampnet_pl.prep.run import run_all
from vampnet_pl.synth import write_catalog
from vampnet_pl.viz import plot_codes_and_audio


def first_sample(dataset_dir: Path, index: dict) -> tuple[np.ndarray, dict]:
    shard = index["splits"]["train"]["shards"][0]
    sample = next(iter(wds.WebDataset(str(dataset_dir / shard["path"]), shardshuffle=False, empty_check=False)))
    return np.load(io.BytesIO(sample["codes.npy"])), json.loads(sample["json"])


def run_demo(overrides: list[str]) -> dict:
    cfg = compose("demo", overrides)
    work = Path(cfg.work_dir)
    codec_path = Path(cfg.prep.codec.source)
    if not codec_path.is_file():
        make_synthetic_codec(codec_path, SyntheticCodecSpec(seed=cfg.seed))
    write_catalog(cfg.prep.catalog, n_files=cfg.catalog_files, seconds=cfg.catalog_seconds, seed=cfg.seed,
                  formats=("flac", "wav", "ogg"), stereo_every=3)
    index = run_all(cfg.prep)
    dataset_dir = Path(cfg.prep.out_dir)
    problems = verify(dataset_dir)
    if problems:
        raise RuntimeError(f"the demo's shard set failed verification: {problems[:3]}")
    codec = Codec.load(str(codec_path), cfg.prep.codec.device)
    codes, meta = first_sample(dataset_dir, index)
    audio, rate = read_audio(Path(cfg.prep.catalog) / meta["source"])
    source = codec.resample(torch.from_numpy(audio.mean(0)), rate).cpu()
    picture = plot_codes_and_audio(codes, source, codec.decode(codes), codec.sample_rate, codec.frame_rate,
                                   meta["source"], work / "shards_overview.png")
    print(f"\nshards:   {dataset_dir}  (index.json, verify OK, {index['totals']['shards']} shards)")
    print(f"failures: {dataset_dir / 'failures.jsonl'}")
    print(f"picture:  {picture}")
    return index
