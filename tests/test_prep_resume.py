"""Parallel, resumable prep: deterministic units per task, atomic shards, redo only what is unfinished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vampnet_pl.config import SplitConfig
from vampnet_pl.prep.encode import plan_units, run_encode_task, units_for_task
from vampnet_pl.data.index import load_index
from vampnet_pl.prep.index import finalize, verify
from vampnet_pl.prep.manifest import scan_catalog
from vampnet_pl.prep.run import encode_local, load_codec, run_all

from conftest import prep_config


def _shard_table(out: Path) -> dict:
    index = load_index(out)
    return {s["path"]: (s["sha256"], s["samples"]) for split in index["splits"].values() for s in split["shards"]}


def test_units_are_deterministic_and_tasks_partition_them(synthetic_catalog, tmp_path, codec_path):
    cfg = prep_config(synthetic_catalog, tmp_path / "o", codec_path, files_per_unit=3)
    entries, _ = scan_catalog(cfg)
    units = plan_units(entries, 3)
    assert [u.entries for u in units] == [u.entries for u in plan_units(list(reversed(entries)), 3)]
    shares = [units_for_task(units, i, 3) for i in range(3)]
    assert sorted(u.index for share in shares for u in share) == [u.index for u in units]
    with pytest.raises(ValueError, match="outside"):
        units_for_task(units, 3, 3)


def test_two_tasks_produce_the_same_shards_as_one(synthetic_catalog, tmp_path, codec_path, prepared):
    cfg = prep_config(synthetic_catalog, tmp_path / "tasks", codec_path)
    scan_catalog(cfg)
    run_encode_task(cfg, 1, 2)  # tasks in any order, with no coordination
    assert any(not (tmp_path / "tasks" / "units" / f"unit-{i:05d}.json").exists() for i in range(4))
    with pytest.raises(RuntimeError, match="not done"):
        finalize(cfg, load_codec(cfg))
    run_encode_task(cfg, 0, 2)
    finalize(cfg, load_codec(cfg))
    assert _shard_table(tmp_path / "tasks") == _shard_table(prepared)
    assert verify(tmp_path / "tasks") == []


@pytest.mark.slow
def test_local_worker_processes_share_the_work(synthetic_catalog, tmp_path, codec_path, prepared):
    cfg = prep_config(synthetic_catalog, tmp_path / "workers", codec_path, workers=2)
    scan_catalog(cfg)
    encode_local(cfg)
    finalize(cfg, load_codec(cfg))
    ours, reference = _shard_table(tmp_path / "workers"), _shard_table(prepared)
    assert ours.keys() == reference.keys()
    assert [v[1] for v in ours.values()] == [v[1] for v in reference.values()]


def test_rerun_skips_done_units_and_redoes_interrupted_ones(synthetic_catalog, tmp_path, codec_path):
    out = tmp_path / "o"
    cfg = prep_config(synthetic_catalog, out, codec_path)
    run_all(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.glob("shards/*/*.tar")}
    # Simulate a kill inside unit 1: marker gone, a half-written temp shard and a stray final shard left.
    (out / "units" / "unit-00001.json").unlink()
    stray = next(iter(out.glob("shards/*/unit-00001-*.tar")))
    stray.write_bytes(b"half a tar")
    (out / "tmp" / "unit-00001.999").mkdir(parents=True)
    (out / "tmp" / "unit-00001.999" / "unit-00001-000.tar").write_bytes(b"partial")
    run_all(cfg)
    after = {p: p.stat().st_mtime_ns for p in out.glob("shards/*/*.tar")}
    assert after.keys() == before.keys()
    changed = {p.name for p in after if after[p] != before[p]}
    assert changed and all(name.startswith("unit-00001-") for name in changed)
    assert verify(out) == [] and not (out / "tmp").exists()


def test_kill_during_encode_then_resume(synthetic_catalog, tmp_path, codec_path, prepared):
    """A real SIGKILL mid-run leaves no half shard in place; the re-run finishes the set."""
    out = tmp_path / "killed"
    overrides = [f"catalog={synthetic_catalog}", f"out_dir={out}", f"codec.source={codec_path}", "codec.device=cpu",
                 "files_per_unit=2", "shard_max_samples=4", "segment_seconds=8.0", "split.val_fraction=0.25",
                 "split.test_fraction=0.0", "scan_workers=1"]
    cli = [sys.executable, "-m", "vampnet_pl.cli", "prep"]
    subprocess.run([*cli, "scan", *overrides], check=True, capture_output=True)
    proc = subprocess.Popen([*cli, "encode", *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("units/*.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("units/*.json"))
    assert 1 <= len(done_before) < 4, "the kill should land mid-run"
    for shard in out.glob("shards/*/*.tar"):  # every shard in place is complete (tar index readable)
        import tarfile

        with tarfile.open(shard) as tar:
            assert tar.getnames()
    subprocess.run([*cli, "encode", *overrides], check=True, capture_output=True)
    subprocess.run([*cli, "finalize", *overrides], check=True, capture_output=True)
    assert _shard_table(out) == _shard_table(prepared)
    assert subprocess.run([*cli, "verify", f"out_dir={out}"], capture_output=True).returncode == 0


def test_a_rerun_with_other_settings_or_another_codec_is_refused(tmp_path, fast_codec_path):
    """A unit counted as done by its files alone: a re-run with other settings or another codec kept the old
    shards and wrote an index that described the new run."""
    from vampnet_pl.codec import SyntheticCodecSpec, make_synthetic_codec
    from vampnet_pl.prep.encode import EncodingChanged

    from conftest import write_tone

    catalog = tmp_path / "catalog"
    for i in range(3):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    out = tmp_path / "out"
    run_all(prep_config(catalog, out, fast_codec_path))
    index = (out / "index.json").read_bytes()
    with pytest.raises(EncodingChanged, match=r"segment_seconds 8\.0 -> 1\.0.*delete"):
        run_all(prep_config(catalog, out, fast_codec_path, segment_seconds=1.0))
    other = make_synthetic_codec(tmp_path / "other.pth", SyntheticCodecSpec(sample_rate=16000, encoder_dim=2,
                                                                            decoder_dim=16, n_codebooks=4, seed=7))
    with pytest.raises(EncodingChanged, match="codec"):
        run_all(prep_config(catalog, out, other))
    assert (out / "index.json").read_bytes() == index and verify(out, deep=True) == []


def test_a_file_changed_between_scan_and_encode_is_a_failure_until_rescanned(tmp_path, fast_codec_path):
    """Encoded under its old hash, a replaced file landed in the old hash's split (the same music in train and
    val). A file merely touched is still encoded."""
    import json
    import shutil

    from conftest import write_tone

    catalog = tmp_path / "catalog"
    for i in range(3):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    cfg = prep_config(catalog, tmp_path / "out", fast_codec_path)
    scan_catalog(cfg)
    shutil.copy(catalog / "t0.wav", catalog / "t1.wav")  # replaced after the scan
    os.utime(catalog / "t2.wav", ns=(1, 1))  # touched: same bytes
    encode_local(cfg)
    finalize(cfg, load_codec(cfg))
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [(f["path"], f["stage"]) for f in failures] == [("t1.wav", "encode")]
    assert "changed since scan" in failures[0]["reason"] and "prep scan again" in failures[0]["reason"]
    index = run_all(cfg)  # scans again: t1.wav is now a duplicate of t0.wav
    assert index["totals"]["files"] == 2 and not any("changed" in json.loads(line)["reason"] for line in
                                                     (tmp_path / "out" / "failures.jsonl").read_text().splitlines())


def test_a_file_replaced_under_its_old_size_and_mtime_is_not_encoded_under_its_old_hash(tmp_path, fast_codec_path):
    """``cp -p`` (or ``rsync -t``, ``touch -r``) of other bytes of the same size between scan and encode kept size
    and mtime: the file was encoded under the scanned hash. A rerun of prep re-encodes it under its new one."""
    import json

    from conftest import write_tone
    from test_prep_manifest import replace_keeping_size_and_mtime

    catalog = tmp_path / "catalog"
    for i in range(2):
        write_tone(catalog / f"t{i}.wav", 1.5, 44100, freq=200 + 50 * i)
    cfg = prep_config(catalog, tmp_path / "out", fast_codec_path)
    scan_catalog(cfg)
    replace_keeping_size_and_mtime(catalog / "t1.wav", freq=600)
    encode_local(cfg)
    finalize(cfg, load_codec(cfg))
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [(f["path"], f["stage"]) for f in failures] == [("t1.wav", "encode")]
    assert run_all(cfg)["totals"]["files"] == 2


def test_a_rerun_with_other_split_settings_is_refused(tmp_path, fast_codec_path):
    """Units counted as done by their files kept the old splits' shards under new split settings."""
    import json

    from vampnet_pl.config import SplitConfig
    from vampnet_pl.prep.encode import EncodingChanged

    from conftest import write_tone

    catalog = tmp_path / "catalog"
    for i in range(3):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    out = tmp_path / "out"
    run_all(prep_config(catalog, out, fast_codec_path))
    with pytest.raises(EncodingChanged, match=r"split\.val_fraction 0\.25 -> 0\.0, split\.test_fraction 0\.0 -> 0\.5"):
        run_all(prep_config(catalog, out, fast_codec_path, split=SplitConfig(val_fraction=0.0, test_fraction=0.5)))
    with pytest.raises(EncodingChanged, match="split.salt 'vampnet-pl' -> 'other'"):
        run_all(prep_config(catalog, out, fast_codec_path, split=SplitConfig(0.25, 0.0, salt="other")))
    for marker in out.glob("units/*.json"):  # markers written before the split was recorded are taken as is
        record = json.loads(marker.read_text())
        record["encoding"] = {k: v for k, v in record["encoding"].items() if not k.startswith("split.")}
        marker.write_text(json.dumps(record))
    run_all(prep_config(catalog, out, fast_codec_path))


