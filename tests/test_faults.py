"""Faults: damaged samples and shards never stop training nor slip in; checkpoints survive kills and full disks.

(kill -9 during ``prep encode`` then resume: tests/test_prep_resume.py::test_kill_during_encode_then_resume.)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.fabric.utilities.data import AttributeDict

from vampnet_pl.data.datamodule import (
    CodesDataModule,
    DataIntegrityError,
    NoReadableShards,
    SkipCounter,
    TrainWindowStream,
    read_fixed_windows,
    read_shard,
)
from vampnet_pl.data.validation import (REASONS, SampleInvalid, codes_checksum, decode_npy, legacy_codes_checksum,
                                        validate_codes)
from vampnet_pl.model.vampnet import VampNet, VampNetConfig, check_token_range
from vampnet_pl.data.index import load_index
from vampnet_pl.prep.index import repair, verify
from vampnet_pl.training.callbacks import DataHealth
from vampnet_pl.training.export import read_checkpoint

from test_train import overrides, train, training_process

FINGERPRINT = "f" * 64


def write_shard(path: Path, lengths: list[int], n_codebooks: int = 4, seed: int = 0, checksum: bool = True) -> Path:
    """A shard as prep writes it (with per-sample checksums), or as older sets were (without)."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as writer:
        for i, frames in enumerate(lengths):
            codes = rng.integers(0, 1024, size=(n_codebooks, frames), dtype=np.uint16)
            meta = {"codec_fingerprint": FINGERPRINT, "frames": frames, "n_codebooks": n_codebooks}
            if checksum:
                meta["codes_crc32"] = codes_checksum(codes)
            writer.write({"__key__": f"s{seed}_{i:04d}", "codes.npy": codes, "json": meta})
    return path


def stream(urls, **kwargs) -> TrainWindowStream:
    defaults = dict(window_frames=20, n_codebooks=4, batch_size=4, batches_per_worker=10, fingerprint=FINGERPRINT,
                    shuffle_buffer=8, codebook_size=1024)
    return TrainWindowStream([str(u) for u in urls], **{**defaults, **kwargs})


def member_offset(shard: Path, suffix: str, which: int = 0) -> int:
    """Byte offset of the data of the ``which``-th member ending in ``suffix``."""
    with tarfile.open(shard) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][which].offset_data


def flip_codes_bytes(shard: Path, which: int = 0, count: int = 4) -> None:
    """Damage a sample's codes in place: still a valid tar, and its .npy still parses."""
    data = bytearray(shard.read_bytes())
    start = member_offset(shard, "codes.npy", which) + 128 + 10  # past the .npy header
    for i in range(start, start + count):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))


def replace_sample(shard: Path, which: int, edit) -> None:
    """Rewrite one sample through ``edit(codes, meta) -> (codes, meta)``, the rest byte for byte."""
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(shard)) as writer:
        for i, sample in enumerate(samples):
            codes, meta = np.load(io.BytesIO(sample["codes.npy"])), json.loads(sample["json"])
            if i == which:
                codes, meta = edit(codes, meta)
            writer.write({"__key__": sample["__key__"], "codes.npy": codes, "json": meta})


