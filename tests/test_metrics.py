"""Mel distance and FAD: torchmetrics Metric classes, checked against closed forms and trends."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import on_two_ranks

from vampnet_pl.evaluation.metrics import FrechetAudioDistance, LogMelPatchEmbedding, MelDistance, frechet_distance


def tones(n: int, seconds: float = 1.0, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    freqs = 200 + 600 * torch.rand(n, 1, generator=g)
    return 0.3 * torch.sin(2 * math.pi * freqs * t)


def test_mel_distance_is_zero_for_identical_audio_and_grows_with_noise():
    audio = tones(4)
    metric = MelDistance(16000)
    assert metric.distance(audio, audio).abs().max() < 1e-9
    g = torch.Generator().manual_seed(0)
    distances = [float(metric.distance(audio + s * torch.randn(audio.shape, generator=g), audio).mean()) for s in (0.01, 0.05, 0.2)]
    assert distances[0] < distances[1] < distances[2]
    metric.update(audio, audio)
    metric.update(audio + 0.2 * torch.randn(audio.shape, generator=g), audio)
    assert float(metric.compute()) == pytest.approx(distances[2] / 2, rel=0.1)
    with pytest.raises(ValueError, match="differ"):
        metric.distance(audio, audio[:, :-1])


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    d = 4
    mu1, mu2 = torch.zeros(d), torch.arange(d).double()
    s1, s2 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.diag(torch.tensor([4.0, 1.0, 9.0, 1.0]))
    expected = float((mu1 - mu2).square().sum() + ((s1.diagonal().sqrt() - s2.diagonal().sqrt()) ** 2).sum())
    assert float(frechet_distance(mu1, s1, mu2, s2)) == pytest.approx(expected, rel=1e-9)


def test_fad_from_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    fad = FrechetAudioDistance(embed=lambda x: x, dim=3)
    real = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0])
    fad.update_embeddings(real, real=True)
    fad.update_embeddings(fake, real=False)
    expected = 1.0 + 3 * (1 - 2) ** 2  # ||mu||^2 + sum (1 - 2)^2
    assert float(fad.compute()) == pytest.approx(expected, rel=0.05)


def test_fad_of_a_set_with_itself_is_zero_and_grows_with_noise():
    audio = tones(16, seconds=2.0)
    embed = LogMelPatchEmbedding(16000)
    scores = []
    g = torch.Generator().manual_seed(1)
    for noise in (0.0, 0.01, 0.05, 0.2):
        fad = FrechetAudioDistance(embed=embed, dim=embed.dim)
        fad.update(audio, real=True)
        fad.update(audio + noise * torch.randn(audio.shape, generator=g), real=False)
        scores.append(float(fad.compute()))
    assert abs(scores[0]) < 1e-3
    assert scores[0] < scores[1] < scores[2] < scores[3]


def test_fad_needs_two_embeddings_per_side():
    fad = FrechetAudioDistance(embed=lambda x: x, dim=2)
    fad.update_embeddings(torch.zeros(1, 2), real=True)
    with pytest.raises(ValueError, match="at least 2 real"):
        fad.compute()


def test_fad_backends_by_name_and_clear_errors_offline(monkeypatch):
    from vampnet_pl.evaluation.metrics import fad_embedding

    assert isinstance(fad_embedding("logmel", 16000), LogMelPatchEmbedding)
    with pytest.raises(ValueError, match="unknown FAD backend"):
        fad_embedding("openl3", 16000)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match="VGGish is not available"):
        fad_embedding("vggish", 16000)
    with pytest.raises(RuntimeError, match="CLAP is not available"):
        fad_embedding("clap", 16000)



HUBCONF = """
import numpy as np
import torch
from torch import nn


