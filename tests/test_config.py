"""Hydra configs: every _target_ in conf/ instantiates; schemas reject typos at compose time."""

from __future__ import annotations


import hydra
import pytest
from omegaconf import OmegaConf

from vampnet_pl.config import conf_dir


def _targets(node, where=""):
    """(path, node) of every dict with a _target_ in a plain (unresolved) container."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            yield from _targets(value, f"{where}.{key}")


# What each _target_ in conf/ must build (a factory's target names what it returns).
EXPECTED = {
    "vampnet_pl.data.datamodule.CodesDataModule": "CodesDataModule",
    "vampnet_pl.training.parallel.ddp_strategy": "DDPStrategy",
    "vampnet_pl.training.parallel.fsdp_strategy": "AtomicFSDPStrategy",
    "vampnet_pl.training.parallel.fsdp2_strategy": "AtomicModelParallelStrategy",
    "vampnet_pl.training.parallel.deepspeed_strategy": "AtomicDeepSpeedStrategy",
    "lightning.pytorch.loggers.TensorBoardLogger": "TensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger": "CSVLogger",
    "lightning.pytorch.loggers.WandbLogger": "WandbLogger",
    "lightning.pytorch.callbacks.ModelCheckpoint": "ModelCheckpoint",
    "vampnet_pl.training.checkpointing.LastCheckpoint": "LastCheckpoint",
    "vampnet_pl.training.callbacks.StepSeedCallback": "StepSeedCallback",
    "vampnet_pl.training.performance.PerformanceMonitor": "PerformanceMonitor",
    "vampnet_pl.evaluation.callback.PromptEvalCallback": "PromptEvalCallback",
}


def _compose_train(group: str, option: str, extra: list[str]):
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra.compose("train", overrides=[f"{group}={option}", *extra])


def test_every_target_in_conf_is_instantiated(prepared, tmp_path):
    found = []
    for path in sorted(conf_dir().rglob("*.yaml")):
        group = str(path.parent.relative_to(conf_dir()))
        for where, node in _targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False)):
            target = node["_target_"]
            found.append(target)
            assert group != ".", f"{path}: keep _target_ nodes in a config group"
            cfg = _compose_train(group, path.stem, [f"data.dataset_dir={prepared}", "data.num_workers=0", f"runs_dir={tmp_path}"])
            OmegaConf.resolve(cfg)
            node_cfg = OmegaConf.select(cfg, group + where)
            if target.endswith("WandbLogger"):
                try:
                    import wandb  # noqa: F401  (optional: its protobuf pin clashes with DAC's audiotools)
                except ImportError:
                    with pytest.raises(Exception, match="wandb"):
                        hydra.utils.instantiate(node_cfg)
                    continue
            obj = hydra.utils.instantiate(node_cfg)
            assert type(obj).__name__ == EXPECTED[target], (path, target)
    assert set(found) == set(EXPECTED), set(found) ^ set(EXPECTED)


def test_data_schema_rejects_typos_and_wrong_types(prepared):
    def _compose_group(group, option, overrides):
        with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return hydra.compose(f"{group}/{option}", overrides=overrides)[group]

    with pytest.raises(Exception, match="batch_sise"):
        _compose_group("data", "codes", [f"data.dataset_dir={prepared}", "data.batch_sise=4"])
    with pytest.raises(Exception, match="batch_size"):
        _compose_group("data", "codes", [f"data.dataset_dir={prepared}", "data.batch_size=many"])


@pytest.mark.parametrize("name, model, window, cutoff, lora", [
    ("vampnet_coarse", "coarse", 10.0, -30.0, False), ("vampnet_c2f", "c2f", 3.0, -40.0, False),
    ("vampnet_finetune", "coarse", 10.0, -30.0, False), ("vampnet_lora", "coarse", 10.0, -30.0, True)])
def test_vampnet_recipes_are_the_originals(name, model, window, cutoff, lora):
    from vampnet_pl.config import compose

    cfg = compose("train", [f"experiment={name}", "init_from=coarse.pt", "data.dataset_dir=codes"])
    assert cfg.model.n_layers == (20 if model == "coarse" else 16) and cfg.model.qkv == "separate"
    assert (cfg.data.window_seconds, cfg.data.loudness_cutoff, cfg.label_smoothing) == (window, cutoff, 0.1)
    assert (cfg.optim.scheduler, cfg.optim.lr, cfg.trainer.gradient_clip_val) == ("noam", 2.0, 5.0)
    # scripts/exp/train.py: r from a scrambled Sobol engine, mask.random's Bernoulli(cos(r pi/2)) per token
    assert (cfg.masking.schedule, cfg.masking.sampler, cfg.masking.kind) == ("cosine", "sobol", "bernoulli")
    fine_tune = name in ("vampnet_finetune", "vampnet_lora")
    assert (cfg.optim.warmup_steps, cfg.data.batch_size) == ((500, 6) if fine_tune else (10000, 8))
    assert cfg.batch_sizing.global_batch == cfg.data.batch_size  # over all GPUs, as audiotools divides it
    assert (cfg.lora is not None) == lora
    if lora:
        assert (cfg.lora.r, cfg.lora.alpha, list(cfg.lora.target_modules)) == (8, 1, ["q", "v", "out", "ffn_in", "ffn_out"])


def test_masking_protocol_and_loss_weighting_names_fail_at_compose_time(prepared):
    from vampnet_pl.config import LossWeighting, UsageError, compose

    base = [f"data.dataset_dir={prepared}"]
    cfg = compose("train", [*base, "masking=magnet_span", "loss_weighting=diffusion", "masking.r_min=0.2"])
    assert cfg.masking.kind == "magnet_span" and cfg.loss_weighting == LossWeighting.diffusion and cfg.masking.r_min == 0.2
    assert cfg.eval_protocol.id == "v1" and compose("train", [*base, "masking=per_level"]).masking.level_schedules
    for bad, match in (("masking.kind=spans", "spans"), ("masking.schedule=cosin", "cosin"),
                       ("masking.level_schedules=[cosine,nope]", "nope"), ("loss_weighting=elbo", "elbo"),
                       ("eval_protocol.ratio=[0.5]", "ratio"), ("eval_protocol.sweep_prompt=periodic_5", "periodic_5")):
        with pytest.raises((UsageError, ValueError), match=match):
            compose("train", [*base, bad])
    assert compose("eval", ["coarse=c.pt", f"dataset_dir={prepared}"]).eval_protocol.passes_sweep == [1, 4, 12, 36]


def test_required_keys_without_a_schema_default_are_named_at_compose_time():
    """`???` over an Optional schema default of None is a no-op in OmegaConf: the schema checks these itself."""
    from vampnet_pl.config import UsageError, compose

    for recipe in ("vampnet_lora", "vampnet_finetune"):
        with pytest.raises(UsageError, match=f"init_from is not set: .*{'LoRA' if recipe == 'vampnet_lora' else recipe}"):
            compose("train", [f"experiment={recipe}", "data.dataset_dir=codes"])
    with pytest.raises(UsageError, match="init_from is not set: LoRA"):
        compose("train", ["lora=default", "data.dataset_dir=codes"])
    assert compose("train", ["lora=default", "data.dataset_dir=codes", "init_from=m.pt"]).lora.r == 8
    with pytest.raises(UsageError, match="data.dataset_dir is not set"):
        compose("train", [])
    cfg = compose("train", ["data.train_urls=train.tar", "data.val_urls=val.tar", "data.n_codebooks=4"])
    assert cfg.data.dataset_dir is None and cfg.data.train_urls == "train.tar"


def test_every_experiment_the_docs_name_exists():
    """`experiment=<name>` in the READMEs, the SLURM scripts and conf/ comments must be a conf/experiment/ recipe."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    known = {p.stem for p in (root / "conf" / "experiment").glob("*.yaml")}
    files = [root / "README.md", *root.glob("docs/**/*.md"), *root.glob("slurm/*.md"), *root.glob("slurm/*.sh"),
             *root.glob("slurm/*.sbatch"), *(root / "conf").rglob("*.yaml")]
    named = {(name, str(path.relative_to(root))) for path in files
             for match in re.finditer(r"experiment=([\w|,]+)", path.read_text())
             for name in re.split(r"[|,]", match.group(1)) if name}
    assert sorted((n, where) for n, where in named if n not in known) == []
    assert {n for n, _ in named} >= {"vampnet_coarse", "vampnet_lora"}  # the pattern finds them


