"""Generation pipeline and the vamp command (mechanics, with small untrained models)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from vampnet_pl.cli import main
from vampnet_pl.generation.pipeline import CodecMismatch, GenerationConfig, VampPipeline, sample_windowed
from vampnet_pl.model import VampNet, VampNetConfig, save_exported
from vampnet_pl.generation.sampling import SamplingConfig, sample

from conftest import write_tone


def small_model(codec, n_codebooks, n_conditioning, fingerprint=None):
    cfg = VampNetConfig(n_codebooks=n_codebooks, n_conditioning_codebooks=n_conditioning, codebook_size=codec.codebook_size,
                        latent_dim=int(codec.model.latent_dim), d_model=32, n_layers=1, n_heads=4, dropout=0.0,
                        codec_fingerprint=fingerprint or codec.fingerprint)
    torch.manual_seed(n_codebooks)
    return VampNet(cfg, codec.codebook_tables()[:n_codebooks])


@pytest.fixture(scope="module")
def models(codec, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_exported(folder / "coarse.pt", small_model(codec, 4, 0))
    save_exported(folder / "c2f.pt", small_model(codec, 14, 4))
    return folder / "coarse.pt", folder / "c2f.pt"


class WindowSpy:
    def __init__(self, vocab=8):
        self.vocab, self.seen = vocab, []

    def __call__(self, codes, mask):
        self.seen.append((codes.shape[-1], mask.clone()))
        return torch.zeros(codes.shape[0], codes.shape[1], codes.shape[-1], self.vocab)


def test_windowed_sampling_fills_everything_once_with_overlapping_context():
    codes = torch.full((1, 2, 50), 7)
    mask = torch.ones(1, 2, 50, dtype=torch.bool)
    mask[..., :3] = False
    spy = WindowSpy()
    out = sample_windowed(spy, codes, mask, SamplingConfig(passes=2, seed=0), window=20, overlap=5)
    assert torch.equal(out[..., :3], codes[..., :3]) and int(out[..., 3:].max()) < 8
    assert all(frames <= 20 for frames, _ in spy.seen)
    later_first_passes = [m for frames, m in spy.seen[2::2]]  # first pass of each later window
    assert later_first_passes and all(not m[..., :5].any() for m in later_first_passes)  # context is kept


class SameEverywhere:
    """The same spread-out distribution at every position: only the random stream tells tokens apart."""

    def __init__(self, predicted: int, cfg=None):
        self.predicted, self.cfg = predicted, cfg

    def __call__(self, codes, mask):
        return torch.linspace(0, 2, 64).expand(codes.shape[0], self.predicted, codes.shape[-1], 64).clone()


def test_windows_and_c2f_sub_batches_draw_from_one_random_stream(codec):
    """Each window (and c2f sub-batch) reseeded with the same seed repeated the previous one's draws."""
    codes, mask = torch.zeros(1, 2, 60, dtype=torch.long), torch.ones(1, 2, 60, dtype=torch.bool)
    out = sample_windowed(SameEverywhere(2), codes, mask, SamplingConfig(passes=6, seed=0), window=20, overlap=0)
    assert not torch.equal(out[..., :20], out[..., 20:40]) and not torch.equal(out[..., 20:40], out[..., 40:])
    assert torch.equal(out, sample_windowed(SameEverywhere(2), codes, mask, SamplingConfig(passes=6, seed=0), 20, 0))
    pipeline = VampPipeline(small_model(codec, 4, 0), small_model(codec, 14, 4), codec,
                            GenerationConfig(c2f=SamplingConfig(passes=3, seed=0), c2f_max_batch=1))
    pipeline.c2f = SameEverywhere(10, pipeline.c2f.cfg)
    chunk = codec.frames_for(pipeline.cfg.c2f_chunk_seconds)
    fine = pipeline.coarse_to_fine(torch.zeros(1, 14, 2 * chunk, dtype=torch.long),
                                   torch.ones(1, 14, 2 * chunk, dtype=torch.bool))
    assert not torch.equal(fine[..., :chunk], fine[..., chunk:])


