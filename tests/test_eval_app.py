"""The offline eval app: prompts and a passes sweep over a shard split -> CSV and plots."""

from __future__ import annotations

import csv
import math

import hydra
import numpy as np
import torch

from vampnet_pl.config import conf_dir
from vampnet_pl.evaluation.app import run
from vampnet_pl.masking.presets import build_prompt
from vampnet_pl.model import save_exported

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
                 "codec.device=cpu", f"dataset_dir={prepared}", "window_seconds=1.0", "n_windows=2", "batch_size=2",
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
    assert beat_calls and all(shape[0] == batch == 2 for batch, shape in beat_calls)  # each window's own audio


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
    (job,) = callback.preset_jobs(lambda codes, mask, passes: seen.append(mask) or codes, torch.Generator(), 0, 4)
    assert job[0] == "onset"
    job[2](torch.zeros(2, 4, frames, dtype=torch.long))
    (mask,) = seen
    for i in range(2):
        alone = prompts.onset_prompt((1, 4, frames), reference[i].numpy(), rate, hop)
        assert torch.equal(mask[i], alone[0])
    assert not torch.equal(mask[0], mask[1])
