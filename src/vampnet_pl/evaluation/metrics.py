"""Audio quality metrics as torchmetrics ``Metric`` classes (their states sync across ranks).

- :class:`MelDistance`: this project's own multi-scale L1 distance between log-mel spectrograms, on
  torchaudio's default mel filters (HTK scale, not area-normalised). Not comparable with the papers'
  numbers (they use Slaney filters): see its docstring.
- :class:`DACMelDistance` / :class:`VampNetMelDistance`: audiotools' ``MelSpectrogramLoss`` in the
  configuration the DAC paper reports (DAC's ``conf/base.yml``: 7 scales, windows 32...2048,
  5...320 mels, log10 magnitude only) and the one VampNet's evaluation script used (its defaults:
  windows 2048 and 512, 150 and 80 mels, log10 of the squared magnitude plus the magnitude
  itself). Use these to set a score beside a paper's.
- :class:`FrechetAudioDistance`: Fréchet distance between the embedding statistics of a
  generated set and a reference set, in float64. Biased at small sample sizes: report the
  number of embeddings (``n_embeddings``) with it.
- :class:`KernelAudioDistance`: KAD (Chung et al. 2025), the unbiased MMD^2 estimate with a
  Gaussian RBF kernel whose bandwidth is the median pairwise distance of the reference
  embeddings, times 100 (the KAD toolkit's scale). Near 0 for one distribution; noisy at small sizes, where it
  can be well below zero.

Embedding backends are pluggable; FAD and KAD scores are only comparable within one backend.

Non-finite input (NaN or inf audio from a diverged model, or the embeddings of such audio) gives a NaN score
and a logged warning, never an exception: the training-time evaluation must not end the training.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torchmetrics import Metric

log = logging.getLogger(__name__)


def _finite(score: str, *tensors: torch.Tensor) -> bool:
    """True when every value is finite; else a logged warning that ``score`` is NaN."""
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return True
    log.warning("%s: its input has NaN or inf values (a diverged model's audio?); the score is NaN", score)
    return False


class _PerExampleDistance(Metric):
    """Mean over examples of a per-example waveform distance; subclasses give :meth:`distance`. An empty batch adds
    nothing; audio no longer than half the longest window is refused (a ValueError that says so)."""

    higher_is_better = False
    full_state_update = False
    longest_window = 0  # samples: the STFT's reflect padding needs audio longer than half of it

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def distance(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example distance of waveforms ``[B, T]`` (float64 ``[B]``)."""
        raise NotImplementedError

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        preds, target = preds.reshape(-1, preds.shape[-1]), target.reshape(-1, target.shape[-1])
        if preds.shape[0] == 0:
            return  # no examples (a rank's empty batch): nothing to add to the mean
        if preds.shape[-1] <= self.longest_window // 2:
            raise ValueError(f"{type(self).__name__} needs audio longer than {self.longest_window // 2} samples (half its "
                             f"longest window, {self.longest_window}), got {preds.shape[-1]}")
        if _finite(type(self).__name__, preds, target):
            distances = self.distance(preds, target)
        else:  # NaN for the whole set, as a mean with a NaN example is
            distances = torch.full((preds.shape[0],), math.nan, dtype=torch.float64, device=preds.device)
        self.total += distances.sum()
        self.count += distances.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()  # no examples: NaN (no value), not 0 (a perfect score)


class MelDistance(_PerExampleDistance):
    """Mean over examples of sum over scales of L1(log10 mel(pred), log10 mel(target)): this project's own score.

    The scales are DAC's (windows 32...2048, hop a quarter window, 5...320 mels, magnitude clamped at 1e-5),
    but the mel filters are torchaudio's defaults: HTK mel scale and no normalisation (``norm=None``), where
    DAC's and VampNet's audiotools loss uses librosa's Slaney scale and Slaney-normalised filters. Its values
    are therefore not comparable with the papers' and are not a fixed multiple of them: on a tone with added
    noise they were 1.2 to 1.8 times :class:`DACMelDistance` (the same code with Slaney filters equals it).
    It is kept unchanged because recorded results use it; to set a score beside a paper's, use ``mel_dac``
    (:class:`DACMelDistance`) or ``mel_vampnet`` (:class:`VampNetMelDistance`).
    """

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
        self.longest_window = max(window_lengths)

    def distance(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        total = torch.zeros(preds.shape[0], device=preds.device, dtype=torch.float64)
        for mel in self.transforms:
            a = mel(preds.float()).clamp_min(self.clamp_eps).log10()
            b = mel(target.float()).clamp_min(self.clamp_eps).log10()
            total += (a - b).abs().flatten(1).mean(1).double()
        return total


# audiotools.metrics.spectral.MelSpectrogramLoss arguments of the two papers' reports.
DAC_MEL_CONFIG = dict(n_mels=[5, 10, 20, 40, 80, 160, 320], window_lengths=[32, 64, 128, 256, 512, 1024, 2048],
                      mel_fmin=[0.0] * 7, mel_fmax=[None] * 7, pow=1.0, clamp_eps=1e-5, mag_weight=0.0, log_weight=1.0)
VAMPNET_MEL_CONFIG = dict(n_mels=[150, 80], window_lengths=[2048, 512], mel_fmin=[0.0, 0.0], mel_fmax=[None, None],
                          pow=2.0, clamp_eps=1e-5, mag_weight=1.0, log_weight=1.0)


def _per_example_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1)