def test_a_window_or_chunk_with_nothing_to_generate_is_kept(codec, models):
    """The head on masked frames has no frame there: the window or chunk comes back as it was."""
    from vampnet_pl.masking.prompts import inpaint
    from vampnet_pl.model import load_exported

    coarse, c2f = load_exported(models[0]), load_exported(models[1])
    codes = torch.randint(0, codec.codebook_size, (1, 14, 30))
    kept = torch.zeros(1, 4, 30, dtype=torch.bool)
    assert torch.equal(sample(coarse, codes[:, :4], kept, SamplingConfig(passes=3, seed=0)), codes[:, :4])
    suffix = inpaint((1, 4, 30), suffix_frames=10)  # the last window adds only kept frames
    out = sample_windowed(coarse, codes[:, :4], suffix, SamplingConfig(passes=3, seed=0), window=20, overlap=4)
    assert torch.equal(out[..., 20:], codes[:, :4, 20:])
    pipeline = VampPipeline(coarse, c2f, codec, GenerationConfig(c2f=SamplingConfig(passes=2, seed=0), c2f_max_batch=1,
                                                                 c2f_chunk_seconds=0.1))
    fine_mask = torch.zeros(1, 14, 30, dtype=torch.bool)
    fine_mask[:, 4:, :5] = True  # later chunks are wholly kept
    out = pipeline.coarse_to_fine(codes, fine_mask)
    assert torch.equal(out[..., 5:], codes[..., 5:])


def test_pipeline_keeps_the_prompt_and_fills_every_codebook(codec, models):
    from vampnet_pl.model import load_exported

    pipeline = VampPipeline(load_exported(models[0]), load_exported(models[1]), codec,
                            GenerationConfig(coarse=SamplingConfig(passes=3, seed=0), c2f=SamplingConfig(passes=2, seed=0),
                                             window_seconds=0.5, overlap_seconds=0.1))
    codes = codec.encode(torch.randn(44100) * 0.2, 44100).long()[None]
    from vampnet_pl.masking.prompts import periodic

    mask = periodic((1, 4, codes.shape[-1]), 8)
    out = pipeline.generate(codes, mask)
    assert out.shape == (1, 14, codes.shape[-1])
    assert torch.equal(out[:, :4][~mask], codes[:, :4][~mask])
    assert pipeline.to_audio(out).shape[-1] == codes.shape[-1] * codec.hop_length


def test_c2f_keeps_the_input_fine_tokens_of_every_kept_frame(codec, models):
    from vampnet_pl.masking.prompts import inpaint, keep_union, periodic
    from vampnet_pl.model import load_exported

    pipeline = VampPipeline(load_exported(models[0]), load_exported(models[1]), codec,
                            GenerationConfig(coarse=SamplingConfig(passes=2, seed=0), c2f=SamplingConfig(passes=2, seed=0),
                                             window_seconds=1.0, c2f_chunk_seconds=0.25))
    codes = codec.encode(torch.randn(2, 44100) * 0.2, 44100).long()  # [2, 14, T]
    frames = codes.shape[-1]
    mask = keep_union(periodic((2, 4, frames), 7, width=3), inpaint((2, 4, frames), prefix_frames=5))
    mask[1, 2, 40] = False  # one kept coarse token alone does not keep its frame
    out = pipeline.generate(codes, mask)
    kept = ~mask.any(1)  # [B, T] frames kept whole
    assert kept.any() and (~kept).any()
    for b in range(2):
        assert torch.equal(out[b][:, kept[b]], codes[b][:, kept[b]])  # every codebook of every kept frame
    assert not torch.equal(out[1, 4:, 40], codes[1, 4:, 40])
    assert (out[:, 4:][~kept[:, None].expand(-1, 10, -1)] != codes[:, 4:][~kept[:, None].expand(-1, 10, -1)]).any()


def test_a_full_depth_prompt_keeps_its_fine_tokens_and_generates_its_masked_ones(codec, models):
    """The fine rows of a prompt deeper than the coarse model were ignored: a kept fine token in a frame with a
    masked coarse token was generated anew, and a masked fine token in a frame kept whole was never generated."""
    from vampnet_pl.masking.prompts import compression, random_prompt
    from vampnet_pl.model import load_exported

    pipeline = VampPipeline(load_exported(models[0]), load_exported(models[1]), codec,
                            GenerationConfig(coarse=SamplingConfig(passes=3, seed=0), c2f=SamplingConfig(passes=2, seed=0),
                                             c2f_chunk_seconds=0.25))
    codes = torch.randint(0, codec.codebook_size, (2, 14, 45), generator=torch.Generator().manual_seed(0))
    scattered = random_prompt((2, 14, 45), 0.5, torch.Generator().manual_seed(1))  # keeps fine tokens of any frame
    out = pipeline.generate(codes, scattered)
    assert torch.equal(out[~scattered], codes[~scattered])
    six_codebooks = compression((2, 14, 45), 6, 4)  # keep 6 of 14 codebooks every 4 frames: coarse rows kept whole
    out = pipeline.generate(codes, six_codebooks)
    assert torch.equal(out[~six_codebooks], codes[~six_codebooks])
    assert (out[:, 6:, ::4] != codes[:, 6:, ::4]).float().mean() > 0.9  # generated, not the input's tokens
    assert torch.equal(pipeline.generate(codes, six_codebooks[:, :4])[:, 6:, ::4], codes[:, 6:, ::4])  # frame rule