def damaged_copy(prepared: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "set"
    shutil.copytree(prepared, copy)
    return copy


# -- validation, pure ------------------------------------------------------------------------------
def test_validation_names_every_kind_of_damage():
    codes = np.arange(12, dtype=np.uint16).reshape(3, 4)
    meta = {"n_codebooks": 3, "frames": 4, "codes_crc32": codes_checksum(codes)}
    validate_codes(codes, meta, codebook_size=16)
    assert meta["codes_crc32"] == zlib.crc32(codes.astype("<u2").tobytes())  # the standard CRC-32 (ISA-L's = zlib's)
    flipped = codes.copy()
    flipped[1, 2] ^= 1

    def reason(c, m=meta, size=16):
        with pytest.raises(SampleInvalid) as err:
            validate_codes(c, m, codebook_size=size)
        return err.value.reason

    assert reason(flipped) == "checksum_mismatch"
    assert reason(codes[:2]) == "codebook_count"
    assert reason(codes[:, :3]) == "frame_count_mismatch"
    assert reason(codes.astype(np.int64)) == "bad_array"
    # prep range-checked before writing the checksum (and the fingerprint pins the codebook size), so a
    # matching checksum stands for the range check: no second pass over the tokens
    validate_codes(codes, meta, codebook_size=8)
    old = {"n_codebooks": 3, "frames": 4}  # an older set without checksums: range checks only
    validate_codes(flipped, old, codebook_size=16)
    assert reason(flipped, old, 8) == "token_out_of_range"
    with pytest.raises(SampleInvalid, match="codebook_count"):
        validate_codes(codes[:2], {}, expected_codebooks=3)  # the index's count when the sample has none
    legacy = {"n_codebooks": 3, "frames": 4, "codes_xxh3": legacy_codes_checksum(codes)}  # sets of earlier versions
    validate_codes(codes, legacy, codebook_size=16)
    assert reason(flipped, legacy) == "checksum_mismatch"
    # arrays that are not C-contiguous (a Fortran-order .npy, a view) are hashed in C order: the same checksum
    validate_codes(np.asfortranarray(codes), meta, codebook_size=16)
    wide = np.zeros((3, 8), np.uint16)
    wide[:, ::2] = codes
    validate_codes(wide[:, ::2], meta, codebook_size=16)
    assert reason(np.asfortranarray(flipped)) == "checksum_mismatch"


def npy_bytes(array: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array)
    else:
        np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
def test_decode_npy_equals_np_load_without_a_copy(version):
    codes = np.random.default_rng(0).integers(0, 1024, size=(3, 7), dtype=np.uint16)
    data = npy_bytes(codes, version)
    decoded = decode_npy(data)
    np.testing.assert_array_equal(decoded, np.load(io.BytesIO(data)))
    assert decoded.dtype == np.uint16 and not decoded.flags.writeable  # a view of the member's bytes
    fortran = np.asfortranarray(codes)
    np.testing.assert_array_equal(decode_npy(npy_bytes(fortran)), codes)  # via np.load
    assert decode_npy(npy_bytes(np.zeros((2, 0), np.uint16))).shape == (2, 0)


def test_decode_npy_rejects_damaged_bytes():
    data = npy_bytes(np.arange(12, dtype=np.uint16).reshape(3, 4))
    for damaged, match in ((data[:-1], "data is 23 bytes, its header says 24"), (data + b"\0", "25 bytes"),
                           (data[:20], "truncated .npy header"), (b"PK" + data[2:], "bad magic"), (b"", "bad magic")):
        with pytest.raises(ValueError, match=match):
            decode_npy(damaged)
    with pytest.raises(ValueError):  # object arrays would need pickles
        decode_npy(npy_bytes(np.array([None, 1], dtype=object)))


def test_out_of_range_tokens_are_a_clear_error_at_the_model_not_clamped():
    model = VampNet(VampNetConfig(n_codebooks=2, codebook_size=16, latent_dim=4, d_model=16, n_layers=1, n_heads=2))
    codes, mask = torch.randint(0, 16, (1, 2, 5)), torch.zeros(1, 2, 5, dtype=torch.bool)
    assert model(codes, mask).shape == (1, 2, 5, 16)
    for bad in (16, 2003, -1):
        damaged = codes.clone()
        damaged[0, 1, 3] = bad
        with pytest.raises(ValueError, match=f"token {bad} is outside \\[0, 16\\)"):
            model(damaged, mask)
    check_token_range(torch.empty(0, 2, 0, dtype=torch.long), 16)


# -- damaged data while training ---------------------------------------------------------------------
def test_flipped_bytes_and_a_missing_codebook_are_skipped_and_counted(prepared, tmp_path):
    data = damaged_copy(prepared, tmp_path)
    shards = sorted(data.glob("shards/train/*.tar"))
    flip_codes_bytes(shards[0])
    replace_sample(shards[1], 0, lambda codes, meta: (codes[:-1], meta))  # a codebook lost, metadata intact
    urls = [str(s) for s in shards]
    total = load_index(data)["splits"]["train"]["samples"]
    windows, skips = read_fixed_windows(urls, 20, 14, None, 1, 10_000, codebook_size=1024, expected_codebooks=14)
    assert skips.counts["checksum_mismatch"] == 1 and skips.counts["codebook_count"] == 1 and skips.total == 2
    assert skips.samples == total - 2  # every undamaged sample is still read
    assert set(skips.damaged) == {urls[0], urls[1]}
    problems = verify(data, deep=True)
    assert any("checksum_mismatch" in p for p in problems) and any("codebook_count" in p for p in problems)


def test_tokens_out_of_range_in_an_older_set_without_checksums_are_skipped(tmp_path):
    shard = write_shard(tmp_path / "old.tar", [100] * 4, checksum=False)

    def out_of_range(codes, meta):
        codes[2, 10] = 2003  # the "Target 2003 is out of bounds"
        return codes, meta

    replace_sample(shard, 1, out_of_range)
    s = stream([shard], batches_per_worker=4)
    batches = list(s)
    assert len(batches) == 4 and all(int(b["codes"].max()) < 1024 for b in batches)
    assert s.skips.counts["token_out_of_range"] >= 1 and s.skips.counts["checksum_mismatch"] == 0
    assert batches[-1]["data_health"]["counts"]["token_out_of_range"] >= 1  # rides out of the worker with the batch


def test_truncated_and_deleted_shards_drop_out_and_streaming_goes_on(tmp_path):
    shards = [write_shard(tmp_path / f"{i}.tar", [40] * 3, seed=i) for i in range(4)]
    truncated = shards[0]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    s = stream(shards, batches_per_worker=30)
    iterator = iter(s)
    first = [next(iterator) for _ in range(3)]
    shards[1].unlink()  # vanishes while training
    rest = list(iterator)
    assert len(first) + len(rest) == 30  # the fixed count per worker (and so per rank) still holds
    assert s.skips.dead_shards == {str(truncated), str(shards[1])}
    assert s.skips.counts["unreadable_shard"] == 2  # once per shard: a dead shard leaves the pool


def test_a_run_resumed_after_a_shard_died_draws_the_uninterrupted_runs_stream(tmp_path):
    """The pool left out dead shards for the rest of the run: resumed at the next epoch, a run drew again the one
    its earlier attempt had found dead, and from then on other shards than the uninterrupted run."""
    gone = tmp_path / "gone.tar"
    urls = [gone, *(write_shard(tmp_path / f"{i}.tar", [100] * 3, seed=i) for i in range(4))]
    straight = stream(urls, batches_per_worker=6)
    assert len(list(straight)) == 6 and straight.skips.dead_shards == {str(gone)}  # found in the first epoch
    second_epoch = [b["codes"] for b in straight]
    resumed = [b["codes"] for b in stream(urls, batches_per_worker=6, start_batch=6)]
    assert len(resumed) == 6 and all(torch.equal(a, b) for a, b in zip(resumed, second_epoch))


def test_a_shard_back_after_a_failure_is_read_again_at_the_next_epoch(tmp_path):
    other = write_shard(tmp_path / "other.tar", [100] * 3)
    back = tmp_path / "back.tar"  # rank 0's only shard: missing in the first epoch (an object store's outage)
    reader = stream([back, other], rank=0, world_size=2, batches_per_worker=3)
    assert len(list(reader)) == 3 and reader.skips.counts["unreadable_shard"] == 1
    write_shard(back, [100] * 3, seed=7)
    codes = [decode_npy(sample["codes.npy"]) for sample in read_shard(str(back), SkipCounter())]

    def from_back(window: np.ndarray) -> bool:
        return any(np.array_equal(c[:, i : i + 20], window) for c in codes for i in range(c.shape[1] - 19))

    assert all(from_back(w.numpy()) for batch in reader for w in batch["codes"])


def test_a_worker_whose_own_shards_are_gone_reads_the_others_and_none_left_is_a_clear_error(tmp_path):
    shards = [write_shard(tmp_path / f"{i}.tar", [40] * 3, seed=i) for i in range(4)]
    for gone in shards[0::2]:  # every shard of rank 0 (2 ranks, 1 worker)
        gone.unlink()
    batches = list(stream(shards, rank=0, world_size=2, batches_per_worker=5))
    assert len(batches) == 5
    for gone in shards[1::2]:
        gone.unlink()
    with pytest.raises(NoReadableShards, match="no readable train shard left: all 4 failed"):
        list(stream(shards, batches_per_worker=5))
    with pytest.raises(NoReadableShards, match="no readable shard among 4"):
        read_fixed_windows([str(s) for s in shards], 20, 4, FINGERPRINT, 1, 10)


@pytest.mark.timeout(60)  # it searched forever before
def test_a_worker_whose_shards_are_all_damaged_reads_the_others_and_all_damaged_stops_naming_them(tmp_path):
    good = write_shard(tmp_path / "good.tar", [40] * 2)
    bad = write_shard(tmp_path / "bad.tar", [40] * 6, seed=1)
    for i in range(6):
        flip_codes_bytes(bad, i)
    reader = stream([bad, good], rank=0, world_size=2, batches_per_worker=5)  # rank 0 owns only the bad shard
    assert len(list(reader)) == 5 and reader.skips.counts["checksum_mismatch"] >= 6
    with pytest.raises(DataIntegrityError, match=f"no train shard can give a window: of 1, 1 have only damaged "
                                                 f"samples \\({bad}\\)"):
        list(stream([bad], batches_per_worker=5))


def test_the_train_skip_rate_is_judged_on_all_ranks_not_on_one_worker(tmp_path):
    """One damaged shard in 40: rank 0's loader alone skips about 1 sample in 5, all 8 ranks together 1 in 20.
    The limit (here 10%) applies to the sum (DataHealth): rank 0's reader stopped the run by its own count."""
    shards = [write_shard(tmp_path / f"{i:02d}.tar", [40] * 10, seed=i) for i in range(40)]
    for i in range(10):
        flip_codes_bytes(shards[0], i)
    limits = dict(max_skip_rate=0.1, skip_rate_min_samples=200)

    def report(rank: int) -> dict:
        dm = CodesDataModule(train_urls=[str(s) for s in shards], n_codebooks=4, hop_length=512, sample_rate=44100,
                             window_seconds=20 * 512 / 44100, batch_size=4, num_workers=0, batches_per_epoch=100,
                             **limits)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=8, global_step=0, accumulate_grad_batches=1)
        return list(dm.train_dataloader())[-1]["data_health"]

    reports = [report(rank) for rank in range(8)]
    skipped = [sum(r["counts"].values()) for r in reports]
    assert skipped[0] / (skipped[0] + reports[0]["samples"]) > 0.1

    def rank_zero_health(max_skip_rate: float) -> dict:
        """DataHealth on rank 0, its all-reduce standing in for DDP's: the sum of every rank's own local tensor."""
        health = DataHealth()
        health.reports = {0: reports[0]}  # rank 0's one loader worker
        local = [torch.tensor([r["samples"], *(r["counts"][reason] for reason in REASONS)]) for r in reports]
        trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: sum(local)), world_size=8,
                                  datamodule=SimpleNamespace(hparams=AttributeDict(limits, max_skip_rate=max_skip_rate)))
        return health._sync(trainer, SimpleNamespace(device=torch.device("cpu")), emit=False)

    totals = rank_zero_health(limits["max_skip_rate"])  # within it
    assert totals["samples"] == sum(r["samples"] for r in reports) and totals["damaged_shards"] == [str(shards[0])]
    with pytest.raises(DataIntegrityError, match=r"train data \(all 8 ranks\): \d+ of \d+ samples \(\d\.\d%\) were "
                                                 "skipped"):
        rank_zero_health(0.01)


