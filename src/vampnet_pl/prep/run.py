"""Data prep orchestration: scan -> encode (local worker processes / GPUs) -> finalize -> summary."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from vampnet_pl.codec import Codec
from vampnet_pl.config import PrepBalance, PrepConfig
from vampnet_pl.prep.encode import (Unit, check_encoding, encode_unit, manifest_units, run_encode_task, unit_is_done,
                                    unit_markers, units_for_task)
from vampnet_pl.prep.index import finalize
from vampnet_pl.prep.manifest import scan_catalog
from vampnet_pl.utils.atomic import write_text_atomic

log = logging.getLogger(__name__)


def _worker_device(cfg: PrepConfig, worker: int) -> str:
    if cfg.codec.device == "auto" and torch.cuda.is_available():
        return f"cuda:{worker % torch.cuda.device_count()}"
    return cfg.codec.device


_worker_codec: Codec | None = None
_worker_cfg: PrepConfig | None = None


def _init_worker(cfg_yaml: str, devices, threads: int) -> None:
    """A pool process: its config, its device (one from the shared queue) and its codec, loaded once."""
    global _worker_codec, _worker_cfg
    torch.set_num_threads(threads)
    _worker_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.create(cfg_yaml)))
    codec_cfg = _worker_cfg.codec
    _worker_codec = Codec.load(codec_cfg.source, devices.get(), codec_cfg.chunk_seconds, codec_cfg.context_frames)


def _encode_one(unit: Unit) -> dict:
    return encode_unit(unit, _worker_cfg, _worker_codec)


def _encode_worker(cfg_yaml: str, task_index: int, num_tasks: int, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.create(cfg_yaml)))
    run_encode_task(cfg, task_index, num_tasks, device)


def unit_cost(unit: Unit) -> float:
    """Audio seconds to encode (what a unit's time mostly depends on)."""
    return sum(e.duration * e.channels for e in unit.entries)


def encode_local(cfg: PrepConfig, task_index: int = 0, num_tasks: int = 1) -> None:
    """Encode this task's share of units with ``cfg.workers`` local processes (one per GPU when there are GPUs).

    ``balance=queue`` (default): the processes take units from one shared queue, longest first, so none
    idles while another has a backlog. ``balance=static``: worker ``w`` of task ``i`` becomes sub-task
    ``i * workers + w`` of ``num_tasks * workers`` with a fixed share (as SLURM array tasks, which need no
    coordination between them, always are).
    """
    workers = max(1, cfg.workers)
    if workers == 1:
        run_encode_task(cfg, task_index, num_tasks)
        return
    units = units_for_task(manifest_units(cfg), task_index, num_tasks)  # refuses other split settings than the scan's
    check_out_dir(cfg)  # other settings or another codec: refused here, once, before a worker process writes a shard
    cfg_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    if cfg.balance == PrepBalance.static:
        _encode_static(cfg_yaml, cfg, task_index, num_tasks, workers, threads, context)
        return
    out_dir = Path(cfg.out_dir)
    todo = sorted((u for u in units if not unit_is_done(out_dir, u, cfg)), key=unit_cost, reverse=True)
    log.info("task %d/%d: %d units, %d already done, %d processes on one queue", task_index, num_tasks, len(units),
             len(units) - len(todo), workers)
    if not todo:
        return
    workers = min(workers, len(todo))
    devices = context.Queue()
    for w in range(workers):
        devices.put(_worker_device(cfg, w))
    failed = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(cfg_yaml, devices, threads)) as pool, \
            tqdm(total=sum(len(u.entries) for u in todo), desc=f"encode task {task_index}", unit="file",
                 dynamic_ncols=True) as progress:
        futures = {pool.submit(_encode_one, unit): unit for unit in todo}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                future.result()
            except Exception as err:  # one unit's failure does not stop the others; a re-run redoes it
                log.error("%s failed: %s", unit.name, err)
                failed.append(unit.name)
            progress.update(len(unit.entries))
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed ({', '.join(failed[:10])}); re-run to resume")


def _encode_static(cfg_yaml, cfg, task_index, num_tasks, workers, threads, context) -> None:
    processes = [
        context.Process(
            target=_encode_worker,
            args=(cfg_yaml, task_index * workers + w, num_tasks * workers, _worker_device(cfg, w), threads),
        )
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} encode worker(s) failed (exit codes {failed}); re-run to resume")


def save_config(cfg: PrepConfig) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "prep_config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def load_codec(cfg: PrepConfig, device: str | None = None) -> Codec:
    return Codec.load(cfg.codec.source, device or cfg.codec.device, cfg.codec.chunk_seconds, cfg.codec.context_frames)


def check_out_dir(cfg: PrepConfig, codec: Codec | None = None) -> None:
    """Refuse (:class:`EncodingChanged`), before anything is written, an ``out_dir`` whose units were encoded with
    other settings or another codec. The codec is loaded (on the CPU: only its fingerprint counts) only when
    ``out_dir`` holds encoded units and none is given."""
    out_dir = Path(cfg.out_dir)
    if not unit_markers(out_dir):
        return
    check_encoding(out_dir, cfg, (codec or load_codec(cfg, "cpu")).fingerprint)


def scan(cfg: PrepConfig, codec: Codec | None = None) -> tuple[list, list]:
    """Stage 1 (:func:`scan_catalog`), then the config saved beside the manifest; a refused or failed scan
    leaves ``out_dir`` as it was."""
    check_out_dir(cfg, codec)
    entries, failures = scan_catalog(cfg)
    save_config(cfg)
    return entries, failures


def run_all(cfg: PrepConfig) -> dict:
    """The whole pipeline on one machine; resumable at every stage."""
    codec = load_codec(cfg, "cpu")  # for its fingerprint: checked before anything is written, recorded in the index
    scan(cfg, codec)
    started = time.perf_counter()
    encode_local(cfg)
    wall = time.perf_counter() - started
    try:
        (Path(cfg.out_dir) / "tmp").rmdir()  # per-unit work folders are gone once their units are done
    except OSError:
        pass
    index = finalize(cfg, codec)
    print_summary(index, wall)
    return index


def print_summary(index: dict, encode_wall_seconds: float | None = None) -> None:
    totals = index["totals"]
    table = Table(title="data prep summary", show_header=False)
    table.add_row("files encoded", str(totals["files"]))
    table.add_row("failures (failures.jsonl)", str(totals["failures"]))
    table.add_row("hours of audio", f"{totals['hours']:.3f}")
    for split, info in index["splits"].items():
        table.add_row(f"  {split}", f"{info['samples']} samples, {len(info['shards'])} shards, {info['hours']:.3f} h")
    table.add_row("shards", str(totals["shards"]))
    if totals["encode_seconds"] > 0:
        table.add_row("throughput per worker", f"{totals['audio_seconds_read'] / totals['encode_seconds']:.1f} audio-s/s")
    if encode_wall_seconds:
        table.add_row("throughput (wall)", f"{totals['audio_seconds_read'] / encode_wall_seconds:.1f} audio-s/s")
    stages = totals.get("stage_seconds") or {}
    if sum(stages.values()) > 0:
        outside = 1 - stages["codec"] / sum(stages.values())
        table.add_row("time outside the codec", f"{100 * outside:.1f}%")
    table.add_row("codec fingerprint", index["codec"]["fingerprint"][:16])
    Console().print(table)