class ModelSpy(torch.nn.Module):
    """A model stand-in recording what it is called with; logits favour token 1."""

    def __init__(self, real: VampNet):
        super().__init__()
        self.cfg, self.weight, self.calls = real.cfg, torch.nn.Parameter(torch.zeros(1)), []

    def forward(self, codes, mask):
        self.calls.append((tuple(codes.shape), codes.device, mask.device))
        logits = torch.zeros(codes.shape[0], self.cfg.n_predicted_codebooks, codes.shape[-1], 8, device=codes.device)
        logits[..., 1] = 50.0
        return logits


def test_coarse_runs_in_its_window_and_c2f_in_its_chunks_as_one_batch(codec):
    coarse, c2f = ModelSpy(small_model(codec, 4, 0)), ModelSpy(small_model(codec, 14, 4))
    cfg = GenerationConfig(coarse=SamplingConfig(passes=2, seed=0), c2f=SamplingConfig(passes=3, seed=0),
                           window_seconds=1.0, overlap_seconds=0.25, c2f_chunk_seconds=0.3)
    pipeline = VampPipeline(coarse, c2f, codec, cfg)
    frames = 200
    codes = torch.randint(0, 8, (2, 14, frames))
    out = pipeline.generate(codes, torch.ones(2, 4, frames, dtype=torch.bool))
    window, chunk = codec.frames_for(1.0), codec.frames_for(0.3)
    assert {shape[-1] for shape, *_ in coarse.calls} == {window} and {shape[0] for shape, *_ in coarse.calls} == {2}
    n_chunks = -(-frames // chunk)
    assert c2f.calls == [((2 * n_chunks, 14, chunk), torch.device("cpu"), torch.device("cpu"))] * 3
    assert out[:, 4:].eq(1).all() and out.shape == (2, 14, frames)


def test_everything_runs_on_the_pipelines_device(codec, monkeypatch):
    """On the meta device: a tensor made on the CPU anywhere in the pipeline would fail to mix."""
    import vampnet_pl.generation.pipeline as pipeline_module

    seen = []

    def spy_sample(model, codes, mask, cfg, n_conditioning=0, generator=None, on_pass=None):
        devices = {codes.device, mask.device, *(p.device for p in model.parameters()), *(b.device for b in model.buffers())}
        seen.append(devices)
        return codes.clone()

    monkeypatch.setattr(pipeline_module, "sample", spy_sample)
    pipeline = VampPipeline(small_model(codec, 4, 0), small_model(codec, 14, 4), codec,
                            GenerationConfig(window_seconds=1.0, c2f_chunk_seconds=0.3), device="meta")
    assert {p.device.type for m in (pipeline.coarse, pipeline.c2f) for p in [*m.parameters(), *m.buffers()]} == {"meta"}
    out = pipeline.generate(torch.randint(0, 8, (2, 14, 150)), torch.ones(2, 4, 150, dtype=torch.bool))
    assert out.device.type == "meta" and len(seen) >= 2
    assert all(devices == {torch.device("meta")} for devices in seen)


def test_load_pipeline_puts_models_and_codec_on_the_device(codec_path, models):
    from vampnet_pl.generation.vamp import load_pipeline

    pipeline = load_pipeline(models[0], models[1], str(codec_path), "cpu")
    tensors = [t for m in (pipeline.coarse, pipeline.c2f, pipeline.codec.model) for t in [*m.parameters(), *m.buffers()]]
    assert pipeline.device == torch.device("cpu") and {t.device for t in tensors} == {torch.device("cpu")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vamp_generates_on_the_gpu(codec_path, models):
    from vampnet_pl.generation.vamp import load_pipeline

    pipeline = load_pipeline(models[0], models[1], str(codec_path), "cuda",
                             GenerationConfig(coarse=SamplingConfig(passes=2, seed=0), c2f=SamplingConfig(passes=2, seed=0)))
    tensors = [t for m in (pipeline.coarse, pipeline.c2f, pipeline.codec.model) for t in [*m.parameters(), *m.buffers()]]
    assert {t.device.type for t in tensors} == {"cuda"}
    codes = torch.randint(0, pipeline.codec.codebook_size, (2, 14, 300))
    out = pipeline.generate(codes, torch.ones(2, 4, 300, dtype=torch.bool))
    assert out.device.type == "cuda" and out.shape == (2, 14, 300)


def test_models_of_another_codec_are_refused(codec):
    with pytest.raises(CodecMismatch, match="coarse model was trained on codec"):
        VampPipeline(small_model(codec, 4, 0, fingerprint="0" * 64), None, codec)


def test_a_c2f_model_given_as_the_coarse_one_is_refused(codec):
    with pytest.raises(ValueError, match="a c2f model given as the coarse one"):
        VampPipeline(small_model(codec, 14, 4), None, codec)


@pytest.mark.parametrize("bad", [{"window_seconds": 0.0}, {"overlap_seconds": -1.0},
                                 {"c2f_chunk_seconds": 0.0}, {"c2f_max_batch": 0}])
def test_generation_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationConfig(**bad)


def test_a_short_window_advances_by_more_than_one_frame(codec, monkeypatch):
    """The overlap defaulted to 2 s whatever the window: at ``--window-seconds 2`` it was cut to the window less
    one frame, and each window generated a single new frame (346 windows for 6 s of audio, each with every pass)."""
    import vampnet_pl.generation.pipeline as pipeline_module

    windows = []
    monkeypatch.setattr(pipeline_module, "sample",
                        lambda model, codes, *args, **kwargs: windows.append(codes.shape[-1]) or codes)
    assert GenerationConfig(window_seconds=2.0).overlap_seconds == 1.0  # 2 s, at most half the window
    assert GenerationConfig(window_seconds=10.0).overlap_seconds == 2.0
    pipeline = VampPipeline(small_model(codec, 4, 0), None, codec, GenerationConfig(window_seconds=2.0))
    frames = codec.frames_for(6.0)
    pipeline.generate(torch.zeros(1, 4, frames, dtype=torch.long), torch.ones(1, 4, frames, dtype=torch.bool))
    assert windows == [codec.frames_for(2.0)] * 6  # starts 0, 86, ... 344, then the last full window
    with pytest.raises(ValueError, match=r"overlap_seconds must be in \[0, window_seconds=2.0\), got 2.0"):
        GenerationConfig(window_seconds=2.0, overlap_seconds=2.0)


def test_a_window_under_one_codec_frame_is_a_clear_error(codec):
    pipeline = VampPipeline(small_model(codec, 4, 0), None, codec, GenerationConfig(window_seconds=1e-4,
                                                                                     overlap_seconds=0.0))
    with pytest.raises(ValueError, match="under one codec frame"):
        pipeline.generate(torch.zeros(1, 4, 20, dtype=torch.long), torch.ones(1, 4, 20, dtype=torch.bool))


def test_vamp_command_writes_variations_and_loops(tmp_path, codec_path, models):
    song = write_tone(tmp_path / "song.wav", 1.5, 22050, channels=2)
    common = ["--coarse", str(models[0]), "--c2f", str(models[1]), "--codec", str(codec_path), "--device", "cpu",
              "--coarse-passes", "2", "--c2f-passes", "2", "--out-dir", str(tmp_path / "out")]
    assert main(["vamp", str(song), "--prompt", "periodic:8", "--prompt", "prefix:0.2", "--variations", "2", *common]) == 0
    files = sorted((tmp_path / "out").glob("song_vamp_*.wav"))
    assert len(files) == 2
    info = sf.info(str(files[0]))
    assert info.samplerate == 44100 and info.duration == pytest.approx(1.5, abs=0.05)
    assert main(["vamp", str(song), "--prompt", "compression:2:4", "--loop", "2", "--variations", "3", *common]) == 0
    looped = sf.info(str(tmp_path / "out" / "song_loop_x2.wav"))
    assert looped.duration == pytest.approx(4.5, abs=0.1)  # the input and 2 vamps, whatever --variations says


def test_vamp_outputs_are_as_long_as_the_input_and_earlier_ones_are_kept(tmp_path, codec_path, codec, models, capsys):
    """The codec pads to whole frames: outputs were up to a hop longer, and a loop drifted at every seam. A second
    run into the same folder replaced the first run's files without a word."""
    from vampnet_pl.audio_io import read_audio

    song = write_tone(tmp_path / "song.wav", 1.3, 22050)
    length = codec.resample(torch.from_numpy(read_audio(song)[0].mean(0)), 22050).shape[-1]
    assert length % codec.hop_length  # not a whole number of frames
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu", "--coarse-passes", "1",
              "--out-dir", str(tmp_path / "out")]
    assert main(["vamp", str(song), "--variations", "2", *common]) == 0
    assert [sf.info(str(p)).frames for p in sorted((tmp_path / "out").glob("song_vamp_*.wav"))] == [length] * 2
    assert main(["vamp", str(song), "--loop", "2", *common]) == 0
    assert sf.info(str(tmp_path / "out" / "song_loop_x2.wav")).frames == 3 * length
    capsys.readouterr()
    before = (tmp_path / "out" / "song_vamp_00.wav").read_bytes()
    assert main(["vamp", str(song), "--seed", "7", *common]) == 2
    assert "exist already" in capsys.readouterr().err and (tmp_path / "out" / "song_vamp_00.wav").read_bytes() == before
    assert main(["vamp", str(song), "--seed", "7", "--overwrite", *common]) == 0
    assert (tmp_path / "out" / "song_vamp_00.wav").read_bytes() != before


def test_vamp_refuses_non_finite_audio_and_audio_prompts_that_find_nothing(tmp_path, codec_path, models, capsys):
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu", "--coarse-passes", "1",
              "--out-dir", str(tmp_path / "out")]
    tone = 0.1 * np.sin(np.arange(44100) * 2 * np.pi * 220 / 44100).astype(np.float32)
    steady = tmp_path / "steady.wav"
    sf.write(str(steady), tone, 44100, subtype="FLOAT")
    assert main(["vamp", str(steady), "--prompt", "beat", *common]) == 2  # a steady tone has no beats
    assert "--prompt beat keeps nothing: no beats found" in capsys.readouterr().err
    assert main(["vamp", str(steady), "--prompt", "inpaint:100:100", *common]) == 2  # wrote copies of the input
    assert "--prompt inpaint:100:100 keeps every token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    tone[100] = np.nan  # it passed the silence check (NaN < -60 dB is False) and turned loudness matching off
    sf.write(str(tmp_path / "nan.wav"), tone, 44100, subtype="FLOAT")
    assert main(["vamp", str(tmp_path / "nan.wav"), *common]) == 2
    assert "has 1 NaN or infinite samples" in capsys.readouterr().err


