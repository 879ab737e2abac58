"""Masking library: schedules, samplers, training masks and prompt masks (pure tensor functions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vampnet_pl.masking import prompts
from vampnet_pl.masking.config import MaskingConfig, TrainingMasker
from vampnet_pl.masking.schedules import SCHEDULES, RatioSampler, get_schedule, register_schedule
from vampnet_pl.masking.training import codebook_level_mask, random_mask, span_mask

SHAPE = (16, 6, 200)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_go_from_all_masked_to_none(name):
    r = torch.linspace(0, 1, 101)
    gamma = get_schedule(name)(r)
    assert gamma[0] == pytest.approx(1.0) and gamma[-1] == pytest.approx(0.0, abs=1e-6)
    assert torch.all(gamma[1:] <= gamma[:-1] + 1e-6)


def test_schedule_registry_is_open_and_names_unknowns():
    register_schedule("half")(lambda r: 0.5 * torch.ones_like(r))
    assert get_schedule("half")(torch.tensor([0.3])).item() == 0.5
    del SCHEDULES["half"]
    with pytest.raises(KeyError, match="known"):
        get_schedule("nope")


def test_samplers_cover_the_unit_interval():
    uniform = RatioSampler("uniform")(4096, torch.Generator().manual_seed(0))
    sobol = RatioSampler("sobol")(4096, torch.Generator().manual_seed(0))
    for r in (uniform, sobol):
        assert r.shape == (4096,) and r.min() >= 0 and r.max() < 1
        assert torch.histc(r, 8, 0, 1).min() > 400
    assert torch.histc(sobol, 8, 0, 1).std() < torch.histc(uniform, 8, 0, 1).std()  # low discrepancy
    with pytest.raises(ValueError):
        RatioSampler("gaussian")


@pytest.mark.parametrize("n_conditioning", [0, 2])
def test_random_mask_has_the_exact_fraction_and_spares_conditioning(n_conditioning):
    ratios = torch.linspace(0.05, 1.0, SHAPE[0])
    mask = random_mask(SHAPE, ratios, n_conditioning, torch.Generator().manual_seed(0))
    assert mask.shape == SHAPE and mask.dtype == torch.bool
    assert not mask[:, :n_conditioning].any()
    predicted = (SHAPE[1] - n_conditioning) * SHAPE[2]
    fraction = mask[:, n_conditioning:].flatten(1).float().mean(1)
    assert torch.allclose(fraction, ratios, atol=1.0 / predicted)
    assert random_mask(SHAPE, torch.zeros(SHAPE[0]), n_conditioning).flatten(1).sum(1).min() == 1  # never empty


def test_span_mask_masks_whole_spans_at_about_the_ratio():
    ratios = torch.full((SHAPE[0],), 0.5)
    mask = span_mask(SHAPE, ratios, span_frames=10, n_conditioning=1, generator=torch.Generator().manual_seed(0))
    assert not mask[:, 0].any()
    assert torch.equal(mask[:, 1], mask[:, -1])  # the same time spans in every predicted codebook
    assert mask[:, 1:].float().mean().item() == pytest.approx(0.5, abs=0.03)
    runs = torch.diff(mask[0, 1].int(), prepend=torch.zeros(1, dtype=torch.int32)).eq(1).sum()
    assert runs <= 10  # 10 spans of 10 frames at most (adjacent ones merge)


def test_codebook_level_mask_masks_everything_above_the_chosen_level():
    mask = codebook_level_mask(SHAPE, torch.full((SHAPE[0],), 0.5), 2, torch.Generator().manual_seed(1))
    assert not mask[:, :2].any()
    for example in mask:
        full = example.all(dim=1)
        partial = example.any(dim=1) & ~full
        levels = torch.nonzero(partial).flatten()
        assert len(levels) <= 1
        if len(levels):
            assert full[levels[0] + 1 :].all() and not example[: levels[0]].any()


@pytest.mark.parametrize("kind", ["random", "span", "codebook_level"])
def test_training_masker_end_to_end(kind):
    masker = TrainingMasker(MaskingConfig(kind=kind, schedule="cosine", sampler="sobol"), n_conditioning=2)
    mask, ratios = masker(torch.zeros(SHAPE, dtype=torch.long))
    assert mask.shape == SHAPE and ratios.shape == (SHAPE[0],) and not mask[:, :2].any()
    expected = ratios.mean().item()
    if kind != "codebook_level":
        assert mask[:, 2:].float().mean().item() == pytest.approx(expected, abs=0.08)
    with pytest.raises(ValueError, match="unknown masking kind"):
        TrainingMasker(MaskingConfig(kind="typo"), 0)


def test_prompt_masks():
    shape = (2, 4, 32)
    assert prompts.random_prompt(shape, 0.7, torch.Generator().manual_seed(0)).float().mean() == pytest.approx(0.7, abs=0.1)
    inpaint = prompts.inpaint(shape, prefix_frames=5, suffix_frames=3)
    assert not inpaint[..., :5].any() and not inpaint[..., -3:].any() and inpaint[..., 5:-3].all()
    assert prompts.seconds_to_frames(1.0, 86.13) == 86
    periodic = prompts.periodic(shape, period=8, width=2)
    kept_frames = torch.nonzero(~periodic[0, 0]).flatten().tolist()
    assert kept_frames == [0, 7, 8, 15, 16, 23, 24]  # centred: one frame before each centre, clipped at 0
    rolled = prompts.periodic((64, 1, 32), period=8, random_roll=True, generator=torch.Generator().manual_seed(0))
    assert len({tuple(torch.nonzero(~m[0]).flatten().tolist()) for m in rolled}) > 1
    assert (~rolled).sum(-1).eq(4).all()
    compressed = prompts.compression(shape, n_keep_codebooks=1, period=4)
    assert compressed[:, 1:].all() and torch.nonzero(~compressed[0, 0]).flatten().tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    kept = prompts.keep_codebooks(prompts.full_mask(shape), 2)
    assert not kept[:, :2].any() and kept[:, 2:].all()
    dropped = prompts.dropout(inpaint, 1.0)
    assert dropped.all()
    union = prompts.keep_union(prompts.inpaint(shape, prefix_frames=4), prompts.inpaint(shape, suffix_frames=4))
    assert not union[..., :4].any() and not union[..., -4:].any() and union[..., 4:-4].all()
    both = prompts.keep_intersection(prompts.inpaint(shape, prefix_frames=8), prompts.periodic(shape, 4))
    assert torch.nonzero(~both[0, 0]).flatten().tolist() == [0, 4]


def test_periodic_prompt_width_is_centred_and_period_zero_is_unconditional():
    shape = (1, 1, 20)
    kept = lambda mask: torch.nonzero(~mask[0, 0]).flatten().tolist()  # noqa: E731
    assert kept(prompts.periodic(shape, period=6, width=3)) == [0, 1, 5, 6, 7, 11, 12, 13, 17, 18, 19]
    assert kept(prompts.periodic(shape, period=6, width=1)) == [0, 6, 12, 18]
    assert prompts.periodic(shape, period=0, width=3).all()
    assert prompts.periodic((3, 2, 20), period=0).all()
    with pytest.raises(ValueError, match="period and width"):
        prompts.periodic(shape, period=-1)
    rolled = prompts.periodic((32, 1, 40), period=8, width=3, random_roll=True,
                              generator=torch.Generator().manual_seed(0))
    for row in rolled[:, 0]:
        frames = torch.nonzero(~row).flatten().tolist()
        centre = next(f for f in frames if f - 1 in frames and f + 1 in frames)
        assert all(((f - centre + 1) % 8) < 3 for f in frames)  # width 3 around each rolled centre
    assert len({tuple(torch.nonzero(~row).flatten().tolist()) for row in rolled[:, 0]}) > 1


def test_presets_pass_the_random_roll_and_find_beats_per_example(codec):
    from vampnet_pl.masking.presets import build_prompt

    shape = (16, 2, 64)
    plain = build_prompt("periodic:8", shape, np.zeros(100), codec)
    assert len({tuple(r.tolist()) for r in plain[:, 0]}) == 1
    rolled = build_prompt("periodic:8", shape, np.zeros(100), codec, torch.Generator().manual_seed(0), random_roll=True)
    assert len({tuple(r.tolist()) for r in rolled[:, 0]}) > 1
    assert build_prompt("periodic:0", shape, np.zeros(100), codec).all()


def test_onset_prompt_is_computed_from_each_examples_own_audio():
    audio, period = _clicks()
    hop = 256
    frames = audio.size // hop
    shifted = np.roll(audio, period // 2)  # clicks half a beat later
    mask = prompts.onset_prompt((2, 1, frames), np.stack([audio, shifted]), 22050, hop)
    first, second = (torch.nonzero(~mask[i, 0]).flatten().numpy() for i in range(2))
    assert len(first) and len(second) and not np.array_equal(first, second)
    alone = torch.nonzero(~prompts.onset_prompt((1, 1, frames), shifted, 22050, hop)[0, 0]).flatten().numpy()
    assert np.array_equal(second, alone)
    with pytest.raises(ValueError, match="beat/onset prompt"):
        prompts.onset_prompt((3, 1, frames), np.stack([audio, shifted]), 22050, hop)


def _clicks(sample_rate=22050, bpm=120, seconds=8.0):
    audio = np.zeros(int(sample_rate * seconds), np.float32)
    period = int(sample_rate * 60 / bpm)
    for start in range(0, audio.size, period):
        audio[start : start + 400] = np.hanning(400) * np.sin(np.arange(400) * 0.3)
    return audio, period


def test_onset_and_beat_prompts_keep_frames_at_the_clicks():
    audio, period = _clicks()
    hop = 256
    shape = (1, 2, audio.size // hop)
    onsets = prompts.onset_prompt(shape, audio, 22050, hop)
    kept = torch.nonzero(~onsets[0, 0]).flatten().numpy()
    expected = np.arange(0, audio.size, period) // hop
    assert len(kept) >= len(expected) - 2
    assert np.all(np.min(np.abs(kept[:, None] - expected[None]), axis=1) <= 2)


def test_beat_prompt_follows_the_tempo_of_a_song():
    from vampnet_pl.synth import random_song_spec, render_song

    spec = random_song_spec(5)
    song = render_song(spec, 12.0, 22050)[0]
    hop = 256
    beats = prompts.beat_frames(song, 22050, hop)
    assert len(beats) >= 8
    beat_period = 60 / spec.tempo_bpm * 22050 / hop
    spacing = np.median(np.diff(beats))
    assert min(abs(spacing - beat_period * f) for f in (0.5, 1, 2)) < 0.1 * beat_period
    mask = prompts.beat_prompt((1, 2, song.size // hop), song, 22050, hop, width=2)
    assert (~mask[0, 0]).sum() >= 2 * len(beats) - 2
