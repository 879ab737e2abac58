"""The README's main job, small: synthetic catalog -> shards -> verify -> picture."""

from __future__ import annotations

import pytest

from vampnet_pl.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", f"work_dir={tmp_path}", "catalog_files=4", "catalog_seconds=6", "prep.workers=1"]) == 0
    out = capsys.readouterr().out
    assert "verify OK" in out and "data prep summary" in out
    assert (tmp_path / "shards" / "index.json").is_file()
    assert (tmp_path / "shards_overview.png").stat().st_size > 10_000