class StandIn(nn.Module):  # torchvggish's VGGish: embeddings ending in a ReLU, PCA + 8-bit postprocessing on
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.postprocess = True
        self.embeddings = nn.Sequential(nn.Linear(4, 128), nn.ReLU(True))

    def forward(self, x, fs):
        patches = torch.from_numpy(np.asarray(x, dtype=np.float32)[: len(x) // 15360 * 15360]).reshape(-1, 15360)
        out = self.embeddings(patches[:, :4] * 100)
        return torch.clamp(out * 20, 0, 255).round() if self.postprocess else out


def vggish():
    return StandIn()
"""


def test_vggish_embeds_as_the_fad_reference_does_without_pca_quantisation_or_final_relu(tmp_path):
    """torchvggish's defaults (PCA, 8-bit quantisation, a final ReLU) put FAD off the papers' scale."""
    from vampnet_pl.evaluation.metrics import fad_embedding

    (tmp_path / "hubconf.py").write_text(HUBCONF)
    embed = fad_embedding("vggish", 16000, str(tmp_path))
    out = embed(torch.randn(2, 16000 * 2))
    assert out.shape == (4, 128)
    assert (out < 0).any() and not torch.equal(out, out.round())

def test_dac_and_vampnet_mel_configurations_equal_audiotools_mel_spectrogram_loss():
    from audiotools import AudioSignal
    from audiotools.metrics.spectral import MelSpectrogramLoss

    from vampnet_pl.evaluation.metrics import DACMelDistance, VampNetMelDistance

    generator = torch.Generator().manual_seed(0)
    target = 0.1 * torch.randn(3, 16000, generator=generator)
    preds = target + 0.05 * torch.randn(3, 16000, generator=generator)
    # DAC's conf/base.yml MelSpectrogramLoss settings, and VampNet's evaluation (the defaults), written out here.
    dac = MelSpectrogramLoss(n_mels=[5, 10, 20, 40, 80, 160, 320], window_lengths=[32, 64, 128, 256, 512, 1024, 2048],
                             mel_fmin=[0.0] * 7, mel_fmax=[None] * 7, pow=1.0, clamp_eps=1e-5, mag_weight=0.0)
    for metric, reference in ((DACMelDistance(16000), dac), (VampNetMelDistance(16000), MelSpectrogramLoss())):
        metric.update(preds[:2], target[:2])
        metric.update(preds[2:], target[2:])  # accumulates over batches
        expected = reference(AudioSignal(preds[:, None], 16000), AudioSignal(target[:, None], 16000))
        assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-4)
    assert float(DACMelDistance(16000).distance(target, target).max()) == 0.0


def test_kad_is_unbiased_near_zero_for_one_distribution_and_grows_with_noise():
    from vampnet_pl.evaluation.metrics import KernelAudioDistance, kernel_audio_distance

    generator = torch.Generator().manual_seed(0)
    draw = lambda: torch.randn(64, 8, generator=generator, dtype=torch.float64)  # noqa: E731
    same = torch.stack([kernel_audio_distance(draw(), draw()) for _ in range(40)])
    assert (same < 0).any() and (same > 0).any()  # unbiased: scattered around 0, not clamped
    assert abs(float(same.mean())) < 3 * float(same.std()) / 40**0.5 + 1e-3
    real = draw()
    growing = [float(kernel_audio_distance(real, draw() + shift)) for shift in (0.0, 0.3, 1.0, 3.0)]
    assert growing == sorted(growing) and growing[-1] > 50 * abs(float(same.mean())) + 1
    # The Metric: embeddings of both sides, bandwidth from the reference's median pairwise distance.
    metric = KernelAudioDistance(embed=lambda audio: audio)
    metric.update(real[:32], real=True)
    metric.update(real[32:], real=True)
    metric.update(embeddings=real + 1.0, real=False)
    assert float(metric.compute()) == pytest.approx(float(kernel_audio_distance(real, real + 1.0)), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_audio_distance(real[:1], real)


def test_score_reports_every_distance_and_its_embedding_count():
    from vampnet_pl.evaluation.metrics import fad_embedding
    from vampnet_pl.evaluation.scoring import SCORES, score

    generator = torch.Generator().manual_seed(0)
    reference = 0.1 * torch.randn(3, 32000, generator=generator)
    noisy = reference + 0.1 * torch.randn(3, 32000, generator=generator)
    embed = fad_embedding("logmel", 16000)
    same, other = score(reference, reference, 16000, embed), score(noisy, reference, 16000, embed)
    assert tuple(same) == SCORES and same["n_embeddings"] == 6  # 3 clips x two 0.96 s patches
    assert all(same[k] < 1e-5 for k in ("mel", "mel_dac", "mel_vampnet", "fad"))
    assert all(other[k] > same[k] for k in ("mel", "mel_dac", "mel_vampnet", "fad", "kad"))


def _score_rank(rank: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as dist

    from vampnet_pl.evaluation.metrics import fad_embedding
    from vampnet_pl.evaluation.scoring import score

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(rank)
        reference = 0.1 * torch.randn(1 + 2 * rank, 16000, generator=generator)  # rank 0: 1 clip, rank 1: 3
        results[rank] = score(reference + 0.05 * torch.randn_like(reference), reference, 16000,
                              fad_embedding("logmel", 16000))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_the_embedding_count_covers_every_rank_as_the_scores_do():
    """torchmetrics pools FAD and KAD over the ranks; the count reported with them counted one rank's."""
    results = on_two_ranks(_score_rank)
    assert results[0]["n_embeddings"] == results[1]["n_embeddings"] == 4  # 1 + 3 clips of one 0.96 s patch
    assert results[0]["fad"] == pytest.approx(results[1]["fad"])


def test_non_finite_audio_gives_nan_scores_and_a_warning_not_an_exception(caplog):
    """A diverged model decodes NaN audio; eigh raised on its FAD statistics, inside the training-time callback."""
    from vampnet_pl.evaluation.metrics import DACMelDistance, fad_embedding, kernel_audio_distance
    from vampnet_pl.evaluation.scoring import score

    generator = torch.Generator().manual_seed(0)
    reference = 0.1 * torch.randn(3, 32000, generator=generator)
    partly, inf = reference.clone(), reference.clone()
    partly[1, 5000:6000] = float("nan")
    inf[0, 10] = float("inf")
    for audio in (partly, torch.full_like(reference, float("nan")), inf):
        caplog.clear()
        scores = score(audio, reference, 16000, fad_embedding("logmel", 16000))
        assert all(math.isnan(scores[k]) for k in ("mel", "mel_dac", "mel_vampnet", "fad", "kad"))
        assert scores["n_embeddings"] == 6
        warned = caplog.text
        assert all(f"{name}: its input has NaN or inf values" in warned
                   for name in ("MelDistance", "DACMelDistance", "VampNetMelDistance", "FAD", "KAD"))
    nan = torch.tensor(float("nan"))
    eye = torch.eye(3, dtype=torch.float64)
    assert math.isnan(float(frechet_distance(torch.zeros(3), eye, torch.zeros(3), eye * nan)))
    real = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    assert math.isnan(float(kernel_audio_distance(real, real.clone().fill_(math.inf))))
    mel = DACMelDistance(16000)
    mel.update(reference, reference)
    assert float(mel.compute()) == 0.0  # finite audio: unchanged


def test_mel_distance_uses_htk_filters_and_is_documented_as_not_the_papers_scale():
    """MelDistance stays as recorded results computed it; its docs must not call it close to DAC's numbers."""
    import torchaudio

    from vampnet_pl.evaluation import metrics
    from vampnet_pl.evaluation.metrics import DACMelDistance

    sr = 16000
    reference = tones(2)
    noisy = reference + 0.01 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))
    ours, dac = MelDistance(sr), DACMelDistance(sr)
    ours.update(noisy, reference)
    dac.update(noisy, reference)
    slaney = MelDistance(sr)  # the same computation on Slaney filters is DAC's configuration
    slaney.transforms = torch.nn.ModuleList(
        torchaudio.transforms.MelSpectrogram(sr, n_fft=w, win_length=w, hop_length=w // 4, n_mels=m, power=1.0,
                                             f_min=0.0, f_max=sr / 2, norm="slaney", mel_scale="slaney")
        for w, m in zip((32, 64, 128, 256, 512, 1024, 2048), (5, 10, 20, 40, 80, 160, 320)))
    slaney.update(noisy, reference)
    assert float(slaney.compute()) == pytest.approx(float(dac.compute()), rel=1e-3)
    assert float(ours.compute()) > 1.15 * float(dac.compute())  # HTK, unnormalised: well off the papers' scale
    assert all(t.mel_scale.mel_scale == "htk" and t.mel_scale.norm is None for t in ours.transforms)
    docs = metrics.__doc__ + MelDistance.__doc__
    assert "close to" not in docs and "not comparable" in docs and "mel_dac" in MelDistance.__doc__


