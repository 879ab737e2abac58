"""Masking library: schedules, samplers, training masks and prompt masks (pure tensor functions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vampnet_pl.masking import prompts
from vampnet_pl.masking.config import MaskingConfig, TrainingMasker
from vampnet_pl.masking.schedules import SCHEDULES, RatioSampler, get_schedule, register_schedule, schedule_slope, truncate
from vampnet_pl.masking.training import (bernoulli_mask, codebook_level_mask, magnet_expected_fractions,
                                         magnet_span_counts, magnet_span_mask, per_level_mask, random_mask, span_mask)

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


def test_bernoulli_mask_masks_each_token_independently_as_the_original():
    """The original's training mask (vampnet/mask.py ``random``) is Bernoulli(gamma(r)) per token: at r = 0.5 the
    masked count of 400 predicted tokens is Binomial(400, cos(pi / 4)), mean 282.8 and standard deviation 9.1."""
    import math

    batch, p = 4000, math.cos(math.pi / 4)
    mask = bernoulli_mask((batch, 6, 100), torch.full((batch,), p), 2, torch.Generator().manual_seed(0))
    assert not mask[:, :2].any()
    counts = mask[:, 2:].flatten(1).sum(1).double()
    assert counts.mean().item() == pytest.approx(400 * p, abs=0.5)
    assert counts.std().item() == pytest.approx(math.sqrt(400 * p * (1 - p)), rel=0.05)
    # the masked positions are independent: the frames of one codebook are not those of another
    assert mask[:, 2].float().mean().item() == pytest.approx(p, abs=0.01)
    assert (mask[:, 2] & mask[:, 3]).float().mean().item() == pytest.approx(p * p, abs=0.01)
    # an example left with no masked token gets one (the original's batch of empty masks has a NaN loss)
    empty = bernoulli_mask((64, 4, 10), torch.zeros(64), 1, torch.Generator().manual_seed(0))
    assert torch.equal(empty[:, 1:].flatten(1).sum(1), torch.ones(64, dtype=torch.long)) and not empty[:, 0].any()
    assert len(set(empty[:, 1:].flatten(1).int().argmax(1).tolist())) > 10  # at a random position


def test_span_mask_masks_whole_spans_at_about_the_ratio():
    ratios = torch.full((SHAPE[0],), 0.5)
    mask = span_mask(SHAPE, ratios, span_frames=10, n_conditioning=1, generator=torch.Generator().manual_seed(0))
    assert not mask[:, 0].any()
    assert torch.equal(mask[:, 1], mask[:, -1])  # the same time spans in every predicted codebook
    assert mask[:, 1:].float().mean().item() == pytest.approx(0.5, abs=0.03)
    runs = torch.diff(mask[0, 1].int(), prepend=torch.zeros(1, dtype=torch.int32)).eq(1).sum()
    assert runs <= 10  # 10 spans of 10 frames at most (adjacent ones merge)


@pytest.mark.parametrize("frames, span", [(4, 8), (7, 8), (20, 16), (86, 8)])
def test_span_mask_masks_the_ratio_of_frames_when_spans_do_not_tile_the_window(frames, span):
    """Fewer frames than a span, or a partial last span: the masked fraction is still the ratio (to a frame), and
    the masker reports the fraction it masked."""
    ratios = torch.linspace(0.05, 1.0, 64)
    mask = span_mask((64, 3, frames), ratios, span, 1, torch.Generator().manual_seed(0))
    fraction = mask[:, 1:].flatten(1).float().mean(1)
    assert torch.equal(fraction, (ratios * frames).round().clamp(1, frames) / frames)
    assert torch.equal(mask[:, 1], mask[:, 2])
    draw = TrainingMasker(MaskingConfig(kind="span", span_frames=span), 1).draw(torch.zeros(64, 3, frames).long())
    assert torch.equal(draw.ratios, draw.mask[:, 1:].flatten(1).float().mean(1))


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


@pytest.mark.parametrize("kind", ["random", "bernoulli", "span", "magnet_span", "codebook_level", "per_level"])
def test_training_masker_end_to_end(kind):
    masker = TrainingMasker(MaskingConfig(kind=kind, schedule="cosine", sampler="sobol"), n_conditioning=2)
    mask, ratios = masker(torch.zeros(SHAPE, dtype=torch.long))
    assert mask.shape == SHAPE and ratios.shape == (SHAPE[0],) and not mask[:, :2].any()
    assert mask[:, 2:].float().mean().item() == pytest.approx(ratios.mean().item(), abs=0.08)
    assert mask[:, 2:].flatten(1).any(1).all()  # never an empty mask
    with pytest.raises(ValueError, match="unknown masking kind"):
        TrainingMasker(MaskingConfig(kind="typo"), 0)


@pytest.mark.parametrize("kind, extra", [("per_level", dict(level_schedules=["linear", "cosine"])), ("codebook_level", {})])
def test_the_expected_ratio_and_its_slope_count_every_level_masked(kind, extra):
    """per_level repeats its last schedule over the levels it does not list, and codebook_level masks the levels
    above its drawn one whole: the recorded ratio, the expected one and the diffusion weight (its slope) count them."""
    import math

    masker = TrainingMasker(MaskingConfig(kind=kind, schedule="cosine", **extra), n_conditioning=4)
    r = torch.full((2000,), 0.4)
    draw = masker.draw(torch.zeros(2000, 14, 40, dtype=torch.long), torch.Generator().manual_seed(0), r)
    realised = draw.mask[:, 4:].flatten(1).float().mean(1)
    assert torch.allclose(draw.ratios, realised, atol=0.02)
    assert masker.expected_ratio(r[:1], 10).item() == pytest.approx(realised.mean().item(), abs=0.01)
    slope = math.pi / 2 * math.sin(math.pi / 2 * 0.4)  # |d cos(pi r / 2) / dr|
    want = (1 + 9 * slope) / 10 if kind == "per_level" else slope / 10  # linear once, cosine on 9 levels
    assert masker.loss_weights(r[:1], 10).item() == pytest.approx(want, rel=1e-4)


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
    assert kept(prompts.periodic((1, 1, 3), period=16, width=8)) == [0, 1, 2]  # wider than the signal: all of it
    assert kept(prompts.periodic((1, 1, 10), period=16, width=3)) == [0, 1]
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


@pytest.mark.parametrize("spec, message", [
    ("periodic:16.7", "argument 1 must be a whole number >= 0, got 16.7"),  # was cut to 16
    ("periodic:8:0", "argument 2 must be a whole number >= 1"),
    ("compression:-1:4", "argument 1 must be a whole number >= 0"),  # masked only the last codebook
    ("beat:0", "argument 1 must be a whole number >= 1"),  # kept nothing
    ("random:1.5", r"argument 1 must lie in \[0, 1\]"),
    ("prefix:-2", r"argument 1 must lie in \[0, inf\]"),
    ("prefix:inf", "arguments must be finite numbers"),  # these three raised OverflowError (a traceback in vamp)
    ("inpaint:0:1e308", "argument 2 must be at most 1e\\+09, got 1e\\+308"),
    ("periodic:1e30", "argument 1 must be at most 1e\\+09"),
])
def test_presets_refuse_arguments_out_of_range(codec, spec, message):
    from vampnet_pl.masking.presets import build_prompt

    with pytest.raises(ValueError, match=message):
        build_prompt(spec, (1, 2, 64), np.zeros(100), codec)


def test_compression_keeping_more_codebooks_than_the_mask_has_is_refused(codec):
    """``compression:3:4`` on a 2-codebook mask kept every codebook of its frames: ``periodic:4``."""
    from vampnet_pl.masking.presets import build_prompt, prompt_arguments
    from vampnet_pl.masking.protocol import EvalProtocolConfig, prompt_mask

    assert prompt_arguments("compression:3:4") == ("compression", [3, 4])  # the depth unknown: a config's check
    with pytest.raises(ValueError, match="bad prompt 'compression:3:4': keeps 3 codebooks, but the model has 2"):
        prompt_arguments("compression:3:4", 2)
    with pytest.raises(ValueError, match="keeps 3 codebooks, but the model has 2"):
        build_prompt("compression:3:4", (1, 2, 64), np.zeros(100), codec)
    assert not build_prompt("compression:2:4", (1, 2, 64), np.zeros(100), codec)[0, :, 0].any()
    with pytest.raises(ValueError, match="compression_codebooks=3 is more than the model's 2 codebooks"):
        prompt_mask(EvalProtocolConfig(compression_codebooks=3), "compression", (1, 2, 64))


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


def test_onset_prompt_can_keep_the_originals_width_around_each_onset(codec, monkeypatch):
    """The original's onset_mask(width=w) keeps frames [onset - w, onset + w): ``onset:2w:w``; the default keeps w
    frames from the onset. Clipped at the start (the original's negative slice keeps nothing there)."""
    from vampnet_pl.masking.presets import build_prompt

    monkeypatch.setattr(prompts, "onset_frames", lambda audio, sr, hop: np.array([3, 20]))
    kept = lambda spec: torch.nonzero(~build_prompt(spec, (1, 2, 40), np.zeros(100), codec)[0, 0]).flatten().tolist()
    assert kept("onset:5") == [3, 4, 5, 6, 7, 20, 21, 22, 23, 24]
    assert kept("onset:10:5") == [0, 1, 2, 3, 4, 5, 6, 7, *range(15, 25)]
    assert (~prompts.frames_to_mask((1, 1, 40), [20], 10, before=5)[0, 0]).nonzero().flatten().tolist() == [*range(15, 25)]
    with pytest.raises(ValueError, match="argument 2 must be a whole number >= 0"):
        build_prompt("onset:4:-1", (1, 2, 40), np.zeros(100), codec)


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


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_slopes_are_finite_and_integrate_to_the_masked_range(name):
    r = torch.linspace(0, 1, 2001)
    slope = schedule_slope(get_schedule(name), r)
    assert slope.shape == r.shape and torch.isfinite(slope).all() and (slope >= 0).all()
    inner = slope[1:-1]  # sqrt's slope is infinite at 0: the integral over the inner points still comes to ~1
    assert float(torch.trapezoid(inner, r[1:-1])) == pytest.approx(1.0, abs=0.05)
    assert schedule_slope(get_schedule("cosine"), torch.tensor([0.5])).item() == pytest.approx(np.pi / 2 * np.sin(np.pi / 4))


def test_truncated_schedules_draw_r_in_the_range_only():
    masker = TrainingMasker(MaskingConfig(schedule="linear", r_min=0.2, r_max=0.6), n_conditioning=0)
    draw = masker.draw(torch.zeros(512, 2, 50, dtype=torch.long), torch.Generator().manual_seed(0))
    assert draw.r.min() >= 0.2 and draw.r.max() < 0.6 and draw.r.max() > 0.55 and draw.r.min() < 0.25
    assert torch.allclose(draw.ratios, 1 - draw.r)  # linear schedule
    assert torch.equal(truncate(torch.tensor([0.0, 0.5]), 0.2, 0.6), torch.tensor([0.2, 0.4]))
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="r_min"):
            MaskingConfig(r_min=bad[0], r_max=bad[1])