def test_units_of_removed_files_are_moved_aside_and_flagged_by_verify(tmp_path, fast_codec_path):
    """Deleted songs stayed in the shards of units no longer planned (and their markers stayed)."""
    import shutil

    from conftest import write_tone

    catalog, out = tmp_path / "catalog", tmp_path / "out"
    for i in range(4):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    cfg = prep_config(catalog, out, fast_codec_path, split=SplitConfig(val_fraction=0.0, test_fraction=0.0))
    run_all(cfg)
    old_shards = sorted(out.glob("shards/train/unit-00001-*.tar"))
    assert old_shards
    (catalog / "t2.wav").unlink()
    (catalog / "t3.wav").unlink()
    run_all(cfg)
    assert sorted(_shard_table(out)) == sorted(str(p.relative_to(out)) for p in out.glob("shards/*/*.tar"))
    assert all(path.startswith("shards/train/unit-00000-") for path in _shard_table(out))
    assert sorted(p.name for p in (out / "units").iterdir()) == ["unit-00000.json"]
    assert (out / "orphaned" / "units" / "unit-00001.json").is_file()
    assert [p.name for p in (out / "orphaned" / "shards" / "train").iterdir()] == [p.name for p in old_shards]
    assert verify(out) == []
    shutil.copy(out / "orphaned" / "shards" / "train" / old_shards[0].name, old_shards[0])  # as before the fix
    assert verify(out) == [f"shards/train/{old_shards[0].name}: not in index.json (left by a unit no longer "
                           "planned? `prep finalize` moves such shards aside)"]


