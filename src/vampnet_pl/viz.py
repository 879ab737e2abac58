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


def plot_codes_and_audio(codes: np.ndarray, audio: torch.Tensor, sample_rate: int, frame_rate: float, title: str, path: Path) -> Path:
    """Token map (codebook x frame), per-codebook token usage, and the decoded audio's mel spectrogram."""
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), constrained_layout=True)
    seconds = codes.shape[1] / frame_rate
    axes[0].imshow(codes, aspect="auto", interpolation="nearest", cmap="viridis", extent=(0, seconds, codes.shape[0] - 0.5, -0.5))
    axes[0].set(title=f"{title}: DAC tokens", xlabel="seconds", ylabel="codebook")
    used = [len(np.unique(row)) for row in codes]
    axes[1].bar(range(len(used)), used, color="tab:blue")
    axes[1].set(title="distinct tokens per codebook in this sample", xlabel="codebook", ylabel="distinct tokens")
    axes[2].imshow(log_mel(audio, sample_rate), aspect="auto", origin="lower", cmap="magma", extent=(0, audio.shape[-1] / sample_rate, 0, 80))
    axes[2].set(title="decoded audio: log-mel spectrogram", xlabel="seconds", ylabel="mel bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