def test_wrong_model_and_checkpoint_files_are_clear_errors(tmp_path, models, capsys):
    from vampnet_pl.model import load_exported

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "text.pt").write_text("hello")
    for wrong in (tmp_path / "tensor.pt", tmp_path / "text.pt", write_tone(tmp_path / "song.wav", 0.5)):
        with pytest.raises(ValueError, match="is not an exported vampnet-pl model"):
            load_exported(wrong)
    payload = torch.load(models[0], weights_only=True)
    payload["config"]["attention_sinks"] = 4  # a setting of a newer version
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=r"newer.pt has model settings this vampnet-pl does not know \(attention_sinks\)"):
        load_exported(tmp_path / "newer.pt")
    assert not load_exported(models[0]).training  # dropout off, as inference wants
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "x.pt")]) == 2
    assert "is a folder but not a checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "text.pt"), str(tmp_path / "x.pt")]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err
    assert main(["export", str(models[0]), str(tmp_path / "empty")]) == 2
    assert "is a folder: give the model file to write" in capsys.readouterr().err


def test_vamp_command_errors_are_clear(tmp_path, codec_path, models, capsys):
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu", "--coarse-passes", "1",
              "--out-dir", str(tmp_path / "out")]
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(22050, np.float32), 22050)
    assert main(["vamp", str(silent), *common]) == 2
    assert "silent" in capsys.readouterr().err
    (tmp_path / "junk.wav").write_text("not audio")
    assert main(["vamp", str(tmp_path / "junk.wav"), *common]) == 2
    assert "cannot read" in capsys.readouterr().err
    song = write_tone(tmp_path / "song.wav", 1.0)
    assert main(["vamp", str(song), "--coarse", str(tmp_path / "missing.pt"), "--codec", str(codec_path)]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["vamp", str(song), "--prompt", "sideways:3", *common]) == 2
    assert "unknown prompt" in capsys.readouterr().err
    assert main(["vamp", str(song), "--prompt", "periodic", *common]) == 2
    assert "needs more arguments" in capsys.readouterr().err
    assert main(["vamp", str(song), "--top-p", "0", *common]) == 2  # would filter out every token
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_is_refused_before_generating(tmp_path, codec_path, models, capsys,
                                                                           monkeypatch):
    """``--out-dir`` naming a file failed only after the whole generation, as 'File exists ... (--overwrite)'; one
    under a file ended in a NotADirectoryError traceback."""
    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the output folder was checked")

    monkeypatch.setattr(VampPipeline, "generate", no_generation)
    song = write_tone(tmp_path / "song.wav", 0.5)
    (tmp_path / "taken").write_text("a file")
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu", "--coarse-passes", "1"]
    assert main(["vamp", str(song), "--out-dir", str(tmp_path / "taken"), *common]) == 2
    assert capsys.readouterr().err.strip().endswith(f"the output folder {tmp_path / 'taken'} is a file")
    assert main(["vamp", str(song), "--out-dir", str(tmp_path / "taken" / "sub"), *common]) == 2
    assert f"cannot create the output folder {tmp_path / 'taken' / 'sub'}: Not a directory" in capsys.readouterr().err