def _folder_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_run_leaves_the_out_dir_byte_identical(tmp_path, fast_codec_path):
    """A refused re-run had already rewritten prep_config.yaml and manifest.jsonl (the new splits, with another
    salt), and with another codec and a new file it encoded the new file's unit before finalize refused it."""
    import dataclasses

    from vampnet_pl.codec import SyntheticCodecSpec, make_synthetic_codec
    from vampnet_pl.prep.encode import EncodingChanged
    from vampnet_pl.prep.index import repair
    from vampnet_pl.prep.run import scan

    from conftest import write_tone

    catalog, out = tmp_path / "catalog", tmp_path / "out"
    for i in range(3):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    cfg = prep_config(catalog, out, fast_codec_path)
    run_all(cfg)
    other = make_synthetic_codec(tmp_path / "other.pth", SyntheticCodecSpec(sample_rate=16000, encoder_dim=2,
                                                                            decoder_dim=16, n_codebooks=4, seed=7))
    other_codec = dataclasses.replace(cfg.codec, source=str(other))
    before = _folder_bytes(out)
    refused = [
        (EncodingChanged, lambda: run_all(dataclasses.replace(cfg, segment_seconds=1.0))),
        (EncodingChanged, lambda: run_all(dataclasses.replace(cfg, split=SplitConfig(0.25, 0.0, salt="other")))),
        (EncodingChanged, lambda: run_all(dataclasses.replace(cfg, codec=other_codec))),
        (EncodingChanged, lambda: scan(dataclasses.replace(cfg, loudness_lufs=-20.0))),
        (FileNotFoundError, lambda: run_all(dataclasses.replace(cfg, catalog=str(tmp_path / "gone")))),
    ]
    for error, attempt in refused:
        with pytest.raises(error):
            attempt()
        assert _folder_bytes(out) == before
    write_tone(catalog / "t9.wav", 2.0, 16000, freq=700)  # a unit to encode: another codec must not write it
    with pytest.raises(EncodingChanged, match="codec"):
        run_all(dataclasses.replace(cfg, codec=other_codec))
    assert _folder_bytes(out) == before
    scan(cfg)
    before = _folder_bytes(out)
    for workers, balance in [(1, "queue"), (2, "queue"), (2, "static")]:  # refused before any worker starts
        with pytest.raises(EncodingChanged, match="codec"):
            encode_local(dataclasses.replace(cfg, codec=other_codec, workers=workers, balance=balance))
        assert _folder_bytes(out) == before
    run_all(cfg)
    shard = next(out.glob("shards/train/*.tar"))
    shard.write_bytes(shard.read_bytes()[:-100])  # a damaged shard for repair to redo
    before = _folder_bytes(out)
    with pytest.raises(EncodingChanged, match="codec"):
        repair(dataclasses.replace(cfg, codec=other_codec))
    assert _folder_bytes(out) == before
    repair(cfg)
    assert verify(out, deep=True) == []


