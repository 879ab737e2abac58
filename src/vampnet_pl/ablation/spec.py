"""An ablation spec: base overrides x grid x seeds -> the runs of a sweep, validated before anything starts."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vampnet_pl.ablation.stats import is_score
from vampnet_pl.config import AblationConfig, UsageError, compose, override_value
from vampnet_pl.training.csv_logs import csv_log_dirs

# The baseline every condition is compared with unless the spec names one: this project's default masking.
DEFAULT_BASELINE = {"masking.schedule": "cosine", "masking.kind": "random", "masking.sampler": "uniform",
                    "masking": "cosine"}
SWEEP_LOGGER = "logger=sweep"  # CSV (the report's curves) + TensorBoard, unless the spec picks its own logger


class SpecError(UsageError):
    """A spec that cannot run: reported before any run is launched."""


@dataclass(frozen=True)
class Run:
    run_id: str  # <condition id>_seed-<seed>: the run's folder name under <sweep>/runs/
    condition_id: str
    condition: tuple[tuple[str, str], ...]  # (override key, value) of the grid cell, in grid order
    seed: int
    overrides: tuple[str, ...]  # everything `vampnet-pl train` gets
    run_dir: Path

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "condition_id": self.condition_id, "condition": dict(self.condition),
                "seed": self.seed, "overrides": list(self.overrides), "run_dir": str(self.run_dir)}


@dataclass
class Outcome:
    """What became of one run: by the local runner or the SLURM launcher."""
    run: Run
    status: str  # finished | skipped | failed | diverged | submitted | running (by another process)
    detail: str = ""


@dataclass
class Sweep:
    spec: AblationConfig
    sweep_dir: Path
    runs: list[Run]
    baseline_id: str

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(r.condition_id for r in self.runs))


def load_spec(path: str | Path, extra_base: list[str] | None = None) -> AblationConfig:
    """Read a spec YAML, checked against :class:`AblationConfig` (unknown keys and wrong types fail)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no spec at {path}")
    try:
        spec = OmegaConf.merge(OmegaConf.structured(AblationConfig), OmegaConf.load(path))
        spec = OmegaConf.to_object(spec)
    except OmegaConfBaseException as err:
        raise SpecError(f"bad spec {path}: {err}") from None
    spec.base = [*spec.base, *(extra_base or [])]
    return spec


def format_value(value: Any) -> str:
    """A grid value as a Hydra override value."""
    if isinstance(value, (list, dict)):
        raise SpecError(f"grid values must be scalars (write a list as a quoted override string): {value!r}")
    return override_value(value)


def _slug(text: str) -> str:
    text = re.sub(r"^-(?=[0-9.])", "neg", text)  # -0.1 is not 0.1
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def condition_ids(grid: dict[str, list[str]]) -> list[tuple[tuple[tuple[str, str], ...], str]]:
    """Every grid cell as ((key, value), ...) and a readable, folder-safe id such as ``schedule-cosine_kind-span``."""
    keys = list(grid)
    short = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(short)) < len(short):  # e.g. data.seed and seed: spell the keys out
        short = [k.replace(".", "-") for k in keys]
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cell = tuple(zip(keys, values))
        name = "_".join(f"{_slug(s)}-{_slug(v)}" for s, v in zip(short, values)) or "base"
        cells.append((cell, name))
    return cells


def _quote(path: Path) -> str:
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9_./\-]+", text):
        return text
    if "'" in text:
        raise SpecError(f"the sweep folder {text!r} has a quote in its path; pick another")
    return f"'{text}'"


