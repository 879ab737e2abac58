"""The pure statistics behind ablation reports, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from vampnet_pl.ablation import stats


def test_mean_ci_uses_the_t_distribution():
    e = stats.mean_ci([1.0, 2.0, 3.0])  # sd 1, sem 1/sqrt(3), t(0.975, 2) = 4.302653
    assert e.mean == 2.0 and e.n == 3
    assert e.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (e.low, e.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-6)
    two = stats.mean_ci([10.0, 12.0])  # sd sqrt(2), sem 1, t(0.975, 1) = 12.706205
    assert two.half_width == pytest.approx(12.706205, rel=1e-6)
    assert stats.mean_ci([1.0, 2.0, 3.0], confidence=0.9).half_width == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)


def test_mean_ci_of_one_or_no_value_has_no_interval():
    one = stats.mean_ci([5.0, float("nan")])
    assert one.mean == 5.0 and one.n == 1 and math.isnan(one.half_width)
    assert one.format() == "5 (n=1)"
    none = stats.mean_ci([])
    assert none.n == 0 and math.isnan(none.mean) and none.format() == "–"


def test_paired_difference_pairs_by_seed_and_drops_unpaired():
    condition = {0: 1.5, 1: 2.5, 2: 4.0, 3: 9.0}
    baseline = {0: 1.0, 1: 2.0, 2: 3.0}  # seed 3 has no partner
    d = stats.paired_difference(condition, baseline)  # differences 0.5, 0.5, 1.0
    assert d.n == 3 and d.mean == pytest.approx(2 / 3)
    sd = math.sqrt(((0.5 - 2 / 3) ** 2 * 2 + (1 / 3) ** 2) / 2)
    assert d.half_width == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    # paired t statistic 4.0 on 2 degrees of freedom: two-sided p = 0.057191
    assert d.p_value == pytest.approx(0.0571909, rel=1e-4)


def test_paired_difference_differs_from_the_unpaired_one():
    # A large seed effect shared by both conditions: the paired interval is narrow, the unpaired one wide.
    baseline = {0: 1.0, 1: 5.0, 2: 9.0}
    condition = {s: v + 0.1 for s, v in baseline.items()}
    paired = stats.paired_difference(condition, baseline)
    assert paired.mean == pytest.approx(0.1) and paired.half_width == pytest.approx(0.0, abs=1e-9)
    assert stats.mean_ci(condition.values()).half_width > 5


def test_direction_ranking_and_scores():
    assert stats.higher_is_better("val/acc1") and stats.higher_is_better("val/top1_masked/ratio_le_0.25")
    assert not stats.higher_is_better("val/loss") and not stats.higher_is_better("gen/fad/periodic:16")
    assert not stats.is_score("gen/n_embeddings/periodic:16") and stats.is_score("gen/kad/prefix")
    for bookkeeping in ("data/skipped/undecodable", "data/samples_read", "perf/tokens_per_s", "train/grad_norm", "lr"):
        assert not stats.is_score(bookkeeping), bookkeeping
    assert stats.is_score("val/loss/prompt_prefix") and stats.is_score("train/loss_epoch")
    estimates = {"a": stats.Estimate(0.3, 0.1, 2), "b": stats.Estimate(0.1, 0.1, 2), "c": stats.Estimate(math.nan, math.nan, 0)}
    assert stats.rank(estimates, higher_better=False) == ["b", "a", "c"]
    assert stats.rank(estimates, higher_better=True) == ["a", "b", "c"]


def test_band_averages_curves_where_they_have_values():
    steps, estimates = stats.band([{10: 1.0, 20: 2.0}, {10: 3.0, 20: 4.0, 30: 5.0}])
    assert steps == [10, 20, 30]
    assert [e.mean for e in estimates] == [2.0, 3.0, 5.0] and [e.n for e in estimates] == [2, 2, 1]


def test_holm_adjustment_by_hand():
    # sorted p 0.01, 0.02, 0.03, 0.5 of m = 4: 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.03), max(0.06, 0.5)
    adjusted = stats.holm({"a": 0.03, "b": 0.01, "c": 0.5, "d": 0.02, "e": math.nan})
    assert {k: v for k, v in adjusted.items() if k != "e"} == pytest.approx({"a": 0.06, "b": 0.04, "c": 0.5, "d": 0.06})
    assert math.isnan(adjusted["e"])  # no test: not counted in m
    assert stats.holm({"a": 0.4, "b": 0.9}) == pytest.approx({"a": 0.8, "b": 0.9})
    assert stats.holm({"a": 0.7, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1, monotone
    assert stats.holm({}) == {}


def test_common_keys_are_the_seeds_every_condition_with_values_has():
    by_condition = {"a": {0: 1.0, 1: 2.0, 2: 3.0}, "b": {0: 1.0, 1: math.nan, 2: 3.0, 3: 4.0}, "c": {}, "d": {0: math.nan}}
    assert stats.common_keys(by_condition) == [0, 2]  # b's NaN drops seed 1; c and d have nothing to compare
    assert stats.common_keys({"a": {}}) == [] and stats.common_keys({}) == []