def test_scheduler_and_fad_backend_names_fail_at_compose_time(tmp_path, capsys):
    """Checked against the registries that build them (SCHEDULERS, EMBEDDINGS), not only when the fit starts."""
    from vampnet_pl.cli import main
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes"]
    for name, overrides, match in (
            ("train", [*base, "optim.scheduler=cosin"], r"unknown scheduler 'cosin' \(optim.scheduler\)"),
            ("train", [*base, "callbacks=with_eval", "callbacks.prompt_eval.fad_backend=vgish"],
             r"unknown FAD backend 'vgish' \(callbacks.prompt_eval.fad_backend\)"),
            ("eval", ["coarse=c.pt", "dataset_dir=codes", "fad_backend=clapp"], r"unknown FAD backend 'clapp'")):
        with pytest.raises(UsageError, match=match):
            compose(name, overrides)
    assert compose("train", [*base, "optim=noam", "callbacks=with_eval"]).optim.scheduler == "noam"
    spec = conf_dir() / "ablation" / "demo.yaml"
    assert main(["ablate", "run", str(spec), "--dry-run", "--sweep-dir", str(tmp_path), "optim.scheduler=cosin"]) == 2
    assert "cosin" in capsys.readouterr().err


def test_a_key_added_with_a_plus_that_no_schema_has_is_refused(tmp_path, capsys):
    """Hydra answers `workers=2` misspelt with `To append to your config use +worker=2`; so added, the key passed
    every check and OmegaConf.to_object set it on the dataclass, where nothing read it: the run went on without it."""
    from vampnet_pl.cli import main
    from vampnet_pl.config import UsageError, compose

    for name, overrides, match in (
            ("prep", ["catalog=c", "out_dir=o", "+worker=2"], r"unknown setting worker \(did you mean workers\?\)"),
            ("demo", ["+prep.split.val_fractoin=0.2"], r"prep.split.val_fractoin \(did you mean prep.split.val_fraction"),
            ("train", ["data.dataset_dir=codes", "+seeed=3", "+model.d_modle=32"],
             r"unknown settings model.d_modle \(did you mean model.d_model\?\), seeed \(did you mean seed\?\)"),
            ("train", ["data.dataset_dir=codes", "lora=default", "init_from=m.pt", "+lora.rank=4"], r"lora.rank"),
            ("eval", ["coarse=c.pt", "dataset_dir=codes", "+eval_protocol.pases=3"], r"eval_protocol.pases")):
        with pytest.raises(UsageError, match=match):
            compose(name, overrides)
    # the nodes without a schema (_target_ nodes) and the keys forced with ++ that the schema has are not refused
    cfg = compose("train", ["data.dataset_dir=codes", "++seed=3", "+callbacks.performance.peak_tflops=1.0"], typed=False)
    assert cfg.seed == 3
    assert main(["prep", "all", "catalog=c", f"out_dir={tmp_path}", "+worker=2"]) == 2
    assert "unknown setting worker" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_best_checkpoints_follow_checkpoint_mode():
    """`checkpoint.monitor=val/acc1` kept the lowest accuracies: the mode was fixed to min."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes", "checkpoint.monitor=val/acc1"]
    cfg = compose("train", [*base, "checkpoint.mode=max"], typed=False)
    best = hydra.utils.instantiate(cfg.callbacks.best_checkpoints)
    assert (best.monitor, best.mode) == ("val/acc1", "max")
    assert hydra.utils.instantiate(compose("train", base[:1], typed=False).callbacks.best_checkpoints).mode == "min"
    for bad, match in ((base, "accuracy .*checkpoint.mode=max"), ([*base, "checkpoint.mode=maximum"], "min or max"),
                       (["data.dataset_dir=codes", "checkpoint.monitor=val/acc1/ratio_0.50"], "checkpoint.mode=max"),
                       (["data.dataset_dir=codes", "checkpoint.mode=max"], "val/loss is a loss .*checkpoint.mode=min")):
        with pytest.raises(UsageError, match=match):
            compose("train", bad)


def test_the_runs_seed_seeds_the_data_stream_unless_set_apart():
    """``data.seed`` was a fixed 0: an ablation's seeds varied the initialisation but never the data order."""
    from vampnet_pl.config import compose

    assert compose("train", ["seed=7", "data.dataset_dir=/data"]).data.seed == 7
    assert compose("train", ["seed=7", "data.seed=3", "data.dataset_dir=/data"]).data.seed == 3


