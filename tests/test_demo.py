"""The README's main job, small: synthetic catalog -> shards -> verify -> picture."""

from __future__ import annotations

import pytest

from vampnet_pl.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", f"work_dir={tmp_path}", "catalog_files=6", "catalog_seconds=6", "prep.workers=1",
                 "prep.split.val_fraction=0.3", "train_steps=6",
                 "train_overrides=['data.batches_per_epoch=3','data.window_seconds=1.0','data.num_workers=0','trainer.log_every_n_steps=1']"]) == 0
    out = capsys.readouterr().out
    assert "verify OK" in out and "data prep summary" in out
    assert (tmp_path / "shards" / "index.json").is_file()
    assert (tmp_path / "shards_overview.png").stat().st_size > 10_000
    assert (tmp_path / "training_loss.png").stat().st_size > 10_000
    from vampnet_pl.model import load_exported

    assert load_exported(tmp_path / "models" / "coarse.pt").cfg.n_conditioning_codebooks == 0
    assert load_exported(tmp_path / "models" / "c2f.pt").cfg.n_conditioning_codebooks == 4
    assert "coarse: loss" in out and "c2f: loss" in out
    logs = [tmp_path / "runs" / stage / "csv" / "metrics.csv" for stage in ("coarse", "c2f")]
    assert f"training logs: {logs[0]}, {logs[1]}" in out and all(p.is_file() for p in logs)  # what it points to exists
    assert "TensorBoard" not in out and ("(test split;" in out or "(val split;" in out)
    assert (tmp_path / "eval" / "results.csv").is_file() and (tmp_path / "eval" / "quality_vs_passes.png").is_file()
    assert len(list((tmp_path / "vamps").glob("demo_clip_vamp_*.wav"))) == 2


@pytest.mark.parametrize("bad, named", [("train_overrides=['trainer.max_stepz=3']", "trainer.max_stepz"),
                                        ("train_overrides=['masking.schedule=cosin']", "cosin")])
def test_a_wrong_train_override_fails_before_anything_is_written(bad, named, tmp_path, capsys):
    """A typo in train_overrides failed only when training began, after the catalog was written and encoded."""
    assert main(["demo", f"work_dir={tmp_path / 'demo'}", bad]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
