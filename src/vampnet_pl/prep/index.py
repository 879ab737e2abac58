"""Stage 3 of data prep: merge unit records into ``index.json`` + ``failures.jsonl``; verify a set.

``index.json`` is the contract between data prep and training: codec fingerprint and config,
every shard with its split, sample count, frame and duration totals and checksum.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import OmegaConf
from tqdm import tqdm

from vampnet_pl.codec import Codec
from vampnet_pl.config import PrepConfig
from vampnet_pl.prep.encode import plan_units, unit_is_done, unit_marker_path
from vampnet_pl.prep.manifest import SPLITS, file_sha256, load_manifest, read_jsonl, scan_failures_path, write_jsonl
from vampnet_pl.utils.atomic import write_json_atomic

log = logging.getLogger(__name__)

INDEX_VERSION = 1


class NothingUsable(RuntimeError):
    """The catalog produced no usable sample at all."""


def index_path(out_dir: Path) -> Path:
    return Path(out_dir) / "index.json"


def load_index(dataset_dir: str | Path) -> dict:
    path = index_path(Path(dataset_dir))
    if not path.is_file():
        raise FileNotFoundError(f"no index.json in {dataset_dir}: finish data prep (finalize) first")
    return json.loads(path.read_text())


def finalize(cfg: PrepConfig, codec: Codec) -> dict:
    """Write ``index.json`` and ``failures.jsonl`` once every unit is done."""
    out_dir = Path(cfg.out_dir)
    units = plan_units(load_manifest(out_dir), cfg.files_per_unit)
    missing = [u.name for u in units if not unit_is_done(out_dir, u)]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(units)} units are not done yet (first: {missing[:5]}); run encode")
    markers = [json.loads(unit_marker_path(out_dir, u).read_text()) for u in units]
    failures = read_jsonl(scan_failures_path(out_dir)) + [f for m in markers for f in m["failures"]]
    write_jsonl(out_dir / "failures.jsonl", failures)
    splits = {}
    for split in SPLITS:
        shards = sorted((s for m in markers for s in m["shards"] if s["split"] == split), key=lambda s: s["path"])
        splits[split] = {
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "frames": sum(s["frames"] for s in shards),
            "hours": sum(s["seconds"] for s in shards) / 3600,
            "max_frames": max((s["max_frames"] for s in shards), default=0),
        }
    times = {k: sum(m["times"][k] for m in markers) for k in markers[0]["times"]} if markers else {}
    index = {
        "version": INDEX_VERSION,
        "codec": {"fingerprint": codec.fingerprint, "config": codec.config, "source": cfg.codec.source},
        "prep_config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True),
        "splits": splits,
        "totals": {
            "files": len(load_manifest(out_dir)) - sum(1 for f in failures if f["stage"] == "encode"),
            "failures": len(failures),
            "samples": sum(s["samples"] for s in splits.values()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "hours": sum(s["hours"] for s in splits.values()),
            "audio_seconds_read": sum(m["audio_seconds"] for m in markers),
            "encode_seconds": sum(m["wall_seconds"] for m in markers),
            "stage_seconds": times,
        },
    }
    if index["totals"]["samples"] == 0:
        raise NothingUsable(f"no usable audio: all {len(failures)} files failed (see {out_dir / 'failures.jsonl'})")
    write_json_atomic(index_path(out_dir), index)
    return index


def _check_sample(sample: dict, index: dict) -> str | None:
    try:
        codes = np.load(io.BytesIO(sample["codes.npy"]))
        meta = json.loads(sample["json"])
    except Exception as err:  # any undecodable member
        return f"undecodable sample: {err}"
    n_codebooks = index["codec"]["config"]["n_codebooks"]
    if codes.dtype != np.uint16 or codes.ndim != 2 or codes.shape[0] != n_codebooks:
        return f"codes {codes.dtype}{list(codes.shape)}, expected uint16[{n_codebooks}, frames]"
    if meta.get("codec_fingerprint") != index["codec"]["fingerprint"]:
        return "codec fingerprint differs from the index"
    if codes.shape[1] != meta.get("frames"):
        return "frame count differs from its metadata"
    return None


def verify(dataset_dir: str | Path) -> list[str]:
    """Check every shard against ``index.json``; returns a list of problems (empty when sound)."""
    dataset_dir = Path(dataset_dir)
    index = load_index(dataset_dir)
    problems = []
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    for shard in tqdm(shards, desc="verify", unit="shard", dynamic_ncols=True):
        path = dataset_dir / shard["path"]
        if not path.is_file():
            problems.append(f"{shard['path']}: missing")
            continue
        if file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['path']}: checksum mismatch")
            continue
        count = 0
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            if problem := _check_sample(sample, index):
                problems.append(f"{shard['path']}/{sample['__key__']}: {problem}")
        if count != shard["samples"]:
            problems.append(f"{shard['path']}: {count} samples, index says {shard['samples']}")
    return problems
