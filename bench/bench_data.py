"""Data pipeline benchmarks: prep throughput, loader throughput, and shards vs on-the-fly encoding.

    .venv/bin/python bench/bench_data.py --files 8 --seconds 60  (catalog at 48 kHz: resampled to 44.1 kHz)

1. Prep: a synthetic catalog through scan + encode + finalize with the small codec; audio-seconds
   per second and the share of time spent outside the codec (decode, resample, write).
2. Loader: 10 s windows per second from the prepared shards, per worker (one process, in-line)
   and with 2 DataLoader workers.
3. On the fly: what the original VampNet trainer does per batch (read excerpts, resample,
   encode with the codec), in 10 s windows per second, and the ratio to reading shards.

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from vampnet_pl.codec import Codec, make_synthetic_codec
from vampnet_pl.config import CodecConfig, PrepConfig
from vampnet_pl.data.datamodule import CodesDataModule
from vampnet_pl.prep.run import run_all
from vampnet_pl.synth import write_catalog

WINDOW_SECONDS = 10.0


def time_loader(dm: CodesDataModule, batches: int) -> float:
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # warm-up: worker start, first shard open
    started = time.perf_counter()
    count = 0
    for batch in iterator:
        count += batch["codes"].shape[0]
        if count >= batches * dm.hparams.batch_size:
            break
    return count / (time.perf_counter() - started)


def time_on_the_fly(catalog: Path, codec: Codec, batch_size: int, batches: int) -> float:
    files = sorted(p for p in catalog.rglob("*") if p.suffix in (".flac", ".wav", ".ogg"))
    rng = random.Random(0)
    started = time.perf_counter()
    for _ in range(batches):
        excerpts = []
        for _ in range(batch_size):
            path = rng.choice(files)
            info = sf.info(str(path))
            length = int(WINDOW_SECONDS * info.samplerate)
            start = rng.randint(0, max(0, info.frames - length))
            audio, rate = sf.read(str(path), start=start, frames=length, dtype="float32", always_2d=True)
            excerpts.append(codec.resample(torch.from_numpy(audio.mean(1)), rate))
        codec.encode(torch.stack(excerpts), codec.sample_rate)
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="prep encode processes")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vampnet_bench_"))
    catalog = work / "catalog"
    write_catalog(catalog, n_files=args.files, seconds=args.seconds, seed=0, sample_rate=48000, formats=("flac",))
    codec_path = make_synthetic_codec(work / "synthetic_dac.pth")
    cfg = PrepConfig(catalog=str(catalog), out_dir=str(work / "shards"), codec=CodecConfig(source=str(codec_path), device="cpu"),
                     workers=args.workers, files_per_unit=1)
    started = time.perf_counter()
    index = run_all(cfg)
    prep_wall = time.perf_counter() - started
    totals = index["totals"]
    stages = totals["stage_seconds"]
    outside = 1 - stages["codec"] / sum(stages.values())

    dm_kwargs = dict(dataset_dir=str(work / "shards"), window_seconds=WINDOW_SECONDS, batch_size=16, batches_per_epoch=10**6,
                     shuffle_buffer=256)
    per_worker = time_loader(CodesDataModule(num_workers=0, **dm_kwargs), args.batches)
    two_workers = time_loader(CodesDataModule(num_workers=2, **dm_kwargs), args.batches)
    torch.set_num_threads(2)
    codec = Codec.load(str(codec_path), device="cpu")
    fly = time_on_the_fly(catalog, codec, batch_size=8, batches=6)

    rows = [
        ("prep throughput (wall, %d encode processes)" % args.workers, f"{totals['audio_seconds_read'] / prep_wall:.1f} audio-s/s"),
        ("prep throughput per encode process", f"{totals['audio_seconds_read'] / totals['encode_seconds']:.1f} audio-s/s"),
        ("prep time outside the codec (decode+resample+write)", f"{100 * outside:.1f}% "
         f"(decode {stages['decode']:.1f} s, resample {stages['resample']:.1f} s, write {stages['write']:.1f} s, "
         f"codec {stages['codec']:.1f} s)"),
        ("loader, 1 worker (in-line)", f"{per_worker:,.0f} windows/s"),
        ("loader, 2 DataLoader workers", f"{two_workers:,.0f} windows/s"),
        ("on-the-fly encode per batch (VampNet style)", f"{fly:,.2f} windows/s"),
        ("shards vs on the fly (1 worker each)", f"{per_worker / fly:,.0f}x"),
    ]
    print(f"\ncatalog: {args.files} files x {args.seconds:.0f} s, codec {codec.n_codebooks} codebooks, hop {codec.hop_length}, "
          f"{torch.get_num_threads()} threads, window {WINDOW_SECONDS:.0f} s\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
