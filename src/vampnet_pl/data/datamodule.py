"""Streaming LightningDataModule over WebDataset shards of DAC codes.

Train: the shard list is split explicitly by rank, then by dataloader worker; each worker
resamples its own shards forever, cuts random windows, shuffles and batches inside the
pipeline, and stops after a fixed number of batches (webdataset's ``with_epoch``, done with
``islice`` here so that a resumed run can start mid-epoch), so every rank sees the same number
of batches whatever the shard sizes (DDP never waits on a rank that ran dry).

Validation: fixed windows from the start of each sample, read in a fixed order, dealt
round-robin to ranks and cut to an equal count per rank (what the cut leaves out is logged).

Integrity: every sample is validated (:mod:`vampnet_pl.data.validation`) before it is windowed; a damaged sample,
or a shard that is missing, unreadable or truncated (also one cut at a sample boundary, which reads without an
error: told by ``index.json``'s sample count), is skipped and counted by reason (:class:`SkipCounter`); a dead
shard leaves the epoch's resampling pool (:class:`ShardPool`, found anew each epoch) and streaming goes on with the
others (a worker whose own shards are all dead reads the other live ones, so every rank still serves its fixed
batch count). Too high a skip rate (judged on the sum over all workers and ranks by
:class:`~vampnet_pl.training.callbacks.DataHealth`, on the whole set for validation), or no readable shard, is a
clear error; so is no shard with a valid sample (a worker whose own shards hold only damaged ones reads the others,
as for dead ones). A shard whose samples are all shorter than a window, or (with ``loudness_cutoff``) that gives no
loud enough window, leaves the epoch's pool like a dead one (a worker would search it forever); none left that can
give a window is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vampnet_pl.codec import CodecMismatch, fingerprints_apart
from vampnet_pl.data.validation import (REASONS, UNDECODABLE, UNREADABLE_SHARD, SampleInvalid, decode_npy,
                                        validate_codes)
from vampnet_pl.data.windows import (collate_windows, fixed_window_starts, random_window_starts, window_frames,
                                     window_loudness)
from vampnet_pl.data.index import load_index, shard_sample_counts

log = logging.getLogger(__name__)


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


class DataIntegrityError(RuntimeError):
    """Too much of the data is damaged, or no shard is readable: training on it would be wrong."""


class NoReadableShards(DataIntegrityError):
    """Every shard of a split failed to open or read."""


class NoWindowShards(ValueError):
    """No live train shard has a valid sample as long as a window: no batch can be cut."""


class NoLoudWindows(ValueError):
    """``loudness_cutoff`` drops every window of every train shard: the stream would search forever."""


# Windows are drawn at random: one read of a shard without a loud enough window can be chance (a few samples, loud
# in parts); this many in a row, in one epoch, leave it out.
QUIET_READS = 3


class SkipCounter:
    """Counts read and skipped samples, by reason and by shard, and warns with the running total. It judges the
    skip rate only when asked (:meth:`check_rate`): a partial count is no verdict on the whole.

    Every skip has a reason from :data:`vampnet_pl.data.validation.REASONS`; ``dead_shards`` are those
    that failed to open or read as a whole (missing, unreadable, truncated).
    """

    def __init__(self, max_rate: float = 1.0, what: str = "data") -> None:
        self.max_rate, self.what = max_rate, what
        self.counts: Counter[str] = Counter()
        self.samples = 0  # samples that passed every check
        self.damaged: Counter[str] = Counter()  # skips per shard
        self.dead_shards: set[str] = set()

    def skip(self, shard: str, what: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.damaged[shard] += 1
        if reason == UNREADABLE_SHARD:
            self.dead_shards.add(shard)
        log.warning("skipping %s: %s: %s (%d skipped so far in this reader)", what, reason, detail, self.total)

    def passed(self) -> None:
        self.samples += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        """Skipped over everything read (a failed shard read counts once)."""
        return self.total / max(1, self.total + self.samples)

    def report(self) -> dict:
        """Plain, picklable totals (they ride along with batches out of DataLoader worker processes)."""
        return {"samples": self.samples, "counts": {r: self.counts[r] for r in REASONS},
                "damaged_shards": sorted(self.damaged)}

    def check_rate(self) -> None:
        """Raise :class:`DataIntegrityError` when too many of all the samples read were skipped (a whole read's
        count: training judges its partial counts, summed over ranks, in ``DataHealth``)."""
        check_skip_rate(self.report(), self.max_rate, 0, self.what)


def check_skip_rate(report: dict, max_rate: float, min_samples: int, what: str) -> None:
    """The skip-rate rule on a :meth:`SkipCounter.report` (or a sum of them)."""
    skipped = sum(report["counts"].values())
    seen = skipped + report["samples"]
    if seen == 0 or seen < min_samples or skipped / seen <= max_rate:
        return
    reasons = ", ".join(f"{n} {r}" for r, n in report["counts"].items() if n)
    shards = report["damaged_shards"]
    raise DataIntegrityError(
        f"{what}: {skipped} of {seen} samples ({skipped / seen:.1%}) were skipped as damaged ({reasons}), more "
        f"than data.max_skip_rate={max_rate:.1%}. Damaged shards ({len(shards)}): {', '.join(shards[:20])}"
        f"{' ...' if len(shards) > 20 else ''}. Run `vampnet-pl prep verify --deep out_dir=...` and "
        "`vampnet-pl prep repair ...`, or raise data.max_skip_rate"
    )


def read_shard(url: str, skips: SkipCounter, expected_samples: int | None = None) -> Iterator[dict]:
    """Raw samples of one shard; a shard that cannot be opened or read to its end is counted as dead, and so is
    one read to its end with another sample count than ``expected_samples`` (``index.json``'s): a tar cut at a
    member boundary ends without an error, its later samples silently gone."""
    failures: list[Exception] = []

    def on_error(exn: Exception) -> bool:
        failures.append(exn)
        return True  # keep the samples read before the damage

    count = 0
    for sample in wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}])):
        count += 1
        yield sample
    if failures:
        err = failures[0]
        skips.skip(url, url, UNREADABLE_SHARD, f"{type(err).__name__}: {err.args[0] if err.args else err}")
    elif expected_samples is not None and count != expected_samples:
        skips.skip(url, url, UNREADABLE_SHARD, f"{count} samples, index.json says {expected_samples} "
                                               "(truncated, or replaced since the index was written)")


def decode_samples(
    samples: Iterable[dict], n_codebooks: int, fingerprint: str | None, skips: SkipCounter,
    codebook_size: int | None = None, expected_codebooks: int | None = None,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Raw tar samples -> validated ``(codes[:n_codebooks], meta)``; bad samples are skipped and counted.

    See :func:`vampnet_pl.data.validation.validate_codes` for the checks.
    """
    for sample in samples:
        shard = str(sample.get("__url__", "?"))
        key = f"{shard}/{sample.get('__key__', '?')}"
        try:
            codes = decode_npy(sample["codes.npy"])
            meta = json.loads(sample["json"])
        except Exception as err:  # truncated bytes, missing member, bad JSON
            skips.skip(shard, key, UNDECODABLE, f"{type(err).__name__}: {err}")
            continue
        if fingerprint is not None and meta.get("codec_fingerprint") != fingerprint:
            found, expected = fingerprints_apart(meta.get("codec_fingerprint"), fingerprint)
            raise CodecMismatch(f"{key} was encoded by codec {found}, the model expects {expected}: re-encode the "
                                "catalog with the model's codec")
        try:
            validate_codes(codes, meta, codebook_size, expected_codebooks)
        except SampleInvalid as err:
            skips.skip(shard, key, err.reason, err.detail)
            continue
        if codes.shape[0] < n_codebooks:  # a whole shard set of another codec config, not damage
            raise CodecMismatch(f"{key} has {codes.shape[0]} codebooks, the model reads {n_codebooks}")
        skips.passed()
        yield codes[:n_codebooks], meta


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class ShardPool:
    """What a train worker found out about shards in this epoch, by reading each whole. Found anew every epoch, so a
    resumed run (which starts its epoch from the beginning) draws the same stream; a shard back after a failure
    (an object store's outage) is read again."""

    dead: set[str] = field(default_factory=set)  # failed to open or read: left out
    short: set[str] = field(default_factory=set)  # its valid samples all shorter than a window: left out
    quiet: set[str] = field(default_factory=set)  # QUIET_READS reads in a row without a loud enough window: left out
    quiet_reads: Counter = field(default_factory=Counter)  # reads in a row without one, per shard
    damaged: set[str] = field(default_factory=set)  # no valid sample: drawn (its damage counts) while others are left

    def usable(self, urls: list[str]) -> list[str]:
        return [u for u in urls if u not in self.dead and u not in self.short and u not in self.quiet]


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
        loudness_cutoff: float | None = None,
        frame_rate: float | None = None,
        codebook_size: int | None = None,
        expected_codebooks: int | None = None,
        shard_samples: dict[str, int] | None = None,
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
        self.loudness_cutoff, self.frame_rate = loudness_cutoff, frame_rate
        if loudness_cutoff is not None and not frame_rate:
            raise ValueError("loudness_cutoff needs the codec's frame_rate")
        self._warned_no_loudness = False
        self.quiet_windows = self.loud_windows = 0  # windows the cut-off skipped and kept, by this copy
        self.codebook_size, self.expected_codebooks = codebook_size, expected_codebooks
        self.shard_samples = shard_samples or {}  # url -> sample count in index.json: a shorter read is a cut shard
        self.long_samples = 0  # valid samples with room for a window, read by this copy
        # Counted only: data.max_skip_rate is judged on the sum over all workers and ranks (DataHealth).
        self.skips = SkipCounter(what="train data")

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
        for codes, meta in samples:
            starts = random_window_starts(codes.shape[1], self.window_frames, self.max_windows_per_sample, rng)
            self.long_samples += bool(starts)
            if self.loudness_cutoff is not None:
                starts = self._loud_enough(starts, meta)
            for start in starts:
                yield np.ascontiguousarray(codes[:, start : start + self.window_frames])

    def _loud_enough(self, starts: list[int], meta: dict) -> list[int]:
        """The starts whose window is at least ``loudness_cutoff`` loud (as the original draws excerpts)."""
        track = meta.get("loudness_lufs_per_second")
        if track is None:
            if not self._warned_no_loudness:
                log.warning("data.loudness_cutoff=%s is not applied: the shards have no per-second loudness "
                            "(prepared before it was recorded; re-run prep to record it)", self.loudness_cutoff)
                self._warned_no_loudness = True
            self.loud_windows += len(starts)  # no track: every window is kept
            return starts
        kept = [s for s in starts if window_loudness(track, s, self.window_frames, self.frame_rate) >= self.loudness_cutoff]
        self.quiet_windows += len(starts) - len(kept)  # expected, not an error: counted, not logged
        self.loud_windows += len(kept)
        return kept

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A generator: an epoch counts only once batches are drawn (a bare iter() by a framework check does not).
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        per_epoch = self.batches_per_worker * num_workers
        epoch = self.start_batch // per_epoch + self.iterations
        # The DataLoader deals batches round-robin, starting with its worker 0: batch i of an epoch is the
        # (i // workers)-th of worker i % workers. Resuming after ``done`` batches, loader worker k plays worker
        # (k + done) % workers, whose next batch is the next in that order, minus what it already served.
        done = self.start_batch % per_epoch if self.iterations == 0 else 0
        worker = (loader_worker + done) % num_workers
        skip = max(0, -(-(done - worker) // num_workers))
        self.iterations += 1
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        shards = self.shards_for(worker, num_workers)
        samples = self._read(shards, rng, ShardPool())
        decoded = decode_samples(samples, self.n_codebooks, self.fingerprint, self.skips, self.codebook_size,
                                 self.expected_codebooks)
        windows = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(
            self._windows(decoded, rng)
        )
        batches = wds.batched(self.batch_size, collation_fn=collate_windows, partial=False)(windows)
        for batch in islice(batches, skip, self.batches_per_worker):
            batch["data_health"] = {"worker": loader_worker, **self.skips.report()}  # cumulative, plain Python: DataHealth
            yield batch

    def _read(self, shards: list[str], rng: random.Random, pool: ShardPool) -> Iterator[dict]:
        """Raw samples of shards drawn by :meth:`_resampled`, what each whole read found noted in ``pool``.
        The pipeline is lazy: when a shard's reader ends, its last sample has been through :meth:`_windows`."""
        for url in self._resampled(shards, rng, pool):
            valid_before, long_before, loud_before = self.skips.samples, self.long_samples, self.loud_windows
            failures_before = self.skips.counts[UNREADABLE_SHARD]
            yield from read_shard(url, self.skips, self.shard_samples.get(url))
            if self.skips.counts[UNREADABLE_SHARD] > failures_before:
                pool.dead.add(url)
            elif self.long_samples == long_before and self.skips.samples > valid_before:
                pool.short.add(url)
                log.warning("train shard %s has no sample of at least %d frames (one window): left out of this "
                            "epoch's stream", url, self.window_frames)
            elif self.long_samples == long_before:
                pool.damaged.add(url)
            elif self.loudness_cutoff is not None and self.loud_windows == loud_before:
                pool.quiet_reads[url] += 1
                if pool.quiet_reads[url] == QUIET_READS:
                    pool.quiet.add(url)
                    log.warning("train shard %s gave no window as loud as data.loudness_cutoff=%s LUFS in %d reads: "
                                "left out of this epoch's stream", url, self.loudness_cutoff, QUIET_READS)
            else:
                pool.quiet_reads.pop(url, None)

    def _resampled(self, shards: list[str], rng: random.Random, pool: ShardPool) -> Iterator[str]:
        """This worker's shards drawn forever, minus the dead, short and quiet ones; when none of its own is left, or only
        damaged ones, any other shard still in the pool."""
        while True:
            drawn = pool.usable(shards)
            if pool.damaged.issuperset(drawn):  # an empty list too
                drawn = pool.usable(self.urls)
                if pool.damaged.issuperset(drawn):
                    raise self._no_shard_left(pool)
            yield rng.choice(drawn)

    def _no_shard_left(self, pool: ShardPool) -> Exception:
        if not pool.short and not pool.damaged and not pool.quiet:
            return NoReadableShards(f"no readable train shard left: all {len(self.urls)} failed "
                                    f"({', '.join(sorted(pool.dead)[:20])})")
        short = f"have only samples shorter than a window ({self.window_frames} frames)"
        parts = [f"{len(found)} {what} ({', '.join(sorted(found)[:20])}{' ...' if len(found) > 20 else ''})"
                 for found, what in ((pool.dead, "failed to read"), (pool.damaged, "have only damaged samples"),
                                     (pool.short, short),
                                     (pool.quiet, f"have only windows quieter than data.loudness_cutoff="
                                                  f"{self.loudness_cutoff} LUFS")) if found]
        message = f"no train shard can give a window: of {len(self.urls)}, {'; '.join(parts)}"
        if pool.damaged:
            return DataIntegrityError(f"{message}. Run `vampnet-pl prep verify --deep out_dir=...` and "
                                      "`vampnet-pl prep repair ...`")
        if pool.quiet:
            return NoLoudWindows(f"{message}; lower data.loudness_cutoff, or set it to null to keep every window")
        return NoWindowShards(f"{message}; shorten data.window_seconds")


def read_fixed_windows(
    urls: list[str], window_frames: int, n_codebooks: int, fingerprint: str | None, per_sample: int, max_windows: int,
    skips: SkipCounter | None = None, codebook_size: int | None = None, expected_codebooks: int | None = None,
    shard_samples: dict[str, int] | None = None,
) -> tuple[list[np.ndarray], SkipCounter]:
    """Deterministic validated windows, in shard order, at most ``max_windows``.

    Damaged samples and shards are skipped and counted in ``skips``; its skip-rate limit is applied to
    what was read; no readable shard at all raises :class:`NoReadableShards`. ``shard_samples``: each shard's
    sample count in ``index.json`` (a shard read whole with another count is counted as unreadable).
    """
    skips = skips if skips is not None else SkipCounter()
    windows: list[np.ndarray] = []
    shard_samples = shard_samples or {}
    samples = (sample for url in urls for sample in read_shard(url, skips, shard_samples.get(url)))
    for codes, _ in decode_samples(samples, n_codebooks, fingerprint, skips, codebook_size, expected_codebooks):
        for start in fixed_window_starts(codes.shape[1], window_frames, per_sample):
            windows.append(np.ascontiguousarray(codes[:, start : start + window_frames]))
            if len(windows) >= max_windows:
                skips.check_rate()
                return windows, skips
    if urls and set(urls) <= skips.dead_shards:
        raise NoReadableShards(f"no readable shard among {len(urls)}: {', '.join(urls[:20])}")
    skips.check_rate()
    return windows, skips


class FixedBatches(IterableDataset):
    """A rank's equal share of fixed validation windows, batched: ``{"codes", "index"}``, where ``index``
    holds each window's global position in the validation set (the evaluation protocol seeds its masks by it)."""

    def __init__(self, windows: list[np.ndarray], batch_size: int, n_codebooks: int | None = None,
                 indices: list[int] | None = None):
        self.windows, self.batch_size, self.n_codebooks = windows, batch_size, n_codebooks
        self.indices = list(range(len(windows))) if indices is None else list(indices)
        if len(self.indices) != len(windows):
            raise ValueError(f"{len(self.indices)} indices for {len(windows)} windows")

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.windows), self.batch_size):
            batch = collate_windows([w[: self.n_codebooks] for w in self.windows[start : start + self.batch_size]])
            batch["index"] = torch.tensor(self.indices[start : start + self.batch_size], dtype=torch.long)
            yield batch


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
        loudness_cutoff: float | None = None,
        codebook_size: int | None = None,
        max_skip_rate: float = 0.05,
        skip_rate_min_samples: int = 200,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.index: dict | None = None
        self.train_urls, self.val_urls = expand_urls(train_urls), expand_urls(val_urls)
        self.fingerprint = expected_fingerprint
        self.n_codebooks, self.hop_length, self.sample_rate = n_codebooks, hop_length, sample_rate
        self.codebook_size = codebook_size  # tokens must be below it (the index's codec, else unchecked)
        self.shard_codebooks: int | None = None  # every sample of an indexed set has this many
        self.shard_samples: dict[str, int] = {}  # url -> sample count, for the shards index.json lists
        if dataset_dir is not None:
            self._read_index(Path(dataset_dir))
        missing = [n for n in ("n_codebooks", "hop_length", "sample_rate") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"without a dataset_dir (index.json), set {', '.join(missing)}")
        self.window_frames = window_frames(window_seconds, self.sample_rate, self.hop_length)
        # Training batches as served (AutoBatchSize may split each batch into micro-batches).
        self.train_batch_size, self.train_batches_per_epoch = batch_size, batches_per_epoch
        self.val_windows: list[np.ndarray] | None = None
        self.val_skips = self._skip_counter("validation data")

    def _skip_counter(self, what: str) -> SkipCounter:
        return SkipCounter(self.hparams.max_skip_rate, what)

    def _read_index(self, dataset_dir: Path) -> None:
        index = self.index = load_index(dataset_dir)
        codec = index["codec"]
        if self.fingerprint is not None and codec["fingerprint"] != self.fingerprint:
            found, expected = fingerprints_apart(codec["fingerprint"], self.fingerprint)
            raise CodecMismatch(f"shards in {dataset_dir} were encoded by codec {found}, the model expects {expected}")
        shard_codebooks = codec["config"]["n_codebooks"]
        if self.n_codebooks is not None and self.n_codebooks > shard_codebooks:
            raise CodecMismatch(f"shards have {shard_codebooks} codebooks, the model reads {self.n_codebooks}")
        self.fingerprint = codec["fingerprint"]
        self.shard_codebooks = shard_codebooks
        if self.codebook_size is not None and self.codebook_size != codec["config"]["codebook_size"]:
            raise CodecMismatch(f"shards have {codec['config']['codebook_size']} tokens per codebook, "
                                f"the model {self.codebook_size}")
        self.codebook_size = codec["config"]["codebook_size"]
        self.n_codebooks = self.n_codebooks or shard_codebooks
        self.hop_length = self.hop_length or codec["config"]["hop_length"]
        self.sample_rate = self.sample_rate or codec["config"]["sample_rate"]
        self.shard_samples = shard_sample_counts(dataset_dir, index)
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
            self.train_batch_size,
            batches_per_worker=max(1, self.train_batches_per_epoch // workers),
            fingerprint=self.fingerprint,
            max_windows_per_sample=self.hparams.max_windows_per_sample,
            shuffle_buffer=self.hparams.shuffle_buffer,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world_size,
            start_batch=consumed,
            loader_workers=self.hparams.num_workers,
            loudness_cutoff=self.hparams.loudness_cutoff,
            frame_rate=self.sample_rate / self.hop_length,
            codebook_size=self.codebook_size,
            expected_codebooks=self.shard_codebooks,
            shard_samples=self.shard_samples,
        )

    def serve_micro_batches(self, micro_batch: int, accumulation: int, configured_accumulation: int = 1) -> None:
        """Serve training batches of ``micro_batch`` windows, ``accumulation`` of them per optimiser step.

        An epoch keeps its optimiser steps whatever the split, the global batch and the number of ranks: those of
        ``batches_per_epoch`` batches at ``configured_accumulation`` a step (``trainer.accumulate_grad_batches`` as
        set), so validation comes at the same steps. Its micro-batches are whole optimiser steps that the loader
        workers share evenly (rounded up where they cannot be). Call before the train dataloader is built.
        """
        if micro_batch < 1 or accumulation < 1 or configured_accumulation < 1:
            raise ValueError(f"micro_batch, accumulation and configured_accumulation must be >= 1, got {micro_batch}, "
                             f"{accumulation} and {configured_accumulation}")
        self.train_batch_size = micro_batch
        self.train_batches_per_epoch = self._epoch_batches(accumulation, configured_accumulation)

    def serve_configured_batches(self, accumulation: int = 1) -> None:
        """Serve training batches of ``batch_size``, about ``batches_per_epoch`` an epoch (the default): rounded up
        to whole optimiser steps of ``accumulation`` batches that the loader workers share evenly."""
        self.train_batch_size = self.hparams.batch_size
        self.train_batches_per_epoch = self._epoch_batches(accumulation, accumulation)

    def _epoch_batches(self, accumulation: int, configured_accumulation: int) -> int:
        """Micro-batches an epoch: ``accumulation`` for each of its optimiser steps, ``batches_per_epoch /
        configured_accumulation`` rounded up (never down: the same split served either way is the same epoch)."""
        steps = -(-self.hparams.batches_per_epoch // configured_accumulation)
        return self._whole_steps(steps * accumulation, accumulation)

    def _whole_steps(self, batches: int, accumulation: int) -> int:
        """``batches`` rounded up to a multiple of both ``accumulation`` and the loader workers. Lightning ends an
        epoch with an optimiser step, whole or not; a resumed run counts ``global_step * accumulation`` batches."""
        unit = math.lcm(accumulation, max(1, self.hparams.num_workers))
        return -(-batches // unit) * unit

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
            self.val_skips = self._skip_counter("validation data")
            self.val_windows, _ = read_fixed_windows(  # all codebooks: evaluation decodes the full signal
                self.val_urls,
                self.window_frames,
                depth,
                self.fingerprint,
                self.hparams.val_windows_per_sample,
                self.hparams.val_max_windows,
                self.val_skips,
                self.codebook_size,
                self.shard_codebooks,
                self.shard_samples,
            )
        rank, world_size = self._rank()
        share = rank_share(self.val_windows, rank, world_size)
        if not share:
            raise ValueError(f"{len(self.val_windows)} validation windows cannot be shared by {world_size} ranks")
        left_out = len(self.val_windows) % world_size
        if left_out and rank == 0:
            log.warning("validation: the last %d of %d windows are left out so that each of the %d ranks gets %d "
                        "(val/ metrics cover %d windows, a number that depends on the ranks)", left_out,
                        len(self.val_windows), world_size, len(share), len(share) * world_size)
        indices = rank_share(list(range(len(self.val_windows))), rank, world_size)
        batches = FixedBatches(share, self.hparams.val_batch_size, self.n_codebooks, indices)
        return DataLoader(batches, batch_size=None, generator=torch.Generator(), pin_memory=torch.cuda.is_available())