def test_a_mel_distance_of_no_examples_is_nan_not_a_perfect_score():
    import warnings

    from vampnet_pl.evaluation.metrics import MelDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns of compute before update
        assert math.isnan(MelDistance(sample_rate=16000).compute().item())


@pytest.mark.parametrize("name", ["MelDistance", "DACMelDistance", "VampNetMelDistance"])
def test_mel_distances_add_nothing_for_an_empty_batch_and_refuse_audio_too_short_clearly(name):
    """An empty batch (a rank with no example left) crashed inside torch's padding; so did audio no longer than half
    the longest window (2048 samples), with a message about padding sizes."""
    from vampnet_pl.evaluation import metrics

    audio = tones(2)
    alone, with_empty = getattr(metrics, name)(16000), getattr(metrics, name)(16000)
    alone.update(audio, audio.flip(0))
    with_empty.update(torch.zeros(0, 16000), torch.zeros(0, 16000))
    with_empty.update(audio, audio.flip(0))
    assert with_empty.count == 2 and float(with_empty.compute()) == float(alone.compute())
    with pytest.raises(ValueError, match=f"{name} needs audio longer than 1024 samples .* got 1024"):
        getattr(metrics, name)(16000).update(audio[:, :1024], audio[:, :1024])
    getattr(metrics, name)(16000).update(audio[:, :1025], audio[:, :1025])  # the shortest it takes


