"""The prep command line: Hydra overrides, clear errors and exit codes, verify."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from vampnet_pl.cli import compose, main, slurm_array_task, UsageError

from conftest import write_tone


def test_compose_validates_against_the_schema(tmp_path):
    cfg = compose("prep", [f"catalog={tmp_path}", f"out_dir={tmp_path}/o", "codec.source=x.pth", "channels=each"])
    assert cfg.channels.value == "each" and cfg.codec.source == "x.pth" and cfg.segment_seconds == 60.0
    with pytest.raises(UsageError, match="segmnt_seconds"):
        compose("prep", ["segmnt_seconds=3"])
    with pytest.raises(UsageError, match="min_seconds"):
        compose("prep", ["min_seconds=long"])
    with pytest.raises(UsageError, match="channels"):
        compose("prep", ["channels=stereo"])
    with pytest.raises(UsageError, match="min_seconds <= segment_seconds, got min_seconds=1.0, segment_seconds=0.5"):
        compose("prep", [f"catalog={tmp_path}", f"out_dir={tmp_path}/o", "segment_seconds=0.5"])


@pytest.mark.parametrize("bad, message", [
    ("files_per_unit=0", "files_per_unit must be at least 1, got 0"),  # was "range() arg 3 must not be zero", after the scan
    ("shard_max_samples=0", "shard_max_samples must be at least 1"),
    ("codec.chunk_seconds=-1", "codec.chunk_seconds must be > 0"),  # was torch.cat's "expected a non-empty list"
    ("codec.context_frames=-1", "codec.context_frames must be at least 0")])
def test_prep_counts_out_of_range_fail_at_compose_time(bad, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        compose("prep", [f"catalog={tmp_path}", f"out_dir={tmp_path}/o", bad])


@pytest.mark.parametrize("fractions, message", [
    (["split.val_fraction=-0.1"], r"split.val_fraction must be in \[0, 1\], got -0.1"),
    (["split.test_fraction=1.5"], r"split.test_fraction must be in \[0, 1\], got 1.5"),
    (["split.val_fraction=0.7", "split.test_fraction=0.6"], r"val_fraction \+ split.test_fraction must be at most 1")])
def test_split_fractions_out_of_range_fail_at_compose_time(fractions, message, tmp_path):
    """A negative val_fraction silently left val empty; fractions summing past 1 silently shrank val and left no train."""
    with pytest.raises(UsageError, match=message):
        compose("prep", [f"catalog={tmp_path}", f"out_dir={tmp_path}/o", *fractions])
    with pytest.raises(UsageError, match=message):  # the demo's prep too
        compose("demo", [f"prep.{f}" for f in fractions])
    assert compose("prep", [f"catalog={tmp_path}", f"out_dir={tmp_path}/o", "split.val_fraction=0.5",
                            "split.test_fraction=0.5"]).split.val_fraction == 0.5  # a set with no train split


def test_slurm_array_environment_gives_the_task(monkeypatch):
    assert slurm_array_task() is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert slurm_array_task() == (1, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "6")
    assert slurm_array_task() == (1, 3)
    # a hand-made retry of two tasks of an 8-task array (--array=3,5): its ids say nothing of the 8 shares
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    with pytest.raises(UsageError, match="sparse array .*--task-index and --num-tasks"):
        slurm_array_task()


def test_exit_codes(tmp_path, codec_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = [f"codec.source={codec_path}", "codec.device=cpu", "scan_workers=1"]
    assert main(["prep", "all", f"catalog={empty}", f"out_dir={tmp_path}/o1", *common]) == 2
    assert "no audio files" in capsys.readouterr().err
    assert main(["prep", "all", f"catalog={tmp_path}/missing", f"out_dir={tmp_path}/o1", *common]) == 2
    assert "catalog folder not found" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.wav").write_text("junk")
    assert main(["prep", "all", f"catalog={junk}", f"out_dir={tmp_path}/o2", *common]) == 3
    assert "no usable audio" in capsys.readouterr().err
    assert main(["prep", "all", f"catalog={junk}", "out_dir=x", "typo_key=1"]) == 2
    assert main(["prep", "encode", "--task-index", "2", "--num-tasks", "2", "out_dir=x"]) == 2


def test_verify_catches_a_damaged_or_missing_shard(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    assert main(["prep", "verify", f"out_dir={copy}"]) == 0
    shard = sorted(copy.glob("shards/train/*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    sorted(copy.glob("shards/train/*.tar"))[1].unlink()
    from vampnet_pl.prep.index import verify

    problems = verify(copy)
    assert any("checksum mismatch" in p for p in problems) and any("missing" in p for p in problems)
    assert main(["prep", "verify", f"out_dir={copy}"]) == 1


def test_the_console_script_runs_a_small_prep_end_to_end(tmp_path, codec_path):
    catalog = tmp_path / "c"
    write_tone(catalog / "a.flac", 2.5)
    write_tone(catalog / "b.wav", 2.5, freq=330)
    done = subprocess.run(
        [sys.executable, "-m", "vampnet_pl.cli", "prep", "all", f"catalog={catalog}", f"out_dir={tmp_path / 'o'}",
         f"codec.source={codec_path}", "codec.device=cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data prep summary" in done.stdout and "throughput" in done.stdout and "hours of audio" in done.stdout
    assert (tmp_path / "o" / "index.json").is_file() and (tmp_path / "o" / "failures.jsonl").is_file()
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_a_repair_override_typo_is_a_usage_error(tmp_path, capsys):
    """`prep repair out_dir=DIR codec.devcie=cpu` gave a ConfigKeyError traceback (exit 1), not the one-line exit 2."""
    from omegaconf import OmegaConf

    from vampnet_pl.config import PrepConfig

    saved = OmegaConf.merge(OmegaConf.structured(PrepConfig), {"catalog": "c", "out_dir": str(tmp_path), "codec": {"source": "x"}})
    OmegaConf.save(saved, tmp_path / "prep_config.yaml")
    assert main(["prep", "repair", f"out_dir={tmp_path}", "codec.devcie=cpu"]) == 2
    assert "devcie" in capsys.readouterr().err


def test_repair_reads_a_quoted_or_interpolated_out_dir_as_verify_does(prepared, tmp_path, monkeypatch, capsys):
    """`prep repair "out_dir='/data/codes,v2'"` looked for prep_config.yaml under the quotes (and an
    `${oc.env:...}` unresolved): 'not a prep output folder', where `prep verify` read the same override."""
    copy = tmp_path / "codes,v2"
    shutil.copytree(prepared, copy)
    monkeypatch.setenv("CODES", str(copy))
    escaped = str(copy).replace(",", "\\,")  # Hydra's escape in an unquoted value
    for override in (f"out_dir='{copy}'", "out_dir=${oc.env:CODES}", f"out_dir={escaped}"):
        assert main(["prep", "verify", override]) == 0
        assert main(["prep", "repair", override]) == 0
        assert "repair: nothing to do" in capsys.readouterr().out
