"""``index.json``, the contract between data prep (which writes it, ``prep/index.py``) and training (which reads
it): codec fingerprint and config, every shard with its split, sample count, frame and duration totals and
checksum. Durations (a shard's ``seconds``, the ``hours`` of each split and in total) are audio time with each
segment counted once, also under ``channels=each``, where each channel of a segment is its own sample."""

from __future__ import annotations

import json
from pathlib import Path

INDEX_VERSION = 1


def index_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / "index.json"


def load_index(dataset_dir: str | Path) -> dict:
    path = index_path(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no index.json in {dataset_dir}: finish data prep (finalize) first")
    index = json.loads(path.read_text())
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path} has index version {index.get('version')!r}; this vampnet-pl reads version "
                         f"{INDEX_VERSION}: prepare the data again with this version (vampnet-pl prep)")
    return index


def shard_sample_counts(dataset_dir: str | Path, index: dict) -> dict[str, int]:
    """Sample count of every shard ``index`` lists, by its path under ``dataset_dir`` (as readers open it)."""
    return {str(Path(dataset_dir) / shard["path"]): shard["samples"]
            for split in index["splits"].values() for shard in split["shards"]}