def expand(spec: AblationConfig, sweep_dir: str | Path | None = None) -> Sweep:
    """The runs of a spec (no validation against conf/ yet: see :func:`validate`)."""
    if not spec.seeds:
        raise SpecError("the spec has no seeds")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise SpecError(f"seeds repeat: {spec.seeds}")
    if not spec.seed_keys:  # the runs of a condition would differ in their folder name only
        raise SpecError("seed_keys is empty: every seed of a condition would train the same run; list the keys "
                        "that get the run's seed (the default is [seed])")
    if spec.parallel < 1:
        raise SpecError(f"parallel must be at least 1, not {spec.parallel}")
    if not is_score(spec.primary_metric):
        raise SpecError(f"primary_metric {spec.primary_metric!r} is bookkeeping, not a score; the report ranks the "
                        "conditions by a score such as val/loss or val/acc1")
    grid: dict[str, list[str]] = {}
    for key, values in spec.grid.items():
        if not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.\-/@]*", key):
            raise SpecError(f"grid key {key!r} is not an override key")
        if not values:
            raise SpecError(f"grid key {key!r} has no values")
        formatted = [format_value(v) for v in values]
        if len(set(formatted)) != len(formatted):
            raise SpecError(f"grid key {key!r} repeats a value: {formatted}")
        grid[key] = formatted
    for key in grid:
        if key in spec.seed_keys:
            raise SpecError(f"{key!r} is a seed key; list seeds under `seeds`, not in the grid")
    root = Path(sweep_dir or spec.sweep_dir or Path("sweeps") / spec.name).resolve()
    cells = condition_ids(grid)
    ids = [name for _, name in cells]
    if len(set(ids)) != len(ids):
        raise SpecError(f"two grid cells get the same folder name; make the values differ in letters or digits: {ids}")
    logger = [] if any(o.split("=", 1)[0].lstrip("+~") == "logger" for o in spec.base) or "logger" in grid else [SWEEP_LOGGER]
    runs = []
    for cell, condition_id in cells:
        for seed in spec.seeds:
            run_id = f"{condition_id}_seed-{seed}"
            run_dir = root / "runs" / run_id
            overrides = (*logger, *spec.base, *(f"{k}={v}" for k, v in cell), *(f"{k}={seed}" for k in spec.seed_keys),
                         f"run_dir={_quote(run_dir)}", f"run_name={run_id}", "resume=true")
            runs.append(Run(run_id, condition_id, cell, int(seed), overrides, run_dir))
    return Sweep(spec, root, runs, _baseline(spec, grid, cells))


def _baseline(spec: AblationConfig, grid: dict[str, list[str]], cells) -> str:
    wanted = {k: format_value(v) for k, v in spec.baseline.items()}
    if unknown := sorted(set(wanted) - set(grid)):
        raise SpecError(f"baseline names {unknown}, which the grid does not vary; grid keys: {sorted(grid)}")
    for key, value in wanted.items():
        if value not in grid[key]:
            raise SpecError(f"baseline {key}={value} is not in the grid ({grid[key]})")
    choice = {}
    for key, values in grid.items():
        default = DEFAULT_BASELINE.get(key)
        choice[key] = wanted.get(key, default if default in values else values[0])
    return next(name for cell, name in cells if dict(cell) == choice)


def compose_run(run: Run, extra: tuple[str, ...] = ()) -> DictConfig:
    """The run's full training config, as `vampnet-pl train` will see it (schemas reject typos); ``extra``: the
    overrides its launcher adds."""
    try:
        return compose("train", [*run.overrides, *extra], typed=False)
    except UsageError as err:
        raise SpecError(f"run {run.run_id}: {err}") from None


def check_run_config(run: Run, cfg: DictConfig) -> None:
    """Masking names against the registries, a CSV log. (Every run validates at its last step, mid-epoch or not:
    see ``training.callbacks.FinalValidation``.)"""
    from vampnet_pl.masking.config import TrainingMasker

    try:  # the schema and the masker look every name up in its registry (schedules, kinds, samplers)
        schema = OmegaConf.to_object(cfg)
        TrainingMasker(schema.masking, schema.model.n_conditioning_codebooks)
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise SpecError(f"run {run.run_id}: {message}") from None
    if not csv_log_dirs(cfg):
        raise SpecError(f"run {run.run_id}: its logger writes no CSV; the report reads curves from a CSVLogger "
                        "(drop the logger override, or use logger=sweep or logger=csv)")


def validate(sweep: Sweep, progress: bool = True) -> dict[str, DictConfig]:
    """Compose and check every run; the first problem raises :class:`SpecError`. Returns run id -> config."""
    from tqdm.auto import tqdm

    configs = {}
    for run in tqdm(sweep.runs, desc="validate spec", unit="run", disable=not progress):
        cfg = compose_run(run)
        check_run_config(run, cfg)
        configs[run.run_id] = cfg
    return configs