def test_a_device_that_is_not_there_is_a_one_line_error(tmp_path, codec_path, models, capsys, monkeypatch):
    """``--device gpu`` (a name torch does not know) and ``--device cuda`` on a machine without CUDA, or ``cuda:N``
    past its GPUs, ended in a traceback from torch when the codec moved there."""
    song = write_tone(tmp_path / "song.wav", 0.5)
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--out-dir", str(tmp_path / "out")]
    assert main(["vamp", str(song), "--device", "gpu", *common]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown device 'gpu': use auto, cpu, cuda or cuda:N"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["vamp", str(song), "--device", "cuda", *common]) == 2
    assert capsys.readouterr().err.strip() == "error: device 'cuda': this machine has no CUDA GPU (use auto or cpu)"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["vamp", str(song), "--device", "cuda:2", *common]) == 2
    assert capsys.readouterr().err.strip() == "error: device 'cuda:2': this machine has 2 CUDA GPUs (cuda:0 to cuda:1)"


@pytest.mark.parametrize("spec, message", [("sideways:3", "unknown prompt 'sideways'"),
                                           ("periodic", "needs more arguments"), ("prefix:x", "must be numbers")])
def test_a_wrong_prompt_is_refused_before_anything_loads(tmp_path, codec_path, models, capsys, monkeypatch, spec,
                                                         message):
    """A wrong ``--prompt`` was found only after the models and the codec had loaded and the input was encoded."""
    import vampnet_pl.generation.vamp as vamp_module

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before the prompts were checked")

    monkeypatch.setattr(vamp_module, "load_pipeline", no_loading)
    song = write_tone(tmp_path / "song.wav", 0.5)
    assert main(["vamp", str(song), "--prompt", "periodic:8", "--prompt", spec, "--coarse", str(models[0]),
                 "--codec", str(codec_path)]) == 2
    assert message in capsys.readouterr().err