@pytest.mark.parametrize("samples", [512, 41894])
def test_windows_too_short_for_the_logmel_embedding_get_the_fix_not_a_padding_error(samples):
    """A window of one codec frame (512 samples at 44.1 kHz) crashed in the STFT's padding before the embedding's
    own check, so the start-up check raised a RuntimeError instead of its message that says what to raise."""
    from vampnet_pl.evaluation.scoring import check_embedding_count

    embed = LogMelPatchEmbedding(44100)
    with pytest.raises(ValueError, match=rf"too short for the FAD embedding \(audio is shorter than one embedding "
                                         rf"patch \({samples} samples, 41895 needed\)\): raise window_seconds"):
        check_embedding_count(embed, 8, samples, 44100, "raise window_seconds")
    assert check_embedding_count(embed, 2, 41895, 44100, "raise window_seconds") == 2


def test_an_empty_batch_adds_no_embedding():
    audio = tones(3)
    fad_alone, fad = FrechetAudioDistance(LogMelPatchEmbedding(16000), 128), FrechetAudioDistance(LogMelPatchEmbedding(16000), 128)
    for metric in (fad_alone, fad):
        metric.update(audio, real=True)
        metric.update(audio.flip(0) + 0.01, real=False)
    fad.update(torch.zeros(0, 16000), real=False)
    assert fad.fake_n == 3 and float(fad.compute()) == float(fad_alone.compute())


def test_score_leaves_the_embedding_where_it_is():
    """The eval app and callback put the embedding on the GPU while decoded audio is on the CPU: scoring must
    run the embedding there, not move it to the audio's device for every later score."""
    from vampnet_pl.evaluation.metrics import fad_embedding
    from vampnet_pl.evaluation.scoring import score

    class Pinned(LogMelPatchEmbedding):
        def _apply(self, fn, recurse=True):  # every .to()/.cpu()/.cuda() goes through here
            raise AssertionError("the embedding was moved")

    generator = torch.Generator().manual_seed(0)
    reference = 0.1 * torch.randn(3, 32000, generator=generator)
    noisy = reference + 0.1 * torch.randn(3, 32000, generator=generator)
    assert score(noisy, reference, 16000, Pinned(16000)) == score(noisy, reference, 16000, fad_embedding("logmel", 16000))
    with pytest.raises(ValueError, match="without an embedding"):
        FrechetAudioDistance(None, 3).update(torch.zeros(2, 3))
