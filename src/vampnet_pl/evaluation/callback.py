"""During training: generate under several prompt masks and score the audio (mel distance, FAD).

Every ``every_n_steps`` steps, on a fixed set of validation windows (each rank its equal share),
for each prompt preset: generate the masked tokens with the model being trained, decode with
the codec, and compare with the reference: the codec's decoding of the real tokens at full
depth (shards hold tokens, not the source audio). Two reference points come with it: the codec
reconstruction at the model's depth (the ceiling) and the noisy-token baseline (random tokens
at ratio r). Metrics are torchmetrics
objects, so the scores are gathered across ranks. A time budget skips the remaining prompts
when evaluation would stall training; the decision is rank 0's, broadcast to all.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from vampnet_pl.codec import Codec
from vampnet_pl.data.datamodule import rank_share
from vampnet_pl.evaluation.scoring import noisy_tokens, score
from vampnet_pl.masking.presets import build_prompt
from vampnet_pl.evaluation.metrics import fad_embedding
from vampnet_pl.generation.sampling import SamplingConfig, sample

log = logging.getLogger(__name__)


class PromptEvalCallback(L.Callback):
    def __init__(self, codec_source: str, prompts: list[str] = ("periodic:8", "periodic:16", "prefix:0.5", "random:0.8"),
                 every_n_steps: int = 1000, n_windows: int = 8, passes: int = 12, noisy_ratio: float = 0.5,
                 time_budget_seconds: float = 300.0, seed: int = 0, log_audio: bool = True, fad_backend: str = "logmel",
                 fad_weights: str | None = None):
        self.codec_source, self.prompts = codec_source, list(prompts)
        self.every_n_steps, self.n_windows, self.passes = every_n_steps, n_windows, passes
        self.noisy_ratio, self.time_budget, self.seed, self.log_audio = noisy_ratio, time_budget_seconds, seed, log_audio
        self.fad_backend, self.fad_weights = fad_backend, fad_weights
        self.codec: Codec | None = None
        self.embed: torch.nn.Module | None = None
        self.last_scores: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def _windows(self, trainer: L.Trainer) -> torch.Tensor:
        datamodule = trainer.datamodule
        if datamodule.val_windows is None:
            datamodule.val_dataloader()
        share = rank_share(datamodule.val_windows, trainer.global_rank, trainer.world_size)[: self.n_windows]
        if not share:
            raise ValueError("no validation windows for the evaluation callback")
        return torch.stack([torch.from_numpy(w.astype("int64")) for w in share])

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        started = time.perf_counter()
        if self.codec is None:
            self.codec = Codec.load(self.codec_source, device=str(pl_module.device))
            self.embed = fad_embedding(self.fad_backend, self.codec.sample_rate, self.fad_weights).to(pl_module.device)
        codec, model, cfg = self.codec, pl_module.model, pl_module.cfg
        full = self._windows(trainer).to(pl_module.device)  # [N, all codebooks, T]
        codes = full[:, : cfg.n_codebooks]
        reference = codec.decode(full)
        sr = codec.sample_rate
        generator = torch.Generator().manual_seed(self.seed)
        candidates: dict[str, torch.Tensor] = {
            "ceiling_codec": codes,
            f"baseline_noisy_{self.noisy_ratio}": noisy_tokens(codes, self.noisy_ratio, cfg.codebook_size,
                                                               cfg.n_conditioning_codebooks, generator),
        }
        was_training = model.training
        model.eval()
        scores: dict[str, float] = {}
        try:
            for name, tokens in list(candidates.items()) + [(spec, None) for spec in self.prompts]:
                over_budget = torch.tensor(float(time.perf_counter() - started > self.time_budget))
                if trainer.strategy.broadcast(over_budget, src=0).item():
                    log.warning("evaluation time budget of %.0f s spent: skipping %s and later prompts", self.time_budget, name)
                    break
                if tokens is None:
                    mask = self._prompt(name, codes, reference)
                    tokens = sample(model, codes, mask, SamplingConfig(passes=self.passes, seed=self.seed),
                                    cfg.n_conditioning_codebooks)
                audio = codec.decode(tokens)
                scores.update({f"eval/{name}/{k}": v for k, v in score(audio, reference, sr, self.embed).items()})
                if self.log_audio and trainer.is_global_zero:
                    self._log_media(trainer, name, audio[0], sr)
        finally:
            model.train(was_training)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(scores, step=trainer.global_step)
            self._log_table(trainer, scores)
        self.last_scores = scores
        log.info("prompt evaluation at step %d took %.1f s", trainer.global_step, time.perf_counter() - started)
        return scores

    def _prompt(self, spec: str, codes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        # beat / onset prompts are found in each window's own audio
        mask = build_prompt(spec, tuple(codes.shape), reference.cpu().numpy(), self.codec,
                            torch.Generator().manual_seed(self.seed))
        return mask.to(codes.device)

    @staticmethod
    def _log_table(trainer: L.Trainer, scores: dict[str, float]) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        names = sorted({key.split("/")[1] for key in scores})
        rows = ["| prompt | mel distance | FAD |", "|---|---|---|"]
        rows += [f"| {n} | {scores[f'eval/{n}/mel_distance']:.4f} | {scores[f'eval/{n}/fad']:.4f} |" for n in names]
        experiment.add_text("eval/table", "\n".join(rows), trainer.global_step)

    @staticmethod
    def _log_media(trainer: L.Trainer, name: str, audio: torch.Tensor, sample_rate: int) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_audio"):
            return
        import matplotlib.pyplot as plt

        from vampnet_pl.viz import log_mel

        experiment.add_audio(f"eval/{name}/audio", audio.float().cpu().clamp(-1, 1)[None], trainer.global_step, sample_rate)
        fig, ax = plt.subplots(figsize=(6, 3), constrained_layout=True)
        ax.imshow(log_mel(audio.float().cpu(), sample_rate), aspect="auto", origin="lower", cmap="magma")
        ax.set(title=name, xlabel="frame", ylabel="mel bin")
        experiment.add_figure(f"eval/{name}/spectrogram", fig, trainer.global_step)
        plt.close(fig)
