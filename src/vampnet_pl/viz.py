"""Pictures a person would rather look at than read: token maps and spectrograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def log_mel(audio: torch.Tensor, sample_rate: int, n_mels: int = 80) -> np.ndarray:
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=2048, hop_length=512, n_mels=n_mels)(audio.float())
    return torch.log10(mel.clamp_min(1e-5)).numpy()


def _mel_panel(ax, audio: torch.Tensor, sample_rate: int, title: str) -> None:
    extent = (0, audio.shape[-1] / sample_rate, 0, 80)
    ax.imshow(log_mel(audio, sample_rate), aspect="auto", origin="lower", cmap="magma", extent=extent)
    ax.set(title=title, xlabel="seconds", ylabel="mel bin")


def plot_codes_and_audio(
    codes: np.ndarray, source: torch.Tensor, decoded: torch.Tensor, sample_rate: int, frame_rate: float, title: str, path: Path
) -> Path:
    """Source spectrogram, token map (codebook x frame), token usage, and the decoded audio's spectrogram."""
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), constrained_layout=True)
    _mel_panel(axes[0], source, sample_rate, f"{title}: source audio, log-mel spectrogram")
    seconds = codes.shape[1] / frame_rate
    axes[1].imshow(codes, aspect="auto", interpolation="nearest", cmap="viridis", extent=(0, seconds, codes.shape[0] - 0.5, -0.5))
    axes[1].set(title="DAC tokens", xlabel="seconds", ylabel="codebook")
    used = [len(np.unique(row)) for row in codes]
    axes[2].bar(range(len(used)), used, color="tab:blue")
    axes[2].set(title="distinct tokens per codebook in this sample", xlabel="codebook", ylabel="distinct tokens")
    _mel_panel(axes[3], decoded, sample_rate, "the tokens decoded by the codec (a random, untrained DAC decodes to noise)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> Path:
    """Training loss against step, one line per model."""
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, alpha=0.85)
    ax.set(title="training loss (cross-entropy on masked tokens)", xlabel="step", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
