"""Structured-config schemas for Hydra: a typo or a wrong type fails at compose time.

The YAML files in ``conf/`` hold the values; these dataclasses hold the shape. Every schema
is registered in Hydra's ConfigStore under ``schema/<name>`` and used as the first default
of the matching YAML file.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vampnet_pl.codec import CodecMismatch, DeviceUnavailable
from vampnet_pl.masking.config import MaskingConfig
from vampnet_pl.masking.protocol import EvalProtocolConfig
from vampnet_pl.model import VampNetConfig
from vampnet_pl.training.optim import OptimConfig
from vampnet_pl.utils.checks import check_at_least, check_fraction


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$VAMPNET_PL_CONF``, else the one beside ``src/`` in this checkout."""
    env = os.environ.get("VAMPNET_PL_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "prep.yaml").is_file():
        raise FileNotFoundError(f"Hydra config folder not found at {path}; set VAMPNET_PL_CONF")
    return path


def check_fad_backend(name: str, key: str) -> None:
    """A FAD backend name, against the registry that builds them (evaluation/metrics.py)."""
    from vampnet_pl.evaluation.metrics import EMBEDDINGS

    if name not in EMBEDDINGS:
        raise ValueError(f"unknown FAD backend {name!r} ({key}); known: {sorted(EMBEDDINGS)}")


def check_prompt_presets(specs, key: str, n_codebooks: int | None = None) -> None:
    """Prompt presets (``beat``, ``random:0.5`` ...), parsed as masking/presets.py parses them, so that a wrong one
    stops the config, not the evaluation after hours (or the training run at its first generation evaluation).
    ``n_codebooks``: the model's depth, where known (``compression:N:P`` keeps at most that many)."""
    from vampnet_pl.masking.presets import prompt_arguments

    for spec in specs or []:
        try:
            prompt_arguments(str(spec), n_codebooks)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


@dataclass
class CodecConfig:
    # A pretrained DAC name (44khz, 24khz, 16khz; needs internet once) or a DAC checkpoint path.
    source: str = MISSING
    # Where prep and eval run the codec. train ignores it: it reads the codec's metadata on the CPU, and its
    # generation callbacks decode on the training device.
    device: str = "auto"
    chunk_seconds: float = 30.0
    context_frames: int = 32

    def __post_init__(self) -> None:  # else prep fails after its scan, in torch.cat
        if not self.chunk_seconds > 0:
            raise ValueError(f"codec.chunk_seconds must be > 0, got {self.chunk_seconds}")
        check_at_least(self, "codec", context_frames=0)


class ChannelMode(str, Enum):
    mono = "mono"  # mix all channels down to one example
    each = "each"  # every channel is an example of its own


class PrepBalance(str, Enum):
    queue = "queue"  # local worker processes take units from one shared queue, longest first
    static = "static"  # each local process a fixed share (u % workers), as SLURM array tasks


SPLITS = ("train", "val", "test")  # prep writes shards/<split>/; val and test take the fractions below, train the rest


@dataclass
class SplitConfig:
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = "vampnet-pl"

    def __post_init__(self) -> None:  # a draw in [0, 1) picks test below test_fraction, val in the next val_fraction
        for name in ("val_fraction", "test_fraction"):
            check_fraction(getattr(self, name), f"split.{name}")
        if self.val_fraction + self.test_fraction > 1:
            raise ValueError(f"split.val_fraction + split.test_fraction must be at most 1, got {self.val_fraction} + "
                             f"{self.test_fraction}")


@dataclass
class PrepConfig:
    catalog: str = MISSING
    out_dir: str = MISSING
    codec: CodecConfig = field(default_factory=CodecConfig)
    extensions: list[str] = field(
        default_factory=lambda: ["wav", "flac", "mp3", "ogg", "opus", "aiff", "aif", "m4a", "aac", "wma"]
    )
    channels: ChannelMode = ChannelMode.mono
    segment_seconds: float = 60.0
    min_seconds: float = 1.0
    silence_db: float = -60.0
    loudness_lufs: Optional[float] = None
    split: SplitConfig = field(default_factory=SplitConfig)
    files_per_unit: int = 16
    shard_max_samples: int = 2000
    shard_max_bytes: int = 256 * 1024 * 1024
    workers: int = 1
    balance: PrepBalance = PrepBalance.queue  # how local workers share units (SLURM array tasks: always static)
    scan_workers: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds <= self.segment_seconds:  # above it every file fails as too short
            raise ValueError(f"prep needs 0 < min_seconds <= segment_seconds, got min_seconds={self.min_seconds}, "
                             f"segment_seconds={self.segment_seconds}")
        check_at_least(self, "", files_per_unit=1, shard_max_samples=1, shard_max_bytes=1)  # files_per_unit=0: range()


@dataclass
class DataConfig:
    _target_: str = "vampnet_pl.data.datamodule.CodesDataModule"
    dataset_dir: Optional[str] = None  # a prepared shard set (reads its index.json)
    train_urls: Optional[Any] = None  # or explicit URLs: paths, brace patterns, pipe: commands
    val_urls: Optional[Any] = None
    expected_fingerprint: Optional[str] = None
    n_codebooks: Optional[int] = None  # codebooks the model reads (<= those in the shards)
    hop_length: Optional[int] = None
    sample_rate: Optional[int] = None
    window_seconds: float = 10.0
    max_windows_per_sample: int = 4
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 1000
    batches_per_epoch: int = 1000  # an epoch (validation at its end): this / trainer.accumulate_grad_batches steps
    val_windows_per_sample: int = 2
    val_max_windows: int = 512
    val_batch_size: int = 8
    seed: int = 0
    # skip train windows quieter than this (LUFS), as the original VampNet draws excerpts (-30 coarse, -40 c2f);
    # needs shards with per-second loudness (prep records it); None: no cut-off
    loudness_cutoff: Optional[float] = None
    codebook_size: Optional[int] = None  # tokens must be below it (set by the train app from the codec)
    # Damaged samples are skipped and counted; more than this share of skips stops the run, naming the shards.
    max_skip_rate: float = 0.05
    skip_rate_min_samples: int = 200  # the training rate (summed over workers and ranks) is judged after this many

    def __post_init__(self) -> None:  # at compose time: a zero here fails deep inside the loader or the split
        check_at_least(self, "data", batch_size=1, batches_per_epoch=1, val_batch_size=1, num_workers=0)
        check_fraction(self.max_skip_rate, "data.max_skip_rate")


@dataclass
class DemoConfig:
    work_dir: str = "demo_out"
    catalog_files: int = 24
    catalog_seconds: float = 20.0
    seed: int = 0
    prep: PrepConfig = field(default_factory=PrepConfig)
    train_steps: int = 200  # for each of the coarse and c2f models
    train_overrides: list[str] = field(default_factory=list)  # extra overrides for conf/train.yaml


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: str = "32-true"  # bf16-mixed on GPUs that have it
    max_steps: int = 1000
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        check_at_least(self, "trainer", accumulate_grad_batches=1, log_every_n_steps=0)
        if self.max_steps < -1:
            raise ValueError(f"trainer.max_steps must be at least 0 (or -1: no limit), got {self.max_steps}")


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 500
    save_top_k: int = 2
    monitor: str = "val/loss"
    mode: str = "min"  # min | max: keep the lowest or the highest monitor values (max for val/acc1, val/acc5 ...)
    # On SIGTERM (scancel, a preemption, a local ``timeout``): every rank saves last.ckpt at the step boundary, then the
    # run stops (exit 143). Off: it stops without a checkpoint. Not under submitit, which owns the job's signals.
    on_sigterm: bool = True

    def __post_init__(self):
        from vampnet_pl.ablation.stats import higher_is_better  # the one rule for which metrics are better higher

        if self.mode not in ("min", "max"):
            raise ValueError(f"checkpoint.mode must be min or max, got {self.mode!r}")
        direction = "max" if higher_is_better(self.monitor) else "min"
        if self.mode != direction:
            kind = "an accuracy (higher is better)" if direction == "max" else "a loss or distance (lower is better)"
            raise ValueError(f"checkpoint.monitor={self.monitor} is {kind}: set checkpoint.mode={direction}")


class RequeueMode(str, Enum):
    auto = "auto"  # on SLURM, unless Hydra's submitit launcher manages the job
    on = "on"
    off = "off"


@dataclass
class SlurmConfig:
    requeue: RequeueMode = RequeueMode.auto  # checkpoint + ``scontrol requeue`` on ``signal`` (slurm/train.sbatch)
    signal: str = "SIGUSR1"  # the one ``#SBATCH --signal`` sends


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "out", "ffn_in", "ffn_out"])


