"""Offline evaluation app: ``vampnet-pl eval coarse=coarse.pt c2f=c2f.pt dataset_dir=DIR``.

On fixed windows of a shard split: every prompt preset, plus the codec ceiling and the
noisy-token baseline, scored by mel distance and FAD against the full-depth codec decoding of
the real tokens; then quality against the number of coarse sampling passes. Writes
``results.csv`` and two plots, and prints where they are.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vampnet_pl.config import EvalConfig, conf_dir  # noqa: E402
from vampnet_pl.data.datamodule import read_fixed_windows  # noqa: E402
from vampnet_pl.data.windows import window_frames  # noqa: E402
from vampnet_pl.evaluation.scoring import noisy_tokens, score  # noqa: E402
from vampnet_pl.generation.pipeline import GenerationConfig  # noqa: E402
from vampnet_pl.evaluation.metrics import fad_embedding  # noqa: E402
from vampnet_pl.prep.index import load_index  # noqa: E402
from vampnet_pl.generation.sampling import SamplingConfig  # noqa: E402
from vampnet_pl.utils.atomic import write_text_atomic  # noqa: E402
from vampnet_pl.masking.presets import build_prompt  # noqa: E402
from vampnet_pl.generation.vamp import load_pipeline  # noqa: E402

log = logging.getLogger(__name__)


def eval_windows(cfg: EvalConfig, codec) -> torch.Tensor:
    index = load_index(cfg.dataset_dir)
    split = cfg.split if index["splits"][cfg.split]["shards"] else "val"
    urls = [str(Path(cfg.dataset_dir) / s["path"]) for s in index["splits"][split]["shards"]]
    frames = window_frames(cfg.window_seconds, codec.sample_rate, codec.hop_length)
    windows, _ = read_fixed_windows(urls, frames, index["codec"]["config"]["n_codebooks"], codec.fingerprint, 1,
                                    cfg.n_windows)
    if not windows:
        raise ValueError(f"no {cfg.window_seconds} s windows in the {split} split of {cfg.dataset_dir}")
    return torch.stack([torch.from_numpy(w.astype("int64")) for w in windows])


def evaluate(cfg: EvalConfig) -> list[dict]:
    generation = GenerationConfig(coarse=SamplingConfig(passes=cfg.coarse_passes, seed=cfg.seed),
                                  c2f=SamplingConfig(passes=cfg.c2f_passes, mask_temperature=1.0, seed=cfg.seed),
                                  window_seconds=cfg.window_seconds, c2f_chunk_seconds=cfg.c2f_chunk_seconds)
    pipeline = load_pipeline(Path(cfg.coarse), Path(cfg.c2f) if cfg.c2f else None, cfg.codec.source, cfg.codec.device,
                             generation)
    codec = pipeline.codec
    full = eval_windows(cfg, codec)
    depth = pipeline.n_codebooks
    reference = torch.cat([codec.decode(b) for b in full.split(cfg.batch_size)])
    n_coarse = pipeline.coarse.cfg.n_codebooks
    generator = torch.Generator().manual_seed(cfg.seed)
    embed = fad_embedding(cfg.fad_backend, codec.sample_rate, cfg.fad_weights).to(reference.device)
    rows = []

    def add(name: str, passes: int | None, tokens_fn) -> None:
        batches = zip(full.split(cfg.batch_size), reference.split(cfg.batch_size))
        audio = torch.cat([codec.decode(tokens_fn(batch, batch_audio)) for batch, batch_audio in batches])
        rows.append({"prompt": name, "coarse_passes": passes or "", **score(audio, reference, codec.sample_rate, embed)})

    def generated(spec: str):
        def run(batch: torch.Tensor, batch_audio: torch.Tensor) -> torch.Tensor:
            # beat / onset prompts are found in each window's own audio
            mask = build_prompt(spec, (batch.shape[0], n_coarse, batch.shape[-1]), batch_audio.cpu().numpy(), codec,
                                generator)
            return pipeline.generate(batch, mask)
        return run

    jobs = [("ceiling_codec", None, lambda b, _: b[:, :depth]),
            (f"baseline_noisy_{cfg.noisy_ratio}", None,
             lambda b, _: noisy_tokens(b[:, :depth], cfg.noisy_ratio, codec.codebook_size, 0, generator))]
    jobs += [(spec, cfg.coarse_passes, generated(spec)) for spec in cfg.prompts]
    for name, passes, fn in tqdm(jobs, desc="prompts", unit="prompt"):
        add(name, passes, fn)
    for passes in tqdm(cfg.passes_sweep, desc="passes sweep", unit="setting"):
        pipeline.cfg.coarse.passes = passes
        add(f"{cfg.sweep_prompt} (sweep)", passes, generated(cfg.sweep_prompt))
    return rows


def write_results(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "coarse_passes", "mel_distance", "fad"])
    writer.writeheader()
    writer.writerows(rows)
    table = write_text_atomic(out_dir / "results.csv", buffer.getvalue())
    prompt_rows = [r for r in rows if not r["prompt"].endswith("(sweep)")]
    sweep = [r for r in rows if r["prompt"].endswith("(sweep)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, key in zip(axes, ("mel_distance", "fad")):
        ax.barh([r["prompt"] for r in prompt_rows], [r[key] for r in prompt_rows], color="tab:blue")
        ax.set(title=f"{key} per prompt (lower is better)", xlabel=key)
        ax.invert_yaxis()
    per_prompt = out_dir / "per_prompt.png"
    fig.savefig(per_prompt, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    passes = [r["coarse_passes"] for r in sweep]
    ax.plot(passes, [r["mel_distance"] for r in sweep], "o-", label="mel distance")
    twin = ax.twinx()
    twin.plot(passes, [r["fad"] for r in sweep], "s--", color="tab:orange", label="FAD")
    ax.set(xscale="log", xlabel="coarse sampling passes", ylabel="mel distance", title=sweep[0]["prompt"] if sweep else "")
    twin.set_ylabel("FAD")
    fig.legend(loc="upper right")
    sweep_plot = out_dir / "quality_vs_passes.png"
    fig.savefig(sweep_plot, dpi=90)
    plt.close(fig)
    return [table, per_prompt, sweep_plot]


def run(cfg: DictConfig) -> list[Path]:
    schema: EvalConfig = OmegaConf.to_object(cfg)
    paths = write_results(evaluate(schema), Path(schema.out_dir))
    for path in paths:
        print(path)
    return paths


@hydra.main(config_path=str(conf_dir()), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
