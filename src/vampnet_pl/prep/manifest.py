"""Stage 1 of data prep: scan a catalog folder into a manifest (one JSON line per usable file).

Each entry records path, duration, sample rate, channels and a content hash. The split is a
pure function of the content hash, so adding files never moves existing ones between splits.
Byte-identical files are encoded once: the first path in sorted order; the others are recorded as
duplicates in the scan failures. (The same music in another encoding is another file.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from vampnet_pl.audio_io import AudioReadError, probe
from vampnet_pl.config import PrepConfig, SplitConfig
from vampnet_pl.utils.atomic import write_text_atomic
from vampnet_pl.utils.hashing import file_sha256

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative to the catalog root
    duration: float
    sample_rate: int
    channels: int
    size_bytes: int
    mtime_ns: int
    sha256: str
    split: str
    ctime_ns: int | None = None  # None in manifests written before they were recorded: such files are hashed again
    inode: int | None = None


def stat_record(stat: os.stat_result) -> dict:
    """What a file's recorded hash is trusted on. Size and mtime alone are not enough: ``cp -p``, ``rsync -t`` and
    ``touch -r`` put other bytes of the same size under the old mtime; none can set ctime (the kernel's, moved by
    every write) or keep the inode of a file renamed into place."""
    return {"size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino}


def unchanged_since(stat: os.stat_result, recorded: dict) -> bool:
    """Whether a file's stat is the one ``recorded`` (a manifest row); a row missing a field is never unchanged."""
    return all(recorded.get(key) == value for key, value in stat_record(stat).items())


@dataclass(frozen=True)
class Failure:
    path: str
    stage: str
    reason: str


def assign_split(content_hash: str, split: SplitConfig) -> str:
    """Deterministic train/val/test from a content hash (stable as the catalog grows)."""
    draw = int(hashlib.sha256(f"{split.salt}:{content_hash}".encode()).hexdigest()[:12], 16) / 16**12
    if draw < split.test_fraction:
        return "test"
    if draw < split.test_fraction + split.val_fraction:
        return "val"
    return "train"


def find_audio_files(catalog: Path, extensions: Iterable[str]) -> tuple[list[Path], list[Failure]]:
    """All files under ``catalog`` with an audio extension, sorted, and a scan failure for each folder skipped.

    Folder links are followed (music on another disk may be linked in), as file links are. A folder reached
    a second time (a link loop, or two links to one folder) is scanned once, under the path met first; each
    other path to it is recorded as a failure, as is a folder that cannot be listed.
    """
    wanted = {"." + ext.lower().lstrip(".") for ext in extensions}
    found: list[Path] = []
    failures: list[Failure] = []
    scanned_as: dict[str, str] = {}  # real path of each folder scanned -> its path in the catalog

    def relative(path) -> str:
        return os.path.relpath(path, catalog)

    def unlistable(err: OSError) -> None:
        failures.append(Failure(relative(err.filename), "scan", f"cannot list folder: {err.strerror or err}"))

    listing = tqdm(os.walk(catalog, onerror=unlistable, followlinks=True), desc="list catalog", unit=" folders",
                   dynamic_ncols=True)  # a large network-mounted catalog takes a while before the scan's bar starts
    for root, dirs, files in listing:
        listing.set_postfix(audio_files=len(found), refresh=False)
        real = os.path.realpath(root)
        if real in scanned_as:
            failures.append(Failure(relative(root), "scan", f"folder skipped: the same folder as "
                                    f"{scanned_as[real]!r}, scanned there (a link loop, or a second link to it)"))
            dirs.clear()
            continue
        scanned_as[real] = relative(root)
        dirs.sort()
        names = files + [d for d in dirs if Path(d).suffix.lower() in wanted]  # a folder named x.wav is reported
        found.extend(Path(root) / name for name in names if Path(name).suffix.lower() in wanted)
    return sorted(found), sorted(failures, key=lambda f: f.path)


def _scan_one(args: tuple[Path, Path, SplitConfig, dict | None]) -> ManifestEntry | Failure:
    path, catalog, split, previous = args
    rel = str(path.relative_to(catalog))
    try:
        info = probe(path)
        if info.frames <= 0 or info.sample_rate <= 0:
            raise AudioReadError("no samples in file")
        stat = path.stat()
        if previous and unchanged_since(stat, previous):
            content_hash = previous["sha256"]
        else:
            content_hash = file_sha256(path)
    except AudioReadError as err:
        return Failure(rel, "scan", str(err))
    except OSError as err:
        return Failure(rel, "scan", f"cannot read file: {err.strerror or err}")
    return ManifestEntry(
        path=rel,
        duration=info.duration,
        sample_rate=info.sample_rate,
        channels=info.channels,
        sha256=content_hash,
        split=assign_split(content_hash, split),
        **stat_record(stat),
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable) -> None:
    write_text_atomic(path, "".join(json.dumps(asdict(r) if not isinstance(r, dict) else r) + "\n" for r in rows))


def manifest_path(out_dir: Path) -> Path:
    return out_dir / "manifest.jsonl"


def scan_failures_path(out_dir: Path) -> Path:
    return out_dir / "scan_failures.jsonl"


def load_manifest(out_dir: Path) -> list[ManifestEntry]:
    path = manifest_path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: run the scan stage first")
    return [ManifestEntry(**row) for row in read_jsonl(path)]


def scan_catalog(cfg: PrepConfig) -> tuple[list[ManifestEntry], list[Failure]]:
    """Probe and hash every audio file of the catalog; write ``manifest.jsonl`` atomically.

    Hashes of files whose size, mtime, ctime and inode are unchanged since the last manifest are reused.
    """
    catalog, out_dir = Path(cfg.catalog), Path(cfg.out_dir)
    if not catalog.is_dir():
        raise FileNotFoundError(f"catalog folder not found: {catalog}")
    files, folder_failures = find_audio_files(catalog, cfg.extensions)
    if not files:
        raise ValueError(f"no audio files under {catalog} (extensions: {', '.join(cfg.extensions)})")
    previous = {row["path"]: row for row in read_jsonl(manifest_path(out_dir))}
    jobs = [(path, catalog, cfg.split, previous.get(str(path.relative_to(catalog)))) for path in files]
    progress = dict(total=len(jobs), desc="scan", unit="file", dynamic_ncols=True)
    if cfg.scan_workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.scan_workers) as pool:
            results = list(tqdm(pool.imap(_scan_one, jobs, chunksize=4), **progress))
    else:
        results = [_scan_one(job) for job in tqdm(jobs, **progress)]
    entries, failures, first = [], folder_failures + [r for r in results if isinstance(r, Failure)], {}
    for entry in (r for r in results if isinstance(r, ManifestEntry)):
        if entry.sha256 in first:  # training on it twice would weigh it double (and its samples share keys)
            failures.append(Failure(entry.path, "scan", f"duplicate of {first[entry.sha256]} (identical bytes)"))
        else:
            first[entry.sha256] = entry.path
            entries.append(entry)
    for failure in failures:
        log.warning("skipping %s: %s", failure.path, failure.reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(manifest_path(out_dir), entries)
    write_jsonl(scan_failures_path(out_dir), failures)
    return entries, failures