class BatchSizing(str, Enum):
    fixed = "fixed"  # micro-batches of data.batch_size
    auto = "auto"  # on CUDA: the largest micro-batch that fits, measured (training/batch_size.py); elsewhere as fixed


@dataclass
class BatchSizingConfig:
    """How the global batch (examples per optimiser step over all ranks) is split into micro-batches."""

    mode: BatchSizing = BatchSizing.auto
    # None: data.batch_size x trainer.accumulate_grad_batches x ranks
    global_batch: Optional[int] = None
    memory_fraction: float = 0.85  # of the GPU's memory a training step may reserve (auto)

    def __post_init__(self):
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"batch_sizing.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"batch_sizing.global_batch must be >= 1, got {self.global_batch}")


class LossWeighting(str, Enum):
    none = "none"  # mean cross-entropy over the global batch's masked tokens, all micro-batches and ranks (VampNet)
    # each micro-batch's own mean, averaged over micro-batches and ranks: VampNet's code under DDP (the gradient then
    # depends on the split: tokens of a lightly masked micro-batch weigh more)
    micro_batch = "micro_batch"
    diffusion = "diffusion"  # masked-diffusion ELBO style: per example |d gamma/d r| x mean CE of its masked tokens


LARGEST_SEED = 2**32 - 1  # Lightning's seed_everything seeds NumPy's legacy generator, which takes no other


