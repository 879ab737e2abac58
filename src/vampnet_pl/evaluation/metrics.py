"""Audio quality metrics as torchmetrics ``Metric`` classes (their states sync across ranks).

- :class:`MelDistance`: multi-scale L1 distance between log-mel spectrograms (as in DAC and
  VampNet's evaluation), built on torchaudio transforms.
- :class:`FrechetAudioDistance`: Fréchet distance between the embedding statistics of a
  generated set and a reference set, in float64. Embedding backends are pluggable; scores are
  only comparable within one backend.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchmetrics import Metric


class MelDistance(Metric):
    """Mean over examples of sum over scales of L1(log10 mel(pred), log10 mel(target))."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, sample_rate: int, window_lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
                 n_mels: Sequence[int] = (5, 10, 20, 40, 80, 160, 320), clamp_eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        import torchaudio

        self.transforms = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=w, win_length=w, hop_length=w // 4, n_mels=m,
                                                 power=1.0, f_min=0.0, f_max=sample_rate / 2)
            for w, m in zip(window_lengths, n_mels)
        )
        self.clamp_eps = clamp_eps
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def distance(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example distance of waveforms ``[B, T]``."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        total = torch.zeros(preds.shape[0], device=preds.device, dtype=torch.float64)
        for mel in self.transforms:
            a = mel(preds.float()).clamp_min(self.clamp_eps).log10()
            b = mel(target.float()).clamp_min(self.clamp_eps).log10()
            total += (a - b).abs().flatten(1).mean(1).double()
        return total

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        distances = self.distance(preds.reshape(-1, preds.shape[-1]), target.reshape(-1, target.shape[-1]))
        self.total += distances.sum()
        self.count += distances.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), stably, in float64."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return distance.clamp_min(0)  # rounding can leave -1e-8 for identical sets


class LogMelPatchEmbedding(nn.Module):
    """Offline default embedding (no download): mean and std of 64-band log-mel frames over ~1 s patches.

    It is not a learned audio model: FAD with it measures spectral statistics only, and its
    scores are not comparable with VGGish or CLAP scores.
    """

    dim = 128

    def __init__(self, sample_rate: int, patch_seconds: float = 0.96):
        super().__init__()
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1024, hop_length=sample_rate // 100, n_mels=64)
        self.patch = max(1, int(patch_seconds * 100))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` -> ``[N, 128]`` (one row per patch)."""
        logmel = self.mel(audio.float()).clamp_min(1e-5).log10()  # [B, 64, frames]
        frames = logmel.shape[-1] // self.patch * self.patch
        if frames == 0:
            raise ValueError("audio is shorter than one embedding patch")
        patches = logmel[..., :frames].unfold(-1, self.patch, self.patch)  # [B, 64, n, patch]
        stats = torch.cat([patches.mean(-1), patches.std(-1)], dim=1)  # [B, 128, n]
        return stats.permute(0, 2, 1).reshape(-1, self.dim)


class VGGishEmbedding(nn.Module):
    """VGGish, the paper's FAD embedding (128-d per 0.96 s), from torch hub or a local hub checkout."""

    dim = 128

    def __init__(self, sample_rate: int, weights: str | None = None):
        super().__init__()
        try:
            self.model = (torch.hub.load(weights, "vggish", source="local") if weights
                          else torch.hub.load("harritaylor/torchvggish", "vggish"))
        except Exception as err:  # offline, or no such checkout
            raise RuntimeError(f"VGGish is not available ({type(err).__name__}: {err}); use fad_backend=logmel offline, "
                               "or give a local torchvggish checkout as fad_weights") from None
        self.model.eval()
        self.sample_rate = sample_rate

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.forward(a.cpu().numpy(), self.sample_rate).reshape(-1, self.dim) for a in audio])


class CLAPEmbedding(nn.Module):
    """LAION-CLAP audio embeddings (512-d per clip), when the ``laion_clap`` package and its weights are there."""

    dim = 512

    def __init__(self, sample_rate: int, weights: str | None = None):
        super().__init__()
        try:
            import laion_clap

            self.model = laion_clap.CLAP_Module(enable_fusion=False)
            self.model.load_ckpt(weights) if weights else self.model.load_ckpt()
        except Exception as err:
            raise RuntimeError(f"CLAP is not available ({type(err).__name__}: {err}); pip install laion_clap and "
                               "give its checkpoint as fad_weights, or use fad_backend=logmel") from None
        self.sample_rate = sample_rate

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        import torchaudio

        audio_48k = torchaudio.functional.resample(audio.float().cpu(), self.sample_rate, 48000)
        return self.model.get_audio_embedding_from_data(x=audio_48k, use_tensor=True)


EMBEDDINGS = {"logmel": LogMelPatchEmbedding, "vggish": VGGishEmbedding, "clap": CLAPEmbedding}


def fad_embedding(name: str, sample_rate: int, weights: str | None = None) -> nn.Module:
    """An FAD embedding backend by name: ``logmel`` (offline default), ``vggish``, ``clap``."""
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown FAD backend {name!r}; use one of {sorted(EMBEDDINGS)}")
    if name == "logmel":
        return LogMelPatchEmbedding(sample_rate)
    return EMBEDDINGS[name](sample_rate, weights)


class FrechetAudioDistance(Metric):
    """FAD between ``update(audio, real=True)`` and ``update(audio, real=False)`` sets."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], dim: int, **kwargs):
        super().__init__(**kwargs)
        self.embed = embed
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update_embeddings(self, embeddings: torch.Tensor, real: bool) -> None:
        side = "real" if real else "fake"
        e = embeddings.double()
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + e.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + e.T @ e)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + e.shape[0])

    def update(self, audio: torch.Tensor, real: bool) -> None:
        with torch.no_grad():
            self.update_embeddings(self.embed(audio.reshape(-1, audio.shape[-1])), real)

    def _stats(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = getattr(self, f"{side}_n")
        if n < 2:
            raise ValueError(f"FAD needs at least 2 {side} embeddings, got {int(n)}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> torch.Tensor:
        return frechet_distance(*self._stats("real"), *self._stats("fake")).float()
