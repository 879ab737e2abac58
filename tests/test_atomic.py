"""Atomic writes: all or nothing, and the file mode a plain write would give."""

from __future__ import annotations

import os

import pytest

from vampnet_pl.utils.atomic import atomic_path, write_text_atomic


def test_atomic_write_replaces_whole_and_keeps_the_usual_file_mode(tmp_path):
    target = tmp_path / "report.md"
    write_text_atomic(target, "old")
    mask = os.umask(0o022)
    try:
        write_text_atomic(target, "new")
    finally:
        os.umask(mask)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