def test_stages_run_with_other_split_settings_than_the_scan_are_refused(tmp_path, fast_codec_path):
    """`prep scan` with one split setting, `prep encode` with another: the shards went to the scan's splits while
    the markers and the index recorded the encode's, and a later `prep all` with them kept those shards."""
    import dataclasses

    from vampnet_pl.prep.encode import EncodingChanged
    from vampnet_pl.prep.run import scan

    from conftest import write_tone

    catalog, out = tmp_path / "catalog", tmp_path / "out"
    for i in range(4):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    cfg = prep_config(catalog, out, fast_codec_path, split=SplitConfig(val_fraction=0.0, test_fraction=0.0))
    scan(dataclasses.replace(cfg, split=SplitConfig(val_fraction=0.5, test_fraction=0.0)))
    for stage in (lambda: encode_local(cfg), lambda: run_encode_task(cfg, 0, 1), lambda: finalize(cfg, load_codec(cfg))):
        with pytest.raises(EncodingChanged, match=r"manifest\.jsonl was scanned with other split settings.*prep scan"):
            stage()
    assert not (out / "units").exists()
    index = run_all(cfg)  # scans again, with its own settings
    assert index["splits"]["val"]["samples"] == 0 and index["splits"]["train"]["samples"] == 4


def test_a_kill_right_after_a_unit_is_marked_done_leaves_no_work_folder(tmp_path, fast_codec_path, monkeypatch):
    """The unit's work folder was removed after its marker: killed in between, it stayed in tmp/ for good (a done
    unit is never encoded again), unlike in an uninterrupted run."""
    import vampnet_pl.prep.encode as encode

    from conftest import write_tone

    catalog, out = tmp_path / "catalog", tmp_path / "out"
    for i in range(4):
        write_tone(catalog / f"t{i}.wav", 2.0, 16000, freq=200 + 50 * i)
    real = encode.write_json_atomic

    def killed_after(path, obj):
        real(path, obj)
        if Path(path).name == "unit-00000.json":
            raise KeyboardInterrupt("killed right after the marker")

    monkeypatch.setattr(encode, "write_json_atomic", killed_after)
    with pytest.raises(KeyboardInterrupt):
        run_all(prep_config(catalog, out, fast_codec_path))
    monkeypatch.setattr(encode, "write_json_atomic", real)
    run_all(prep_config(catalog, out, fast_codec_path))
    assert not (out / "tmp").exists() and verify(out) == []
