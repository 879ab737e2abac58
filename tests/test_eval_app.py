"""The offline eval app: prompts and a passes sweep over a shard split -> CSV and plots."""

from __future__ import annotations

import csv
import math
import re

import hydra
import pytest
import numpy as np
import torch
from omegaconf import OmegaConf

from vampnet_pl.config import conf_dir
from vampnet_pl.evaluation.app import run
from vampnet_pl.masking.presets import build_prompt
from vampnet_pl.model import save_exported

from conftest import on_two_ranks
from test_vamp import small_model


def test_eval_app_writes_results_and_plots(prepared, codec, codec_path, tmp_path, monkeypatch):
    import vampnet_pl.evaluation.protocol as protocol

    audio_seen = []

    def spy(spec, shape, audio, *args, **kwargs):
        audio_seen.append((spec, shape[0], np.shape(audio)))
        return build_prompt(spec, shape, audio, *args, **kwargs)

    monkeypatch.setattr(protocol, "build_prompt", spy)
    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    save_exported(tmp_path / "c2f.pt", small_model(codec, 14, 4))
    overrides = [f"coarse={tmp_path / 'coarse.pt'}", f"c2f={tmp_path / 'c2f.pt'}", f"codec.source={codec_path}",
                 "codec.device=cpu", f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=2", "batch_size=2",
                 "eval_protocol.id=test", "eval_protocol.periods=[8]", "eval_protocol.sweep_prompt=periodic_8",
                 "eval_protocol.passes=2", "c2f_passes=1", "eval_protocol.passes_sweep=[1,2]", "prompts=[beat]",
                 f"out_dir={tmp_path / 'eval'}"]
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra.compose("eval", overrides=overrides)
    paths = run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [r["prompt"] for r in rows] == ["ceiling_codec", "baseline_noisy", "periodic_8", "prefix", "suffix", "inpaint",
                                           "compression", "passes_1", "passes_2", "beat"]
    assert {r["protocol"] for r in rows} == {"test"}  # the protocol id on every row
    assert [r["coarse_passes"] for r in rows[-3:]] == ["1", "2", "2"]
    scores = ("mel", "mel_dac", "mel_vampnet", "fad", "kad")
    assert all(math.isfinite(float(r[k])) for r in rows for k in scores)
    assert {r["n_embeddings"] for r in rows} == {"2"}  # two 1 s windows, one log-mel patch each
    assert all(float(rows[0][k]) < 1e-5 for k in ("mel", "mel_dac", "mel_vampnet"))  # the ceiling at full depth is the reference
    assert all(float(rows[1][k]) > 0.1 for k in ("mel", "mel_dac", "mel_vampnet"))
    assert paths[0].name == "results.csv" and all(p.stat().st_size > 10_000 for p in paths[1:])
    beat_calls = [(batch, shape) for spec, batch, shape in audio_seen if spec == "beat"]
    assert beat_calls == [(1, (1, beat_calls[0][1][1]))] * 2  # each window's prompt from its own audio


