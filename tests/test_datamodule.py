"""The streaming DataModule: windows, rank/worker splits, equal batches per rank, bad data."""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from vampnet_pl.data.datamodule import (
    CodecMismatch,
    CodesDataModule,
    NoWindowShards,
    TrainWindowStream,
    expand_urls,
    rank_share,
    read_fixed_windows,
)
from vampnet_pl.data.index import load_index
from vampnet_pl.data.windows import fixed_window_starts, random_window_starts, window_frames


def write_shard(path: Path, lengths: list[int], n_codebooks: int = 4, fingerprint: str = "f" * 64, seed: int = 0) -> Path:
    """A hand-made shard of random codes (the prep pipeline is tested elsewhere)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for i, frames in enumerate(lengths):
            codes = rng.integers(0, 1024, size=(n_codebooks, frames), dtype=np.uint16)
            writer.write({"__key__": f"s{seed}_{i:04d}", "codes.npy": codes,
                          "json": {"codec_fingerprint": fingerprint, "frames": frames}})
    return path


def stream(urls, **kwargs) -> TrainWindowStream:
    defaults = dict(window_frames=20, n_codebooks=4, batch_size=4, batches_per_worker=10, fingerprint="f" * 64,
                    shuffle_buffer=16)
    return TrainWindowStream([str(u) for u in urls], **{**defaults, **kwargs})


def test_window_helpers():
    assert window_frames(10.0, 44100, 512) == 861
    with pytest.raises(ValueError):
        window_frames(0.001, 44100, 512)
    import random

    rng = random.Random(0)
    assert random_window_starts(10, 20, 4, rng) == []
    starts = random_window_starts(100, 20, 4, rng)
    assert len(starts) == 4 and all(0 <= s <= 80 for s in starts)
    assert len(random_window_starts(30, 20, 4, rng)) == 1
    assert fixed_window_starts(100, 20, 3) == [0, 20, 40]


def test_brace_patterns_expand():
    assert expand_urls("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_urls(["x.tar", "y-{1..2}.tar"]) == ["x.tar", "y-1.tar", "y-2.tar"]
    assert expand_urls("pipe:cat a.tar::b.tar") == ["pipe:cat a.tar", "b.tar"]


def test_batches_have_the_configured_shape_from_real_prepared_shards(prepared, codec):
    dm = CodesDataModule(dataset_dir=str(prepared), n_codebooks=4, window_seconds=2.0, batch_size=3,
                         num_workers=0, batches_per_epoch=7, expected_fingerprint=codec.fingerprint)
    batches = list(dm.train_dataloader())
    assert len(batches) == 7
    frames = window_frames(2.0, 44100, 512)
    for batch in batches:
        assert batch["codes"].shape == (3, 4, frames) and batch["codes"].dtype == torch.long
        assert 0 <= int(batch["codes"].min()) and int(batch["codes"].max()) < 1024
    val = list(dm.val_dataloader())
    assert val and all(b["codes"].shape[1:] == (4, frames) for b in val)


def test_several_windows_from_long_samples_and_none_from_short():
    samples = ((np.zeros((4, n), np.uint16), {}) for n in (200, 10))  # 10 frames < window of 20: never used
    windows = list(stream([], max_windows_per_sample=4)._windows(samples, random.Random(0)))
    assert len(windows) == 4 and all(w.shape == (4, 20) for w in windows)


def test_same_seed_same_stream_and_epochs_differ(tmp_path):
    shards = [write_shard(tmp_path / f"{i}.tar", [100] * 5, seed=i) for i in range(3)]
    first = [b["codes"] for b in stream(shards)]
    again = [b["codes"] for b in stream(shards)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    same_object = stream(shards)
    epoch0, epoch1 = [b["codes"] for b in same_object], [b["codes"] for b in same_object]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    other_seed = [b["codes"] for b in stream(shards, seed=1)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    urls = [str(tmp_path / f"{i}.tar") for i in range(8)]
    seen = []
    for rank in range(2):
        for worker in range(2):
            seen.append(set(stream(urls, rank=rank, world_size=2).shards_for(worker, 2)))
    assert set().union(*seen) == set(urls) and sum(map(len, seen)) == 8
    with pytest.raises(ValueError, match="3 train shards for 2 ranks x 2 workers"):
        stream(urls[:3], rank=0, world_size=2).shards_for(0, 2)


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path):
    small = write_shard(tmp_path / "small.tar", [40])  # one sample
    big = write_shard(tmp_path / "big.tar", [400] * 30, seed=1)
    counts = [sum(1 for _ in stream([small, big], rank=r, world_size=2, batches_per_worker=25)) for r in range(2)]
    assert counts == [25, 25]


@pytest.mark.timeout(60)  # it hung before
def test_a_worker_whose_shards_hold_only_samples_shorter_than_a_window_reads_the_others(tmp_path):
    """Its stream searched them forever: a rank hung with no error (the set's longest sample fits a window)."""
    short = write_shard(tmp_path / "short.tar", [10, 15])  # window: 20 frames
    long = write_shard(tmp_path / "long.tar", [100] * 5, seed=1)
    reader = stream([short, long], rank=0, world_size=2, batches_per_worker=3)
    batches = [b["codes"] for b in islice(reader, 4)]
    assert len(batches) == 3 and all(b.shape == (4, 4, 20) for b in batches)
    again = [b["codes"] for b in stream([short, long], rank=0, world_size=2, batches_per_worker=3)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # the same stream each time (exact resume)
    with pytest.raises(NoWindowShards, match=r"of 1, 1 have only samples shorter than a window \(20 frames\) "
                                             r"\(.*short.tar\); shorten data.window_seconds"):
        next(iter(stream([short])))


def _ddp_rank(rank: int, world_size: int, urls: list[str], port: int, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=60))
    loader = torch.utils.data.DataLoader(stream(urls, rank=rank, world_size=world_size, batches_per_worker=6),
                                         batch_size=None, num_workers=2)
    steps = 0
    for batch in loader:  # a collective per batch, as DDP does: a rank that ran dry would hang the other
        total = torch.tensor([float(batch["codes"].shape[0])])
        torch.distributed.all_reduce(total)
        steps += 1
    results[rank] = steps
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_real_ranks_with_uneven_shards_never_hang(tmp_path):
    import socket

    import torch.multiprocessing as mp

    shards = [write_shard(tmp_path / f"{i}.tar", [40] if i % 2 else [400] * 20, seed=i) for i in range(4)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_rank, args=(2, [str(s) for s in shards], port, results), nprocs=2, join=True)
    assert dict(results) == {0: 12, 1: 12}


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path):
    good = write_shard(tmp_path / "good.tar", [100] * 3)
    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as writer:
        writer.write({"__key__": "junk", "codes.npy": b"not numpy", "json": b"{}"})
        writer.write({"__key__": "floats", "codes.npy": np.zeros((4, 100), np.float32), "json": {"codec_fingerprint": "f" * 64}})
        writer.write({"__key__": "ok", "codes.npy": np.zeros((4, 100), np.uint16), "json": {"codec_fingerprint": "f" * 64}})
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(write_shard(tmp_path / "whole.tar", [100] * 5).read_bytes()[:2500])
    windows, skips = read_fixed_windows([str(bad), str(truncated), str(good)], 20, 4, "f" * 64, 1, 100)
    assert skips.counts["bad_array"] == 1 and skips.counts["unreadable_shard"] == 1
    assert skips.counts["undecodable"] == 2  # 'junk' and the truncated shard's cut-off last sample
    assert skips.dead_shards == {str(truncated)} and skips.damaged.keys() == {str(bad), str(truncated)}
    assert len(windows) >= 4  # 'ok' + the three good samples survive
    s = stream([bad, truncated, good], batches_per_worker=5)
    assert sum(1 for _ in s) == 5 and s.skips.total > 0


