"""Streaming LightningDataModule over WebDataset shards of DAC codes.

Train: the shard list is split explicitly by rank, then by dataloader worker; each worker
resamples its own shards forever, cuts random windows, shuffles and batches inside the
pipeline, and stops after a fixed number of batches (webdataset's ``with_epoch``, done with
``islice`` here so that a resumed run can start mid-epoch), so every rank sees the same number
of batches whatever the shard sizes (DDP never waits on a rank that ran dry).

Validation: fixed windows from the start of each sample, read in a fixed order, dealt
round-robin to ranks and cut to an equal count per rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vampnet_pl.data.windows import collate_windows, fixed_window_starts, random_window_starts, window_frames
from vampnet_pl.prep.index import load_index

log = logging.getLogger(__name__)


class CodecMismatch(ValueError):
    """Shards made by another codec, or with other codebooks, than the model expects."""


def expand_urls(urls: str | Iterable[str] | None) -> list[str]:
    """A list of shard URLs from a list, a brace pattern (``a-{000..009}.tar``) or ``::``-joined patterns."""
    if urls is None:
        return []
    if isinstance(urls, str):
        urls = [urls]
    expanded: list[str] = []
    for url in urls:
        for part in str(url).split("::"):
            expanded.extend(wds.shardlists.expand_urls(part))
    return expanded


class SkipCounter:
    """Counts skipped samples by reason and warns with the running total."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, what: str, reason: str) -> None:
        self.counts[reason.split(":")[0]] += 1
        log.warning("skipping %s: %s (%d skipped so far in this worker)", what, reason, sum(self.counts.values()))

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: count, warn, continue."""
        self.skip("tar member", f"corrupt or truncated shard: {exn}")
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def decode_samples(
    samples: Iterable[dict], n_codebooks: int, fingerprint: str | None, skips: SkipCounter
) -> Iterator[tuple[np.ndarray, dict]]:
    """Raw tar samples -> ``(codes[:n_codebooks], meta)``; bad samples are skipped and counted."""
    for sample in samples:
        key = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
        try:
            codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
            meta = json.loads(sample["json"])
        except Exception as err:  # truncated bytes, missing member, bad JSON
            skips.skip(key, f"undecodable sample: {type(err).__name__}: {err}")
            continue
        if codes.ndim != 2 or codes.dtype != np.uint16:
            skips.skip(key, f"bad codes array: {codes.dtype}{list(codes.shape)}")
            continue
        if fingerprint is not None and meta.get("codec_fingerprint") != fingerprint:
            raise CodecMismatch(
                f"{key} was encoded by codec {str(meta.get('codec_fingerprint'))[:16]}, "
                f"the model expects {fingerprint[:16]}: re-encode the catalog with the model's codec"
            )
        if codes.shape[0] < n_codebooks:
            raise CodecMismatch(f"{key} has {codes.shape[0]} codebooks, the model reads {n_codebooks}")
        yield codes[:n_codebooks], meta


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class TrainWindowStream(IterableDataset):
    """Endless, rank- and worker-split, resampled stream of shuffled batches of random windows."""

    def __init__(
        self,
        urls: list[str],
        window_frames: int,
        n_codebooks: int,
        batch_size: int,
        batches_per_worker: int,
        fingerprint: str | None = None,
        max_windows_per_sample: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        loader_workers: int = 0,
    ):
        self.urls = list(urls)
        self.window_frames = window_frames
        self.n_codebooks = n_codebooks
        self.batch_size = batch_size
        self.batches_per_worker = batches_per_worker
        self.fingerprint = fingerprint
        self.max_windows_per_sample = max_windows_per_sample
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch  # batches this rank consumed before (a resumed run continues after them)
        self.iterations = 0  # epochs started by this copy (one copy per persistent worker)
        self.loader_workers = loader_workers
        self.skips = SkipCounter()

    def __len__(self) -> int:
        """Batches per epoch on this rank: Lightning needs it to resume mid-epoch correctly."""
        return self.batches_per_worker * max(1, self.loader_workers)

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's own shards: the explicit node, then worker, split."""
        slots = self.world_size * num_workers
        if len(self.urls) < slots:
            raise ValueError(
                f"{len(self.urls)} train shards for {self.world_size} ranks x {num_workers} workers: "
                "need at least one shard each (write smaller shards or use fewer workers)"
            )
        return self.urls[self.rank * num_workers + worker :: slots]

    def _windows(self, samples: Iterable[tuple[np.ndarray, dict]], rng: random.Random) -> Iterator[np.ndarray]:
        for codes, _ in samples:
            starts = random_window_starts(codes.shape[1], self.window_frames, self.max_windows_per_sample, rng)
            for start in starts:
                yield np.ascontiguousarray(codes[:, start : start + self.window_frames])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A generator: an epoch counts only once batches are drawn (a bare iter() by a framework check does not).
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        per_epoch = self.batches_per_worker * num_workers
        epoch = self.start_batch // per_epoch + self.iterations
        # Resuming mid-epoch: skip what this worker already served (the DataLoader deals batches round-robin).
        done = self.start_batch % per_epoch if self.iterations == 0 else 0
        skip = max(0, -(-(done - worker) // num_workers))
        self.iterations += 1
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        shards = self.shards_for(worker, num_workers)
        urls = ({"url": rng.choice(shards)} for _ in iter(int, 1))  # resampled forever
        samples = wds.tarfile_to_samples(handler=self.skips.tar_error)(urls)
        decoded = decode_samples(samples, self.n_codebooks, self.fingerprint, self.skips)
        windows = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(
            self._windows(decoded, rng)
        )
        batches = wds.batched(self.batch_size, collation_fn=collate_windows, partial=False)(windows)
        yield from islice(batches, skip, self.batches_per_worker)


def read_fixed_windows(
    urls: list[str], window_frames: int, n_codebooks: int, fingerprint: str | None, per_sample: int, max_windows: int
) -> tuple[list[np.ndarray], SkipCounter]:
    """Deterministic validation windows, in shard order, at most ``max_windows``."""
    skips = SkipCounter()
    windows: list[np.ndarray] = []
    samples = wds.tarfile_to_samples(handler=skips.tar_error)({"url": url} for url in urls)
    for codes, _ in decode_samples(samples, n_codebooks, fingerprint, skips):
        for start in fixed_window_starts(codes.shape[1], window_frames, per_sample):
            windows.append(np.ascontiguousarray(codes[:, start : start + window_frames]))
            if len(windows) >= max_windows:
                return windows, skips
    return windows, skips


class FixedBatches(IterableDataset):
    """A rank's equal share of fixed validation windows, batched."""

    def __init__(self, windows: list[np.ndarray], batch_size: int, n_codebooks: int | None = None):
        self.windows, self.batch_size, self.n_codebooks = windows, batch_size, n_codebooks

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.windows), self.batch_size):
            yield collate_windows([w[: self.n_codebooks] for w in self.windows[start : start + self.batch_size]])


