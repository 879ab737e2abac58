"""AdamW with sensible parameter groups, and learning-rate schedules as LambdaLR multipliers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vampnet_pl.utils.checks import check_at_least


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    scheduler: str = "warmup_cosine"  # a name in SCHEDULERS: warmup_cosine | noam | constant
    warmup_steps: int = 100
    total_steps: int = 0  # 0: the trainer's max_steps
    min_lr_ratio: float = 0.1
    noam_d_model: int = 0  # 0: the model width
    fused: Optional[bool] = None  # fused AdamW kernel; None: when every parameter is a plain CUDA or CPU tensor

    def __post_init__(self):  # at compose time (and in ablate --dry-run), not when the fit starts
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r} (optim.scheduler); known: {sorted(SCHEDULERS)}")
        check_lr_scale(self.lr, self.scheduler)
        check_at_least(self, "optim", warmup_steps=0, total_steps=0)  # total_steps < 0 dropped cosine to min_lr at once


# Under noam, optim.lr is the Noam factor (VampNet's 2.0; peak lr = factor / sqrt(d_model * warmup)); under the other
# schedulers it is the peak learning rate itself. A value on the wrong scale is a recipe's lr left under another
# scheduler (experiment=vampnet_coarse optim=adamw_cosine trained at 2.0), so it is refused.
MAX_PLAIN_LR, MIN_NOAM_FACTOR = 0.1, 0.05


def check_lr_scale(lr: float, scheduler: str) -> None:
    if scheduler == "noam" and lr < MIN_NOAM_FACTOR:
        raise ValueError(f"optim.lr={lr:g} under scheduler=noam is the Noam factor (peak lr = factor / sqrt(d_model x "
                         f"warmup_steps); VampNet's is 2.0), not a learning rate: give optim.lr >= {MIN_NOAM_FACTOR:g}")
    if scheduler != "noam" and lr > MAX_PLAIN_LR:
        raise ValueError(f"optim.lr={lr:g} under scheduler={scheduler} is the peak learning rate; {lr:g} is a Noam "
                         f"factor (a recipe's, e.g. experiment=vampnet_coarse): give optim.lr <= {MAX_PLAIN_LR:g} with it")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear layers only: not on norms, embeddings, MASK vectors or
    biases. Told by the layer that holds a parameter, not by its shape: FSDP (1) with ``use_orig_params``, which
    wraps the model before the optimiser is made, leaves every parameter a flat 1-d slice."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if id(param) in linear_weights else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _constant(cfg: OptimConfig, warmup: int, total_steps: int, d_model: int):
    return lambda step: min(1.0, (step + 1) / warmup)


def _warmup_cosine(cfg: OptimConfig, warmup: int, total_steps: int, d_model: int):
    if total_steps <= 0:  # the train schema refuses this config; a module built in Python must say so too
        raise ValueError("optim.scheduler=warmup_cosine needs an end: set trainer.max_steps or optim.total_steps")
    def warmup_cosine(step: int) -> float:  # step k runs the k+1-th optimiser step: peak once, min_lr at the last
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return warmup_cosine


def _noam(cfg: OptimConfig, warmup: int, total_steps: int, d_model: int):  # "Attention is all you need", as
    # VampNet trains: the base lr is the factor
    width = cfg.noam_d_model or d_model
    return lambda step: width**-0.5 * min((step + 1) ** -0.5, (step + 1) * warmup**-1.5)


# optim.scheduler -> (cfg, warmup, total_steps, d_model) -> (step -> multiplier); the schema checks names against it
SCHEDULERS = {"warmup_cosine": _warmup_cosine, "noam": _noam, "constant": _constant}


def lr_multiplier(cfg: OptimConfig, total_steps: int, d_model: int):
    """step -> multiplier of the base learning rate (``cfg.scheduler`` checked by the config)."""
    return SCHEDULERS[cfg.scheduler](cfg, max(1, cfg.warmup_steps), total_steps, d_model)


def use_fused(model: nn.Module, fused: bool | None) -> bool:
    """Fused AdamW (one kernel for all parameters) by default when every trainable parameter is a plain
    tensor on CUDA or on the CPU (on 2 CPU cores: 16 ms against foreach's 40 ms for 23 M parameters).

    Sharded (DTensor) parameters keep the foreach implementation.
    """
    if fused is not None:
        return fused
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in ("cuda", "cpu") and type(p.data) is torch.Tensor for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, d_model: int):
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  fused=use_fused(model, cfg.fused) or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, cfg.total_steps or total_steps, d_model))
    return optimizer, scheduler


def apply_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make ``lr`` the base learning rate from the scheduler's current step on. A resumed checkpoint's optimiser and
    scheduler states bring back the base lr they were trained with, which would silently override a changed
    ``optim.lr``; this sets it again, times the schedule's multiplier at the current step."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * multiplier(scheduler.last_epoch)
