"""The offline main job: synthetic catalog -> DAC codes -> shards -> train coarse + c2f -> eval -> a vamp.

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
from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec
from vampnet_pl.config import compose
from vampnet_pl.prep.index import verify
from vampnet_pl.prep.run import run_all
from vampnet_pl.synth import write_catalog
from vampnet_pl.viz import plot_codes_and_audio, plot_losses


def first_sample(dataset_dir: Path, index: dict) -> tuple[np.ndarray, dict]:
    shard = index["splits"]["train"]["shards"][0]
    sample = next(iter(wds.WebDataset(str(dataset_dir / shard["path"]), shardshuffle=False, empty_check=False)))
    return np.load(io.BytesIO(sample["codes.npy"])), json.loads(sample["json"])


STAGES = ("coarse", "c2f")


def run_demo(overrides: list[str]) -> dict:
    cfg = compose("demo", overrides)
    work = Path(cfg.work_dir)
    codec_path = Path(cfg.prep.codec.source)
    for stage in STAGES:  # a wrong train_overrides entry fails now, not after the catalog is encoded
        compose("train", train_overrides(cfg, stage, codec_path))
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
    models, curves, logs = {}, {}, []
    for stage in STAGES:
        run_dir, exported = train_demo_model(cfg, stage, codec_path)
        models[stage] = exported
        logs.append(run_dir / "csv" / "metrics.csv")  # the demo trains with logger=csv
        steps, losses = read_losses(run_dir)
        curves[stage] = (steps, losses)
        print(f"{stage}: loss {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]}; model {exported}")
    loss_plot = plot_losses(curves, work / "training_loss.png")
    # a small catalog may leave the test split empty; eval refuses an empty split, so the demo says which it scores
    eval_split = "test" if index["splits"]["test"]["shards"] else "val"
    eval_paths = evaluate_demo_models(cfg, models, codec_path, eval_split)
    vamps = vamp_demo_clip(cfg, models, codec_path)
    print(f"\nshards:   {dataset_dir}  (index.json, verify OK, {index['totals']['shards']} shards)")
    print(f"failures: {dataset_dir / 'failures.jsonl'}")
    print(f"pictures: {picture}, {loss_plot}")
    print(f"models:   {models['coarse']}, {models['c2f']}  (training logs: {', '.join(map(str, logs))})")
    print(f"metrics:  {eval_paths[0]}  ({eval_split} split; plots: {eval_paths[1]}, {eval_paths[2]})")
    print(f"audio:    {', '.join(str(p) for p in vamps)}")
    return index


def evaluate_demo_models(cfg, models: dict[str, Path], codec_path: Path, split: str = "test") -> list[Path]:
    from vampnet_pl.evaluation.app import run as run_eval

    overrides = [f"coarse={models['coarse']}", f"c2f={models['c2f']}", f"codec.source={codec_path}",
                 f"dataset_dir={cfg.prep.out_dir}", f"split={split}", "window_seconds=2.0", "n_windows=8", "batch_size=8",
                 "prompts=[random:0.8]",
                 f"out_dir={Path(cfg.work_dir) / 'eval'}", f"seed={cfg.seed}"]
    return run_eval(compose("eval", overrides, typed=False))


def vamp_demo_clip(cfg, models: dict[str, Path], codec_path: Path) -> list[Path]:
    """A periodic-prompt variation of the first 6 s of a catalog song."""
    import soundfile as sf

    from vampnet_pl.generation.pipeline import GenerationConfig
    from vampnet_pl.generation.sampling import SamplingConfig
    from vampnet_pl.generation.vamp import load_pipeline, vamp_file

    work = Path(cfg.work_dir)
    source = sorted(Path(cfg.prep.catalog).rglob("*.flac"))[0]
    audio, rate = read_audio(source)
    clip = work / "vamps" / "demo_clip.wav"
    clip.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(clip), audio[:, : 6 * rate].T, rate)
    generation = GenerationConfig(coarse=SamplingConfig(passes=24), c2f=SamplingConfig(passes=12, mask_temperature=1.0),
                                  window_seconds=2.0, overlap_seconds=0.5)
    pipeline = load_pipeline(models["coarse"], models["c2f"], str(codec_path), cfg.prep.codec.device, generation)
    return vamp_file(pipeline, clip, clip.parent, ["periodic:8"], variations=2, seed=cfg.seed,
                     overwrite=True)  # a demo rerun replaces its own vamps


def train_overrides(cfg, stage: str, codec_path: Path) -> list[str]:
    """The conf/train.yaml overrides that train the demo's ``stage`` model, the user's ``train_overrides`` last."""
    work = Path(cfg.work_dir)
    return [f"experiment=demo_{stage}", f"data.dataset_dir={cfg.prep.out_dir}", f"codec.source={codec_path}",
            f"runs_dir={work / 'runs'}", "run_name=" + stage, "resume=false", f"trainer.max_steps={cfg.train_steps}",
            f"seed={cfg.seed}", "logger=csv", *cfg.train_overrides]


def train_demo_model(cfg, stage: str, codec_path: Path) -> tuple[Path, Path]:
    """Train the tiny ``stage`` model on the demo's shards; returns (run dir, exported model)."""
    from vampnet_pl.training.export import export_checkpoint
    from vampnet_pl.training.app import run

    work = Path(cfg.work_dir)
    trainer = run(compose("train", train_overrides(cfg, stage, codec_path), typed=False))
    run_dir = work / "runs" / stage
    exported = export_checkpoint(Path(trainer.checkpoint_callback.last_model_path), work / "models" / f"{stage}.pt")
    return run_dir, exported


def read_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss_step")]
    return [int(r["step"]) for r in rows], [float(r["train/loss_step"]) for r in rows]