def test_the_validation_skip_rate_is_judged_on_the_whole_set_once_read(tmp_path):
    """3 damaged samples after 20 good ones, then 60 good: 3.6% of the set, 13% of what was read at the third."""
    shards = [write_shard(tmp_path / "0.tar", [20] * 20), write_shard(tmp_path / "1.tar", [20] * 3, seed=1),
              write_shard(tmp_path / "2.tar", [20] * 60, seed=2)]
    for i in range(3):
        flip_codes_bytes(shards[1], i)
    urls = [str(s) for s in shards]
    windows, skips = read_fixed_windows(urls, 20, 4, FINGERPRINT, 1, 1000, SkipCounter(0.05, "validation data"))
    assert len(windows) == 80 and skips.counts["checksum_mismatch"] == 3
    with pytest.raises(DataIntegrityError, match="validation data: 3 of 83 samples"):
        read_fixed_windows(urls, 20, 4, FINGERPRINT, 1, 1000, SkipCounter(0.03, "validation data"))


def test_a_damaged_validation_shard_is_skipped_or_stops_the_run_by_the_threshold(prepared, tmp_path):
    data = damaged_copy(prepared, tmp_path)
    val = sorted(data.glob("shards/val/*.tar"))[0]
    flip_codes_bytes(val)
    kwargs = dict(dataset_dir=str(data), n_codebooks=4, window_seconds=1.0, num_workers=0, val_batch_size=2)
    dm = CodesDataModule(**kwargs, max_skip_rate=0.5)
    assert sum(b["codes"].shape[0] for b in dm.val_dataloader()) == len(dm.val_windows) > 0
    assert dm.val_skips.counts["checksum_mismatch"] == 1 and dm.val_skips.damaged.keys() == {str(val)}
    with pytest.raises(DataIntegrityError, match=f"validation data: 1 of .*{val.name}"):
        CodesDataModule(**kwargs, max_skip_rate=0.01).val_dataloader()