class AudiotoolsMelDistance(_PerExampleDistance):
    """audiotools' ``MelSpectrogramLoss`` with ``config``, per example, averaged over examples
    (equal to the loss of the whole batch when the examples have one length)."""

    config: dict = DAC_MEL_CONFIG

    def __init__(self, sample_rate: int, **kwargs):
        super().__init__(**kwargs)
        from audiotools.metrics.spectral import MelSpectrogramLoss

        self.sample_rate = sample_rate
        self.longest_window = max(self.config["window_lengths"])
        self.loss = MelSpectrogramLoss(loss_fn=_per_example_l1, **self.config)

    def distance(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from audiotools import AudioSignal

        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        import warnings

        signal = lambda audio: AudioSignal(audio.float()[:, None, :], self.sample_rate)  # noqa: E731
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="stft_data changed shape")  # audiotools' own, harmless
            return self.loss(signal(preds), signal(target)).double()


class DACMelDistance(AudiotoolsMelDistance):
    """Mel distance as the DAC paper reports it (DAC ``conf/base.yml``'s MelSpectrogramLoss)."""

    config = DAC_MEL_CONFIG


class VampNetMelDistance(AudiotoolsMelDistance):
    """Mel distance as VampNet's evaluation script computed it (``MelSpectrogramLoss()`` defaults)."""

    config = VAMPNET_MEL_CONFIG


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), stably, in float64; NaN (with a logged
    warning) when a statistic is not finite, where ``eigh`` would raise."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if not _finite("FAD", mu1, sigma1, mu2, sigma2):
        return torch.tensor(math.nan, dtype=torch.float64, device=mu1.device)
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
        """``[B, T]`` -> ``[N, 128]`` (one row per patch; none for no audio)."""
        # 1 + T // hop frames (centred), and the centring's reflect padding needs T > n_fft / 2
        needed = max((self.patch - 1) * self.mel.hop_length, self.mel.n_fft // 2 + 1)
        if audio.shape[-1] < needed:
            raise ValueError(f"audio is shorter than one embedding patch ({audio.shape[-1]} samples, {needed} needed)")
        if audio.shape[0] == 0:
            return audio.new_zeros(0, self.dim, dtype=torch.float32)
        logmel = self.mel(audio.float()).clamp_min(1e-5).log10()  # [B, 64, frames]
        frames = logmel.shape[-1] // self.patch * self.patch
        patches = logmel[..., :frames].unfold(-1, self.patch, self.patch)  # [B, 64, n, patch]
        stats = torch.cat([patches.mean(-1), patches.std(-1)], dim=1)  # [B, 128, n]
        return stats.permute(0, 2, 1).reshape(-1, self.dim)


class VGGishEmbedding(nn.Module):
    """VGGish, the paper's FAD embedding (128-d per 0.96 s), from torch hub or a local hub checkout.

    As Google's FAD reference takes it (and the ``frechet_audio_distance`` package with ``use_pca=False,
    use_activation=False``): the last layer's raw output, without torchvggish's default PCA and 8-bit quantisation
    or its final ReLU, so that scores are on the papers' scale."""

    dim = 128

    def __init__(self, sample_rate: int, weights: str | None = None):
        super().__init__()
        try:
            self.model = (torch.hub.load(weights, "vggish", source="local") if weights
                          else torch.hub.load("harritaylor/torchvggish", "vggish"))
        except Exception as err:  # offline, or no such checkout
            raise RuntimeError(f"VGGish is not available ({type(err).__name__}: {err}); use fad_backend=logmel offline, "
                               "or give a local torchvggish checkout as fad_weights") from None
        self.model.postprocess = False  # no PCA whitening, no 8-bit quantisation
        layers = list(self.model.embeddings.children())
        if layers and isinstance(layers[-1], nn.ReLU):
            self.model.embeddings = nn.Sequential(*layers[:-1])  # the embedding before its final ReLU
        self.model.eval()
        self.sample_rate = sample_rate

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        self.model.device = next(self.model.parameters()).device  # torchvggish moves its input to this one
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
    """FAD between ``update(audio, real=True)`` and ``update(audio, real=False)`` sets. ``embed``: None where
    ``update`` is given embeddings (the metric's ``.to()`` moves an ``embed`` module with it)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor] | None, dim: int, **kwargs):
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

    def update(self, audio: torch.Tensor | None = None, real: bool = True, embeddings: torch.Tensor | None = None) -> None:
        """Add ``audio`` ``[..., samples]`` (embedded here) or its ``embeddings`` ``[n, dim]`` to one side."""
        if embeddings is None:
            if self.embed is None:
                raise ValueError(f"{type(self).__name__} was made without an embedding: give update() embeddings=")
            with torch.no_grad():
                embeddings = self.embed(audio.reshape(-1, audio.shape[-1]))
        self.update_embeddings(embeddings, real)

    def _stats(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = getattr(self, f"{side}_n")
        if n < 2:
            raise ValueError(f"FAD needs at least 2 {side} embeddings, got {int(n)}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> torch.Tensor:
        return frechet_distance(*self._stats("real"), *self._stats("fake")).float()


def median_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    return torch.pdist(x.double()).median()


def kernel_audio_distance(real: torch.Tensor, fake: torch.Tensor, bandwidth: float | None = None,
                          scale: float = 100.0) -> torch.Tensor:
    """``scale`` x the unbiased MMD^2 between embedding sets ``[n, d]`` and ``[m, d]``, Gaussian RBF kernel
    exp(-|a - b|^2 / (2 h^2)), h = ``bandwidth`` or the median pairwise distance of ``real``; in float64.
    NaN (with a logged warning) when an embedding is not finite."""
    real, fake = real.double(), fake.double()
    n, m = len(real), len(fake)
    if n < 2 or m < 2:
        raise ValueError(f"KAD needs at least 2 embeddings per side, got {n} real and {m} generated")
    if not _finite("KAD", real, fake):
        return torch.tensor(math.nan, dtype=torch.float64, device=real.device)
    h = float(median_pairwise_distance(real)) if bandwidth is None else bandwidth
    if not h > 0:
        h = 1.0  # all reference embeddings equal: any bandwidth gives 0 for the same set
    kernel = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * h * h))  # noqa: E731
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    within_real = (k_rr.sum() - k_rr.diagonal().sum()) / (n * (n - 1))
    within_fake = (k_ff.sum() - k_ff.diagonal().sum()) / (m * (m - 1))
    return scale * (within_real + within_fake - 2 * k_rf.mean())


class KernelAudioDistance(Metric):
    """KAD between ``update(audio, real=True)`` and ``update(audio, real=False)`` sets (see the module docstring).

    Keeps the embeddings (gathered across ranks), as an unbiased MMD needs every pair.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor] | None, bandwidth: float | None = None,
                 scale: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        self.embed, self.bandwidth, self.scale = embed, bandwidth, scale
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")

    def update_embeddings(self, embeddings: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(embeddings.double())

    def update(self, audio: torch.Tensor | None = None, real: bool = True, embeddings: torch.Tensor | None = None) -> None:
        """Add ``audio`` ``[..., samples]`` (embedded here) or its ``embeddings`` ``[n, dim]`` to one side."""
        if embeddings is None:
            if self.embed is None:
                raise ValueError(f"{type(self).__name__} was made without an embedding: give update() embeddings=")
            with torch.no_grad():
                embeddings = self.embed(audio.reshape(-1, audio.shape[-1]))
        self.update_embeddings(embeddings, real)

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat

        if isinstance(self.real, list) and not self.real or isinstance(self.fake, list) and not self.fake:
            raise ValueError("KAD needs embeddings on both sides")
        return kernel_audio_distance(dim_zero_cat(self.real), dim_zero_cat(self.fake), self.bandwidth, self.scale).float()
