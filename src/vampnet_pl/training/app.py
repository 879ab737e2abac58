"""Training app: ``vampnet-pl train [hydra overrides]`` (or ``python -m vampnet_pl.training.app``).

    vampnet-pl train data.dataset_dir=demo_out/shards model=c2f_small trainer=gpu strategy=fsdp
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vampnet_pl.codec import Codec, CodecMismatch
from vampnet_pl.config import TrainConfig, check_composed, conf_dir, usage_errors_exit
from vampnet_pl.training.batch_size import AutoBatchSize
from vampnet_pl.training.callbacks import DataHealth, FinalValidation, LogPointProgressBar
from vampnet_pl.training.checkpointing import AtomicCheckpointIO, check_resumable, remove_checkpoint_leftovers
from vampnet_pl.training.csv_logs import keep_earlier_attempt
from vampnet_pl.training.slurm import (NOT_REQUEUED_EXIT, SIGTERM_EXIT, SharedSignals, SlurmRequeue,
                                      checkpoint_on_signal, cluster_plugins, describe, gpus_left_unused,
                                      requeue_enabled, share_signals, slurm_layout, stopped_not_requeued,
                                      stopped_on_sigterm, under_submitit)
from vampnet_pl.training.module import MaskedTokenModule
from vampnet_pl.training.parallel import check_accelerator
from vampnet_pl.utils.atomic import previous_folder

log = logging.getLogger(__name__)


def last_checkpoint_path(run_dir: str | Path) -> Path:
    """``checkpoints/last.ckpt``: a file, or a folder for sharded strategies. Resume reads it."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, if any (a crash in a sharded folder's swap leaves it as ``.previous``)."""
    path = last_checkpoint_path(run_dir)
    for candidate in (path, previous_folder(path)):
        if candidate.exists():
            return candidate
    return None


def build_loggers(node) -> list:
    """One logger (a ``_target_`` node) or several (a mapping of name -> ``_target_`` node, e.g. conf/logger/sweep.yaml)."""
    if not node:
        return []
    if "_target_" in node:
        return [hydra.utils.instantiate(node)]
    return [hydra.utils.instantiate(child) for child in node.values() if child]


def build(cfg: DictConfig):
    """Everything a run needs, from a composed config: (module, datamodule, trainer, resume checkpoint)."""
    schema: TrainConfig = check_composed("train", cfg)
    signals = SharedSignals()  # SIGTERM and the requeue signal, exchanged by the ranks once per batch
    on_signal = checkpoint_on_signal(schema.slurm.requeue)
    on_sigterm = schema.checkpoint.on_sigterm and not under_submitit()  # submitit owns the job's signals
    requeue = (SlurmRequeue(last_checkpoint_path(schema.run_dir), schema.slurm.signal if on_signal else None, signals,
                            requeue=requeue_enabled(schema.slurm.requeue), sigterm=on_sigterm)
               if on_signal or on_sigterm else None)
    if requeue is not None:
        requeue.listen()  # first: a requeue signal during start-up is kept (acted on at the first step), not fatal
    check_accelerator(schema.trainer.accelerator)
    L.seed_everything(schema.seed, workers=True)
    codec = Codec.load(schema.codec.source, device="cpu")
    if schema.model.n_codebooks > codec.n_codebooks:
        raise CodecMismatch(f"model reads {schema.model.n_codebooks} codebooks, the codec has {codec.n_codebooks}")
    model_cfg = dataclasses.replace(
        schema.model, codebook_size=codec.codebook_size, latent_dim=codec.table_width(schema.model.embedding),
        codec_fingerprint=codec.fingerprint,
    )
    try:
        datamodule = hydra.utils.instantiate(cfg.data, n_codebooks=model_cfg.n_codebooks, expected_fingerprint=codec.fingerprint,
                                             codebook_size=codec.codebook_size)
    except hydra.errors.InstantiationException as err:  # show the data's own error, not Hydra's wrapper
        raise (err.__cause__ or err) from None
    module = MaskedTokenModule(
        model_cfg, schema.masking, schema.optim, label_smoothing=schema.label_smoothing, compile=schema.compile,
        activation_checkpointing=schema.activation_checkpointing, init_from=schema.init_from,
        lora=dataclasses.asdict(schema.lora) if schema.lora else None,
        train_metrics_every_n_steps=schema.train_metrics_every_n_steps,
        eval_protocol=schema.eval_protocol, loss_weighting=schema.loss_weighting.value,
        codebook_tables=codec.codebook_tables(model_cfg.embedding)[: model_cfg.n_codebooks],
    )
    callbacks = [hydra.utils.instantiate(node) for node in (cfg.callbacks or {}).values()]
    remove_checkpoint_leftovers(last_checkpoint_path(schema.run_dir).parent)  # of a write killed mid-way
    resume_from = last_checkpoint(schema.run_dir) if schema.resume else None
    if resume_from is not None:
        check_resumable(resume_from, dict(module.hparams), module.init_from_sha256)
    # micro-batch and accumulation, before the data loads; a resumed run keeps its own
    callbacks.append(AutoBatchSize(schema.batch_sizing, resume_from))
    callbacks.append(DataHealth())  # skip counts as metrics, the skip-rate limit over all ranks, the closing summary
    callbacks.append(FinalValidation())  # at trainer.max_steps, also mid-epoch: the final weights are scored
    if schema.trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(LogPointProgressBar())  # Lightning's own bar reads the training metrics every step
    if requeue is not None:
        callbacks.append(requeue)
    trainer_args = dataclasses.asdict(schema.trainer)
    if (layout := slurm_layout()) and trainer_args["devices"] == "auto":
        trainer_args["devices"], trainer_args["num_nodes"] = layout  # one process per SLURM task
    log.info(describe(schema.slurm.requeue))
    if warning := gpus_left_unused(str(trainer_args["accelerator"])):
        log.warning(warning)
    if resume_from is not None and rank_zero_only.rank == 0:  # this run's earlier attempt, before the CSV loggers
        keep_earlier_attempt(schema.run_dir, cfg)  # start (they would delete it)
    trainer = L.Trainer(
        **trainer_args,
        strategy=hydra.utils.instantiate(cfg.strategy) if cfg.strategy else "auto",
        logger=build_loggers(cfg.logger) or False,
        callbacks=callbacks,
        plugins=[*cluster_plugins(), AtomicCheckpointIO()],
        default_root_dir=schema.run_dir,
        use_distributed_sampler=False,  # the DataModule splits by rank itself
    )
    share_signals(trainer, signals)
    return module, datamodule, trainer, resume_from