def test_compression_deeper_than_the_models_is_refused_before_the_input_is_read(tmp_path, codec_path, models, capsys,
                                                                               monkeypatch):
    """``compression:N:P`` with N above the models' codebooks kept them all (``periodic:P``) without a word."""
    import vampnet_pl.generation.vamp as vamp_module

    song = write_tone(tmp_path / "song.wav", 0.5)
    real_read = vamp_module.read_audio
    monkeypatch.setattr(vamp_module, "read_audio", lambda *a: pytest.fail("read the input before the check"))
    common = ["--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu", "--coarse-passes", "1",
              "--out-dir", str(tmp_path / "out")]
    assert main(["vamp", str(song), "--prompt", "compression:5:4", *common]) == 2
    assert capsys.readouterr().err.strip() == ("error: --prompt: bad prompt 'compression:5:4': keeps 5 codebooks, "
                                                    "but the model has 4")
    assert main(["vamp", str(song), "--prompt", "compression:15:4", "--c2f", str(models[1]), *common]) == 2
    assert "keeps 15 codebooks, but the model has 14" in capsys.readouterr().err
    monkeypatch.setattr(vamp_module, "read_audio", real_read)
    assert main(["vamp", str(song), "--prompt", "compression:4:4", *common]) == 0


def test_vamp_shows_its_progress_pass_by_pass(tmp_path, codec, codec_path, models, capsys):
    """A long vamp printed nothing until it ended: a bar now counts every model pass, coarse windows and c2f batches."""
    from vampnet_pl.model import load_exported

    pipeline = VampPipeline(load_exported(models[0]), load_exported(models[1]), codec,
                            GenerationConfig(coarse=SamplingConfig(passes=3, seed=0), c2f=SamplingConfig(passes=2, seed=0),
                                             window_seconds=0.5, overlap_seconds=0.1, c2f_chunk_seconds=0.25,
                                             c2f_max_batch=3))
    for frames in (30, 100):  # one window; 3 windows and 5 chunks (4 c2f batches of at most 3 for 2 examples)
        calls = []
        pipeline.generate(torch.randint(0, codec.codebook_size, (2, 14, frames)), torch.ones(2, 4, frames, dtype=torch.bool),
                          on_pass=lambda: calls.append(1))
        assert len(calls) == pipeline.passes_for(frames, 2) == {30: 3 + 2 * 2, 100: 3 * 3 + 4 * 2}[frames]
    song = write_tone(tmp_path / "song.wav", 1.0)
    assert main(["vamp", str(song), "--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu",
                 "--coarse-passes", "2", "--window-seconds", "0.5", "--out-dir", str(tmp_path / "out")]) == 0
    assert "vamp song.wav: 100%" in capsys.readouterr().err


