"""The DAC wrapper: loading, facts, fingerprint, encode/decode in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vampnet_pl.codec import Codec, SyntheticCodecSpec, make_synthetic_codec


def test_synthetic_codec_saves_and_loads_like_a_dac_checkpoint(codec_path, codec):
    import dac

    direct = dac.DAC.load(str(codec_path))  # the real loading path, no wrapper
    assert direct.n_codebooks == codec.n_codebooks == 14
    assert codec.hop_length == 512 and codec.sample_rate == 44100
    assert codec.codebook_size == 1024
    assert codec.frame_rate == pytest.approx(44100 / 512)
    assert Codec.load(str(codec_path), device="cpu").fingerprint == codec.fingerprint


def test_fingerprint_changes_with_weights_and_config(tmp_path, codec):
    other_seed = make_synthetic_codec(tmp_path / "a.pth", SyntheticCodecSpec(seed=123))
    other_size = make_synthetic_codec(tmp_path / "b.pth", SyntheticCodecSpec(n_codebooks=9))
    fingerprints = {codec.fingerprint, Codec.load(str(other_seed)).fingerprint, Codec.load(str(other_size)).fingerprint}
    assert len(fingerprints) == 3
    assert Codec.load(str(other_size)).n_codebooks == 9


def test_pretrained_names_go_through_dac_download(monkeypatch, codec_path):
    import dac.utils

    asked = []

    def fake_download(model_type="44khz", **_):
        asked.append(model_type)
        return codec_path

    monkeypatch.setattr(dac.utils, "download", fake_download)
    loaded = Codec.load("44khz", device="cpu")
    assert asked == ["44khz"] and loaded.n_codebooks == 14


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="codec checkpoint not found"):
        Codec.load(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 96000])
def test_encode_resamples_to_codec_rate_and_returns_uint16(codec, rate):
    seconds = 1.5
    codes = codec.encode(torch.randn(int(seconds * rate)) * 0.1, rate)
    assert codes.dtype == torch.uint16
    assert codes.shape[0] == 14
    assert codes.shape[1] == pytest.approx(seconds * codec.frame_rate, abs=1)
    assert int(codes.to(torch.int32).max()) < codec.codebook_size


def test_chunked_encoding_matches_whole_encoding(codec_path):
    whole = Codec.load(str(codec_path), device="cpu", chunk_seconds=60)
    chunked = Codec.load(str(codec_path), device="cpu", chunk_seconds=0.5, context_frames=32)
    audio = torch.randn(44100 * 3) * 0.2
    a, b = whole.encode(audio, 44100), chunked.encode(audio, 44100)
    assert a.shape == b.shape
    assert (a == b).float().mean() > 0.99


def test_batched_encode_matches_single(codec):
    batch = torch.randn(3, 22050) * 0.2
    together = codec.encode(batch, 44100)
    alone = torch.stack([codec.encode(x, 44100) for x in batch])
    assert together.shape == (3, 14, 44)
    assert torch.equal(together, alone)


def test_decode_returns_waveform_of_whole_frames(codec):
    codes = codec.encode(torch.randn(44100) * 0.2, 44100)
    audio = codec.decode(codes)
    assert audio.shape == (codes.shape[-1] * codec.hop_length,)
    assert torch.isfinite(audio).all()
    coarse_only = codec.decode(codes[:4].numpy())
    assert coarse_only.shape == audio.shape


def test_batched_decode_equals_one_signal_at_a_time(codec):
    codes = torch.randint(0, 1024, (2, 3, 14, 20))  # any leading shape; on the CPU decoded signal by signal
    audio = codec.decode(codes)
    assert audio.shape == (2, 3, 20 * codec.hop_length)
    torch.testing.assert_close(audio[1, 2], codec.decode(codes[1, 2]))
    torch.testing.assert_close(audio[0, 1], codec.decode(codes[0, 1]))
    assert not torch.equal(audio[0, 0], audio[0, 1])


def test_codebook_tables_are_the_projected_quantizer_codebooks(codec):
    tables = codec.codebook_tables()
    assert tables.shape == (14, 1024, codec.model.latent_dim)
    codes = torch.tensor([[[5, 7]]]).repeat(1, 14, 1)  # [1, 14, 2]
    latent, _, _ = codec.model.quantizer.from_codes(codes)
    summed = tables[torch.arange(14), 5].sum(0)
    assert torch.allclose(latent[0, :, 0], summed, atol=1e-4)


def test_empty_waveform_is_refused(codec):
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros(0, np.float32), 44100)


def test_a_file_missing_codec_weights_is_refused(tmp_path, codec_path):
    """audiotools' ``DAC.load`` is not strict: weights the file lacks would stay random (a new codec every load)."""
    payload = torch.load(codec_path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("decoder.")}
    torch.save(payload, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth is not a complete DAC checkpoint: it lacks \d+ of the codec's"):
        Codec.load(str(tmp_path / "partial.pth"), device="cpu")
    vampnet_model = Path(__file__).parent / "fixtures" / "vampnet_original" / "coarse.pth"  # audiotools-saved, no codec weights
    with pytest.raises(ValueError, match="is not a complete DAC checkpoint"):
        Codec.load(str(vampnet_model), device="cpu")


def test_files_that_are_no_codec_are_clear_errors(tmp_path, codec_path):
    from vampnet_pl.model import VampNet, VampNetConfig, save_exported

    data = codec_path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("hello")
    save_exported(tmp_path / "exported.pt", VampNet(VampNetConfig(codebook_size=16)))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, message in (("truncated.pth", "not a torch.save zip archive"), ("text.pth", "not a torch.save zip archive"),
                          ("exported.pt", r"found \['codec_fingerprint', 'config', 'format', 'state_dict'\]"),
                          ("tensor.pth", "found a Tensor")):
        with pytest.raises(ValueError, match=f"{name} is not a (DAC )?codec checkpoint .*{message}"):
            Codec.load(str(tmp_path / name), device="cpu")
    payload = torch.load(codec_path, weights_only=True)
    payload["metadata"]["kwargs"]["codebook_dim"] = 4  # weights of another architecture than the metadata's
    torch.save(payload, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="mismatch.pth is not a DAC codec checkpoint: Error.*size mismatch"):
        Codec.load(str(tmp_path / "mismatch.pth"), device="cpu")


def test_an_odd_sample_rate_is_resampled_without_the_exact_filter(codec, monkeypatch):
    """torchaudio's exact filter from 44101 Hz is a 44100 x 44101 table (tens of GB): every caller of the codec
    (prep, vamp, eval) takes FFmpeg's resampler for such a rate, batched waves too."""
    monkeypatch.setattr(type(codec), "_resampler", lambda self, rate: pytest.fail(f"exact filter built for {rate} Hz"))
    t = np.arange(44101) / 44101
    waves = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)]).astype(np.float32)
    out = codec.resample(waves[:, ::1], 44101)
    assert out.shape[0] == 2 and abs(out.shape[-1] - codec.sample_rate) <= 2
    spectrum = torch.fft.rfft(out[0, 1000:-1000]).abs()
    assert spectrum.argmax() * codec.sample_rate / (out.shape[-1] - 2000) == pytest.approx(440, abs=2)
    assert abs(codec.encode(waves[0], 44101).shape[-1] - codec.frames_for(1.0)) <= 1  # padded to whole frames