def test_a_seed_lightning_cannot_take_is_refused_at_compose_time():
    """A negative seed, or one of 2**32 or more, passed the config check and ended the run in a traceback from
    Lightning's seed_everything (the demo's training only after its prep)."""
    from vampnet_pl.config import UsageError, compose

    for bad in (-1, 2**32, 2**64):
        with pytest.raises(UsageError, match=rf"seed must be in \[0, 4294967295\] .*got {bad}"):
            compose("train", [f"seed={bad}", "data.dataset_dir=/data"])
    assert compose("train", [f"seed={2**32 - 1}", "data.dataset_dir=/data"]).seed == 2**32 - 1


@pytest.mark.parametrize("bad, message", [
    ("data.batch_size=0", "data.batch_size must be at least 1, got 0"),  # was numpy's "need at least one array to stack"
    ("data.val_batch_size=0", "data.val_batch_size must be at least 1"),  # was a ZeroDivisionError at validation
    ("data.num_workers=-1", "data.num_workers must be at least 0"),
    ("data.max_skip_rate=1.5", r"data.max_skip_rate must be in \[0, 1\]"),
    ("trainer.max_steps=-5", "trainer.max_steps must be at least 0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be at least 1"),  # a ZeroDivisionError
    ("label_smoothing=2", r"label_smoothing must be in \[0, 1\], got 2")])