def test_a_variation_is_the_same_whatever_the_number_of_variations(tmp_path, codec_path, models):
    """The prompts drew from one generator for the whole batch: with two prompts that draw (``random:0.3`` and a
    rolled ``periodic:8``), the second's draws came after the first's for every variation, so ``song_vamp_00.wav``
    changed with ``--variations``."""
    from vampnet_pl.generation.vamp import load_pipeline, vamp_file

    pipeline = load_pipeline(models[0], None, str(codec_path), "cpu", GenerationConfig(coarse=SamplingConfig(passes=2)))
    generate, seen = pipeline.generate, []
    pipeline.generate = lambda codes, mask, ids=None, **kw: seen.append((mask, generate(codes, mask, ids)))  or seen[-1][1]
    song = write_tone(tmp_path / "song.wav", 0.5)
    for count in (1, 3):
        vamp_file(pipeline, song, tmp_path / str(count), ["random:0.3", "periodic:8"], variations=count, seed=3,
                  random_roll=True)
    (one_mask, one), (three_mask, three) = seen
    assert torch.equal(one_mask[0], three_mask[0]) and torch.equal(one[0], three[0])
    assert (tmp_path / "1" / "song_vamp_00.wav").read_bytes() == (tmp_path / "3" / "song_vamp_00.wav").read_bytes()
    assert not torch.equal(three_mask[0], three_mask[1])  # each variation its own random tokens and phase


def test_vamp_options_reach_the_sampler_and_prompts(tmp_path, codec_path, models, monkeypatch):
    import vampnet_pl.generation.vamp as vamp_module

    captured = {}

    def fake_vamp_file(pipeline, input_path, out_dir, prompts, variations, loops, seed, random_roll, loudness_match,
                       overwrite):
        captured.update(cfg=pipeline.cfg, random_roll=random_roll, loudness_match=loudness_match)
        return []

    monkeypatch.setattr(vamp_module, "vamp_file", fake_vamp_file)
    song = write_tone(tmp_path / "song.wav", 1.0)
    assert main(["vamp", str(song), "--coarse", str(models[0]), "--c2f", str(models[1]), "--codec", str(codec_path),
                 "--device", "cpu", "--mask-temperature", "3.5", "--typical-p", "0.2", "--typical-min-tokens", "64",
                 "--sample-cutoff", "0.5", "--temperature", "0.8", "--random-roll", "--no-match-loudness",
                 "--c2f-chunk-seconds", "2.0", "--overlap-seconds", "0.5"]) == 0
    cfg = captured["cfg"]
    assert (cfg.coarse.mask_temperature, cfg.c2f.mask_temperature) == (3.5, 3.5)
    assert (cfg.coarse.typical_p, cfg.coarse.typical_min_tokens) == (0.2, 64)
    assert cfg.coarse.sample_cutoff == cfg.c2f.sample_cutoff == 0.5 and cfg.c2f.temperature == 0.8
    assert cfg.c2f_chunk_seconds == 2.0 and captured["random_roll"] and not captured["loudness_match"]
    assert cfg.overlap_seconds == 0.5
    assert main(["vamp", str(song), "--coarse", str(models[0]), "--codec", str(codec_path), "--device", "cpu"]) == 0
    cfg = captured["cfg"]
    assert (cfg.coarse.mask_temperature, cfg.c2f.mask_temperature) == (10.5, 1.0) and captured["loudness_match"]
    assert cfg.overlap_seconds == 2.0
    assert not captured["random_roll"]


