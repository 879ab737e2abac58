"""Offline evaluation app: ``vampnet-pl eval coarse=coarse.pt c2f=c2f.pt dataset_dir=DIR``.

On fixed windows of a shard split, the evaluation protocol (``eval_protocol``, see
``evaluation.protocol``): every protocol prompt at the protocol's passes, quality against
passes, plus the codec ceiling, the noisy-token baseline and the extra ``prompts`` presets;
each scored by mel distance (ours, DAC's, VampNet's configuration), FAD and KAD against the
full-depth codec decoding of the real tokens, with the number of embeddings. Writes
``results.csv`` (a ``protocol`` column on every row) and two plots, and prints where they are.
"""

from __future__ import annotations

import csv
import io
import logging
from contextlib import nullcontext
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vampnet_pl.codec import CodecMismatch, DeviceUnavailable, resolve_device  # noqa: E402
from vampnet_pl.config import (EvalConfig, UsageError, check_composed, check_prompt_presets, conf_dir,  # noqa: E402
                               usage_errors_exit)
from vampnet_pl.data.datamodule import read_fixed_windows  # noqa: E402
from vampnet_pl.data.index import load_index, shard_sample_counts  # noqa: E402
from vampnet_pl.data.windows import window_frames  # noqa: E402
from vampnet_pl.evaluation.metrics import fad_embedding  # noqa: E402
from vampnet_pl.evaluation.protocol import evaluate_generation, preset_jobs, protocol_jobs  # noqa: E402
from vampnet_pl.evaluation.scoring import SCORES, check_embedding_count, noisy_tokens  # noqa: E402
from vampnet_pl.generation.pipeline import GenerationConfig  # noqa: E402
from vampnet_pl.generation.sampling import SamplingConfig, example_generators  # noqa: E402
from vampnet_pl.generation.vamp import load_pipeline  # noqa: E402
from vampnet_pl.utils.atomic import write_text_atomic  # noqa: E402

log = logging.getLogger(__name__)
COLUMNS = ["prompt", "protocol", "coarse_passes", *SCORES]


def eval_windows(cfg: EvalConfig, codec) -> torch.Tensor:
    """The ``cfg.split`` windows scored; an empty split is an error, never replaced by another (a
    :class:`UsageError`: the default split, test, is empty in a small catalog's shard set, and the error names the
    splits to score instead)."""
    from vampnet_pl.config import DataSplit

    index = load_index(cfg.dataset_dir)
    split = DataSplit(cfg.split).value
    shards = index["splits"].get(split, {}).get("shards")
    if not shards:
        why = f" (prep's split.{split}_fraction was 0?)" if split != "train" else ""
        others = " or ".join(f"split={name}" for name, entry in index["splits"].items() if entry["shards"])
        raise UsageError(f"the {split} split of {cfg.dataset_dir} has no shards{why}"
                         + (f"; score another with {others}" if others else ""))
    urls = [str(Path(cfg.dataset_dir) / s["path"]) for s in shards]
    frames = window_frames(cfg.window_seconds, codec.sample_rate, codec.hop_length)
    windows, _ = read_fixed_windows(urls, frames, index["codec"]["config"]["n_codebooks"], codec.fingerprint,
                                    cfg.windows_per_sample,
                                    cfg.n_windows or cfg.eval_protocol.gen_windows, codebook_size=codec.codebook_size,
                                    expected_codebooks=index["codec"]["config"]["n_codebooks"],
                                    shard_samples=shard_sample_counts(cfg.dataset_dir, index))
    if not windows:
        raise UsageError(f"no {cfg.window_seconds} s windows in the {split} split of {cfg.dataset_dir}")
    log.info("scoring %d windows of the %s split of %s", len(windows), split, cfg.dataset_dir)
    return torch.stack([torch.from_numpy(w.astype("int64")) for w in windows])


def check_depth(cfg: EvalConfig, n_codebooks: int) -> None:
    """The compression prompts (the protocol's, ``compression:N:P`` presets) against the models' depth, known only
    once they load: before the windows are read and anything generates."""
    try:
        cfg.eval_protocol.check_codebooks(n_codebooks)
        check_prompt_presets(cfg.prompts, "prompts", n_codebooks)
    except ValueError as err:
        raise UsageError(f"{err} (models {cfg.coarse}{', ' + cfg.c2f if cfg.c2f else ''})") from None


