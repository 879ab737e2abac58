"""Stage 2 of data prep: audio files -> DAC codes -> WebDataset shards, one work unit at a time.

The manifest is cut into deterministic units of ``files_per_unit`` files. Task ``i`` of ``N``
(a SLURM array task, or a local process with ``balance=static``) owns the units ``u`` with
``u % N == i`` and needs no coordination; local processes by default share one queue of units
(:func:`vampnet_pl.prep.run.encode_local`). A unit's shards are written into a private temp
folder, renamed into ``shards/<split>/`` (over an earlier attempt's, so a repair never leaves a gap) and only then marked done by an atomically written
``units/unit-XXXXX.json``; a re-run skips done units and redoes any other from scratch.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from vampnet_pl.audio_io import AudioReadError, iter_blocks, probe
from vampnet_pl.codec import Codec
from vampnet_pl.config import ChannelMode, PrepConfig
from vampnet_pl.data.validation import CHECKSUM_FIELD, codes_checksum, validate_codes
from vampnet_pl.prep.manifest import (Failure, ManifestEntry, assign_split, load_manifest, manifest_path,
                                      unchanged_since)
from vampnet_pl.utils.atomic import write_json_atomic
from vampnet_pl.utils.hashing import file_sha256

log = logging.getLogger(__name__)


class FileRejected(Exception):
    """A readable file that is not usable (too short, silent, non-finite samples)."""


@dataclass(frozen=True)
class Unit:
    index: int
    entries: tuple[ManifestEntry, ...]

    @property
    def name(self) -> str:
        return f"unit-{self.index:05d}"

    @property
    def content_hashes(self) -> list[str]:
        return [e.sha256 for e in self.entries]


def plan_units(entries: list[ManifestEntry], files_per_unit: int) -> list[Unit]:
    ordered = sorted(entries, key=lambda e: e.path)
    return [
        Unit(i, tuple(ordered[start : start + files_per_unit]))
        for i, start in enumerate(range(0, len(ordered), files_per_unit))
    ]


def units_for_task(units: list[Unit], task_index: int, num_tasks: int) -> list[Unit]:
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return [u for u in units if u.index % num_tasks == task_index]


def unit_marker_path(out_dir: Path, unit: Unit) -> Path:
    return out_dir / "units" / f"{unit.name}.json"


class EncodingChanged(ValueError):
    """An out_dir's units were encoded with other settings, or another codec, than this run's."""


def encoding_settings(cfg: PrepConfig) -> dict:
    """What a unit's shards depend on besides its files and the codec's weights (those: its fingerprint):
    the codes, and the split folders its files go to."""
    return {"channels": ChannelMode(cfg.channels).value, "segment_seconds": cfg.segment_seconds,
            "min_seconds": cfg.min_seconds, "silence_db": cfg.silence_db, "loudness_lufs": cfg.loudness_lufs,
            "codec_chunk_seconds": cfg.codec.chunk_seconds, "codec_context_frames": cfg.codec.context_frames,
            "split.val_fraction": cfg.split.val_fraction, "split.test_fraction": cfg.split.test_fraction,
            "split.salt": cfg.split.salt}


def encoding_differences(recorded: dict, wanted: dict) -> dict:
    """The settings that differ; one a marker does not record (written before it was) is taken as equal."""
    return {key: value for key, value in wanted.items() if key in recorded and recorded[key] != value}


def changed_encoding(out_dir: Path, what: str, recorded: dict, wanted: dict) -> EncodingChanged:
    changes = ", ".join(f"{key} {recorded[key]!r} -> {value!r}"
                        for key, value in encoding_differences(recorded, wanted).items())
    return EncodingChanged(f"{out_dir} holds {what} encoded otherwise ({changes}): write to a new out_dir, or delete "
                           f"{out_dir / 'units'} and {out_dir / 'shards'} to encode it all again")


def manifest_units(cfg: PrepConfig) -> list[Unit]:
    """The units of ``out_dir``'s manifest. Raises :class:`EncodingChanged` when it was scanned with other split
    settings than ``cfg``'s: its files would go to splits other than those the markers record."""
    entries = load_manifest(Path(cfg.out_dir))
    for entry in entries:
        if (wanted := assign_split(entry.sha256, cfg.split)) != entry.split:
            raise EncodingChanged(f"{manifest_path(Path(cfg.out_dir))} was scanned with other split settings than "
                                  f"this run's (it puts {entry.path} in {entry.split}, these in {wanted}): run "
                                  "`prep scan` with this run's split.* settings")
    return plan_units(entries, cfg.files_per_unit)