def test_shards_of_another_codec_are_refused(tmp_path, prepared):
    foreign = write_shard(tmp_path / "foreign.tar", [100] * 3, fingerprint="0" * 64)
    with pytest.raises(CodecMismatch, match="encoded by codec 0000"):
        list(stream([foreign]))
    with pytest.raises(CodecMismatch, match="the model expects"):
        CodesDataModule(dataset_dir=str(prepared), expected_fingerprint="1" * 64, num_workers=0)
    with pytest.raises(CodecMismatch, match="shards have 14 codebooks, the model reads 20"):
        CodesDataModule(dataset_dir=str(prepared), n_codebooks=20, num_workers=0)
    with pytest.raises(CodecMismatch, match="model reads 6"):
        list(stream([write_shard(tmp_path / "few.tar", [100], n_codebooks=4)], n_codebooks=6))
    # one damaged character late in a sample's fingerprint: the message showed both as the same 16 characters
    damaged = write_shard(tmp_path / "damaged.tar", [100], fingerprint="f" * 40 + "e" + "f" * 23)
    with pytest.raises(CodecMismatch, match=f"encoded by codec {'f' * 40}e, the model expects {'f' * 41}:"):
        list(stream([damaged]))


def test_a_window_longer_than_every_sample_is_a_clear_error(prepared):
    longest = load_index(prepared)["splits"]["train"]["max_frames"]
    dm = CodesDataModule(dataset_dir=str(prepared), window_seconds=(longest + 10) * 512 / 44100, num_workers=0)
    with pytest.raises(ValueError, match="longer than every train sample"):
        dm.train_dataloader()


