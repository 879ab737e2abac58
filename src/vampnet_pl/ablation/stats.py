"""Pure statistics for ablation reports: mean and t-interval over seeds, paired differences, Holm-adjusted p-values,
metric direction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # the 95% (or ``confidence``) interval is mean +- half_width; nan with fewer than 2 values
    n: int
    p_value: float = math.nan  # for paired differences: two-sided paired t-test against no difference

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, digits: int = 4) -> str:
        if self.n == 0:
            return "–"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}g} (n={self.n})"
        return f"{self.mean:.{digits}g} ± {self.half_width:.2g}"


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of independent values (e.g. one per seed); NaNs are dropped."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return Estimate(math.nan, math.nan, 0)
    if x.size == 1:
        return Estimate(float(x[0]), math.nan, 1)
    sem = x.std(ddof=1) / math.sqrt(x.size)
    return Estimate(float(x.mean()), float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * sem), int(x.size))


def paired_difference(condition: Mapping, baseline: Mapping, confidence: float = 0.95) -> Estimate:
    """Mean of ``condition[k] - baseline[k]`` over the keys (seeds) both have, with its t-interval and p-value."""
    keys = sorted(k for k in condition.keys() & baseline.keys()
                  if not math.isnan(condition[k]) and not math.isnan(baseline[k]))
    diffs = [condition[k] - baseline[k] for k in keys]
    estimate = mean_ci(diffs, confidence)
    if len(diffs) < 2:
        return estimate
    sd = float(np.std(diffs, ddof=1))
    if sd == 0:
        p = 1.0 if estimate.mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(estimate.mean) / (sd / math.sqrt(len(diffs))), len(diffs) - 1))
    return Estimate(estimate.mean, estimate.half_width, estimate.n, p)


def common_keys(by_group: Mapping[Hashable, Mapping[Hashable, float]]) -> list:
    """The keys (seeds) with a value (not NaN) in every group (condition) that has any value: the seeds on which
    all of them can be compared, so that means, ranking and paired tests are over the same seeds. A group with no
    value at all is left out (it has nothing to compare), not allowed to empty the set."""
    present = [{k for k, v in values.items() if not math.isnan(v)} for values in by_group.values()]
    present = [keys for keys in present if keys]
    return sorted(set.intersection(*present)) if present else []


def holm(p_values: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Holm-Bonferroni adjusted p-values of one family of tests (a NaN p is no test and stays NaN).

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where the
    adjusted p is below alpha keeps the chance of any false rejection in the family at most alpha. Holm rather
    than Benjamini-Hochberg because that guarantee holds under any dependence between the tests, and the
    metrics of a sweep are strongly dependent (loss, accuracies, per-ratio and per-codebook values of the same
    runs), where BH's false-discovery guarantee needs a positive dependence that two-sided tests need not have.
    """
    tests = sorted(((p, key) for key, p in p_values.items() if not math.isnan(p)), key=lambda test: test[0])
    adjusted = {key: math.nan for key in p_values}
    running = 0.0
    for i, (p, key) in enumerate(tests):
        running = max(running, min(1.0, (len(tests) - i) * p))
        adjusted[key] = running
    return adjusted


_HIGHER_IS_BETTER = re.compile(r"(^|/)(acc\w*|top\d+\w*|accuracy\w*)(/|$)")
# Logged beside the scores but no measure of the model: the data readers' health counts (data/), throughput (perf/),
# gradient norms, embedding counts, steps, the learning rate.
_NOT_A_SCORE = re.compile(r"^(data|perf)/|(^|/)(n_embeddings|epoch|step|lr|grad_norm)(/|$)")


def higher_is_better(metric: str) -> bool:
    """Accuracies are better higher; losses, perplexities and distances (mel, FAD, KAD) lower."""
    return bool(_HIGHER_IS_BETTER.search(metric))


def is_score(metric: str) -> bool:
    """False for bookkeeping numbers reported beside scores (data-health counts, throughput, gradient norm, embedding
    counts, steps, learning rate): they are neither compared with the baseline nor counted in a Holm family."""
    return not _NOT_A_SCORE.search(metric)


def rank(estimates: Mapping[str, Estimate], higher_better: bool) -> list[str]:
    """Conditions best first by mean (conditions without values last)."""
    def key(name: str) -> float:
        mean = estimates[name].mean
        return math.inf if math.isnan(mean) else (-mean if higher_better else mean)

    return sorted(estimates, key=key)


def band(curves: Iterable[Mapping[int, float]], confidence: float = 0.95) -> tuple[list[int], list[Estimate]]:
    """Per step, the mean and interval over the curves that have a value at that step."""
    curves = list(curves)
    steps = sorted(set().union(*[c.keys() for c in curves])) if curves else []
    return steps, [mean_ci([c[s] for c in curves if s in c], confidence) for s in steps]
