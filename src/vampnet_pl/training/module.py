"""The LightningModule for both stages (coarse and c2f): masking, loss, metrics, optimiser.

Training: cross-entropy on masked tokens only (label smoothing), masks from the run's
``masking.*``, averaged over every masked token of the global batch whatever its split into micro-batches
and ranks (:func:`token_mean_scale`); ``loss_weighting=diffusion`` weights each example by the slope of its schedule,
|d gamma / d r| (masked diffusion's ELBO weight gamma'/gamma per masked token, with the mean
over masked tokens taking the 1/gamma). Validation: the evaluation protocol
(``masking.protocol``), never the run's own masks: every window under every protocol mask,
plain cross-entropy (no label smoothing) and top-1 / top-25 accuracy on masked tokens, logged
as ``val/<loss|acc1|acc25>`` (per (window, condition) mean), ``.../ratio_0.10``,
``.../prompt_periodic_16`` and ``.../codebook_<k>`` (pooled over masked tokens of level k).
Metrics are torchmetrics objects that Lightning syncs across ranks. Parallelism is not here:
``configure_model`` hands the model to :func:`vampnet_pl.training.parallel.parallelize`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torchmetrics import MeanMetric, Metric

from vampnet_pl.codec import CodecMismatch, fingerprints_apart
from vampnet_pl.config import UsageError, override_value
from vampnet_pl.masking.config import MaskingConfig, TrainingMasker
from vampnet_pl.masking.protocol import EvalProtocolConfig, protocol_masks
from vampnet_pl.model import VampNet, VampNetConfig, load_exported
from vampnet_pl.model.vampnet import RUNTIME_FIELDS, check_token_range, packed, unwrapped_key
from vampnet_pl.training.optim import OptimConfig, apply_base_lr, build_optimizer
from vampnet_pl.training.parallel import gradient_norm, parallelize

RATIO_BUCKETS = (0.25, 0.5, 0.75, 1.0)
LOSS_WEIGHTINGS = ("none", "micro_batch", "diffusion")
VAL_METRICS = ("loss", "acc1", "acc25")


class MaskedLoss(NamedTuple):
    """One batch's loss and what its metrics read (``logits``: every token's, on sampled steps only)."""

    loss: torch.Tensor
    selected_logits: torch.Tensor  # [masked tokens, V], packed order
    selected_target: torch.Tensor
    logits: torch.Tensor | None  # [B, P, T, V]
    target: torch.Tensor  # [B, P, T]
    masked: torch.Tensor  # [B, P, T] bool
    ratios: torch.Tensor  # [B] mask ratio of each example


def token_mean_scale(accumulation: int, ranks: int, positions: int, tokens: torch.Tensor) -> torch.Tensor:
    """The factor that makes an optimiser step's gradient that of the mean loss over all its masked tokens.

    Each micro-batch's loss is the sum over its masked tokens divided by its token ``positions`` (masked or not,
    the same in every micro-batch); Lightning divides each by the ``accumulation`` and the ranks average their
    gradients, so the accumulated gradient is the sum over the step's masked tokens divided by
    ``accumulation x ranks x positions``. Times this factor it is that sum divided by ``tokens``, the step's
    masked tokens over all its micro-batches and ranks: a global batch weighs every masked token alike, however
    it is split (a mean per micro-batch, averaged, would weigh the tokens of a lightly masked micro-batch more)."""
    return (accumulation * ranks * positions) / tokens.clamp_min(1)


def samples_metrics(step: int, every: int, log_every: int) -> bool:
    """Whether training step ``step`` (counted from 1) computes the top-k metrics: every ``every``-th step, and every
    step a log point logs (``log_every``, Lightning's ``log_every_n_steps``; 0: none). Lightning logs the last value
    of a metric at every log point, so a log point on an unsampled step would log an earlier step's accuracy as its
    own. With the defaults (10 both) the two coincide, and the finiteness check's host read falls where the loggers
    read anyway."""
    return step % max(1, every) == 0 or (log_every > 0 and step % log_every == 0)


class PerplexityMetric(MeanMetric):
    """Perplexity of the cross-entropies it is given: exp of their mean (a mean of per-step perplexities is not one:
    it is pulled up by the worst steps). A step's value is exp of that step's cross-entropy."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def _as(cls, value):
    return value if isinstance(value, cls) or value is None else cls(**value)


def _key(name: str) -> str:
    return name.replace("/", "__").replace(".", "_")


class MaskedTokenModule(L.LightningModule):
    def __init__(
        self,
        model: VampNetConfig | dict,
        masking: MaskingConfig | dict | None = None,
        optim: OptimConfig | dict | None = None,
        label_smoothing: float = 0.1,
        compile: bool | None = None,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        lora: dict | None = None,
        train_metrics_every_n_steps: int = 10,
        codebook_tables: torch.Tensor | None = None,
        eval_protocol: EvalProtocolConfig | dict | None = None,
        loss_weighting: str = "none",
        protocol: str | None = None,  # the protocol's id, saved for readers of hparams; eval_protocol is authoritative
    ):
        super().__init__()
        model_cfg = _as(VampNetConfig, model)
        self.masking_cfg = _as(MaskingConfig, masking) or MaskingConfig()
        self.optim_cfg = _as(OptimConfig, optim) or OptimConfig()
        self.protocol = _as(EvalProtocolConfig, eval_protocol) or EvalProtocolConfig()
        loss_weighting = getattr(loss_weighting, "value", loss_weighting)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; use one of {LOSS_WEIGHTINGS}")
        self.save_hyperparameters(
            {"model": model_cfg.to_dict(), "masking": asdict(self.masking_cfg), "optim": asdict(self.optim_cfg),
             "label_smoothing": label_smoothing, "compile": compile, "activation_checkpointing": activation_checkpointing,
             "init_from": init_from, "lora": lora, "train_metrics_every_n_steps": train_metrics_every_n_steps,
             "eval_protocol": asdict(self.protocol), "protocol": self.protocol.id, "loss_weighting": loss_weighting}
        )
        self.protocol_digest: str | None = None  # sha256 of the windows and masks of the last validation (this rank)
        self._digest = hashlib.sha256()
        self.model = VampNet(model_cfg, codebook_tables)
        self.init_from_sha256: str | None = None  # of the init_from file: a resume checks it is the same model's
        if init_from:
            self._init_from(init_from)
        if lora:
            self._apply_lora(lora)
        self.masker = TrainingMasker(self.masking_cfg, model_cfg.n_conditioning_codebooks)
        self._step_tokens = 0  # masked tokens of this rank's micro-batches since the last optimiser step
        self._positions = 0  # token positions of one micro-batch (see token_mean_scale)
        self._metrics_built = False
        self._build_metrics()

    # -- construction ---------------------------------------------------------------------------
    @property
    def cfg(self) -> VampNetConfig:
        return VampNetConfig(**self.hparams.model)

    def _init_from(self, path: str) -> None:
        """Start from an exported model's weights. Its codec and every config field that changes the function
        the weights compute must equal this run's; only ``RUNTIME_FIELDS`` (dropout, kernels) may differ. A missing
        file or another model is the user's mistake (:class:`UsageError`: one line at ``vampnet-pl train``'s start)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"init_from={path}: no such file (give a model exported with `vampnet-pl export` "
                                    "or `vampnet-pl import-vampnet`)")
        data = Path(path).read_bytes()  # read once: loaded, and hashed as file_sha256 would (a resume checks it)
        source = load_exported(path, data)
        sha256 = hashlib.sha256(data).hexdigest()
        del data  # a paper-size file: not kept beside the weights
        if source.cfg.codec_fingerprint != self.cfg.codec_fingerprint:
            trained, used = fingerprints_apart(source.cfg.codec_fingerprint, self.cfg.codec_fingerprint)
            raise CodecMismatch(f"{path} was trained on codec {trained}, this run uses {used}")
        differ = {f.name: (getattr(source.cfg, f.name), getattr(self.cfg, f.name)) for f in fields(VampNetConfig)
                  if f.name not in RUNTIME_FIELDS and getattr(source.cfg, f.name) != getattr(self.cfg, f.name)}
        if differ:
            found = "; ".join(f"{name}: {theirs!r} in the file, {ours!r} in this run" for name, (theirs, ours) in differ.items())
            fix = " ".join(f"model.{name}={override_value(theirs)}" for name, (theirs, _) in differ.items())
            raise UsageError(f"init_from={path} was exported from another model than this run's ({found}): choose the "
                             "model preset it was trained with (an imported VampNet model: model=coarse_paper or "
                             f"model=c2f_paper) or set {fix}")
        self.model.load_state_dict(source.state_dict())
        self.init_from_sha256 = sha256

    def _apply_lora(self, lora: dict) -> None:
        import peft

        targets = list(lora.get("target_modules", ["qkv", "out", "ffn_in", "ffn_out"]))
        check_lora_targets(self.model, targets, self.cfg.qkv)
        config = peft.LoraConfig(
            r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
            target_modules=targets,
        )
        self.model = peft.inject_adapter_in_model(config, self.model)
        for name, param in self.model.named_parameters():
            param.requires_grad = "lora_" in name

    def _build_metrics(self) -> None:
        names = ["loss", "perplexity", "top1_masked", "top25_masked", "top1_unmasked", "top25_unmasked"]
        cfg = self.cfg
        names += [f"top1_masked/codebook_{k}" for k in range(cfg.n_conditioning_codebooks, cfg.n_codebooks)]
        names += [f"top1_masked/ratio_le_{b:.2f}" for b in RATIO_BUCKETS]
        train = {_key(n): (PerplexityMetric if n == "perplexity" else MeanMetric)(nan_strategy="disable") for n in names}
        self.metrics = torch.nn.ModuleDict({"train_metrics": torch.nn.ModuleDict(train)})
        self.val_metrics = torch.nn.ModuleDict({_key(n): MeanMetric(nan_strategy="disable") for n in self.val_metric_names()})

    def val_metric_names(self) -> list[str]:
        """Every metric validation logs, without the ``val/`` prefix (see the module docstring)."""
        groups = [""] + [f"/{n}" for n in self.protocol.ratio_names] + [f"/prompt_{n}" for n in self.protocol.prompt_names]
        groups += [f"/codebook_{k}" for k in range(self.cfg.n_conditioning_codebooks, self.cfg.n_codebooks)]
        return [f"{metric}{group}" for group in groups for metric in VAL_METRICS]

    def configure_model(self) -> None:
        parallelize(self.model, getattr(self, "device_mesh", None), compile=self.compile_blocks,
                    activation_checkpointing=self.hparams.activation_checkpointing)

    @property
    def compile_blocks(self) -> bool:
        """``compile`` as set, or by default: on when training on CUDA (regional: each block, short start-up)."""
        if self.hparams.compile is not None:
            return self.hparams.compile
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else self.device
        return device.type == "cuda"

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(codes, mask)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Token range checked here, on the CPU batch, so the steps call the model without a host sync."""
        if isinstance(batch, dict) and "codes" in batch:
            check_token_range(batch["codes"], self.cfg.codebook_size)
        return batch

    def _step(self, batch: dict, stage: str = "train", batch_idx: int = 0, sampled: bool | None = None) -> torch.Tensor:
        """Masks, loss and metrics of one batch. ``sampled``: also the top-k metrics (they need every token's
        logits); by default on every ``train_metrics_every_n_steps``-th training step and in other stages."""
        return self._masked_step(batch, stage, sampled).loss

    def _masked_step(self, batch: dict, stage: str = "train", sampled: bool | None = None) -> MaskedLoss:
        if sampled is None:  # top-k metrics are costly: only on sampled train steps (see samples_metrics)
            log_every = self._trainer.log_every_n_steps if self._trainer is not None else 0
            sampled = stage != "train" or samples_metrics(self.global_step + 1, self.hparams.train_metrics_every_n_steps,
                                                          log_every)
        out = self.masked_loss(batch["codes"], sampled)
        # The finiteness check reads the loss on the host: on an accelerator only on sampled steps (no sync per step).
        if (sampled or out.loss.device.type == "cpu") and not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"{stage} loss is {out.loss.item()} at global step {self.global_step}: lower optim.lr, check the data, "
                "or try trainer.precision=32"
            )
        self._update_metrics(stage, *out, sampled)
        return out

    def masked_loss(self, codes: torch.Tensor, sampled: bool) -> MaskedLoss:
        """Draw the training masks for ``codes`` and compute the loss (no metrics, no logging).
        ``sampled``: the model makes every token's logits (top-k metrics need them), not only the masked ones."""
        cfg = self.cfg
        if self.hparams.loss_weighting == "diffusion":
            draw = self.masker.draw(codes)
            mask, ratios, weights = draw.mask, draw.ratios, self.masker.loss_weights(draw.r, cfg.n_predicted_codebooks)
        else:
            (mask, ratios), weights = self.masker(codes), None
        target = codes[:, cfg.n_conditioning_codebooks :]
        masked = mask[:, cfg.n_conditioning_codebooks :]
        # The loss is on masked tokens only, in packed order; the head runs on them alone unless metrics need it all.
        if sampled:
            logits = self.model(codes, mask, check_range=False)  # [B, P, T, V]
            selected_logits = packed(logits, masked).float()
        else:
            logits = None
            selected_logits = self.model(codes, mask, check_range=False, select=masked).float()
        selected_target = packed(target, masked)
        if weights is None:
            loss = F.cross_entropy(selected_logits, selected_target, label_smoothing=self.hparams.label_smoothing)
        else:  # per example: |gamma'(r)| x the mean CE of its masked tokens; then the batch mean
            per_token = F.cross_entropy(selected_logits, selected_target, label_smoothing=self.hparams.label_smoothing,
                                        reduction="none")
            example = packed(torch.arange(codes.shape[0], device=codes.device)[:, None, None].expand_as(masked), masked)
            per_example = per_token.new_zeros(codes.shape[0]).index_add(0, example, per_token)
            per_example = per_example / masked.flatten(1).sum(1).clamp_min(1)
            loss = (weights.to(per_example) * per_example).mean()
        return MaskedLoss(loss, selected_logits, selected_target, logits, target, masked, ratios)

    @torch.no_grad()
    def _update_metrics(self, stage, loss, selected_logits, selected_target, logits, target, masked, ratios,
                        accuracy: bool = True) -> None:
        metrics = self.metrics[f"{stage}_metrics"]
        cfg = self.cfg
        plain = F.cross_entropy(selected_logits, selected_target)
        values = {"loss": loss, "perplexity": plain}  # PerplexityMetric: exp of the mean cross-entropy
        if accuracy:
            top25 = logits.topk(min(25, logits.shape[-1]), dim=-1).indices
            hit1 = top25[..., 0] == target
            hit25 = (top25 == target[..., None]).any(-1)
            values.update({"top1_masked": hit1[masked], "top25_masked": hit25[masked], "top1_unmasked": hit1[~masked],
                           "top25_unmasked": hit25[~masked]})
            for k in range(cfg.n_predicted_codebooks):
                values[f"top1_masked/codebook_{k + cfg.n_conditioning_codebooks}"] = hit1[:, k][masked[:, k]]
            lower = 0.0
            for upper in RATIO_BUCKETS:
                in_bucket = ((ratios > lower) | (lower == 0)) & (ratios <= upper)
                values[f"top1_masked/ratio_le_{upper:.2f}"] = hit1[in_bucket][masked[in_bucket]]
                lower = upper
        for name, value in values.items():
            key = name.replace("/", "__").replace(".", "_")
            # Logged on every rank, empty or not (a mask-ratio bucket with no example in this batch): at the epoch end
            # each rank syncs the metrics it logged that epoch, one collective each, so a metric logged on one rank
            # only would leave the others waiting (a deadlock). An empty value adds nothing to the epoch mean; its
            # step value is NaN (no such token in this step), never a number of another step.
            metrics[key](value.float().flatten())  # forward: updates the epoch state and gives the step value
            # training metrics stay off Lightning's bar (it reads them every step): LogPointProgressBar
            self.log(f"{stage}/{name}", metrics[key], on_step=stage == "train", on_epoch=True,
                     prog_bar=stage != "train" and name in ("loss", "top1_masked"), batch_size=target.shape[0])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._masked_step(batch)
        loss = out.loss
        if self._pools_tokens():  # the sum over masked tokens / positions; on_before_optimizer_step divides by all tokens
            tokens, self._positions = out.selected_target.shape[0], out.masked.numel()  # host numbers: no sync
            self._step_tokens += tokens
            loss = loss * (tokens / self._positions)
        # made on the device by a fill: Lightning copies a Python number to the GPU, a wait for the step (pytorch#120996)
        lr = torch.full((), self.optimizers().param_groups[0]["lr"], device=self.device, dtype=torch.float32)
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    # -- validation: the evaluation protocol ------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._digest = hashlib.sha256(self.protocol.id.encode())
        self._float32_metrics()

    def on_validation_epoch_end(self) -> None:
        self.protocol_digest = self._digest.hexdigest()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Every window of the batch under every protocol mask; ``batch["index"]`` (the windows' global
        indices, from the DataModule's ``FixedBatches``) picks the masks. It is required: positions made up from
        ``batch_idx`` would repeat (after a smaller last batch, and on every rank alike), giving windows the same masks."""
        codes = batch["codes"]
        n_cond = self.cfg.n_conditioning_codebooks
        index = batch.get("index")
        if index is None:
            raise ValueError('a validation batch needs "index", each window\'s global position in the validation set '
                             "(the evaluation protocol seeds its masks by it), as CodesDataModule's FixedBatches give")
        masks = protocol_masks(self.protocol, tuple(codes.shape), n_cond, index.cpu())
        self._digest.update(index.cpu().numpy().astype("int64").tobytes())
        self._digest.update(codes.cpu().numpy().astype("int64").tobytes())
        target = codes[:, n_cond:]
        totals = []
        for name, mask in masks.items():
            self._digest.update(name.encode() + mask.numpy().tobytes())
            mask = mask.to(codes.device)
            logits = self.model(codes, mask, check_range=False).float()
            masked = mask[:, n_cond:]
            per_token = F.cross_entropy(logits[masked], target[masked], reduction="none")
            top = logits[masked].topk(min(25, logits.shape[-1]), dim=-1).indices
            hits = {"acc1": (top[:, 0] == target[masked]).float(), "acc25": (top == target[masked][:, None]).any(-1).float()}
            values = {"loss": per_token, **hits}
            example = torch.arange(codes.shape[0], device=codes.device)[:, None, None].expand_as(masked)[masked]
            level = torch.arange(n_cond, self.cfg.n_codebooks, device=codes.device)[None, :, None].expand_as(masked)[masked]
            counts = masked.flatten(1).sum(1)
            group = name if name.startswith("ratio_") else f"prompt_{name}"
            for metric, value in values.items():
                per_window = value.new_zeros(codes.shape[0]).index_add(0, example, value)
                per_window = per_window[counts > 0] / counts[counts > 0]  # [windows] mean over masked tokens
                self._log_val(metric, per_window)
                self._log_val(f"{metric}/{group}", per_window)
                for k in range(n_cond, self.cfg.n_codebooks):  # all, not level.unique(): the same on every rank
                    self._log_val(f"{metric}/codebook_{k}", value[level == k])
            totals.append(per_token.mean())
        return torch.stack(totals).mean()

    def _log_val(self, name: str, values: torch.Tensor) -> None:
        """Logged on every rank, empty or not (a codebook with no masked token in this batch): each rank syncs the
        metrics it logged at the epoch end, so one that a rank skipped would leave the others waiting. Empty values
        add nothing to the mean."""
        metric = self.val_metrics[_key(name)]
        metric.update(values.float())
        self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("loss", "acc1"),
                 batch_size=max(1, values.numel()))

    def _pools_tokens(self) -> bool:
        """Whether a step's loss is pooled over the masked tokens of all its micro-batches and ranks: under
        ``loss_weighting=none`` (``diffusion`` is a mean over examples, which micro-batches of one size average
        exactly), except under DeepSpeed, whose engine keeps the gradients (each micro-batch's mean, averaged)."""
        return (self.hparams.loss_weighting == "none" and self._trainer is not None
                and (self.trainer.accumulate_grad_batches > 1 or self.trainer.world_size > 1)  # else the same mean
                and not isinstance(self.trainer.strategy, DeepSpeedStrategy))

    def _scale_to_token_mean(self) -> None:
        """The accumulated gradients times :func:`token_mean_scale` (one all-reduce of a number; no host sync)."""
        if not self._step_tokens:
            return
        tokens = torch.full((), float(self._step_tokens), device=self.device)  # a fill: no copy to wait for
        tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = token_mean_scale(self.trainer.accumulate_grad_batches, self.trainer.world_size, self._positions, tokens)
        self._step_tokens = 0
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))  # FSDP's CPU offload: gradients on the CPU

    def on_before_optimizer_step(self, optimizer) -> None:
        self._scale_to_token_mean()  # before the norm is logged and the gradients clipped
        sliced = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if sliced or any(p.grad is not None for p in self.model.parameters()):
            self.log("train/grad_norm", gradient_norm(self.model.parameters(), sliced), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except by norm under FSDP (1): Lightning refuses that there (its FSDPPrecision
        raises at the first step, Lightning issue #19235: ``torch.nn.utils.clip_grad_norm_`` over each rank's slices
        would be wrong), so the root FSDP module clips, with the norm over all ranks (every rank calls this)."""
        by_norm = (gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm") == "norm"  # as Lightning
        if gradient_clip_val and by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written with ``compile`` on or off loads either way: its keys are renamed to this module's
        (a compiled block adds a level to its keys)."""
        if "state_dict" in checkpoint:
            own = {unwrapped_key(key): key for key in self.state_dict()}
            checkpoint["state_dict"] = {own.get(unwrapped_key(k), k): v for k, v in checkpoint["state_dict"].items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.init_from_sha256:  # a resume with another init_from is another run's (checkpointing.check_resumable)
            checkpoint["init_from_sha256"] = self.init_from_sha256

    def on_train_start(self) -> None:
        """The configured learning rate, also after a resume (the restored states carry the checkpoint's)."""
        apply_base_lr(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler, self.optim_cfg.lr)
        self._float32_metrics()

    def _float32_metrics(self) -> None:
        """Metric states back in float32: ``trainer.precision=bf16-true`` (or ``16-true``) converts the whole module,
        metrics included, and a bf16 running sum stops growing at 256 (a mean over 600 values read 1.0, not 0.5)."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float32)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0  # 0: optim.total_steps
        optimizer, scheduler = build_optimizer(self.model, self.optim_cfg, total, self.cfg.d_model)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export -------------------------------------------------------------------------------
    def plain_model(self) -> VampNet:
        """The model without LoRA adapters (merged in) and without compile/FSDP wrappers, on CPU."""
        model = VampNet(self.cfg)
        state = {unwrapped_key(k): v for k, v in self.model.state_dict().items()}
        if self.hparams.lora:
            state = merge_lora_state(state, self.hparams.lora)
        model.load_state_dict(state)
        return model


def lora_matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or its name's last dotted parts."""
    return name == target or name.endswith(f".{target}")


def check_lora_targets(model: torch.nn.Module, targets: list[str], qkv: str) -> None:
    """Each LoRA target must name at least one layer, and only linear layers: peft adapts the matching layers
    silently (a typo trains nothing there), and the export merges linear adapters only (peft adapts an embedding
    too, whose merge would fail after training). A :class:`UsageError`: the config's mistake, found at start-up."""
    modules = dict(model.named_modules())
    if unmatched := [t for t in targets if not any(lora_matches(n, t) for n in modules)]:
        attention = "qkv" if qkv == "fused" else "q, k, v"
        raise UsageError(f"lora.target_modules {unmatched} match no layer of this model (qkv={qkv}: its "
                         f"attention projections are {attention}, then out, ffn_in, ffn_out)")
    other = sorted({f"{t} ({type(m).__name__} {n})" for t in targets for n, m in modules.items()
                    if lora_matches(n, t) and not isinstance(m, torch.nn.Linear)})
    if other:
        raise UsageError(f"lora.target_modules name layers that are not linear: {', '.join(other)}; LoRA adapts "
                         "linear layers only (attention projections, out, ffn_in, ffn_out, proj, head)")


def merge_lora_state(state: dict[str, torch.Tensor], lora: dict) -> dict[str, torch.Tensor]:
    """Fold ``W + (alpha / r) B A`` into each adapted weight and drop the adapter tensors. The merge is computed in
    float32 (a bf16 sum would round a fine-tune's small ``B A`` away at ``W``'s precision)."""
    scale = lora.get("alpha", 16) / lora.get("r", 8)
    merged = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a = state[f"{prefix}.lora_A.default.weight"]
            b = state[f"{prefix}.lora_B.default.weight"]
            merged[f"{prefix}.weight"] = value.float() + scale * (b.float() @ a.float())
        elif key.endswith(".base_layer.bias"):  # peft moves an adapted layer's bias too
            merged[key[: -len(".base_layer.bias")] + ".bias"] = value
        else:
            merged[key] = value
    return merged