def test_training_on_a_damaged_set_finishes_logs_skips_and_stops_past_the_threshold(prepared, codec_path, tmp_path):
    data = damaged_copy(prepared, tmp_path)
    train_shards = sorted(data.glob("shards/train/*.tar"))
    for shard in train_shards:
        flip_codes_bytes(shard)  # one damaged sample in every train shard
    truncated = train_shards[-1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    common = ["trainer.max_steps=3", "data.batches_per_epoch=3", "checkpoint.every_n_train_steps=100"]
    trainer = train(overrides(data, codec_path, tmp_path / "ok", *common, "data.max_skip_rate=0.9"))
    health = next(c for c in trainer.callbacks if type(c).__name__ == "DataHealth")
    counts = health.summary["train"]["counts"]
    assert counts["checksum_mismatch"] >= 1 and counts["unreadable_shard"] == 1  # (a resampled bad sample counts each read)
    assert trainer.global_step == 3
    logged = trainer.logged_metrics
    assert {f"data/skipped/{r}" for r in REASONS} <= logged.keys()
    assert float(logged["data/skipped/checksum_mismatch"]) == counts["checksum_mismatch"]
    with pytest.raises(DataIntegrityError, match="train data.*Damaged shards.*unit-"):
        train(overrides(data, codec_path, tmp_path / "stop", *common, "data.max_skip_rate=0.01",
                        "data.skip_rate_min_samples=1"))


# -- prep verify --deep and repair ------------------------------------------------------------------------
def test_repair_re_encodes_only_the_units_whose_shards_fail(prepared, tmp_path, synthetic_catalog):
    from omegaconf import OmegaConf

    from vampnet_pl.cli import main
    from vampnet_pl.config import PrepConfig

    data = damaged_copy(prepared, tmp_path)
    before = {p.name: p.read_bytes() for p in data.glob("shards/*/*.tar")}
    damaged = sorted(data.glob("shards/train/*.tar"))[0]
    flip_codes_bytes(damaged)
    assert main(["prep", "verify", "--deep", f"out_dir={data}"]) == 1
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.load(data / "prep_config.yaml"),
                                              {"out_dir": str(data)}))
    unit = damaged.name.rsplit("-", 1)[0]
    marker_times = {p.name: p.stat().st_mtime_ns for p in data.glob("units/*.json")}
    assert repair(cfg) == [unit]
    after = {p.name: p.read_bytes() for p in data.glob("shards/*/*.tar")}
    assert after == before  # the damaged shard is rebuilt byte for byte; nothing else was touched
    assert [n for n, t in marker_times.items() if (data / "units" / n).stat().st_mtime_ns != t] == [f"{unit}.json"]
    assert verify(data, deep=True) == [] and not list(data.rglob("*.tmp"))
    assert main(["prep", "repair", f"out_dir={data}"]) == 0  # the command: nothing left to do


