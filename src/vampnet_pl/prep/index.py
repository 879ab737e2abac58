"""Stage 3 of data prep: merge unit records into ``index.json`` (its format: ``data/index.py``) +
``failures.jsonl``; verify a set.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from omegaconf import OmegaConf
from tqdm import tqdm

from vampnet_pl.codec import Codec
from vampnet_pl.config import SPLITS, PrepConfig
from vampnet_pl.data.index import INDEX_VERSION, index_path, load_index
from vampnet_pl.data.validation import SampleInvalid, decode_npy, validate_codes
from vampnet_pl.prep.encode import Unit, check_encoding, manifest_units, unit_is_done, unit_marker_path
from vampnet_pl.prep.manifest import load_manifest, read_jsonl, scan_failures_path, write_jsonl
from vampnet_pl.utils.atomic import write_json_atomic
from vampnet_pl.utils.hashing import file_sha256

log = logging.getLogger(__name__)


class NothingUsable(RuntimeError):
    """The catalog produced no usable sample at all."""


ORPHANED = "orphaned"  # shards and markers of units no longer planned are moved here, under their own paths


def _unit_name(shard: Path) -> str:
    return shard.name.rsplit("-", 1)[0]  # <unit name>-NNN.tar


def orphans(out_dir: Path, units: list[Unit]) -> list[Path]:
    """Shards and done-markers on disk of units that are not in ``units`` (their files left the catalog, or
    fewer units are cut from it now)."""
    planned = {unit.name for unit in units}
    markers = [p for p in out_dir.glob("units/unit-*.json") if p.stem not in planned]
    return sorted(markers + [p for p in out_dir.glob("shards/*/unit-*.tar") if _unit_name(p) not in planned])


def set_aside_orphans(out_dir: Path, units: list[Unit]) -> list[Path]:
    """Move :func:`orphans` to ``out_dir/orphaned/`` (not deleted: a catalog disk missing during one scan
    must not cost its encoded shards); returns their old paths."""
    moved = orphans(out_dir, units)
    for path in moved:
        target = out_dir / ORPHANED / path.relative_to(out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    if moved:
        log.warning("moved %d shards and markers of units no longer planned (files gone from the catalog) to %s; "
                    "delete it once not needed", len(moved), out_dir / ORPHANED)
    return moved


def finalize(cfg: PrepConfig, codec: Codec) -> dict:
    """Write ``index.json`` and ``failures.jsonl`` once every unit is done; then move the shards and markers
    of units no longer planned aside (:func:`set_aside_orphans`)."""
    out_dir = Path(cfg.out_dir)
    units = manifest_units(cfg)
    check_encoding(out_dir, cfg, codec.fingerprint)
    missing = [u.name for u in units if not unit_is_done(out_dir, u, cfg)]
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
    set_aside_orphans(out_dir, units)  # after the index, which never lists them
    return index


def _check_sample(sample: dict, index: dict) -> str | None:
    """Everything the training readers check, on one raw sample: a problem, or None."""
    try:
        codes = decode_npy(sample["codes.npy"])
        meta = json.loads(sample["json"])
    except Exception as err:  # any undecodable member
        return f"undecodable sample: {type(err).__name__}: {err}"
    if meta.get("codec_fingerprint") != index["codec"]["fingerprint"]:
        return "codec fingerprint differs from the index"
    config = index["codec"]["config"]
    try:
        validate_codes(codes, meta, config["codebook_size"], config["n_codebooks"])
    except SampleInvalid as err:  # a set written before per-sample checksums gets the other checks
        return str(err)
    return None


def _read_problems(path: Path, shard: dict, index: dict) -> list[str]:
    problems, count = [], 0
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            if problem := _check_sample(sample, index):
                problems.append(f"{shard['path']}/{sample['__key__']}: {problem}")
    except Exception as err:  # a truncated or garbled tar
        problems.append(f"{shard['path']}: unreadable after {count} samples: {type(err).__name__}: {err}")
        return problems
    if count != shard["samples"]:
        problems.append(f"{shard['path']}: {count} samples, index says {shard['samples']}")
    return problems


def verify_shards(dataset_dir: str | Path, deep: bool = False) -> dict[str, list[str]]:
    """Problems per shard path (only shards that have some).

    Always: every shard of ``index.json`` exists with its size and SHA-256, and no other shard is in
    ``shards/`` (one left by a unit no longer planned: ``prep finalize`` moves it aside). ``deep``: also decode every
    sample (of every shard, damaged or not, to name the bad samples) and check its codebook count, frame
    count, token range and per-sample checksum, and each shard's sample count.
    """
    dataset_dir = Path(dataset_dir)
    index = load_index(dataset_dir)
    problems: dict[str, list[str]] = {}
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    for shard in tqdm(shards, desc="verify --deep" if deep else "verify", unit="shard", dynamic_ncols=True):
        path = dataset_dir / shard["path"]
        found: list[str] = []
        if not path.is_file():
            problems[shard["path"]] = [f"{shard['path']}: missing"]
            continue
        if path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            found.append(f"{shard['path']}: checksum mismatch")
        if deep:
            found += _read_problems(path, shard, index)
        if found:
            problems[shard["path"]] = found
    listed = {shard["path"] for shard in shards}
    for path in sorted(dataset_dir.glob("shards/*/*.tar")):
        if (name := str(path.relative_to(dataset_dir))) not in listed:
            problems[name] = [f"{name}: not in index.json (left by a unit no longer planned? `prep finalize` "
                              "moves such shards aside)"]
    return problems


def verify(dataset_dir: str | Path, deep: bool = False) -> list[str]:
    """Check every shard against ``index.json``; returns a list of problems (empty when sound)."""
    return [p for found in verify_shards(dataset_dir, deep).values() for p in found]


def repair(cfg: PrepConfig, deep: bool = True) -> list[str]:
    """Re-encode, from the manifest, only the units whose shards fail verification; then rewrite the index.

    A unit's marker is removed first (a kill leaves it 'not done', and a re-run redoes it); its new shards
    are written aside and renamed over the old ones (:func:`encode_unit`), and ``index.json`` is replaced
    atomically. Source files that changed since the scan are refused. Returns the units redone.
    """
    from vampnet_pl.prep.encode import encode_unit

    out_dir = Path(cfg.out_dir)
    units = manifest_units(cfg)
    failing = set(verify_shards(out_dir, deep)) if index_path(out_dir).is_file() else set()
    by_name = {unit.name: unit for unit in units}  # a shard is <split>/<unit name>-NNN.tar, marker or not
    owner = {path: by_name.get(_unit_name(Path(path))) for path in failing}
    unknown = [path for path, unit in owner.items() if unit is None]
    if unknown:
        raise RuntimeError(f"shards {sorted(unknown)[:5]} belong to no unit of the manifest; re-run prep all")
    redo = {unit.index: unit for unit in owner.values()}
    redo.update({u.index: u for u in units if not unit_is_done(out_dir, u, cfg)})  # left by an interrupted repair
    if not redo:
        log.info("repair: every shard is sound")
        return []
    catalog = Path(cfg.catalog)
    for unit in redo.values():
        for entry in unit.entries:
            source = catalog / entry.path
            if not source.is_file() or file_sha256(source) != entry.sha256:
                raise RuntimeError(f"{source} is missing or changed since the scan: cannot rebuild {unit.name} "
                                   "exactly; re-run `vampnet-pl prep all`")
    codec = Codec.load(cfg.codec.source, cfg.codec.device, cfg.codec.chunk_seconds, cfg.codec.context_frames)
    check_encoding(out_dir, cfg, codec.fingerprint)  # e.g. an override of the codec: refused before a marker goes
    for unit in redo.values():
        unit_marker_path(out_dir, unit).unlink(missing_ok=True)
    for unit in tqdm(sorted(redo.values(), key=lambda u: u.index), desc="repair", unit="unit", dynamic_ncols=True):
        encode_unit(unit, cfg, codec)
    finalize(cfg, codec)
    return [u.name for u in sorted(redo.values(), key=lambda u: u.index)]