def test_counts_and_rates_out_of_range_fail_at_compose_time(bad, message):
    """Each was accepted when composed and failed once the run had loaded its codec and data, most in another library."""
    from vampnet_pl.config import UsageError, compose

    with pytest.raises(UsageError, match=message):
        compose("train", ["data.dataset_dir=codes", bad])
    assert compose("train", ["data.dataset_dir=codes", "trainer.max_steps=-1", "optim.total_steps=100", "data.num_workers=0"]
                   ).trainer.max_steps == -1


@pytest.mark.parametrize("config, bad, message", [
    ("train", "eval_protocol.gen_windows=0", "eval_protocol.gen_windows must be at least 1"),
    ("train", "callbacks.prompt_eval.n_windows=0", "callbacks.prompt_eval.n_windows must be at least 1"),
    ("eval", "n_windows=0", "n_windows must be at least 1"),
    ("eval", "c2f_passes=0", "c2f_passes must be at least 1"),
    ("eval", "batch_size=0", "batch_size must be at least 1"),
    ("eval", "windows_per_sample=0", "windows_per_sample must be at least 1")])
def test_generation_counts_below_one_fail_at_compose_time(config, bad, message):
    """Zero windows stopped a training run at its first generation evaluation; eval's n_windows=0 silently scored
    eval_protocol.gen_windows windows, and batch_size=0 or c2f_passes=0 failed after the models loaded."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes", "callbacks=with_eval"] if config == "train" else ["coarse=c.pt", "dataset_dir=d"]
    with pytest.raises(UsageError, match=message):
        compose(config, [*base, bad])
    assert compose(config, [*base, "eval_protocol.gen_windows=1"]).eval_protocol.gen_windows == 1


def test_a_learning_rate_on_the_other_schedulers_scale_is_refused():
    """A recipe's Noam factor under another scheduler trained at lr 2.0 (experiment=vampnet_coarse optim=adamw_cosine);
    a plain learning rate as the Noam factor gives a peak lr thousands of times too small."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes"]
    with pytest.raises(UsageError, match=r"optim.lr=2 under scheduler=warmup_cosine is the peak learning rate"):
        compose("train", [*base, "experiment=vampnet_coarse", "optim=adamw_cosine"])
    assert compose("train", [*base, "experiment=vampnet_coarse", "optim=adamw_cosine", "optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(UsageError, match=r"optim.lr=0.0003 under scheduler=noam is the Noam factor"):
        compose("train", [*base, "optim.scheduler=noam"])
    assert compose("train", [*base, "experiment=vampnet_coarse"]).optim.lr == 2.0


def test_a_cosine_schedule_without_an_end_is_refused():
    """trainer.max_steps=-1 with optim.total_steps=0 decayed over an arbitrary 100,000 steps."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes", "trainer.max_steps=-1"]
    with pytest.raises(UsageError, match="trainer.max_steps=-1 sets no end: give optim.total_steps"):
        compose("train", base)
    assert compose("train", [*base, "optim.total_steps=5000"]).optim.total_steps == 5000
    assert compose("train", [*base, "optim=noam"]).optim.scheduler == "noam"  # no end needed


@pytest.mark.parametrize("recipe", ["vampnet_coarse", "vampnet_c2f", "vampnet_lora"])
def test_a_masking_preset_given_with_a_vampnet_recipe_replaces_the_recipes(recipe):
    """The recipe set masking.* itself, after the masking group: masking=span with it trained the recipe's mask, and
    an ablation grid over masking presets trained one mask under every name."""
    from vampnet_pl.config import compose

    base = ["data.dataset_dir=codes", f"experiment={recipe}", "init_from=m.pt"]
    assert compose("train", base).masking.kind == "bernoulli"
    span = compose("train", [*base, "masking=span"]).masking
    assert (span.kind, span.sampler) == ("span", "uniform")
    assert compose("train", [*base, "masking=codebook_level"]).masking.kind == "codebook_level"


def test_the_last_review_s_checks_fire_at_compose_time():
    """A stray prompt argument was dropped without a word; callbacks.prompt_eval.noisy_ratio passed compose and failed
    after the data loaded (as a traceback); negative optim step counts were accepted."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=codes"]
    for bad, message in (("prompts=[random:0.5:0.9]", r"bad prompt 'random:0.5:0.9': random takes at most 1"),
                         ("prompts=[beat:2:1:5]", r"beat takes at most 2")):
        with pytest.raises(UsageError, match=message):
            compose("eval", ["coarse=c.pt", "dataset_dir=d", bad])
    with pytest.raises(UsageError, match=r"callbacks.prompt_eval.noisy_ratio must be in \[0, 1\]"):
        compose("train", [*base, "callbacks=with_eval", "callbacks.prompt_eval.noisy_ratio=2"])
    for bad in ("optim.total_steps=-5", "optim.warmup_steps=-1"):
        with pytest.raises(UsageError, match="must be at least 0"):
            compose("train", [*base, bad])
    assert compose("eval", ["coarse=c.pt", "dataset_dir=d", "prompts=[beat:2:1,periodic:4:1]"]).prompts