@dataclass
class TrainConfig:
    experiment: str = "vampnet"
    runs_dir: str = "runs"
    # All ranks agree on it; a requeued SLURM job (same job id) finds its checkpoints here.
    run_name: str = "${experiment}-${oc.env:SLURM_JOB_ID,local}"
    run_dir: str = "${runs_dir}/${run_name}"  # in a multirun (-m): with -<job number> appended (training/app.py)
    resume: bool = True  # continue from ${run_dir}/checkpoints/last.ckpt when it exists
    seed: int = 0
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: VampNetConfig = field(default_factory=VampNetConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    batch_sizing: BatchSizingConfig = field(default_factory=BatchSizingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    strategy: Any = None  # a _target_ node from conf/strategy/
    logger: Any = None  # a _target_ node from conf/logger/
    callbacks: Any = None  # _target_ nodes from conf/callbacks/
    eval_protocol: EvalProtocolConfig = field(default_factory=EvalProtocolConfig)  # validation (conf/eval_protocol/)
    label_smoothing: float = 0.1
    loss_weighting: LossWeighting = LossWeighting.none
    # top-k accuracy metrics on every n-th train step and every logged step (loss and perplexity: every step)
    train_metrics_every_n_steps: int = 10
    compile: Optional[bool] = None  # torch.compile each transformer block; None: on when training on CUDA
    activation_checkpointing: bool = False
    init_from: Optional[str] = None  # an exported model to fine-tune (of this run's model config)
    fine_tune: bool = False  # a fine-tuning recipe (experiment=vampnet_finetune, vampnet_lora): init_from is required
    lora: Optional[LoraConfig] = None  # with init_from (required): train LoRA adapters only

    def __post_init__(self):  # required keys whose schema default is None (``???`` over None is a no-op in OmegaConf)
        check_fraction(self.label_smoothing, "label_smoothing")  # else torch refuses it at the first training step
        if not 0 <= self.seed <= LARGEST_SEED:  # else Lightning's seed_everything fails after the check (a traceback)
            raise ValueError(f"seed must be in [0, {LARGEST_SEED}] (Lightning seeds NumPy with it), got {self.seed}")
        self.eval_protocol.check_codebooks(self.model.n_codebooks)  # validation masks as deep as the model
        if self.data.dataset_dir is None and self.data.train_urls is None:
            raise ValueError("data.dataset_dir is not set: give data.dataset_dir=<a prep out_dir> "
                             "(or data.train_urls=... and data.val_urls=...)")
        for name, node in (self.callbacks or {}).items():  # the generation callback (callbacks=with_eval)
            if isinstance(node, dict) and "fad_backend" in node:
                check_fad_backend(node["fad_backend"], f"callbacks.{name}.fad_backend")
            if isinstance(node, dict) and "prompts" in node:
                check_prompt_presets(node["prompts"], f"callbacks.{name}.prompts", self.model.n_codebooks)
            if isinstance(node, dict) and node.get("n_windows") is not None and node["n_windows"] < 1:  # else its first evaluation fails
                raise ValueError(f"callbacks.{name}.n_windows must be at least 1, got {node['n_windows']}")
            if isinstance(node, dict) and "noisy_ratio" in node:  # else the callback refuses it after the data loaded
                check_fraction(node["noisy_ratio"], f"callbacks.{name}.noisy_ratio")
        if self.optim.scheduler == "warmup_cosine" and self.optim.total_steps == 0 and self.trainer.max_steps == -1:
            raise ValueError("optim.scheduler=warmup_cosine decays over optim.total_steps (0: trainer.max_steps), and "
                             "trainer.max_steps=-1 sets no end: give optim.total_steps=<steps>")
        if self.init_from is None and (self.lora is not None or self.fine_tune):
            why = "LoRA adapters (lora=...) train on" if self.lora is not None else f"experiment={self.experiment} fine-tunes"
            raise ValueError(f"init_from is not set: {why} a pretrained model; give init_from=<exported model .pt>")


DataSplit = Enum("DataSplit", {name: name for name in SPLITS}, type=str)  # eval's split: one that prep writes


@dataclass
class EvalConfig:
    coarse: str = MISSING  # exported coarse model
    c2f: Optional[str] = None  # exported c2f model (without it, the coarse model's depth is evaluated)
    codec: CodecConfig = field(default_factory=CodecConfig)
    dataset_dir: str = MISSING
    split: DataSplit = DataSplit.test  # an empty split is an error (prep's split.test_fraction=0 leaves test empty)
    window_seconds: float = 10.0
    c2f_chunk_seconds: float = 3.0  # c2f generates in chunks of this length (the original's 3 s)
    n_windows: Optional[int] = None  # windows scored; None: eval_protocol.gen_windows (n_embeddings: their FAD embeddings)
    windows_per_sample: int = 1  # split=val, 2 (data.val_windows_per_sample): the training-time evaluation's windows
    batch_size: int = 8
    eval_protocol: EvalProtocolConfig = field(default_factory=EvalProtocolConfig)  # prompts, passes, sweep
    prompts: list[str] = field(default_factory=lambda: ["beat", "random:0.5", "random:0.8"])  # extra presets, beside the protocol's
    c2f_passes: int = 12
    noisy_ratio: float = 0.5
    fad_backend: str = "logmel"  # logmel (offline, not a learned model) | vggish | clap; compare scores within one
    fad_weights: Optional[str] = None  # local VGGish hub checkout / CLAP checkpoint
    out_dir: str = "eval_out"
    seed: int = 0

    def __post_init__(self):
        check_fad_backend(self.fad_backend, "fad_backend")
        check_prompt_presets(self.prompts, "prompts")
        check_fraction(self.noisy_ratio, "noisy_ratio")
        check_at_least(self, "", windows_per_sample=1, batch_size=1, c2f_passes=1, n_windows=1)  # 0: gen_windows
        for name in ("window_seconds", "c2f_chunk_seconds"):  # else the generation settings refuse it, in a traceback
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class SweepLauncher(str, Enum):
    local = "local"  # subprocesses on this machine, ``parallel`` at a time
    slurm = "slurm"  # one SLURM job per run through submitit, requeued before its time limit


@dataclass
class AblationSlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: Optional[int] = None  # default: one process per GPU (at least one)
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    timeout_min: int = 1440
    signal_delay_s: int = 90  # submitit checkpoints and requeues this long before the time limit
    max_num_timeout: int = 20  # requeues after a time limit
    array_parallelism: int = 64
    setup: list[str] = field(default_factory=list)  # shell lines a job runs first, e.g. "module load cuda"
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # any other sbatch option


@dataclass
class AblationConfig:
    """An ablation sweep (``vampnet-pl ablate run SPEC.yaml``): base overrides x grid x seeds."""

    name: str = "ablation"
    sweep_dir: Optional[str] = None  # default: sweeps/<name>
    base: list[str] = field(default_factory=list)  # overrides for conf/train.yaml every run shares
    grid: dict[str, list[Any]] = field(default_factory=dict)  # override key -> values; one condition per combination
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])  # keys set to the run's seed, at least one
    baseline: dict[str, Any] = field(default_factory=dict)  # default: cosine / random / uniform, else first values
    primary_metric: str = "val/loss"  # ranks the conditions
    launcher: SweepLauncher = SweepLauncher.local
    parallel: int = 1  # local runs at a time
    slurm: AblationSlurmConfig = field(default_factory=AblationSlurmConfig)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="prep_schema", node=PrepConfig)
    store.store(name="demo_schema", node=DemoConfig)
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="ablation_schema", node=AblationConfig)
    store.store(group="model", name="model_schema", node=VampNetConfig)
    store.store(group="masking", name="masking_schema", node=MaskingConfig)
    store.store(group="eval_protocol", name="eval_protocol_schema", node=EvalProtocolConfig)
    store.store(group="optim", name="optim_schema", node=OptimConfig)
    store.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    store.store(group="lora", name="lora_schema", node=LoraConfig)
    store.store(group="codec", name="codec_schema", node=CodecConfig)
    store.store(group="data", name="data_schema", node=DataConfig)


