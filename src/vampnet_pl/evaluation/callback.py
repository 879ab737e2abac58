"""During training: the evaluation protocol's generation scores (see ``evaluation.protocol``).

Every ``every_n_steps`` steps, on the first ``n_windows`` validation windows (shared out over the ranks;
each window with its own random streams, so the scores do not depend on the number of ranks),
for each protocol prompt: generate the masked tokens with the model being trained at the
protocol's passes, decode with the codec, and compare with the reference: the codec's decoding
of the real tokens at full depth (shards hold tokens, not the source audio); then quality
against passes. Two reference points come with it: the codec reconstruction at the model's
depth (``ceiling_codec``) and the noisy-token baseline (``baseline_noisy``, random tokens at
``noisy_ratio``). Logged as ``gen/<score>/<condition>`` with the protocol id as a hyperparameter
of the run (tables, audio and spectrograms under ``media/``). A time budget skips the remaining conditions when evaluation would stall training;
the decision is rank 0's, broadcast to all.
"""

from __future__ import annotations

import logging
import time
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vampnet_pl.codec import Codec
from vampnet_pl.config import check_prompt_presets
from vampnet_pl.evaluation.metrics import fad_embedding
from vampnet_pl.evaluation.protocol import evaluate_generation, preset_jobs, protocol_jobs, rows_to_metrics
from vampnet_pl.evaluation.scoring import check_embedding_count, noisy_tokens
from vampnet_pl.generation.sampling import SamplingConfig, example_generators, sample
from vampnet_pl.masking.protocol import EvalProtocolConfig
from vampnet_pl.training.callbacks import LogPoints, log_step
from vampnet_pl.training.slurm import requeue_pending
from vampnet_pl.utils.checks import check_fraction

log = logging.getLogger(__name__)


def as_protocol(protocol) -> EvalProtocolConfig:
    if isinstance(protocol, EvalProtocolConfig):
        return protocol
    if isinstance(protocol, DictConfig):
        protocol = OmegaConf.to_container(protocol, resolve=True)
    return EvalProtocolConfig(**(protocol or {}))


