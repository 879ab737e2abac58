"""Scanning a catalog: recursive discovery, manifest contents, stable hash-based splits."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from vampnet_pl.config import SplitConfig
from vampnet_pl.prep.index import verify
from vampnet_pl.prep.manifest import assign_split, find_audio_files, load_manifest, scan_catalog

from conftest import prep_config, write_tone


def test_split_is_a_pure_function_of_the_content_hash():
    split = SplitConfig(val_fraction=0.1, test_fraction=0.1)
    hashes = [f"{i:064x}" for i in range(4000)]
    first = [assign_split(h, split) for h in hashes]
    assert first == [assign_split(h, split) for h in hashes]
    shares = {name: first.count(name) / len(first) for name in ("train", "val", "test")}
    assert shares["val"] == pytest.approx(0.1, abs=0.02) and shares["test"] == pytest.approx(0.1, abs=0.02)
    assert {assign_split(h, SplitConfig(val_fraction=0.1, test_fraction=0.1, salt="other")) for h in hashes[:50]} <= {
        "train",
        "val",
        "test",
    }


def test_scan_finds_audio_recursively_and_records_facts(tmp_path, codec_path):
    catalog = tmp_path / "catalog"
    write_tone(catalog / "a.wav", 1.5, 22050)
    write_tone(catalog / "deep" / "er" / "b.flac", 2.0, 48000, channels=2)
    write_tone(catalog / "C.WAV", 1.2, 44100)
    (catalog / "notes.txt").write_text("not audio, not scanned")
    files, folder_failures = find_audio_files(catalog, ["wav", "flac"])
    assert [p.name for p in files] == ["C.WAV", "a.wav", "b.flac"] and not folder_failures
    cfg = prep_config(catalog, tmp_path / "out", codec_path)
    entries, failures = scan_catalog(cfg)
    assert not failures
    by_path = {e.path: e for e in entries}
    assert set(by_path) == {"a.wav", "C.WAV", "deep/er/b.flac"}
    b = by_path["deep/er/b.flac"]
    assert (b.sample_rate, b.channels) == (48000, 2) and b.duration == pytest.approx(2.0)
    assert len(b.sha256) == 64 and b.split in ("train", "val", "test")
    assert [e.path for e in load_manifest(tmp_path / "out")] == [e.path for e in entries]


def test_adding_files_never_moves_existing_files_between_splits(tmp_path, codec_path):
    catalog = tmp_path / "catalog"
    for i in range(12):
        write_tone(catalog / f"t{i}.wav", 1.1, 16000, freq=100 + 37 * i)
    cfg = prep_config(catalog, tmp_path / "out", codec_path, split=SplitConfig(val_fraction=0.3, test_fraction=0.3))
    before = {e.path: e.split for e in scan_catalog(cfg)[0]}
    for i in range(12, 30):
        write_tone(catalog / f"t{i}.wav", 1.1, 16000, freq=100 + 37 * i)
    after = {e.path: e.split for e in scan_catalog(cfg)[0]}
    assert len(after) == 30 and {p: after[p] for p in before} == before
    assert len(set(after.values())) == 3


def test_identical_files_are_encoded_once_and_the_copies_recorded(tmp_path, codec_path):
    """Two copies side by side once wrote two samples of one key into a shard, which then read as damaged."""
    from vampnet_pl.prep.run import run_all

    catalog = tmp_path / "catalog"
    write_tone(catalog / "x.wav", 1.5)
    shutil.copy(catalog / "x.wav", catalog / "copy_of_x.wav")
    write_tone(catalog / "y.wav", 1.5, freq=330)
    cfg = prep_config(catalog, tmp_path / "out", codec_path)
    entries, failures = scan_catalog(cfg)
    assert sorted(e.path for e in entries) == ["copy_of_x.wav", "y.wav"]  # the first in sorted order is kept
    assert [(f.path, f.reason) for f in failures] == [("x.wav", "duplicate of copy_of_x.wav (identical bytes)")]
    index = run_all(cfg)
    assert verify(tmp_path / "out", deep=True) == []
    assert sum(split["samples"] for split in index["splits"].values()) == 2


def test_rescan_reuses_hashes_of_unchanged_files(tmp_path, codec_path, monkeypatch):
    import vampnet_pl.prep.manifest as manifest

    catalog = tmp_path / "catalog"
    write_tone(catalog / "a.wav", 1.5)
    write_tone(catalog / "b.wav", 1.5, freq=330)
    cfg = prep_config(catalog, tmp_path / "out", codec_path)
    scan_catalog(cfg)
    hashed = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda p, *a: hashed.append(p.name) or real(p, *a))
    write_tone(catalog / "b.wav", 2.5, freq=330)  # changed
    entries, _ = scan_catalog(cfg)
    assert hashed == ["b.wav"] and len(entries) == 2


def replace_keeping_size_and_mtime(path, freq):
    """What ``cp -p``, ``rsync -t`` or ``touch -r`` leave: other bytes of the same size under the old mtime."""
    old = path.stat()
    time.sleep(0.05)  # past the kernel's coarse ctime tick
    data = write_tone(path.parent.parent / "replacement" / path.name, 1.5, freq=freq).read_bytes()
    assert len(data) == old.st_size and data != path.read_bytes()
    path.write_bytes(data)  # in place, as cp -p: the same inode
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)


def test_a_file_replaced_under_its_old_size_and_mtime_is_hashed_again(tmp_path, codec_path):
    """The hash was reused on size and mtime alone: ``cp -p`` of other music of the same size kept the old hash,
    so prep kept the old file's codes (and split) for it."""
    from vampnet_pl.utils.hashing import file_sha256

    catalog = tmp_path / "catalog"
    write_tone(catalog / "a.wav", 1.5)
    cfg = prep_config(catalog, tmp_path / "out", codec_path)
    (before,), _ = scan_catalog(cfg)
    replace_keeping_size_and_mtime(catalog / "a.wav", freq=440)
    (after,), _ = scan_catalog(cfg)
    assert after.sha256 == file_sha256(catalog / "a.wav") != before.sha256