register_schemas()


def slurm_gpus(field_name: str, value: Any) -> int | str | None:
    """``${slurm_gpus:FIELD,GPUS_PER_NODE}`` (conf/hydra/launcher/slurm.yaml): a GPU count (``2``) is the launcher's
    ``gpus_per_node``; a GPU type and a count (``a100:2``, as slurm/train.sh takes it) is its ``gres`` (``gpu:a100:2``),
    as ``gpus_per_node`` takes only a number. FIELD is ``gpus_per_node`` or ``gres``; the other one is None."""
    text = str(value)
    kind, _, count = text.rpartition(":")
    if not count.isdigit() or (kind and not all(c.isalnum() or c in "_.-" for c in kind)):
        raise ValueError(f"GPUS_PER_NODE={text}: give a GPU count (2) or a GPU type and a count (a100:2)")
    if field_name == "gpus_per_node":
        return None if kind else int(count)
    if field_name == "gres":
        return f"gpu:{kind}:{int(count)}" if kind and int(count) > 0 else None
    raise ValueError(f"slurm_gpus: unknown field {field_name!r} (gpus_per_node or gres)")


def register_resolvers() -> None:
    """``${at_least_one:N}``: max(1, N); one SLURM task per GPU, and one on CPUs (conf/hydra/launcher/slurm.yaml).
    N may name a GPU type, as ``--gres`` does: ``a100:2`` counts 2. ``${slurm_gpus:...}``: see :func:`slurm_gpus`."""
    if not OmegaConf.has_resolver("at_least_one"):
        OmegaConf.register_new_resolver("at_least_one", lambda value: max(1, int(str(value).rsplit(":", 1)[-1])))
    if not OmegaConf.has_resolver("slurm_gpus"):
        OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus)