def test_validation_windows_are_fixed_and_equal_per_rank(prepared):
    dm = CodesDataModule(dataset_dir=str(prepared), n_codebooks=4, window_seconds=1.0, num_workers=0, val_batch_size=2)
    first = [b["codes"] for b in dm.val_dataloader()]
    second = [b["codes"] for b in CodesDataModule(dataset_dir=str(prepared), n_codebooks=4, window_seconds=1.0,
                                                  num_workers=0, val_batch_size=2).val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == len(second)
    items = list(range(11))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3] and not set(shares[0]) & set(shares[1])


def test_validation_windows_left_out_by_the_equal_share_are_logged(tmp_path, caplog):
    val = write_shard(tmp_path / "val.tar", [20] * 11)

    def validated(world_size: int) -> set[int]:
        indices: set[int] = set()
        for rank in range(world_size):
            dm = CodesDataModule(train_urls=str(val), val_urls=str(val), n_codebooks=4, hop_length=512,
                                 sample_rate=44100, window_seconds=20 * 512 / 44100, num_workers=0,
                                 val_windows_per_sample=1)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            indices.update(i for batch in dm.val_dataloader() for i in batch["index"].tolist())
        return indices

    with caplog.at_level(logging.WARNING, logger="vampnet_pl.data.datamodule"):
        assert validated(3) == set(range(9))  # windows 9 and 10: no rank validates them
    assert [r.getMessage() for r in caplog.records] == [
        "validation: the last 2 of 11 windows are left out so that each of the 3 ranks gets 3 (val/ metrics cover "
        "9 windows, a number that depends on the ranks)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vampnet_pl.data.datamodule"):
        assert validated(1) == set(range(11))
    assert not caplog.records


def test_loaders_pin_memory_when_cuda_is_there(prepared, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Lightning then copies with non_blocking=True
    dm = CodesDataModule(dataset_dir=str(prepared), n_codebooks=4, window_seconds=1.0, num_workers=0)
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not dm.train_dataloader().pin_memory


def test_pipe_urls_stream_through_a_command(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [100] * 4)
    batches = list(stream([f"pipe:cat {shard}"], batches_per_worker=3))
    assert len(batches) == 3


def test_without_an_index_the_codec_facts_must_be_given(tmp_path):
    with pytest.raises(ValueError, match="set n_codebooks, hop_length, sample_rate"):
        CodesDataModule(train_urls=str(tmp_path / "a.tar"))
    dm = CodesDataModule(train_urls=str(write_shard(tmp_path / "a.tar", [900] * 2)), n_codebooks=4, hop_length=512,
                         sample_rate=44100, window_seconds=5.0, batch_size=2, batches_per_epoch=3, num_workers=0)
    assert [b["codes"].shape for b in dm.train_dataloader()] == [(2, 4, 431)] * 3


def test_an_index_missing_or_of_another_version_fails_clearly(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="finish data prep"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**load_index(prepared), "version": 2}))
    with pytest.raises(ValueError, match="index version 2; this vampnet-pl reads version 1"):
        load_index(tmp_path)