class PromptEvalCallback(L.Callback):
    def __init__(self, codec_source: str, protocol: EvalProtocolConfig | dict | None = None, every_n_steps: int = 1000,
                 n_windows: int | None = None, noisy_ratio: float = 0.5, time_budget_seconds: float = 300.0,
                 seed: int = 0, log_audio: bool = True, fad_backend: str = "logmel", fad_weights: str | None = None,
                 prompts: list[str] | None = None):
        self.codec_source, self.protocol = codec_source, as_protocol(protocol)
        self.prompts = list(prompts or [])  # extra presets beside the protocol's (``beat`` ...), per window
        check_prompt_presets(self.prompts, "callbacks.prompt_eval.prompts")  # now, not at its first evaluation
        self.every_n_steps = every_n_steps
        self.n_windows = n_windows or self.protocol.gen_windows
        check_fraction(noisy_ratio, "callbacks.prompt_eval.noisy_ratio")
        self.noisy_ratio, self.time_budget, self.seed, self.log_audio = noisy_ratio, time_budget_seconds, seed, log_audio
        self.fad_backend, self.fad_weights = fad_backend, fad_weights
        self.codec: Codec | None = None
        self.embed: torch.nn.Module | None = None
        self.last_scores: dict[str, float] = {}
        self.last_rows: list[dict] = []
        self.steps = LogPoints()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps.start(trainer)
        self.check_windows(trainer, pl_module)

    def _load(self, device: torch.device) -> None:
        if self.codec is None:
            self.codec = Codec.load(self.codec_source, device=str(device))
            self.embed = fad_embedding(self.fad_backend, self.codec.sample_rate, self.fad_weights).to(device)

    def check_windows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before the first step, windows that the first evaluation could not score: too few for the ranks,
        or too short or too few for two FAD embeddings per side (that evaluation would end the run)."""
        self._load(pl_module.device)
        windows, _ = self._windows(trainer)
        n_windows = min(self.n_windows, len(trainer.datamodule.val_windows))
        check_embedding_count(self.embed, n_windows, windows.shape[-1] * self.codec.hop_length, self.codec.sample_rate,
                              "raise callbacks.prompt_eval.n_windows or data.window_seconds", pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # at the batch that completes the step, once (the other micro-batches of an accumulation keep its number)
        if self.steps.stepped(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def _windows(self, trainer: L.Trainer) -> tuple[torch.Tensor, list[int]]:
        """This rank's share of the first ``n_windows`` validation windows, with their ids: the same windows, each
        with the same random streams, whatever the number of ranks."""
        datamodule = trainer.datamodule
        if datamodule.val_windows is None:
            datamodule.val_dataloader()
        chosen = datamodule.val_windows[: self.n_windows]
        if len(chosen) < trainer.world_size:
            raise ValueError(f"{len(chosen)} validation windows for the evaluation callback cannot give each of "
                             f"{trainer.world_size} ranks one: raise n_windows or add validation data")
        ids = list(range(len(chosen)))[trainer.global_rank :: trainer.world_size]
        return torch.stack([torch.from_numpy(chosen[i].astype("int64")) for i in ids]), ids

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        started = time.perf_counter()
        self._load(pl_module.device)
        codec, model, cfg = self.codec, pl_module.model, pl_module.cfg
        full, ids = self._windows(trainer)  # [N, all codebooks, T]
        full = full.to(pl_module.device)
        depth = cfg.n_codebooks

        def generate(codes: torch.Tensor, mask: torch.Tensor, passes: int, ids: list[int]) -> torch.Tensor:
            return sample(model, codes[:, :depth], mask, SamplingConfig(passes=passes, seed=self.seed),
                          cfg.n_conditioning_codebooks, example_generators(self.seed, ids, codes.device))

        def noisy(codes: torch.Tensor, ids: list[int]) -> torch.Tensor:
            streams = example_generators(self.seed, ids, "cpu", "noisy")
            return noisy_tokens(codes[:, :depth], self.noisy_ratio, cfg.codebook_size, cfg.n_conditioning_codebooks,
                                streams)

        jobs = [("ceiling_codec", None, lambda codes, ids: codes[:, :depth]), ("baseline_noisy", None, noisy)]
        jobs += protocol_jobs(self.protocol, lambda codes: (codes.shape[0], depth, codes.shape[-1]),
                              cfg.n_conditioning_codebooks, generate)
        jobs += self.preset_jobs(generate, cfg.n_conditioning_codebooks, depth)

        def over_budget(name: str) -> bool:  # rank 0 decides for all
            reason = 2.0 if requeue_pending(trainer) else float(time.perf_counter() - started > self.time_budget)
            reason = trainer.strategy.broadcast(torch.tensor(reason), src=0).item()
            if reason == 1:
                log.warning("evaluation time budget of %.0f s spent: skipping %s and later conditions", self.time_budget, name)
            elif reason == 2:  # the signal comes a short grace before the kill (SIGTERM: KillWait): checkpoint first
                log.warning("a requeue signal or SIGTERM came: skipping %s and later conditions", name)
            return reason > 0

        def media(name: str, audio: torch.Tensor) -> None:
            if self.log_audio and trainer.is_global_zero:
                self._log_media(trainer, name, audio[0], codec.sample_rate)

        was_training = model.training
        model.eval()
        try:
            rows = evaluate_generation(self.protocol, full, jobs, codec.decode, codec.sample_rate, self.embed,
                                       window_ids=ids, should_stop=over_budget, on_audio=media)
        finally:
            model.train(was_training)
        scores = rows_to_metrics(rows)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(scores, step=log_step(trainer))
            self._log_table(trainer, rows)
        self.last_scores, self.last_rows = scores, rows
        log.info("protocol %s generation evaluation at step %d took %.1f s", self.protocol.id, trainer.global_step,
                 time.perf_counter() - started)
        return scores

    def preset_jobs(self, generate, n_conditioning: int, depth: int) -> list:
        """The extra presets' jobs; beat / onset prompts come from each window's own (full-depth) audio."""
        def generate_prompted(codes: torch.Tensor, mask: torch.Tensor, passes: int, ids: list[int]) -> torch.Tensor:
            mask[:, :n_conditioning] = False
            return generate(codes, mask, passes, ids)

        return preset_jobs(self.prompts, lambda codes: (codes.shape[0], depth, codes.shape[-1]), self.codec.decode,
                           self.codec, self.seed, generate_prompted, self.protocol.passes)

    @staticmethod
    def _log_table(trainer: L.Trainer, rows: list[dict]) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        lines = ["| protocol | condition | passes | mel | mel (DAC) | FAD | KAD | embeddings |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['protocol']} | {r['prompt']} | {r['coarse_passes']} | {r['mel']:.4f} | {r['mel_dac']:.4f} | "
                  f"{r['fad']:.4f} | {r['kad']:.4f} | {r['n_embeddings']} |" for r in rows]
        experiment.add_text("media/gen_table", "\n".join(lines), trainer.global_step)

    @staticmethod
    def _log_media(trainer: L.Trainer, name: str, audio: torch.Tensor, sample_rate: int) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_audio"):
            return
        import matplotlib.pyplot as plt

        from vampnet_pl.viz import log_mel

        experiment.add_audio(f"media/{name}/audio", audio.float().cpu().clamp(-1, 1)[None], trainer.global_step, sample_rate)
        fig, ax = plt.subplots(figsize=(6, 3), constrained_layout=True)
        ax.imshow(log_mel(audio.float().cpu(), sample_rate), aspect="auto", origin="lower", cmap="magma")
        ax.set(title=name, xlabel="frame", ylabel="mel bin")
        experiment.add_figure(f"media/{name}/spectrogram", fig, trainer.global_step)
        plt.close(fig)