def test_magnet_span_count_mapping_accounts_for_overlaps():
    frames, span = 100, 5
    expected = magnet_expected_fractions(frames, span)
    assert expected[0] == pytest.approx(0.0, abs=1e-6) and expected[-1] == pytest.approx(1.0)
    assert torch.all(expected[1:] >= expected[:-1])  # monotone in the span count
    assert expected[1] == pytest.approx(span / frames - (span - 1) * span / 2 / frames**2, abs=1e-6)  # one clipped span
    # Overlaps: 10 spans of 5 frames cover less than half of 100 frames on average.
    assert expected[10] < 0.5 and expected[10] == pytest.approx(1 - np.mean([
        np.prod([(frames - min(t + 1, span) - i) / (frames - i) for i in range(10)]) for t in range(frames)]), abs=1e-6)
    ratios = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0])
    counts = magnet_span_counts(ratios, frames, span)
    assert torch.all(counts[1:] >= counts[:-1]) and counts.min() >= 1
    assert torch.allclose(expected[counts].float(), ratios, atol=0.02)
    # The realised masked fraction matches the rate in expectation.
    many = ratios.repeat(400)
    mask = magnet_span_mask((len(many), 3, frames), many, span, 1, torch.Generator().manual_seed(0))
    assert not mask[:, 0].any() and torch.equal(mask[:, 1], mask[:, 2])
    realised = mask[:, 1].float().mean(1).view(400, len(ratios)).mean(0)
    assert torch.allclose(realised, ratios, atol=0.02), realised
    runs = torch.diff(mask[:, 1].int(), dim=1, prepend=torch.zeros(len(many), 1, dtype=torch.int32)).eq(1).sum(1)
    assert runs.view(400, -1)[:, 0].float().mean() > 0.5  # spans, not single frames (3 spans at 5%)
    assert torch.all(mask[:, 1].sum(1) >= 1)