@pytest.mark.parametrize("workers, done", [(2, 1), (2, 3), (3, 2), (3, 4)])
def test_a_resumed_stream_serves_the_rest_of_the_epoch_in_order_with_several_workers(tmp_path, workers, done):
    """The DataLoader always starts with its worker 0; after ``done`` batches the next belongs to another."""
    from torch.utils.data import DataLoader

    shards = [write_shard(tmp_path / f"{i}.tar", [100] * 5, seed=i) for i in range(workers * 2)]

    def served(start_batch: int) -> list[torch.Tensor]:
        dataset = stream(shards, batches_per_worker=3, loader_workers=workers, start_batch=start_batch)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                            generator=torch.Generator())
        return [batch["codes"] for batch in loader]

    straight, resumed = served(0), served(done)
    assert len(straight) == 3 * workers and len(resumed) == len(straight) - done
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[done:]))


def _cut_after_samples(shard: Path, samples: int) -> None:
    """Truncate a shard right after its first ``samples`` samples: the tar then ends without an error."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    last = members[2 * samples - 1]  # a sample is two members: <key>.codes.npy and <key>.json
    with open(shard, "r+b") as handle:
        handle.truncate(last.offset_data + -(-last.size // 512) * 512)


def test_a_shard_cut_at_a_sample_boundary_is_counted_as_unreadable(tmp_path):
    """Cut between two samples, a tar reads to its 'end' without an error: its later samples were lost silently."""
    cut = write_shard(tmp_path / "cut.tar", [100] * 5)
    good = write_shard(tmp_path / "good.tar", [100] * 3, seed=1)
    _cut_after_samples(cut, 2)
    counts = {str(cut): 5, str(good): 3}
    windows, skips = read_fixed_windows([str(cut), str(good)], 20, 4, "f" * 64, 1, 100, shard_samples=counts)
    assert len(windows) == 5  # the samples before the cut are kept, as for a shard cut inside a member
    assert skips.counts["unreadable_shard"] == 1 and skips.dead_shards == {str(cut)}
    _, unchecked = read_fixed_windows([str(cut), str(good)], 20, 4, "f" * 64, 1, 100)  # no index: no count to compare
    assert unchecked.total == 0
    s = stream([cut, good], batches_per_worker=3, shard_samples=counts)
    assert sum(1 for _ in s) == 3 and s.skips.dead_shards == {str(cut)}


def test_the_datamodule_checks_shards_against_the_index_sample_counts(prepared, tmp_path, caplog):
    import shutil

    out = tmp_path / "set"
    shutil.copytree(prepared, out)
    index = load_index(out)
    for split in ("train", "val"):
        shard = index["splits"][split]["shards"][0]
        assert shard["samples"] >= 2
        _cut_after_samples(out / shard["path"], 1)
    train, val = (str(out / index["splits"][split]["shards"][0]["path"]) for split in ("train", "val"))
    dm = CodesDataModule(dataset_dir=str(out), window_seconds=1.0, num_workers=0, batches_per_epoch=40,
                         max_skip_rate=1.0)
    stream = dm.train_dataset()
    with caplog.at_level(logging.WARNING):
        assert sum(1 for _ in stream) == 40
    assert stream.skips.dead_shards == {train}
    assert f"{train}: unreadable_shard: 1 samples, index.json says" in caplog.text
    assert len(index["splits"]["val"]["shards"]) >= 2  # the others are read
    dm.val_dataloader()
    assert dm.val_skips.dead_shards == {val}