def test_vamp_compression_keeps_exactly_its_codebook_count(tmp_path, codec_path, models):
    """The vamp prompts were as deep as the coarse model: ``compression:6:4`` (4 coarse codebooks) kept every
    codebook of its frames, the same output as ``periodic:4``."""
    from vampnet_pl.generation.vamp import load_pipeline, vamp_file

    pipeline = load_pipeline(models[0], models[1], str(codec_path), "cpu",
                             GenerationConfig(coarse=SamplingConfig(passes=2), c2f=SamplingConfig(passes=2)))
    generate, seen = pipeline.generate, {}
    pipeline.generate = lambda codes, mask, ids=None, **kw: seen.setdefault("run", (codes, generate(codes, mask, ids)))[1]
    vamp_file(pipeline, write_tone(tmp_path / "song.wav", 0.5), tmp_path / "out", ["compression:6:4"])
    codes, out = seen["run"]
    assert torch.equal(out[:, :6, ::4], codes[:, :6, ::4])  # frames 0, 4, 8 ...: 6 codebooks kept
    assert (out[:, 6:, ::4] != codes[:, 6:, ::4]).float().mean() > 0.9  # the other 8 generated


def test_vamp_output_matches_the_input_loudness(tmp_path, codec_path, codec, models):
    from vampnet_pl.audio_io import read_audio
    from vampnet_pl.generation.vamp import load_pipeline, loudness, match_loudness, vamp_file

    waves = torch.randn(2, 44100) * torch.tensor([[0.01], [0.05]])
    matched = match_loudness(waves, -30.0, 44100)
    assert torch.allclose(loudness(matched, 44100), torch.tensor([-30.0, -30.0]), atol=0.05)
    assert torch.equal(match_loudness(torch.zeros(1, 44100), -30.0, 44100), torch.zeros(1, 44100))

    song = write_tone(tmp_path / "quiet.wav", 1.5, 44100)
    audio, _ = read_audio(song)
    quiet = torch.from_numpy(audio.mean(0)) * 0.1
    import soundfile as sf_

    sf_.write(str(song), quiet.numpy(), 44100)
    target = float(loudness(quiet, 44100))
    pipeline = load_pipeline(models[0], models[1], str(codec_path), "cpu",
                             GenerationConfig(coarse=SamplingConfig(passes=2), c2f=SamplingConfig(passes=2)))
    out = {}
    for match in (True, False):
        [path] = vamp_file(pipeline, song, tmp_path / str(match), ["periodic:8"], loudness_match=match)
        out[match] = float(loudness(torch.from_numpy(read_audio(path)[0].mean(0)), 44100))
    assert abs(out[True] - target) < 0.5 and abs(out[False] - target) > 1.0


def test_an_example_generates_the_same_alone_or_in_any_batch(codec, models):
    """Each example's coarse and c2f streams are named by its id: batch size, order and c2f sub-batches do
    not change its result (what makes evaluation scores independent of the batch size and the ranks)."""
    from vampnet_pl.model import load_exported

    def pipeline(c2f_max_batch):
        return VampPipeline(load_exported(models[0]), load_exported(models[1]), codec,
                            GenerationConfig(coarse=SamplingConfig(passes=3, seed=5), c2f=SamplingConfig(passes=2, seed=5),
                                             window_seconds=0.5, overlap_seconds=0.1, c2f_chunk_seconds=0.25,
                                             c2f_max_batch=c2f_max_batch))

    codes = torch.randint(0, codec.codebook_size, (3, 14, 120))
    mask = torch.ones(3, 4, 120, dtype=torch.bool)
    mask[1, :, :30] = False
    together = pipeline(64).generate(codes, mask, example_ids=[10, 11, 12])
    assert not torch.equal(together[0], together[2])
    reordered = pipeline(1).generate(codes[[2, 0, 1]], mask[[2, 0, 1]], example_ids=[12, 10, 11])
    assert torch.equal(reordered, together[[2, 0, 1]])
    for row in range(3):
        alone = pipeline(1).generate(codes[row : row + 1], mask[row : row + 1], example_ids=[10 + row])
        assert torch.equal(alone[0], together[row])