def test_a_manifest_without_ctime_and_inode_is_read_and_its_files_hashed_again(tmp_path, codec_path, monkeypatch):
    """Manifests written before ctime and inode were recorded still load; their hashes are not trusted once."""
    import vampnet_pl.prep.manifest as manifest

    catalog = tmp_path / "catalog"
    write_tone(catalog / "a.wav", 1.5)
    cfg = prep_config(catalog, tmp_path / "out", codec_path)
    scan_catalog(cfg)
    path = tmp_path / "out" / "manifest.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in ("ctime_ns", "inode")}) + "\n"
                            for row in rows))
    assert [e.path for e in load_manifest(tmp_path / "out")] == ["a.wav"]
    hashed = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda p, *a: hashed.append(p.name) or real(p, *a))
    scan_catalog(cfg)
    scan_catalog(cfg)
    assert hashed == ["a.wav"]  # once: the new manifest records them


def test_a_catalog_without_audio_is_an_error(tmp_path, codec_path):
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no audio files"):
        scan_catalog(prep_config(tmp_path / "catalog", tmp_path / "out", codec_path))


def test_parallel_scan_gives_the_same_manifest(tmp_path, codec_path):
    catalog = tmp_path / "catalog"
    for i in range(6):
        write_tone(catalog / f"t{i}.wav", 1.1, 16000, freq=200 + 50 * i)
    (catalog / "bad.wav").write_text("nope")
    serial, serial_failures = scan_catalog(prep_config(catalog, tmp_path / "o1", codec_path, scan_workers=1))
    parallel, parallel_failures = scan_catalog(prep_config(catalog, tmp_path / "o2", codec_path, scan_workers=2))
    strip = lambda es: [json.dumps({k: v for k, v in e.__dict__.items() if k != "mtime_ns"}) for e in es]
    assert strip(serial) == strip(parallel) and serial_failures == parallel_failures


def test_linked_and_unlistable_folders_are_scanned_or_recorded(tmp_path, codec_path, monkeypatch):
    """No folder vanishes without a trace: folder links are followed (once per real folder), and a folder
    that cannot be listed is a scan failure naming it."""
    catalog, elsewhere = tmp_path / "catalog", tmp_path / "other_disk" / "album"
    write_tone(catalog / "a.wav", 1.5)
    write_tone(elsewhere / "b.wav", 1.5, freq=330.0)
    write_tone(catalog / "private" / "c.wav", 1.5, freq=440.0)
    (catalog / "album").symlink_to(elsewhere)
    (catalog / "album" / "loop").symlink_to(elsewhere)  # a folder link loop
    (catalog / "loop.wav").symlink_to("loop.wav")  # a file link loop
    real_scandir = os.scandir

    def scandir(path="."):  # as an unprivileged user meets a chmod 000 folder (root may list anything)
        if os.fspath(path).endswith("private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries, failures = scan_catalog(prep_config(catalog, tmp_path / "out", codec_path))
    assert [e.path for e in entries] == ["a.wav", "album/b.wav"]
    reasons = {f.path: f.reason for f in failures}
    assert set(reasons) == {"album/loop", "private", "loop.wav"}
    assert "cannot list folder: Permission denied" in reasons["private"]
    assert "the same folder as 'album'" in reasons["album/loop"]
    assert "Too many levels of symbolic links" in reasons["loop.wav"]