def test_an_interrupted_repair_is_finished_by_the_next(prepared, tmp_path, monkeypatch):
    """repair removes the markers of the units it redoes first; the next repair must still know their shards."""
    from omegaconf import OmegaConf

    import vampnet_pl.prep.encode as encode
    from vampnet_pl.config import PrepConfig

    data = damaged_copy(prepared, tmp_path)
    before = {p.name: p.read_bytes() for p in data.glob("shards/*/*.tar")}
    damaged = sorted(data.glob("shards/train/*.tar"))[0]
    flip_codes_bytes(damaged)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.load(data / "prep_config.yaml"),
                                              {"out_dir": str(data)}))
    real = encode.encode_unit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-repair")

    monkeypatch.setattr(encode, "encode_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        repair(cfg)
    monkeypatch.setattr(encode, "encode_unit", real)
    assert repair(cfg) == [damaged.name.rsplit("-", 1)[0]]
    assert {p.name: p.read_bytes() for p in data.glob("shards/*/*.tar")} == before and verify(data, deep=True) == []


# -- checkpoints under faults ----------------------------------------------------------------------------
def _fault_train(args: list[str], fault: str | None) -> subprocess.CompletedProcess:
    script = Path(__file__).with_name("fault_train.py")
    # a session of its own: the kill takes the run's whole process group, not pytest
    return training_process([str(script), *args], start_new_session=True, FAULT=fault or "")


def _leftovers(folder: Path) -> list[Path]:
    return [*folder.glob(".*.tmp"), *folder.glob("*.partial")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single_file", pytest.param("fsdp2", marks=pytest.mark.distributed)])
def test_checkpoint_writes_survive_a_full_disk_and_kill_9_then_resume(strategy, prepared, codec_path, tmp_path):
    extra = ["trainer.devices=2", "strategy=fsdp2"] if strategy == "fsdp2" else []
    args = overrides(prepared, codec_path, tmp_path, *extra, "data.batches_per_epoch=2",
                     "checkpoint.every_n_train_steps=2", "data.val_max_windows=8", "checkpoint.save_top_k=0")
    first = _fault_train([*args, "trainer.max_steps=2"], None)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "demo_coarse-local" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2

    full = _fault_train([*args, "trainer.max_steps=4"], "enospc")  # the disk fills during the step-4 write
    assert full.returncode != 0
    assert "was not written (No space left on device); the previous checkpoint there, if any, is intact" in full.stderr
    assert read_checkpoint(last)["global_step"] == 2 and not _leftovers(last.parent)

    killed = _fault_train([*args, "trainer.max_steps=4"], "kill")  # kill -9 mid-write
    assert killed.returncode == -9
    assert _leftovers(last.parent), "the kill should land inside the write"
    assert read_checkpoint(last)["global_step"] == 2  # the previous checkpoint still loads

    resumed = _fault_train([*args, "trainer.max_steps=4"], None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert read_checkpoint(last)["global_step"] == 4 and not _leftovers(last.parent)


def test_a_full_disk_inside_the_sharded_writer_is_reported_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    """torch.distributed.checkpoint wraps the writer's OSError in a CheckpointException, not an OSError."""
    import errno

    import torch.distributed.checkpoint.filesystem as filesystem

    from vampnet_pl.training.checkpointing import CheckpointWriteError
    from vampnet_pl.training.export import read_checkpoint
    from vampnet_pl.training.parallel import AtomicModelParallelStrategy

    strategy, path = AtomicModelParallelStrategy(), tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "optimizer_states": [], "global_step": 2}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)
    with pytest.raises(CheckpointWriteError, match=r"was not written \(No space left on device\)"):
        strategy.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "optimizer_states": [], "global_step": 4}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert read_checkpoint(path)["global_step"] == 2