def run(cfg: DictConfig, *, start_up=nullcontext) -> L.Trainer:
    """Build the run, then train it. ``start_up`` wraps the build alone (``main`` passes :func:`usage_errors_exit`):
    the user's mistakes found there are reported in one line; an error raised in training keeps its traceback."""
    # The DataModule restarts its stream at the checkpoint's global step, so a mid-epoch resume is exact.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    with start_up():
        module, datamodule, trainer, resume_from = build(cfg)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    return trainer


def give_job_its_own_folder(cfg: DictConfig) -> None:
    """In a Hydra multirun (``-m``), ``run_dir`` becomes ``<run_dir>-<job number>``: the jobs of a sweep never share
    a folder (each would resume the one before it and overwrite its logs). The number is the job's place in the
    sweep, so a requeued job (submitit) finds its own checkpoints again, as does a local rerun of the same sweep (or any
    rerun with a fixed ``run_name``: by default it holds the SLURM job id, new at each submission)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    cfg.run_dir = f"{cfg.run_dir}-{HydraConfig.get().job.num}"
    log.info("multirun job %s: run folder %s", HydraConfig.get().job.num, cfg.run_dir)


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``vampnet-pl train``. A run stopped by SIGTERM exits with 143, not 0, so that a caller (the ablation
    runner, a script) does not take it for finished; it resumes from its checkpoint when run again (with
    ``checkpoint.on_sigterm``, one saved at the step where it stopped). A run that
    checkpointed on the requeue signal and was not requeued (the requeue failed, or ``slurm.requeue=off``) exits with
    ``NOT_REQUEUED_EXIT`` (75; see training/slurm.py). A wrong setting or a missing file found at start-up exits with
    2 and a one-line error; an error in training, with its traceback (Hydra's report, status 1)."""
    give_job_its_own_folder(cfg)
    try:
        trainer = run(cfg, start_up=usage_errors_exit)
    except SIGTERMException:  # several ranks: raised on each once they agreed to stop
        sys.exit(SIGTERM_EXIT)
    if trainer.received_sigterm or stopped_on_sigterm(trainer):  # one process: Lightning's loop stopped; or checkpointed
        sys.exit(SIGTERM_EXIT)
    if stopped_not_requeued(trainer):  # srun then reports the job step as failed
        sys.exit(NOT_REQUEUED_EXIT)


if __name__ == "__main__":
    main()