def unit_markers(out_dir: Path) -> list[Path]:
    """The done-markers in ``out_dir`` (those moved to ``orphaned/`` are not counted)."""
    return sorted((out_dir / "units").glob("unit-*.json"))


def check_encoding(out_dir: Path, cfg: PrepConfig, fingerprint: str) -> None:
    """Raise :class:`EncodingChanged` when any unit of ``out_dir`` was encoded with other settings than ``cfg``'s or
    by another codec than ``fingerprint``'s. Stages call it before they write anything, so that a refused run
    leaves ``out_dir`` as it was (markers that do not record a setting are taken as is)."""
    import json

    wanted = dict(encoding_settings(cfg), codec=fingerprint[:16])
    for marker in unit_markers(out_dir):
        record = json.loads(marker.read_text())
        recorded = dict(record.get("encoding", {}), codec=record.get("codec_fingerprint", fingerprint)[:16])
        if encoding_differences(recorded, wanted):
            raise changed_encoding(out_dir, marker.stem, recorded, wanted)


def unit_is_done(out_dir: Path, unit: Unit, cfg: PrepConfig) -> bool:
    """Its marker is there, for its files, with all its shards. Raises :class:`EncodingChanged` when it was
    encoded with other settings than ``cfg``'s (markers written before they were recorded are taken as is)."""
    import json

    marker = unit_marker_path(out_dir, unit)
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    if record.get("content_hashes") != unit.content_hashes:
        return False
    wanted = encoding_settings(cfg)
    if encoding_differences(record.get("encoding", {}), wanted):
        raise changed_encoding(out_dir, unit.name, record["encoding"], wanted)
    return all((out_dir / shard["path"]).is_file() for shard in record["shards"])


@dataclass
class StageTimes:
    """Seconds spent per stage, for the closing summary and the prep benchmark."""

    decode: float = 0.0
    resample: float = 0.0
    codec: float = 0.0
    write: float = 0.0

    def add(self, other: "StageTimes") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _dbfs(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def _normalize_loudness(wave: torch.Tensor, sample_rate: int, target_lufs: float) -> torch.Tensor:
    import torchaudio

    if wave.shape[-1] < int(0.4 * sample_rate):  # BS.1770 needs one 400 ms block
        return wave
    loudness = float(torchaudio.functional.loudness(wave.unsqueeze(0), sample_rate))
    if not math.isfinite(loudness):
        return wave
    gain = 10 ** ((target_lufs - loudness) / 20)
    peak = float(wave.abs().max())
    if peak * gain > 1.0:  # never clip: limit the gain to the peak
        gain = 1.0 / peak
    return wave * gain


LOUDNESS_FLOOR = -70.0  # BS.1770's absolute gate: quieter seconds are recorded as this


def loudness_per_second(wave: torch.Tensor, sample_rate: int) -> list[float]:
    """BS.1770 loudness (LUFS) of each second of ``wave`` (a last partial second of >= 400 ms included).

    Recorded in each sample's metadata (``loudness_lufs_per_second``) so that training can skip
    quiet windows (``data.loudness_cutoff``) without the audio.
    """
    import torchaudio

    track = []
    for start in range(0, wave.shape[-1], sample_rate):
        block = wave[..., start : start + sample_rate]
        if block.shape[-1] < int(0.4 * sample_rate):
            break
        value = float(torchaudio.functional.loudness(block.reshape(1, -1).float(), sample_rate))
        track.append(round(max(value, LOUDNESS_FLOOR), 2) if math.isfinite(value) else LOUDNESS_FLOOR)
    return track


@dataclass
class EncodedSample:
    key: str
    codes: np.ndarray  # uint16 [n_codebooks, frames]
    meta: dict


@dataclass
class FileResult:
    samples: list[EncodedSample] = field(default_factory=list)
    audio_seconds: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)


def changed_since_scan(path: Path, entry: ManifestEntry) -> bool:
    """Whether the file's bytes differ from those scanned. Hashed only when its stat moved (see
    :func:`~vampnet_pl.prep.manifest.stat_record`; a file merely touched is unchanged); encoding it under the old
    hash would put it in the old hash's split."""
    if unchanged_since(path.stat(), asdict(entry)):
        return False
    return file_sha256(path) != entry.sha256