def evaluate(cfg: EvalConfig, *, start_up=nullcontext) -> list[dict]:
    """``start_up`` wraps the loading alone (models, windows, FAD embedding), not the scoring (see ``run``)."""
    protocol = cfg.eval_protocol
    generation = GenerationConfig(coarse=SamplingConfig(passes=protocol.passes, seed=cfg.seed),
                                  c2f=SamplingConfig(passes=cfg.c2f_passes, mask_temperature=1.0, seed=cfg.seed),
                                  window_seconds=cfg.window_seconds, c2f_chunk_seconds=cfg.c2f_chunk_seconds)
    with start_up():
        device = resolve_device(cfg.codec.device, "codec.device")  # before the models load; the message names it
        try:  # the models do not fit together (a c2f model given as coarse=, ...): the pipeline's own check
            pipeline = load_pipeline(Path(cfg.coarse), Path(cfg.c2f) if cfg.c2f else None, cfg.codec.source,
                                     str(device), generation)
        except ValueError as err:
            if isinstance(err, (CodecMismatch, DeviceUnavailable)):
                raise
            raise UsageError(f"{err} (coarse={cfg.coarse}{', c2f=' + cfg.c2f if cfg.c2f else ''})") from None
        codec = pipeline.codec
        check_depth(cfg, pipeline.n_codebooks)
        full = eval_windows(cfg, codec)
        embed = fad_embedding(cfg.fad_backend, codec.sample_rate, cfg.fad_weights).to(codec.device)
        try:
            check_embedding_count(embed, len(full), full.shape[-1] * codec.hop_length, codec.sample_rate,
                                  "raise n_windows or window_seconds", codec.device)
        except ValueError as err:
            raise UsageError(str(err)) from None
    depth = pipeline.n_codebooks

    def generate(batch: torch.Tensor, mask: torch.Tensor, passes: int, ids: list[int]) -> torch.Tensor:
        pipeline.cfg.coarse.passes = passes
        return pipeline.generate(batch, mask, ids)

    def noisy(b: torch.Tensor, ids: list[int]) -> torch.Tensor:
        streams = example_generators(cfg.seed, ids, "cpu", "noisy")
        return noisy_tokens(b[:, :depth], cfg.noisy_ratio, codec.codebook_size, 0, streams)

    def mask_shape(b: torch.Tensor) -> tuple[int, int, int]:
        return b.shape[0], depth, b.shape[-1]  # as deep as the models, as in vamp

    jobs = [("ceiling_codec", None, lambda b, ids: b[:, :depth]), ("baseline_noisy", None, noisy)]
    jobs += protocol_jobs(protocol, mask_shape, 0, generate)
    jobs += preset_jobs(cfg.prompts, mask_shape, codec.decode, codec, cfg.seed, generate, protocol.passes)
    return evaluate_generation(protocol, full, jobs, codec.decode, codec.sample_rate, embed, cfg.batch_size, progress=True)


def write_results(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    table = write_text_atomic(out_dir / "results.csv", buffer.getvalue())
    protocol = rows[0]["protocol"] if rows else "?"
    prompt_rows = [r for r in rows if not r["prompt"].startswith("passes_")]
    sweep = [r for r in rows if r["prompt"].startswith("passes_")]
    keys = ("mel", "mel_dac", "fad", "kad")
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 4.5), constrained_layout=True)
    for ax, key in zip(axes, keys):
        ax.barh([r["prompt"] for r in prompt_rows], [r[key] for r in prompt_rows], color="tab:blue")
        ax.set(title=f"{key} per prompt (lower is better)", xlabel=key)
        ax.invert_yaxis()
    fig.suptitle(f"protocol {protocol}, {prompt_rows[0]['n_embeddings'] if prompt_rows else 0} embeddings per set")
    per_prompt = out_dir / "per_prompt.png"
    fig.savefig(per_prompt, dpi=90)
    plt.close(fig)
    sweep_plot = out_dir / "quality_vs_passes.png"
    if not sweep:  # eval_protocol.passes_sweep=[]: no curve to draw (a log axis of nothing fails)
        sweep_plot.unlink(missing_ok=True)  # an earlier run's curve would not match this results.csv
        return [table, per_prompt]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    passes = [r["coarse_passes"] for r in sweep]
    ax.plot(passes, [r["mel"] for r in sweep], "o-", label="mel distance")
    twin = ax.twinx()
    twin.plot(passes, [r["fad"] for r in sweep], "s--", color="tab:orange", label="FAD")
    ax.set(xscale="log", xlabel="coarse sampling passes", ylabel="mel distance", title=f"quality against passes (protocol {protocol})")
    twin.set_ylabel("FAD")
    fig.legend(loc="upper right")
    fig.savefig(sweep_plot, dpi=90)
    plt.close(fig)
    return [table, per_prompt, sweep_plot]


def run(cfg: DictConfig, *, start_up=nullcontext) -> list[Path]:
    """``start_up`` wraps the config check and the loading (``main`` passes :func:`usage_errors_exit`): the user's
    mistakes found there are reported in one line; an error raised while scoring keeps its traceback."""
    with start_up():
        schema: EvalConfig = check_composed("eval", cfg)
    paths = write_results(evaluate(schema, start_up=start_up), Path(schema.out_dir))
    for path in paths:
        print(path)
    return paths


@hydra.main(config_path=str(conf_dir()), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``vampnet-pl eval``. A wrong setting or a missing file found before scoring exits with 2 and a one-line
    error; an error while scoring, with its traceback (Hydra's report, status 1)."""
    run(cfg, start_up=usage_errors_exit)


if __name__ == "__main__":
    main()
