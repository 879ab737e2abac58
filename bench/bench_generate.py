"""Generation speed: 10 s of audio through coarse (24 passes) + c2f (12 passes, 3 s chunks) + decode.

CPU, side by side with the original VampNet ``generate`` at the same model size, frames and passes
(its own code, from a local checkout; the column is skipped without ``--original``):

    PYTHONPATH=src:/work/orig/lac:/work/orig/deps .venv/bin/python bench/bench_generate.py --sizes tiny small --batches 1 8 \
        --original /work/orig/vampnet-ismir        # writes bench/results/generate.md

GPU (needs only torch; DAC, when installed, adds the decode of a full-size 44 kHz DAC):

    PYTHONPATH=src python bench/bench_generate.py --device cuda --sizes paper --batches 1 2 4 8 16 --cuda-graphs

Times are the best of ``--repeats`` runs, ours and the original's interleaved (the machine may be
shared). Examples/s = batch / (generate + decode) seconds; "vs batch 1" is the per-example
throughput against batch 1 of the same size. The original runs at batch 1 only (its ismir-2023
``generate`` fails on larger batches); "ours faster per example" compares generate times per
example against it. Put ``--sizes`` with the original first in the batch list (batch 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES  # noqa: E402

from vampnet_pl.generation.pipeline import GenerationConfig, VampPipeline  # noqa: E402
from vampnet_pl.generation.sampling import SamplingConfig  # noqa: E402
from vampnet_pl.masking.prompts import periodic  # noqa: E402
from vampnet_pl.model import VampNet, VampNetConfig  # noqa: E402

SAMPLE_RATE, HOP, VOCAB, LATENT = 44100, 512, 1024, 8  # DAC 44 kHz: 86.1 frames/s, raw codebooks of width 8
STAGES = {"coarse": (4, 0), "c2f": (14, 4)}
C2F_LAYERS = {"paper": 16}  # the paper's c2f is shallower than its coarse model


class BenchCodec:
    """What the pipeline needs of a codec: the frame clock, a device and (when DAC is installed) a decoder
    of the real 44 kHz architecture with random weights (the cost of a decode does not depend on them)."""

    fingerprint = ""

    def __init__(self, device: torch.device, decoder=None):
        self.device, self.decoder = device, decoder
        self.sample_rate, self.hop_length = SAMPLE_RATE, HOP
        if decoder is not None:  # decoded as the framework decodes (vampnet_pl.codec.Codec.decode)
            from vampnet_pl.codec import Codec

            self.codec = Codec(decoder, "bench", str(device))

    def frames_for(self, seconds: float) -> int:
        return int(round(seconds * SAMPLE_RATE / HOP))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor | None:
        return None if self.decoder is None else self.codec.decode(codes)

    @classmethod
    def build(cls, device: torch.device, synthetic: bool) -> "BenchCodec":
        try:
            import dac
        except ImportError:
            return cls(device)
        if synthetic:  # the small random DAC of the tests (CPU runs)
            from vampnet_pl.codec import SyntheticCodecSpec

            spec = SyntheticCodecSpec()
            model = dac.DAC(**{k: v for k, v in spec.__dict__.items() if k != "seed"})
        else:
            model = dac.DAC()  # the 44 kHz architecture, 9 codebooks; our 14-codebook codes are cut to its depth
        return cls(device, model.to(device).eval())


def build_models(size: str, device: torch.device, tables: torch.Tensor) -> dict[str, VampNet]:
    models = {}
    for stage, (n_codebooks, n_conditioning) in STAGES.items():
        dims = dict(SIZES[size], **({"n_layers": C2F_LAYERS[size]} if stage == "c2f" and size in C2F_LAYERS else {}))
        cfg = VampNetConfig(n_codebooks=n_codebooks, n_conditioning_codebooks=n_conditioning, codebook_size=VOCAB,
                            latent_dim=LATENT, dropout=0.0, **dims)
        torch.manual_seed(0)
        models[stage] = VampNet(cfg, tables[:n_codebooks]).to(device).eval()
    return models


def build_original(path: Path, size: str, codec_model) -> dict:
    """The original's coarse and c2f ``VampNet`` of the same size (random weights)."""
    sys.path.insert(0, str(path))
    from vampnet.modules.transformer import VampNet as OriginalVampNet

    models = {}
    for stage, (n_codebooks, n_conditioning) in STAGES.items():
        dims = SIZES[size]
        layers = C2F_LAYERS.get(size, dims["n_layers"]) if stage == "c2f" else dims["n_layers"]
        models[stage] = OriginalVampNet(n_heads=dims["n_heads"], n_layers=layers, n_codebooks=n_codebooks,
                                        n_conditioning_codebooks=n_conditioning, latent_dim=LATENT,
                                        embedding_dim=dims["d_model"], vocab_size=VOCAB, flash_attn=False,
                                        dropout=0.0).eval()
    return models


