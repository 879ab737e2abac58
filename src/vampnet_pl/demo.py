"""The offline main job: synthetic catalog -> DAC codes -> shards -> train coarse + c2f -> export.

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
from vampnet_pl.viz import plot_codes_and_audio, plot_losses


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
    models, curves = {}, {}
    for stage in ("coarse", "c2f"):
        run_dir, exported = train_demo_model(cfg, stage, codec_path)
        models[stage] = exported
        steps, losses = read_losses(run_dir)
        curves[stage] = (steps, losses)
        print(f"{stage}: loss {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]}; model {exported}")
    loss_plot = plot_losses(curves, work / "training_loss.png")
    print(f"\nshards:   {dataset_dir}  (index.json, verify OK, {index['totals']['shards']} shards)")
    print(f"failures: {dataset_dir / 'failures.jsonl'}")
    print(f"pictures: {picture}, {loss_plot}")
    print(f"models:   {models['coarse']}, {models['c2f']}  (TensorBoard logs: {work / 'runs'})")
    return index


def train_demo_model(cfg, stage: str, codec_path: Path) -> tuple[Path, Path]:
    """Train the tiny ``stage`` model on the demo's shards; returns (run dir, exported model)."""
    from vampnet_pl.export import export_checkpoint
    from vampnet_pl.train import run

    work = Path(cfg.work_dir)
    overrides = [f"experiment=demo_{stage}", f"data.dataset_dir={cfg.prep.out_dir}", f"codec.source={codec_path}",
                 f"runs_dir={work / 'runs'}", "run_name=" + stage, "resume=false", f"trainer.max_steps={cfg.train_steps}",
                 f"seed={cfg.seed}", "logger=csv", *cfg.train_overrides]
    trainer = run(compose("train", overrides, typed=False))
    run_dir = work / "runs" / stage
    exported = export_checkpoint(Path(trainer.checkpoint_callback.last_model_path), work / "models" / f"{stage}.pt")
    return run_dir, exported


def read_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss_step")]
    return [int(r["step"]) for r in rows], [float(r["train/loss_step"]) for r in rows]