def encode_file(entry: ManifestEntry, catalog: Path, cfg: PrepConfig, codec: Codec) -> FileResult:
    """Every usable segment of one file as encoded samples; raises on a file that must be skipped
    (one changed since the scan included).

    Nothing is returned until the whole file succeeded, so a file never lands half in a shard.
    """
    path = catalog / entry.path
    result = FileResult()
    clock = time.perf_counter()
    if changed_since_scan(path, entry):
        raise FileRejected("changed since scan (its content differs from the manifest's); run prep scan again")
    info = probe(path)
    if info.duration < cfg.min_seconds:
        raise FileRejected(f"too short: {info.duration:.4f} s < min_seconds={cfg.min_seconds}")
    block_frames = max(1, int(cfg.segment_seconds * info.sample_rate))
    silent_segments = 0
    for start, block in iter_blocks(path, block_frames, info):
        now = time.perf_counter()
        result.times.decode += now - clock
        offset = start / info.sample_rate
        if not np.isfinite(block).all():
            raise FileRejected(f"non-finite samples (NaN/Inf) in the segment at {offset:.2f} s")
        seconds = block.shape[1] / info.sample_rate
        result.audio_seconds += seconds
        if seconds < cfg.min_seconds:  # a short tail
            clock = time.perf_counter()
            continue
        waves = [block.mean(axis=0)] if cfg.channels == ChannelMode.mono else list(block)
        for channel, wave in enumerate(waves):
            if _dbfs(wave) < cfg.silence_db:
                silent_segments += 1
                continue
            t0 = time.perf_counter()
            resampled = codec.resample(wave, info.sample_rate)
            if cfg.loudness_lufs is not None:
                resampled = _normalize_loudness(resampled, codec.sample_rate, cfg.loudness_lufs)
            t1 = time.perf_counter()
            codes = codec.encode(resampled, codec.sample_rate).numpy()
            t2 = time.perf_counter()
            result.times.resample += t1 - t0
            result.times.codec += t2 - t1
            channel_tag = "mix" if cfg.channels == ChannelMode.mono else channel
            key = f"{entry.sha256[:16]}_{int(round(offset * 1000)):09d}" + ("" if channel_tag == "mix" else f"_ch{channel}")
            validate_codes(codes, {}, codec.codebook_size)  # the checksum below vouches for this range check
            meta = {
                "source": entry.path,
                "content_sha256": entry.sha256,
                "offset_seconds": offset,
                "duration_seconds": seconds,
                "channel": channel_tag,
                "source_sample_rate": info.sample_rate,
                "frames": int(codes.shape[-1]),
                "n_codebooks": int(codes.shape[0]),
                "codec_fingerprint": codec.fingerprint,
                "split": entry.split,
                "loudness_lufs_per_second": loudness_per_second(resampled.cpu(), codec.sample_rate),
                CHECKSUM_FIELD: codes_checksum(codes),  # the readers check it per sample
            }
            result.samples.append(EncodedSample(key, codes, meta))
        clock = time.perf_counter()
    if not result.samples:
        if silent_segments:
            raise FileRejected(f"silent: every segment below silence_db={cfg.silence_db} dBFS")
        raise FileRejected("no segment of at least min_seconds")
    return result


class _SplitShardWriter:
    """webdataset ShardWriter for one split of one unit, recording per-shard counts."""

    def __init__(self, folder: Path, prefix: str, cfg: PrepConfig):
        self.writer = wds.ShardWriter(
            str(folder / f"{prefix}-%03d.tar"),
            maxcount=cfg.shard_max_samples,
            maxsize=cfg.shard_max_bytes,
            verbose=0,
            mtime=0,  # reproducible shard bytes
        )
        self.stats: dict[str, dict] = {}
        self.last_segment: tuple | None = None

    def write(self, sample: EncodedSample) -> None:
        """Write one sample; a shard's ``seconds`` is audio time, each segment counted once (with
        ``channels=each`` its channels are consecutive samples, the first one counts)."""
        self.writer.write({"__key__": sample.key, "codes.npy": sample.codes, "json": sample.meta})
        stats = self.stats.setdefault(self.writer.fname, {"samples": 0, "frames": 0, "seconds": 0.0, "max_frames": 0})
        stats["samples"] += 1
        stats["frames"] += sample.meta["frames"]
        segment = (sample.meta["content_sha256"], sample.meta["offset_seconds"])
        if segment != self.last_segment:
            stats["seconds"] += sample.meta["duration_seconds"]
            self.last_segment = segment
        stats["max_frames"] = max(stats["max_frames"], sample.meta["frames"])

    def close(self) -> None:
        self.writer.close()