@torch.no_grad()
def original_generate(models: dict, codec_model, codes: torch.Tensor, mask: torch.Tensor, frames_per_chunk: int):
    """The original's own flow: coarse ``generate`` over the window, then c2f ``generate`` chunk by chunk
    (its ``Interface.coarse_to_fine``: 3 s chunks, the last one zero-padded)."""
    coarse = models["coarse"].generate(codec=codec_model, time_steps=codes.shape[-1], sampling_steps=24,
                                       start_tokens=codes[:, :4], mask=mask.int(), return_signal=False)
    frames = codes.shape[-1]
    padded = -(-frames // frames_per_chunk) * frames_per_chunk
    full = torch.nn.functional.pad(torch.cat([coarse, codes[:, 4:]], 1), (0, padded - frames))
    chunks = []
    for start in range(0, padded, frames_per_chunk):
        chunk = full[..., start : start + frames_per_chunk]
        chunk_mask = torch.ones_like(chunk, dtype=torch.int)
        chunk_mask[:, :4] = 0
        chunks.append(models["c2f"].generate(codec=codec_model, time_steps=frames_per_chunk, sampling_steps=12,
                                             start_tokens=chunk, mask=chunk_mask, return_signal=False))
    return torch.cat(chunks, -1)[..., :frames]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--original", type=Path, default=None, help="checkout of hugofloresgarcia/vampnet to time too")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="run the models under bf16 autocast (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    parser.add_argument("--eval-share", action="store_true", help="also time one evaluation round (needs the full env)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    codec = BenchCodec.build(device, synthetic=device.type == "cpu")
    frames = codec.frames_for(args.seconds)
    gen_cfg = GenerationConfig(coarse=SamplingConfig(passes=24, seed=0, cuda_graphs=args.cuda_graphs),
                               c2f=SamplingConfig(passes=12, mask_temperature=1.0, seed=0, cuda_graphs=args.cuda_graphs),
                               window_seconds=args.seconds, c2f_chunk_seconds=3.0)
    lines = [f"{args.seconds:.0f} s of audio ({frames} frames), coarse 24 + c2f 12 passes (3 s chunks), periodic:16 prompt, "
             f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
             f"{torch.get_num_threads()} CPU threads, best of {args.repeats}; decode: "
             f"{'synthetic DAC' if device.type == 'cpu' and codec.decoder is not None else 'DAC 44 kHz architecture' if codec.decoder is not None else 'not measured (no dac)'}",
             "",
             "| size | batch | ours: generate s | decode s | examples/s | vs batch 1 | original batch 1: generate s "
             "| ours faster per example |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    tables = torch.randn(14, VOCAB, LATENT)
    for size in args.sizes:
        models = build_models(size, device, tables)
        pipeline = VampPipeline(models["coarse"], models["c2f"], codec, gen_cfg, device=device)
        original = build_original(args.original, size, codec.decoder) if args.original and device.type == "cpu" else None
        warm = torch.randint(0, VOCAB, (1, 14, codec.frames_for(1.0)), device=device)  # one-time start-up costs
        warm_tokens = pipeline.generate(warm, periodic(tuple(warm[:, :4].shape), 16, device=device))
        codec.decode(warm_tokens[:, :9] if device.type == "cuda" else warm_tokens)
        per_example_b1, original_b1 = None, None
        for batch in args.batches:
            torch.manual_seed(batch)
            codes = torch.randint(0, VOCAB, (batch, 14, frames), device=device)
            mask = periodic((batch, 4, frames), 16, device=device)
            ours, theirs, decode, tokens = [], [], [], None

            def run_ours():
                nonlocal tokens
                with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                    tokens = pipeline.generate(codes, mask)

            for _ in range(args.repeats):
                ours.append(timed(run_ours, device))
                decode.append(timed(lambda: codec.decode(tokens[:, :9] if device.type == "cuda" else tokens), device)
                              if codec.decoder is not None else 0.0)
                if original is not None and batch == 1:  # its generate breaks on batches > 1 (ismir-2023)
                    theirs.append(timed(lambda: original_generate(original, codec.decoder, codes.cpu(), mask.cpu(),
                                                                  codec.frames_for(3.0)), device))
            total = min(ours) + min(decode)
            per_example = batch / total
            per_example_b1 = per_example_b1 or (per_example if batch == 1 else None)
            relative = f"{per_example / per_example_b1:.2f}x" if per_example_b1 else ""
            original_b1 = min(theirs) if theirs else original_b1
            original_cell = f"{original_b1:.2f} | {original_b1 * batch / min(ours):.2f}x" if original_b1 else "- | -"
            decode_cell = f"{min(decode):.2f}" if codec.decoder is not None else "-"
            line = f"| {size} | {batch} | {min(ours):.2f} | {decode_cell} | {per_example:.2f} | {relative} | {original_cell} |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from run import command_line

        args.out.write_text("\n".join([command_line(), *lines]) + "\n")
    if args.eval_share:
        eval_share(frames)


def eval_share(frames: int, every_n_steps: int = 1000, windows: int = 8, n_prompts: int = 11) -> None:
    """One evaluation round of the callback's defaults (8 windows, 9 prompts + 2 reference points, 12 passes)
    for the tiny coarse model, against ``every_n_steps`` training steps of the same model (batch 8)."""
    import tempfile

    from vampnet_pl.codec import Codec, make_synthetic_codec
    from vampnet_pl.evaluation.metrics import LogMelPatchEmbedding
    from vampnet_pl.evaluation.scoring import score
    from vampnet_pl.generation.sampling import sample
    from vampnet_pl.training.module import MaskedTokenModule

    codec = Codec.load(str(make_synthetic_codec(Path(tempfile.mkdtemp()) / "dac.pth")), device="cpu")
    coarse = build_models("tiny", torch.device("cpu"), codec.codebook_tables())["coarse"]
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
    train_seconds = every_n_steps * (time.perf_counter() - t0) / 5
    print(f"\nevaluation round (tiny coarse, {windows} windows x {n_prompts} prompts, 12 passes, mel + FAD): "
          f"{eval_seconds:.1f} s; {every_n_steps} training steps (batch {windows}): {train_seconds:.0f} s; "
          f"share of training time: {100 * eval_seconds / (eval_seconds + train_seconds):.1f}%")


if __name__ == "__main__":
    main()