def test_training_callback_builds_beat_and_onset_prompts_per_window(codec, monkeypatch):
    from vampnet_pl.evaluation.callback import PromptEvalCallback
    from vampnet_pl.masking import prompts

    rate, hop = codec.sample_rate, codec.hop_length
    frames = 4 * rate // hop
    clicks = np.zeros(frames * hop, np.float32)
    for start in range(0, clicks.size, rate // 2):
        clicks[start : start + 600] = np.hanning(600) * np.sin(np.arange(600) * 0.3)
    reference = torch.from_numpy(np.stack([clicks, np.roll(clicks, rate // 4)]))
    callback = PromptEvalCallback(codec_source="unused", prompts=["onset"])
    callback.codec = codec
    monkeypatch.setattr(codec, "decode", lambda codes: reference)  # the windows' full-depth audio
    seen = []
    (job,) = callback.preset_jobs(lambda codes, mask, passes, ids: seen.append(mask) or codes, 0, 4)
    assert job[0] == "onset"
    job[2](torch.zeros(2, 4, frames, dtype=torch.long), [0, 1])
    (mask,) = seen
    for i in range(2):
        alone = prompts.onset_prompt((1, 4, frames), reference[i].numpy(), rate, hop)
        assert torch.equal(mask[i], alone[0])
    assert not torch.equal(mask[0], mask[1])


def test_eval_scores_do_not_depend_on_the_batch_size(prepared, codec, codec_path, tmp_path):
    """Each window has its own random streams (sampling, noisy baseline, random prompt), named by its index."""
    from vampnet_pl.evaluation.app import evaluate

    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    save_exported(tmp_path / "c2f.pt", small_model(codec, 14, 4))

    def scores(batch_size: int) -> list[dict]:
        overrides = [f"coarse={tmp_path / 'coarse.pt'}", f"c2f={tmp_path / 'c2f.pt'}", f"codec.source={codec_path}",
                     "codec.device=cpu", f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=3",
                     f"batch_size={batch_size}", "eval_protocol.periods=[8]", "eval_protocol.sweep_prompt=periodic_8",
                     "eval_protocol.passes=2", "c2f_passes=2", "eval_protocol.passes_sweep=[]", "prompts=[random:0.5]"]
        with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return evaluate(OmegaConf.to_object(hydra.compose("eval", overrides=overrides)))

    whole, split = scores(3), scores(2)  # one batch of 3; batches of 2 and 1
    assert [r["prompt"] for r in whole] == [r["prompt"] for r in split]
    assert any(r["prompt"] == "random:0.5" for r in whole)
    for a, b in zip(whole, split):
        numbers = [k for k, v in a.items() if isinstance(v, float)]
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-5, abs=1e-7), a["prompt"]


def test_eval_prompts_are_as_deep_as_the_models(prepared, codec, codec_path, tmp_path, monkeypatch):
    """Eval built its prompt masks only as deep as the coarse model, so ``compression:6:4`` kept every codebook of
    its frames (``vamp`` had the same bug)."""
    from vampnet_pl.evaluation.app import evaluate
    from vampnet_pl.generation.pipeline import VampPipeline

    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    save_exported(tmp_path / "c2f.pt", small_model(codec, 14, 4))
    generate, seen = VampPipeline.generate, []
    monkeypatch.setattr(VampPipeline, "generate",
                        lambda self, codes, mask, ids=None: seen.append((codes, mask, generate(self, codes, mask, ids)))
                        or seen[-1][2])
    overrides = [f"coarse={tmp_path / 'coarse.pt'}", f"c2f={tmp_path / 'c2f.pt'}", f"codec.source={codec_path}",
                 "codec.device=cpu", f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=2",
                 "batch_size=2", "eval_protocol.periods=[8]", "eval_protocol.sweep_prompt=periodic_8",
                 "eval_protocol.passes_sweep=[]", "eval_protocol.passes=1", "c2f_passes=1", "prompts=[compression:6:4]"]
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        evaluate(OmegaConf.to_object(hydra.compose("eval", overrides=overrides)))
    assert [mask.shape[1] for _, mask, _ in seen] == [14] * 6  # 5 protocol prompts, then the preset
    codes, mask, out = seen[-1]
    assert torch.equal(out[:, :6, ::4], codes[:, :6, ::4])  # 6 codebooks kept on every 4th frame
    assert (out[:, 6:, ::4] != codes[:, 6:, ::4]).float().mean() > 0.9  # the other 8 generated


def _callback_scores(rank: int, world_size: int, codec_path: str, callbacks: tuple = ()) -> dict:
    """The training-time evaluation of a fixed tiny model on 3 fixed windows, as rank ``rank`` of ``world_size``."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from vampnet_pl.codec import Codec
    from vampnet_pl.evaluation.callback import PromptEvalCallback
    from vampnet_pl.masking.protocol import EvalProtocolConfig

    codec = Codec.load(codec_path, device="cpu")
    model = small_model(codec, 4, 0)
    frames = codec.frames_for(1.0)
    windows = torch.randint(0, codec.codebook_size, (3, 14, frames), generator=torch.Generator().manual_seed(0))

    def broadcast(tensor, src):
        if world_size > 1:
            dist.broadcast(tensor, src)
        return tensor

    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_windows=[w.numpy() for w in windows]), global_rank=rank,
                              world_size=world_size, strategy=SimpleNamespace(broadcast=broadcast),
                              is_global_zero=rank == 0, logger=None, global_step=1, callbacks=list(callbacks))
    module = SimpleNamespace(model=model, cfg=model.cfg, device=torch.device("cpu"))
    protocol = EvalProtocolConfig(id="test", periods=[8], sweep_prompt="periodic_8", passes=2, passes_sweep=[])
    callback = PromptEvalCallback(codec_source=codec_path, protocol=protocol, n_windows=3, seed=3, log_audio=False,
                                  prompts=["random:0.5"])
    return callback.evaluate(trainer, module)


def test_a_requeue_signal_cuts_the_training_time_evaluation_short(codec_path, tmp_path, caplog):
    """SLURM signals a short grace (90 s) before the time limit; the evaluation's budget is longer (300 s), so a
    signal during it left no time for the requeue checkpoint. It now skips the conditions left."""
    import logging

    from vampnet_pl.training.slurm import SlurmRequeue

    requeue = SlurmRequeue(tmp_path / "last.ckpt")
    requeue.signals.record("requeue")  # what its handler does
    with caplog.at_level(logging.WARNING):
        assert _callback_scores(0, 1, str(codec_path), callbacks=(requeue,)) == {}
    assert "a requeue signal or SIGTERM came: skipping ceiling_codec and later conditions" in caplog.text


def _callback_rank(rank: int, port: int, results: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = _callback_scores(rank, 2, os.environ["VAMPNET_TEST_CODEC"])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_training_time_scores_are_the_same_on_one_rank_and_two(codec_path, monkeypatch):
    """Two ranks score the same first ``n_windows`` windows as one rank (2 + 1 here), each with the same streams;
    before, each rank took its own ``n_windows`` and the same seed for its own windows."""
    monkeypatch.setenv("VAMPNET_TEST_CODEC", str(codec_path))
    one = _callback_scores(0, 1, str(codec_path))
    two = on_two_ranks(_callback_rank)
    assert one["gen/n_embeddings/periodic_8"] == two[0]["gen/n_embeddings/periodic_8"] == 3
    assert "gen/fad/random:0.5" in one
    assert two[0] == pytest.approx(two[1]) and two[0] == pytest.approx(one, rel=1e-5, abs=1e-7)


def test_eval_scores_the_requested_split_or_refuses(prepared, codec, tmp_path):
    """An empty split is an error (it was silently replaced by val); a misspelt one fails at compose time."""
    from vampnet_pl.config import UsageError, compose
    from vampnet_pl.evaluation.app import eval_windows

    base = ["coarse=c.pt", f"dataset_dir={prepared}", "window_seconds=1.0", "n_windows=2"]
    with pytest.raises(UsageError, match="tset"):
        compose("eval", [*base, "split=tset"])
    with pytest.raises(UsageError, match=r"the test split of .* has no shards \(prep's split.test_fraction was 0\?\); "
                                         "score another with split=train or split=val"):  # the fixture's test_fraction is 0
        eval_windows(compose("eval", [*base, "split=test"]), codec)
    assert eval_windows(compose("eval", [*base, "split=val"]), codec).shape[0] == 2



def test_eval_can_score_the_windows_the_training_time_evaluation_scores(prepared, codec):
    """The callback scores the DataModule's validation windows (``data.val_windows_per_sample``, 2 per sample);
    eval's default is 1 per sample, so only its first window was one of them."""
    from vampnet_pl.config import compose
    from vampnet_pl.data.datamodule import CodesDataModule
    from vampnet_pl.evaluation.app import eval_windows

    dm = CodesDataModule(dataset_dir=str(prepared), window_seconds=1.0, num_workers=0, val_windows_per_sample=2)
    dm.setup("fit")
    dm.val_dataloader()
    base = ["coarse=c.pt", f"dataset_dir={prepared}", "window_seconds=1.0", "n_windows=4", "split=val"]
    same = eval_windows(compose("eval", [*base, "windows_per_sample=2"]), codec)
    assert torch.equal(same, torch.stack([torch.from_numpy(w.astype("int64")) for w in dm.val_windows[:4]]))
    assert not torch.equal(eval_windows(compose("eval", base), codec), same)

def test_results_without_a_passes_sweep_write_no_sweep_plot(tmp_path):
    """``eval_protocol.passes_sweep=[]`` is allowed, but the empty log-scale plot raised after every score was computed."""
    from vampnet_pl.evaluation.app import write_results

    row = dict(protocol="v1", mel=1.0, mel_dac=0.5, mel_vampnet=2.0, fad=3.0, kad=0.1, n_embeddings=4)
    rows = [{**row, "prompt": "ceiling_codec", "coarse_passes": ""}, {**row, "prompt": "periodic_8", "coarse_passes": 12}]
    stale = tmp_path / "quality_vs_passes.png"
    stale.write_bytes(b"an earlier run's curve")
    paths = write_results(rows, tmp_path)
    assert [p.name for p in paths] == ["results.csv", "per_prompt.png"]
    assert not stale.exists()  # it would not match the new results.csv
    assert [r["prompt"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["ceiling_codec", "periodic_8"]


@pytest.mark.parametrize("override", ["eval_protocol.passes_sweep=[0,4]", "eval_protocol.passes_sweep=[-1]",
                                      "eval_protocol.passes=0"])
def test_protocol_passes_below_one_are_refused_at_compose_time(override):
    """``passes_sweep=[0]`` was accepted: eval wrote a ``passes_0`` row that was the ungenerated real tokens (the
    ceiling's scores), and the training-time callback raised at its first evaluation, ending the run."""
    from vampnet_pl.config import UsageError, compose

    for name, base in (("eval", ["coarse=c.pt", "dataset_dir=/data"]), ("train", ["data.dataset_dir=/data", "callbacks=with_eval"])):
        with pytest.raises(UsageError, match="eval_protocol.passes and passes_sweep must be >= 1"):
            compose(name, [*base, override])


@pytest.mark.parametrize("spec, message", [("beet", "unknown prompt 'beet'"), ("random:2", r"must lie in \[0, 1\]"),
                                           ("periodic", "needs more arguments")])
def test_wrong_prompt_presets_are_refused_before_anything_runs(spec, message):
    """A wrong preset was found only when its job ran: after every protocol prompt in eval, and at the first
    generation evaluation of a training run (which it ended)."""
    from vampnet_pl.config import UsageError, compose
    from vampnet_pl.evaluation.callback import PromptEvalCallback

    with pytest.raises(UsageError, match=f"prompts: .*{message}"):
        compose("eval", ["coarse=c.pt", "dataset_dir=/data", f"prompts=[{spec}]"])
    with pytest.raises(UsageError, match=f"callbacks.prompt_eval.prompts: .*{message}"):
        compose("train", ["data.dataset_dir=/data", "callbacks=with_eval", f"callbacks.prompt_eval.prompts=[{spec}]"])
    with pytest.raises(ValueError, match=message):
        PromptEvalCallback(codec_source="unused", prompts=[spec])
    compose("eval", ["coarse=c.pt", "dataset_dir=/data", "prompts=[beat,onset:2,random:0.5,compression:6:4]"])


@pytest.mark.parametrize("seconds, n_windows, message", [
    (0.5, 2, r"0.50 s evaluation windows are too short for the FAD embedding \(audio is shorter than one embedding patch \(\d+ samples, \d+ needed\)\)"),
    (1.0, 1, r"1 evaluation window\(s\) of 1.00 s give 1 embedding\(s\) per side; FAD and KAD need at least 2"),
])
def test_windows_too_short_or_few_for_fad_are_refused_before_training(codec_path, seconds, n_windows, message):
    """The training-time evaluation raised at its first run (``audio is shorter than one embedding patch``, ``FAD
    needs at least 2 real embeddings``), ending the training run after ``every_n_steps`` steps."""
    from types import SimpleNamespace

    from vampnet_pl.codec import Codec
    from vampnet_pl.evaluation.callback import PromptEvalCallback

    codec = Codec.load(str(codec_path), device="cpu")
    windows = torch.zeros(n_windows, 14, codec.frames_for(seconds), dtype=torch.long)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_windows=[w.numpy() for w in windows]), global_rank=0,
                              world_size=1, global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"))
    callback = PromptEvalCallback(codec_source=str(codec_path), n_windows=8)
    with pytest.raises(ValueError, match=f"{message}: raise callbacks.prompt_eval.n_windows or data.window_seconds"):
        callback.on_train_start(trainer, module)
    trainer.datamodule.val_windows = [w.numpy() for w in torch.zeros(2, 14, codec.frames_for(1.0), dtype=torch.long)]
    PromptEvalCallback(codec_source=str(codec_path), n_windows=8).on_train_start(trainer, module)  # 2 x 1 embedding


def test_eval_refuses_windows_too_short_for_fad_before_generating(prepared, codec, codec_path, tmp_path, monkeypatch):
    from vampnet_pl.config import UsageError
    from vampnet_pl.evaluation.app import evaluate
    from vampnet_pl.generation.pipeline import VampPipeline

    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    monkeypatch.setattr(VampPipeline, "generate", lambda *args: pytest.fail("generated before the check"))
    overrides = [f"coarse={tmp_path / 'coarse.pt'}", f"codec.source={codec_path}", "codec.device=cpu",
                 f"dataset_dir={prepared}", "split=val", "window_seconds=0.5", "n_windows=2"]
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(hydra.compose("eval", overrides=overrides))
    with pytest.raises(UsageError, match="0.50 s evaluation windows are too short .*: raise n_windows or window_seconds"):
        evaluate(cfg)


@pytest.mark.parametrize("args, message", [
    ([], r"error: the test split of .* has no shards \(prep's split.test_fraction was 0\?\); score another with "
         "split=train or split=val"),
    (["split=val", "window_seconds=60"], "error: no 60.0 s windows in the val split of "),
    (["split=val", "window_seconds=0.5"], "error: 0.50 s evaluation windows are too short for the FAD embedding"),
    (["split=val", "window_seconds=0"], "error: bad configuration for eval: window_seconds must be > 0, got 0.0"),
    (["split=val", "c2f_chunk_seconds=0"], "error: bad configuration for eval: c2f_chunk_seconds must be > 0"),
    (["split=val", "swap"], r"error: the coarse model is conditioned on 4 codebooks: a c2f model given as the coarse "
                            r"one\? \(coarse=.*c2f.pt, c2f=.*coarse.pt\)")])
def test_eval_s_start_up_mistakes_are_one_line_and_exit_2(args, message, prepared, codec, codec_path, tmp_path, capsys):
    """Found before scoring, these ended in Hydra's traceback and exit status 1: the README's `vampnet-pl eval
    coarse=... c2f=... dataset_dir=...` (split=test) on a small catalog's shards, whose test split is empty, among them."""
    from vampnet_pl.cli import main

    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    save_exported(tmp_path / "c2f.pt", small_model(codec, 14, 4))
    models = [f"coarse={tmp_path / 'coarse.pt'}", f"c2f={tmp_path / 'c2f.pt'}"]
    if "swap" in args:
        args, models = [a for a in args if a != "swap"], [f"coarse={tmp_path / 'c2f.pt'}", f"c2f={tmp_path / 'coarse.pt'}"]
    with pytest.raises(SystemExit) as err:  # the fixture's shard set has an empty test split
        main(["eval", *models, f"codec.source={codec_path}", "codec.device=cpu", f"dataset_dir={prepared}",
              "n_windows=2", "window_seconds=1.0", f"out_dir={tmp_path / 'out'}", *args])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0]), stderr
    assert "HYDRA_FULL_ERROR" not in stderr and "Traceback" not in stderr


def test_compression_deeper_than_the_models_is_refused_before_generating(prepared, codec, codec_path, tmp_path,
                                                                         monkeypatch):
    """``eval_protocol.compression_codebooks`` or a ``compression:N:P`` preset above the models' depth kept every
    codebook of its frames without a word (the protocol's compression scored as ``periodic_8``)."""
    from vampnet_pl.config import UsageError
    from vampnet_pl.evaluation.app import evaluate
    import vampnet_pl.evaluation.app as app

    save_exported(tmp_path / "coarse.pt", small_model(codec, 4, 0))
    monkeypatch.setattr(app, "eval_windows", lambda *args: pytest.fail("read the windows before the check"))
    base = [f"coarse={tmp_path / 'coarse.pt'}", f"codec.source={codec_path}", "codec.device=cpu",
            f"dataset_dir={prepared}", "split=val", "window_seconds=1.0", "n_windows=2"]
    for override, message in (("eval_protocol.compression_codebooks=5", "compression_codebooks=5 is more than the "
                                                                         "model's 4 codebooks"),
                              ("prompts=[compression:5:4]", "prompts: bad prompt 'compression:5:4': keeps 5 codebooks, "
                                                            "but the model has 4")):
        with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = OmegaConf.to_object(hydra.compose("eval", overrides=[*base, override]))
        with pytest.raises(UsageError, match=message):
            evaluate(cfg)


@pytest.mark.parametrize("override, message", [
    ("eval_protocol.compression_codebooks=-1", "compression_codebooks must be at least 0"),
    ("eval_protocol.compression_period=0", "compression_period must be at least 1"),
    ("eval_protocol.periods=[-4,16]", r"periods must be >= 0, got \[-4, 16\]"),
])
def test_protocol_prompt_settings_out_of_range_are_refused_at_compose_time(override, message):
    """A negative compression_codebooks kept every level but the last; compression_period 0 kept nothing (the
    compression:N:P preset refuses both); a negative period failed at the first validation."""
    from vampnet_pl.config import UsageError, compose

    for name, base in (("eval", ["coarse=c.pt", "dataset_dir=/data"]), ("train", ["data.dataset_dir=/data"])):
        with pytest.raises(UsageError, match=message):
            compose(name, [*base, override])


def test_train_refuses_compression_deeper_than_its_model_at_compose_time():
    """The model's depth is in the train config: a deeper compression prompt was accepted, and validated as a
    periodic one (the protocol's) or kept every level (the callback's preset)."""
    from vampnet_pl.config import UsageError, compose

    base = ["data.dataset_dir=/data", "model=coarse_tiny"]
    with pytest.raises(UsageError, match="compression_codebooks=5 is more than the model's 4 codebooks"):
        compose("train", [*base, "eval_protocol.compression_codebooks=5"])
    with pytest.raises(UsageError, match="callbacks.prompt_eval.prompts: bad prompt 'compression:5:4': keeps 5"):
        compose("train", [*base, "callbacks=with_eval", "callbacks.prompt_eval.prompts=[compression:5:4]"])
    compose("train", ["data.dataset_dir=/data", "model=c2f_tiny", "eval_protocol.compression_codebooks=14",
                      "callbacks=with_eval", "callbacks.prompt_eval.prompts=[compression:14:4]"])


def test_a_noisy_ratio_outside_0_1_is_refused_before_anything_runs(codec_path):
    """1.5 silently replaced every token (the noisy-token baseline then was pure noise)."""
    from vampnet_pl.config import UsageError, compose
    from vampnet_pl.evaluation.callback import PromptEvalCallback

    with pytest.raises((UsageError, ValueError), match=r"noisy_ratio must be in \[0, 1\]"):
        compose("eval", ["coarse=c.pt", "dataset_dir=d", "noisy_ratio=1.5"])
    with pytest.raises(ValueError, match=r"noisy_ratio must be in \[0, 1\]"):
        PromptEvalCallback(str(codec_path), None, noisy_ratio=-0.1)