def test_per_level_mask_gives_each_level_its_own_schedule():
    cfg = MaskingConfig(kind="per_level", level_schedules=["linear", "cosine", "square"])
    masker = TrainingMasker(cfg, n_conditioning=1)
    r = torch.full((64,), 0.5)
    draw = masker.draw(torch.zeros(64, 5, 200, dtype=torch.long), torch.Generator().manual_seed(0), r)
    per_level = draw.mask.float().mean(2).mean(0)  # [levels]
    assert per_level[0] == 0  # conditioning
    expected = [0.5, np.cos(np.pi / 4), 0.75, 0.75]  # the last schedule repeats for higher levels
    assert torch.allclose(per_level[1:], torch.tensor(expected, dtype=torch.float32), atol=0.01)
    assert torch.allclose(draw.ratios, torch.full((64,), float(np.mean(expected))), atol=1e-6)
    assert masker.expected_ratio(torch.tensor([0.0, 1.0]), 4).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # Exact per-level counts, and never an empty mask even where every schedule gives 0.
    mask = per_level_mask((2, 3, 10), torch.tensor([[0.3, 0.0], [0.0, 0.0]]), 1, torch.Generator().manual_seed(0))
    assert mask[0, 1].sum() == 3 and mask[0, 2].sum() == 0 and mask[1].sum() == 1
    with pytest.raises(ValueError, match="predicted levels"):
        per_level_mask((2, 3, 10), torch.zeros(2, 3), 1)