register_resolvers()


def override_value(value: Any) -> str:
    """A scalar as a Hydra override writes it (``true``, ``null``, ``0.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


class UsageError(Exception):
    """A wrong configuration or invocation: reported in one line, exit status 2."""


def unknown_settings(cfg, where: str = "") -> list[str]:
    """The keys of ``cfg`` that no schema declares, with a close match where there is one. Hydra refuses such a key
    as an override (``data.batchsize=3``), but its message suggests ``+data.batchsize=3``, which it adds, and
    ``OmegaConf.to_object`` then sets it on the dataclass as an attribute no code reads: a typo that trained on.
    Nodes without a schema (the ``_target_`` nodes of ``strategy``, ``logger``, ``callbacks``) are not checked."""
    import dataclasses
    import difflib

    from omegaconf import DictConfig

    found = []
    schema = OmegaConf.get_type(cfg)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        name = f"{where}{key}"
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            found.append(f"{name}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            found += unknown_settings(child, f"{name}.")
    return found


def check_known_settings(cfg) -> None:
    """:func:`unknown_settings` as a ``ValueError`` (a :class:`UsageError` where :func:`compose` reports it)."""
    if unknown := unknown_settings(cfg):
        raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in the schemas "
                         "of config.py (`+key=value` adds a key, but nothing reads it)")


def compose(config_name: str, overrides: list[str], typed: bool = True):
    """Compose ``conf/<config_name>.yaml`` with overrides, validated against its schema.

    ``typed``: return the schema's dataclass instance; otherwise the (validated) DictConfig.
    """
    import hydra
    from hydra.errors import HydraException

    if config_name == "train":
        require_lora_group(overrides)
    try:
        with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra.compose(config_name, overrides=overrides)
        check_known_settings(cfg)
        return OmegaConf.to_object(cfg) if typed else cfg
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ValueError: a schema's own check
        raise UsageError(f"bad configuration for {config_name}: {err}") from None


def check_composed(config_name: str, cfg):
    """The schema's own checks (``__post_init__``) on a config Hydra composed for a ``@hydra.main`` app, which
    runs them only when the app builds its dataclass: a :class:`UsageError`, as :func:`compose` raises."""
    try:
        check_known_settings(cfg)
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as err:
        raise UsageError(f"bad configuration for {config_name}: {err}") from None


@contextmanager
def usage_errors_exit():
    """In a ``@hydra.main`` app (train, eval), around its start-up only: a user's mistake (a schema's check, a missing
    file) ends the run with a one-line ``error: ...`` and exit status 2, as the other commands do, not with Hydra's
    traceback and status 1. Not around the training or the scoring: there the same errors are bugs (a file gone
    mid-run), and keep their traceback."""
    try:
        yield
    # CodecMismatch: model, codec and shards disagree; DeviceUnavailable: a device setting this machine lacks
    except (UsageError, FileNotFoundError, CodecMismatch, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def require_lora_group(overrides: list[str]) -> None:
    """``lora.<key>=...`` (train) needs a LoRA config selected: ``lora=default``, or a recipe that selects it
    (``experiment=vampnet_lora``). Without one, Hydra fails with a bare ``AssertionError`` (the node is None).
    Both ``vampnet-pl train`` and :func:`compose` (``ablate``) call this before composing."""
    keys = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].startswith("lora.")]
    choices = [o for o in overrides if "=" in o and not o.startswith("-") and "." not in o.split("=", 1)[0]]
    if not keys or any(o.lstrip("+~").split("=", 1)[0] == "lora" for o in choices) or any("," in o for o in choices):
        return  # no LoRA key, the group is chosen here, or a swept choice (each job's compose reports it)
    if compose("train", choices, typed=False).lora is None:
        raise UsageError(f"{keys[0]} sets a LoRA option, but no LoRA config is selected: select lora=default first "
                         f"(vampnet-pl train lora=default {keys[0]} ...), or a recipe that has one "
                         "(experiment=vampnet_lora)")