def encode_unit(unit: Unit, cfg: PrepConfig, codec: Codec, progress: tqdm | None = None) -> dict:
    """Encode one unit into its shards and write its done-marker; returns the marker record."""
    out_dir, catalog = Path(cfg.out_dir), Path(cfg.catalog)
    for stale in (out_dir / "tmp").glob(f"{unit.name}.*"):  # left by a killed attempt (one task owns a unit)
        shutil.rmtree(stale, ignore_errors=True)
    work = out_dir / "tmp" / f"{unit.name}.{os.getpid()}"
    work.mkdir(parents=True)
    writers: dict[str, _SplitShardWriter] = {}
    failures: list[dict] = []
    times, audio_seconds, started = StageTimes(), 0.0, time.perf_counter()
    for entry in unit.entries:
        try:
            result = encode_file(entry, catalog, cfg, codec)
        except (AudioReadError, FileRejected) as err:
            failures.append(Failure(entry.path, "encode", str(err)).__dict__)
            log.warning("skipping %s: %s", entry.path, err)
        except OSError as err:
            failures.append(Failure(entry.path, "encode", f"cannot read file: {err}").__dict__)
            log.warning("skipping %s: %s", entry.path, err)
        else:
            t0 = time.perf_counter()
            if entry.split not in writers:
                (work / entry.split).mkdir()
                writers[entry.split] = _SplitShardWriter(work / entry.split, unit.name, cfg)
            for sample in result.samples:
                writers[entry.split].write(sample)
            result.times.write += time.perf_counter() - t0
            times.add(result.times)
            audio_seconds += result.audio_seconds
        if progress is not None:
            progress.update(1)
    t0 = time.perf_counter()
    shards = []
    for split, writer in sorted(writers.items()):
        writer.close()
        final_dir = out_dir / "shards" / split
        final_dir.mkdir(parents=True, exist_ok=True)
        for tmp_name, stats in sorted(writer.stats.items()):
            tmp = Path(tmp_name)
            final = final_dir / tmp.name
            record = {"path": str(final.relative_to(out_dir)), "split": split, "bytes": tmp.stat().st_size}
            record.update(stats, sha256=file_sha256(tmp))
            os.replace(tmp, final)
            shards.append(record)
    written = {out_dir / shard["path"] for shard in shards}
    for stale in out_dir.glob(f"shards/*/{unit.name}-*.tar"):  # an earlier attempt's, not replaced by a new one
        if stale not in written:
            stale.unlink()
    times.write += time.perf_counter() - t0
    marker = {
        "unit": unit.index,
        "content_hashes": unit.content_hashes,
        "encoding": encoding_settings(cfg),
        "codec_fingerprint": codec.fingerprint,
        "shards": shards,
        "failures": failures,
        "audio_seconds": audio_seconds,
        "wall_seconds": time.perf_counter() - started,
        "worker_pid": os.getpid(),  # with finished_at: per-process busy and idle time (bench/bench_integrity.py)
        "finished_at": time.time(),
        "times": times.__dict__,
    }
    shutil.rmtree(work, ignore_errors=True)  # before the marker: a done unit is never redone, so never cleaned
    write_json_atomic(unit_marker_path(out_dir, unit), marker)
    return marker


def run_encode_task(cfg: PrepConfig, task_index: int, num_tasks: int, device: str | None = None) -> list[dict]:
    """Encode every unfinished unit owned by task ``task_index`` of ``num_tasks``."""
    out_dir = Path(cfg.out_dir)
    units = units_for_task(manifest_units(cfg), task_index, num_tasks)
    todo = [u for u in units if not unit_is_done(out_dir, u, cfg)]
    log.info("task %d/%d: %d units, %d already done", task_index, num_tasks, len(units), len(units) - len(todo))
    if not todo:
        return []
    codec = Codec.load(cfg.codec.source, device or cfg.codec.device, cfg.codec.chunk_seconds, cfg.codec.context_frames)
    check_encoding(out_dir, cfg, codec.fingerprint)  # before the first shard: never mix codecs in one set
    markers = []
    with tqdm(
        total=sum(len(u.entries) for u in todo),
        desc=f"encode task {task_index}",
        unit="file",
        position=task_index % 8,
        dynamic_ncols=True,
    ) as progress:
        for unit in todo:
            markers.append(encode_unit(unit, cfg, codec, progress))
    return markers
