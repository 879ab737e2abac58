"""Data-integrity benchmarks: what validation costs the loader, and local prep balance before vs after.

    .venv/bin/python bench/bench_integrity.py

1. Validation: shards as prep writes them (14 codebooks, 60 s samples, per-sample CRC-32 checksum), streamed by
   the training reader (read tar, decode, validate, cut windows, shuffle, batch) in-line, ``--rounds`` times;
   the time spent in :func:`validate_codes` (wall time by ``perf_counter_ns``, less the timer's own cost,
   calibrated in the same run) is set against the loader's CPU time per sample (``thread_time`` of the
   reading thread, once per round: other load on the machine does not count). A preempted validation
   call counts in full, so the share errs high. The median round is reported, every round's share beside it.
   The model-boundary token check (one ``aminmax``) is timed against one forward of the tiny model.
2. Prep balance: one catalog of uneven files (a few long, many short), encoded by 2 local processes with
   ``balance=static`` (the old fixed ``u % workers`` shares) and ``balance=queue`` (one shared queue,
   longest first), one after the other in this run: wall time and each process's busy time (from the
   unit markers).

Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

import vampnet_pl.data.datamodule as datamodule
from vampnet_pl.codec import SyntheticCodecSpec, make_synthetic_codec
from vampnet_pl.config import ChannelMode, CodecConfig, PrepBalance, PrepConfig, SplitConfig
from vampnet_pl.data.validation import codes_checksum
from vampnet_pl.model.vampnet import VampNet, VampNetConfig, check_token_range
from vampnet_pl.prep.manifest import scan_catalog
from vampnet_pl.prep.run import encode_local

FINGERPRINT = "f" * 64


def write_prep_like_shards(folder: Path, shards: int, per_shard: int, frames: int, codebooks: int = 14) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        path = folder / f"s-{s:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                codes = rng.integers(0, 1024, size=(codebooks, frames), dtype=np.uint16)
                writer.write({"__key__": f"{s}_{i}", "codes.npy": codes,
                              "json": {"codec_fingerprint": FINGERPRINT, "frames": frames, "n_codebooks": codebooks,
                                       "codes_crc32": codes_checksum(codes)}})
        urls.append(str(path))
    return urls


def empty_timing_seconds(repeats: int = 100_000) -> float:
    """What timing an empty region with ``time.perf_counter_ns`` reads (the two calls' own cost), in s."""
    total = 0
    for _ in range(repeats):
        started = time.perf_counter_ns()
        total += time.perf_counter_ns() - started
    return total / repeats / 1e9


def bench_validation(work: Path, batches: int, rounds: int) -> list[tuple[str, str]]:
    """Stream the training reader ``rounds`` times; in each, the time of every :func:`validate_codes` call
    (less the timer's own cost) against the loader's CPU time. The median round is reported."""
    urls = write_prep_like_shards(work, shards=4, per_shard=16, frames=5168)  # 60 s at 44.1 kHz, hop 512
    real = datamodule.validate_codes
    timer_cost = empty_timing_seconds()
    spent: list[float] = []

    def timed(*args, **kwargs):
        started = time.perf_counter_ns()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append((time.perf_counter_ns() - started) / 1e9 - timer_cost)

    measured = []  # (validation share, loader s per sample, validation s per sample)
    datamodule.validate_codes = timed
    try:
        for _ in range(rounds):
            spent.clear()
            stream = datamodule.TrainWindowStream(urls, window_frames=861, n_codebooks=14, batch_size=16,
                                                  batches_per_worker=batches, fingerprint=FINGERPRINT,
                                                  shuffle_buffer=256, codebook_size=1024)
            started = time.thread_time()  # CPU time of this thread: the machine's other load does not count
            for _ in stream:
                pass
            loader = time.thread_time() - started
            samples = stream.skips.samples
            measured.append((sum(spent) / loader, loader / samples, sum(spent) / samples))
    finally:
        datamodule.validate_codes = real
    share, per_sample_loader, per_sample_validation = sorted(measured)[len(measured) // 2]
    shares = ", ".join(f"{100 * m[0]:.2f}%" for m in measured)

    model = VampNet(VampNetConfig(n_codebooks=4, codebook_size=1024, latent_dim=8))
    codes, mask = torch.randint(0, 1024, (16, 4, 861)), torch.zeros(16, 4, 861, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        model(codes, mask)
        started = time.perf_counter()
        for _ in range(5):
            model(codes, mask)
        forward = (time.perf_counter() - started) / 5
    started = time.perf_counter()
    for _ in range(200):
        check_token_range(codes, 1024)
    check = (time.perf_counter() - started) / 200
    return [
        ("samples streamed per round (14 codebooks x 5168 frames, 10 s windows, batch 16)", f"{samples}"),
        ("loader time per sample (read, decode, validate, window, shuffle, batch)", f"{1e3 * per_sample_loader:.3f} ms"),
        ("validation per sample (shape, codebook count, frame count, CRC-32)", f"{1e3 * per_sample_validation:.4f} ms"),
        (f"validation share of loader time (median of {rounds} rounds: {shares})",
         f"**{100 * share:.2f}%** (target < 2%)"),
        ("model-boundary token check per batch [16, 4, 861]", f"{1e6 * check:.0f} us"),
        ("its share of one forward of the tiny model (CPU)", f"{100 * check / forward:.3f}%"),
    ]


def encode_with(balance: PrepBalance, catalog: Path, out: Path, codec_path: Path, workers: int) -> tuple[float, dict]:
    cfg = PrepConfig(catalog=str(catalog), out_dir=str(out), codec=CodecConfig(source=str(codec_path), device="cpu"),
                     workers=workers, balance=balance, files_per_unit=1, scan_workers=1, segment_seconds=30.0,
                     split=SplitConfig(val_fraction=0.0, test_fraction=0.0), channels=ChannelMode.mono)
    scan_catalog(cfg)
    started = time.perf_counter()
    encode_local(cfg)
    wall = time.perf_counter() - started
    busy: dict[int, float] = defaultdict(float)
    finished: dict[int, float] = defaultdict(float)
    for marker in out.glob("units/*.json"):
        record = json.loads(marker.read_text())
        busy[record["worker_pid"]] += record["wall_seconds"]
        finished[record["worker_pid"]] = max(finished[record["worker_pid"]], record["finished_at"])
    last = max(finished.values())
    return wall, {pid: (busy[pid], last - finished[pid]) for pid in busy}


def bench_balance(work: Path, workers: int) -> list[tuple[str, str]]:
    catalog = work / "catalog"
    catalog.mkdir()
    # Files sort by name into units 0..7: both long ones (units 0 and 2) fall into one share under u % 2.
    rate = 16000
    lengths = [120, 8, 120, 8, 8, 8, 8, 8]
    for i, seconds in enumerate(lengths):
        t = np.arange(int(seconds * rate)) / rate
        sf.write(str(catalog / f"f{i:02d}.wav"), (0.3 * np.sin(2 * np.pi * (180 + 20 * i) * t)).astype(np.float32), rate)
    spec = SyntheticCodecSpec(sample_rate=16000, encoder_dim=2, decoder_dim=16, n_codebooks=4, seed=1)
    codec_path = make_synthetic_codec(work / "fast_dac.pth", spec)
    rows = [("catalog", f"{len(lengths)} files ({', '.join(map(str, lengths))} s), 1 file per unit, {workers} processes")]
    for balance in (PrepBalance.static, PrepBalance.queue):
        wall, per_process = encode_with(balance, catalog, work / f"out_{balance.value}", codec_path, workers)
        stats = sorted(per_process.values(), reverse=True)
        rows.append((f"balance={balance.value}: encode wall time (incl. process start, codec load)", f"{wall:.1f} s"))
        rows.append((f"balance={balance.value}: busy per process", ", ".join(f"{b:.1f} s" for b, _ in stats)))
        rows.append((f"balance={balance.value}: idle at the end, per process (waiting for the last unit)",
                     ", ".join(f"{i:.1f} s" for _, i in stats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5, help="loader runs; the median is reported")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vampnet_integrity_"))
    torch.set_num_threads(1)
    rows = bench_validation(work, args.batches, args.rounds)
    rows += bench_balance(work, args.workers)
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