def test_a_full_disk_leaves_the_previous_fsdp1_sharded_checkpoint_whole(tmp_path, monkeypatch):
    """FSDP (1) wrote its sharded folder in place: a failed save left old and new shards mixed."""
    import errno

    import torch.distributed.checkpoint.filesystem as filesystem

    from vampnet_pl.training.checkpointing import CheckpointWriteError
    from vampnet_pl.training.export import read_checkpoint
    from vampnet_pl.training.parallel import fsdp_strategy

    strategy, path = fsdp_strategy(sharded_checkpoints=True), tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "optimizer_states": [], "global_step": 2}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(filesystem, "_write_item", full)
        with pytest.raises(CheckpointWriteError, match=r"was not written \(No space left on device\)"):
            strategy.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "optimizer_states": [], "global_step": 4}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert read_checkpoint(path)["global_step"] == 2
    strategy.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "optimizer_states": [], "global_step": 6}, path)
    assert read_checkpoint(path)["global_step"] == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class _DeepSpeedEngineWriting:
    """What Lightning's DeepSpeedStrategy hands a checkpoint to: writes its folder, failing half-way if asked."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, save_dir, client_state, tag, exclude_frozen_parameters):
        import errno

        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "latest").write_text(tag)
        torch.save(client_state, folder / "client_state.pt")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_a_full_disk_leaves_the_previous_deepspeed_checkpoint_whole(tmp_path):
    """DeepSpeed wrote its checkpoint folder in place: a failed save overwrote part of the previous one."""
    from vampnet_pl.training.checkpointing import CheckpointWriteError
    from vampnet_pl.training.parallel import deepspeed_strategy

    strategy, path, engine = deepspeed_strategy(stage=2), tmp_path / "last.ckpt", _DeepSpeedEngineWriting()
    strategy.model = engine
    strategy.save_checkpoint({"global_step": 2}, path)
    engine.fail = True
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        strategy.save_checkpoint({"global_step": 4}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path / "checkpoint" / "client_state.pt")["global_step"] == 2
    assert (path / "checkpoint" / "mp_rank_00_model_states.pt").exists()