def rank_share(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of ``items``, cut so that every rank gets the same count."""
    per_rank = len(items) // world_size
    return items[rank::world_size][:per_rank]


class CodesDataModule(L.LightningDataModule):
    """Batches ``{"codes": LongTensor[batch, n_codebooks, window_frames]}`` from shards of DAC codes."""

    def __init__(
        self,
        dataset_dir: str | None = None,
        train_urls: Any = None,
        val_urls: Any = None,
        expected_fingerprint: str | None = None,
        n_codebooks: int | None = None,
        hop_length: int | None = None,
        sample_rate: int | None = None,
        window_seconds: float = 10.0,
        max_windows_per_sample: int = 4,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int = 1000,
        val_windows_per_sample: int = 2,
        val_max_windows: int = 512,
        val_batch_size: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.index: dict | None = None
        self.train_urls, self.val_urls = expand_urls(train_urls), expand_urls(val_urls)
        self.fingerprint = expected_fingerprint
        self.n_codebooks, self.hop_length, self.sample_rate = n_codebooks, hop_length, sample_rate
        if dataset_dir is not None:
            self._read_index(Path(dataset_dir))
        missing = [n for n in ("n_codebooks", "hop_length", "sample_rate") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"without a dataset_dir (index.json), set {', '.join(missing)}")
        self.window_frames = window_frames(window_seconds, self.sample_rate, self.hop_length)
        self.val_windows: list[np.ndarray] | None = None

    def _read_index(self, dataset_dir: Path) -> None:
        index = self.index = load_index(dataset_dir)
        codec = index["codec"]
        if self.fingerprint is not None and codec["fingerprint"] != self.fingerprint:
            raise CodecMismatch(
                f"shards in {dataset_dir} were encoded by codec {codec['fingerprint'][:16]}, "
                f"the model expects {self.fingerprint[:16]}"
            )
        shard_codebooks = codec["config"]["n_codebooks"]
        if self.n_codebooks is not None and self.n_codebooks > shard_codebooks:
            raise CodecMismatch(f"shards have {shard_codebooks} codebooks, the model reads {self.n_codebooks}")
        self.fingerprint = codec["fingerprint"]
        self.n_codebooks = self.n_codebooks or shard_codebooks
        self.hop_length = self.hop_length or codec["config"]["hop_length"]
        self.sample_rate = self.sample_rate or codec["config"]["sample_rate"]
        for split, urls in (("train", self.train_urls), ("val", self.val_urls)):
            if not urls:
                urls.extend(str(dataset_dir / s["path"]) for s in index["splits"][split]["shards"])

    def _check_window_fits(self, split: str) -> None:
        if self.index is None:
            return
        longest = self.index["splits"][split]["max_frames"]
        if longest < self.window_frames:
            raise ValueError(
                f"window of {self.hparams.window_seconds} s ({self.window_frames} frames) is longer than every "
                f"{split} sample (longest: {longest} frames); shorten data.window_seconds"
            )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self) -> TrainWindowStream:
        if not self.train_urls:
            raise ValueError("no train shards")
        self._check_window_fits("train")
        rank, world_size = self._rank()
        workers = max(1, self.hparams.num_workers)
        trainer = getattr(self, "trainer", None)
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        return TrainWindowStream(
            self.train_urls,
            self.window_frames,
            self.n_codebooks,
            self.hparams.batch_size,
            batches_per_worker=max(1, self.hparams.batches_per_epoch // workers),
            fingerprint=self.fingerprint,
            max_windows_per_sample=self.hparams.max_windows_per_sample,
            shuffle_buffer=self.hparams.shuffle_buffer,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world_size,
            start_batch=consumed,
            loader_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        dataset.shards_for(0, max(1, self.hparams.num_workers))  # fail now, not inside a worker
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,  # each worker keeps its epoch count
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),  # leaves the global RNG alone (exact resume)
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_windows is None:
            if not self.val_urls:
                raise ValueError("no validation shards")
            self._check_window_fits("val")
            depth = self.index["codec"]["config"]["n_codebooks"] if self.index else self.n_codebooks
            self.val_windows, skips = read_fixed_windows(  # all codebooks: evaluation decodes the full signal
                self.val_urls,
                self.window_frames,
                depth,
                self.fingerprint,
                self.hparams.val_windows_per_sample,
                self.hparams.val_max_windows,
            )
        rank, world_size = self._rank()
        share = rank_share(self.val_windows, rank, world_size)
        if not share:
            raise ValueError(f"{len(self.val_windows)} validation windows cannot be shared by {world_size} ranks")
        batches = FixedBatches(share, self.hparams.val_batch_size, self.n_codebooks)
        return DataLoader(batches, batch_size=None, generator=torch.Generator(), pin_memory=torch.cuda.is_available())