def test_masking_config_rejects_unknown_names():
    for field_name, value in (("schedule", "cosin"), ("kind", "spans"), ("sampler", "halton"), ("level_schedules", ["x"])):
        with pytest.raises(ValueError, match=f"unknown masking {field_name.split('_')[-1].rstrip('s')}"):
            MaskingConfig(**{field_name: value})


def test_protocol_masks_are_fixed_by_the_protocol_seed_and_window_index():
    from vampnet_pl.masking.protocol import EvalProtocolConfig, protocol_masks

    protocol = EvalProtocolConfig()
    masks = protocol_masks(protocol, (3, 4, 64), 1, torch.tensor([0, 1, 2]))
    assert list(masks)[:10] == [f"ratio_{r:.2f}" for r in protocol.ratios]
    assert list(masks)[10:] == ["periodic_4", "periodic_8", "periodic_16", "periodic_32", "prefix", "suffix", "inpaint",
                                "compression"]
    for ratio, name in zip(protocol.ratios, masks):
        assert torch.allclose(masks[name][:, 1:].flatten(1).float().mean(1), torch.full((3,), ratio), atol=1 / 192)
    assert all(not m[:, 0].any() for m in masks.values())
    assert torch.nonzero(~masks["prefix"][0, 1]).flatten().tolist() == list(range(16))
    assert torch.nonzero(~masks["inpaint"][0, 1]).flatten().tolist() == list(range(16)) + list(range(48, 64))
    again = protocol_masks(protocol, (2, 4, 64), 1, torch.tensor([2, 0]))  # other batching, same windows
    assert torch.equal(again["ratio_0.30"][0], masks["ratio_0.30"][2]) and torch.equal(again["ratio_0.30"][1], masks["ratio_0.30"][0])
    assert not torch.equal(masks["ratio_0.50"][0], masks["ratio_0.50"][1])  # windows differ
    other = protocol_masks(EvalProtocolConfig(seed=1), (3, 4, 64), 1, torch.tensor([0, 1, 2]))
    assert not torch.equal(other["ratio_0.50"], masks["ratio_0.50"])
    with pytest.raises(ValueError, match="sweep_prompt"):
        EvalProtocolConfig(sweep_prompt="periodic_5")


@pytest.mark.parametrize("sampler", ["uniform", "sobol"])
@pytest.mark.parametrize("kind", ["random", "bernoulli", "span", "magnet_span", "codebook_level", "per_level"])
def test_masks_do_not_depend_on_the_default_dtype(kind, sampler):
    """Lightning's bf16-true sets bf16 as the default dtype inside the steps: the draws stay float32 (a bf16 draw
    has only 256 values below 1, and another seed's sequence)."""
    masker = TrainingMasker(MaskingConfig(kind=kind, schedule="cosine", sampler=sampler), n_conditioning=2)
    codes = torch.zeros(SHAPE, dtype=torch.long)

    def drawn():
        draw = masker.draw(codes, torch.Generator().manual_seed(3))
        return draw, prompts.random_prompt(SHAPE, 0.3, torch.Generator().manual_seed(4)), \
            prompts.dropout(torch.ones(SHAPE, dtype=torch.bool), 0.3, torch.Generator().manual_seed(5))

    reference = drawn()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        bf16 = drawn()
    finally:
        torch.set_default_dtype(default)
    assert bf16[0].r.dtype == torch.float32 and torch.equal(bf16[0].r, reference[0].r)
    assert torch.equal(bf16[0].mask, reference[0].mask) and torch.equal(bf16[0].ratios, reference[0].ratios)
    assert torch.equal(bf16[1], reference[1]) and torch.equal(bf16[2], reference[2])
