"""Generation speed on CPU: 10 s of audio (coarse + c2f + decode, 24 + 12 = 36 passes) as a real-time factor,
and the cost of one evaluation round as a share of training time at the default interval.

    .venv/bin/python bench/bench_generate.py --sizes tiny small --batches 1 8

Real-time factor = seconds of audio produced per second of compute (higher is faster), per example.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES  # noqa: E402

from vampnet_pl.codec import Codec, make_synthetic_codec  # noqa: E402
from vampnet_pl.generation.pipeline import GenerationConfig, VampPipeline  # noqa: E402
from vampnet_pl.masking.prompts import periodic  # noqa: E402
from vampnet_pl.model import VampNet, VampNetConfig  # noqa: E402
from vampnet_pl.generation.sampling import SamplingConfig  # noqa: E402


def model(codec: Codec, size: str, n_codebooks: int, n_conditioning: int) -> VampNet:
    cfg = VampNetConfig(n_codebooks=n_codebooks, n_conditioning_codebooks=n_conditioning, codebook_size=codec.codebook_size,
                        latent_dim=int(codec.model.latent_dim), dropout=0.0, codec_fingerprint=codec.fingerprint,
                        **SIZES[size])
    return VampNet(cfg, codec.codebook_tables()[:n_codebooks]).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    codec = Codec.load(str(make_synthetic_codec(Path(tempfile.mkdtemp()) / "dac.pth")), device="cpu")
    frames = codec.frames_for(args.seconds)
    print(f"{args.seconds:.0f} s of audio ({frames} frames), coarse 24 + c2f 12 passes, small synthetic DAC decode, "
          f"{torch.get_num_threads()} threads\n")
    print("| size | batch | generate s (coarse + c2f) | decode s | total s | real-time factor per example |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = GenerationConfig(coarse=SamplingConfig(passes=24, seed=0), c2f=SamplingConfig(passes=12, seed=0),
                               window_seconds=args.seconds)
        pipeline = VampPipeline(model(codec, size, 4, 0), model(codec, size, 14, 4), codec, cfg)
        for batch in args.batches:
            codes = torch.randint(0, codec.codebook_size, (batch, 14, frames))
            mask = periodic((batch, 4, frames), 16)
            t0 = time.perf_counter()
            tokens = pipeline.generate(codes, mask)
            t1 = time.perf_counter()
            pipeline.to_audio(tokens)
            t2 = time.perf_counter()
            print(f"| {size} | {batch} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t2 - t0:.2f} | "
                  f"{args.seconds * batch / (t2 - t0):.2f} |", flush=True)
    eval_share(codec, frames)


def eval_share(codec: Codec, frames: int, every_n_steps: int = 1000, windows: int = 8, n_prompts: int = 11) -> None:
    """One evaluation round of the callback's defaults (8 windows, 9 prompts + 2 reference points, 12 passes)
    for the tiny coarse model, against ``every_n_steps`` training steps of the same model (batch 8)."""
    from vampnet_pl.evaluation.scoring import score
    from vampnet_pl.evaluation.metrics import LogMelPatchEmbedding
    from vampnet_pl.generation.sampling import sample
    from vampnet_pl.training.module import MaskedTokenModule

    coarse = model(codec, "tiny", 4, 0)
    codes = torch.randint(0, codec.codebook_size, (windows, 14, frames))
    reference = codec.decode(codes)
    embed = LogMelPatchEmbedding(codec.sample_rate)
    t0 = time.perf_counter()
    for _ in range(n_prompts):
        tokens = sample(coarse, codes[:, :4], periodic((windows, 4, frames), 16), SamplingConfig(passes=12, seed=0))
        score(codec.decode(tokens), reference, codec.sample_rate, embed)
    eval_seconds = time.perf_counter() - t0
    module = MaskedTokenModule(coarse.cfg, codebook_tables=codec.codebook_tables()[:4])
    module.log = lambda *a, **k: None
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = {"codes": codes[:, :4]}
    t0 = time.perf_counter()
    for _ in range(5):
        loss = module._step(batch, "train")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step_seconds = (time.perf_counter() - t0) / 5
    train_seconds = every_n_steps * step_seconds
    print(f"\nevaluation round (tiny coarse, {windows} windows x {n_prompts} prompts, 12 passes, mel + FAD): "
          f"{eval_seconds:.1f} s; {every_n_steps} training steps (batch {windows}): {train_seconds:.0f} s; "
          f"share of training time: {100 * eval_seconds / (eval_seconds + train_seconds):.1f}%")


if __name__ == "__main__":
    main()
