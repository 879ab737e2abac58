"""``vampnet-pl ablate report SWEEP_DIR``: report.md, summary.csv and PNG figures from a sweep's runs.

Per condition (grid cell, over seeds): mean and 95% t-interval of every metric; paired differences against the
baseline condition (paired by seed), their t-test p-values Holm-adjusted within each family of comparisons (the
primary metric; the other headline metrics; the series metrics) and starred on the adjusted p; a ranking by the
primary metric; curves over training steps with CI bands;
series figures (accuracy against mask ratio, per codebook, quality against passes) and per-prompt bars.
Every statistic of a metric (means, ranking, paired tests) is over the same seeds: those with a value in every
condition that has any (a failed run, or a NaN, leaves its seed out of all conditions' statistics of that metric);
the seeds left out are named with the runs that lack them and why.
Runs that are missing or failed are listed, never dropped silently; so are config keys in which finished runs differ
although neither the grid nor the seed sets them apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vampnet_pl.ablation import results, stats
from vampnet_pl.ablation.runner import SWEEP_FILE
from vampnet_pl.utils.atomic import atomic_path, write_text_atomic

# Metric names that are a point of a series: (kind, family, x).
SERIES = [
    ("ratio", re.compile(r"^(?P<family>.+)/ratio_(?:le_)?(?P<x>\d+(?:\.\d+)?)$")),
    ("codebook", re.compile(r"^(?P<family>.+)/codebook_(?P<x>\d+)$")),
    ("passes", re.compile(r"^(?P<family>.+)/passes_(?P<x>\d+)$")),
    ("prompt", re.compile(r"^(?P<family>.+)/prompt_(?P<x>.+)$")),
    ("prompt", re.compile(r"^(?P<family>gen/[^/]+)/(?P<x>[^/]+)$")),  # gen/<metric>/<prompt>
    ("prompt", re.compile(r"^eval/(?P<x>[^/]+)/(?P<family>[^/]+)$")),  # the training-time evaluation callback
]
SERIES_LABELS = {"ratio": "mask ratio", "codebook": "codebook", "passes": "decoding passes", "prompt": "prompt"}
ALPHA = 0.05  # a paired difference is starred where its Holm-adjusted p is below this
FAMILIES = ("primary", "headline", "series")  # the families of comparisons p-values are adjusted within


def classify(metric: str) -> tuple[str, str, str] | None:
    for kind, pattern in SERIES:
        if match := pattern.match(metric):
            family = match["family"] if not metric.startswith("eval/") or kind != "prompt" else f"eval/{match['family']}"
            return kind, family, match["x"]
    return None


@dataclass
class RunRecord:
    run_id: str
    condition_id: str
    seed: int
    status: str  # finished | failed | diverged | incomplete | not started | unreadable
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    protocol: str = ""
    metrics_step: int | None = None
    final_step: int | None = None
    settings: dict[str, str] = field(default_factory=dict)  # the resolved config, flat, run-neutral (see run_settings)


def read_sweep(sweep_dir: str | Path, progress: bool = True) -> tuple[dict, list[RunRecord]]:
    from tqdm.auto import tqdm

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE}; `vampnet-pl ablate run` writes it)")
    sweep = results.read_record(sweep_dir / SWEEP_FILE)
    records = []
    for run in tqdm(sweep["runs"], desc="read runs", unit="run", disable=not progress):
        # where the sweep put it, under this folder: the recorded absolute path is stale once the folder moved (a
        # sweep copied from the cluster to be reported elsewhere)
        run_dir = sweep_dir / "runs" / run["run_id"]
        record = RunRecord(run["run_id"], run["condition_id"], int(run["seed"]), "not started")
        try:
            records.append(read_run(record, run, run_dir))
        except results.DamagedRecord as err:  # listed, not a report that fails on one run
            record.status, record.detail = "unreadable", str(err)
            records.append(record)
    return sweep, records


def read_run(record: RunRecord, run: dict, run_dir: Path) -> RunRecord:
    """``record`` filled in from the run's folder: finished (results.json), failed or diverged (failure.json),
    incomplete (started), or left as not started."""
    from omegaconf import OmegaConf

    from vampnet_pl.training.csv_logs import csv_log_dirs

    if results.results_path(run_dir).is_file():
        saved = results.read_record(results.results_path(run_dir))
        record.status, record.metrics, record.protocol = "finished", saved["metrics"], saved.get("protocol", "")
        record.metrics_step, record.final_step = saved.get("metrics_step"), saved.get("final_step")
        record.detail = "; ".join(score_warnings(saved))
        record.settings = run_settings(saved["config"], [saved.get("run_dir"), saved["config"].get("run_dir")],
                                       run["run_id"])
        log_dirs = csv_log_dirs(OmegaConf.create(saved["config"]))
        # the config's paths are where the run trained (results.json's run_dir), which sweep.json no longer
        # names once `ablate run` was re-run from a moved folder
        trained_in = Path(saved.get("run_dir") or run["run_dir"])
        record.curves = results.read_curves(run_dir, [moved(d, trained_in, run_dir) for d in log_dirs])
    elif (run_dir / results.FAILURE).is_file():
        failure = results.read_record(run_dir / results.FAILURE)
        # a divergence (non-finite loss) is a finding about the setting, a crash is not: told apart
        record.status = "diverged" if failure.get("status") == "diverged" else "failed"
        record.detail = failure.get("reason", "")
    elif run_dir.exists():
        record.status, record.detail = "incomplete", "started, no results.json (running, or stopped)"
    return record


def moved(path: Path, recorded_run_dir: Path, run_dir: Path) -> Path:
    """``path`` (a log folder the run's config names) in the run folder's place now, when it was inside it."""
    try:
        return run_dir / path.relative_to(recorded_run_dir)
    except ValueError:  # a log folder outside the run folder stays where it was
        return path


def _names(metrics: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{m}`" for m in metrics[:limit])
    return shown + (f" and {len(metrics) - limit} more" if len(metrics) > limit else "")


def score_warnings(saved: dict) -> list[str]:
    """What a finished run's ``results.json`` says about its final scores that a reader must know: scores not
    measured at the final step, scores missing there (left out of the statistics), NaN scores (a diverged run)."""
    final, notes = saved.get("final_step"), []
    if saved.get("metrics_step") != final:
        notes.append(f"scores measured at step {saved.get('metrics_step')}, training ended at {final}")
    gen_step = saved.get("gen_metrics_step")
    if gen_step is not None and gen_step != final:
        notes.append(f"gen/ scores from the generation evaluation at step {gen_step}, training ended at {final}")
    if missing := list(saved.get("missing_metrics") or []):
        notes.append(f"no value at the last evaluation, left out: {_names(missing)}")
    nan = sorted(k for k, v in saved.get("metrics", {}).items() if isinstance(v, float) and math.isnan(v))
    if diverged := [k for k in nan if not _by_mask_ratio(k)]:
        notes.append(f"NaN (diverged?), left out of the means: {_names(diverged)}")
    if empty := [k for k in nan if _by_mask_ratio(k)]:
        notes.append(f"NaN (no masked token in that mask-ratio bucket), left out of the means: {_names(empty)}")
    return notes


def _by_mask_ratio(metric: str) -> bool:
    """Metrics over one mask-ratio bucket: a mean of nothing (NaN) when no example's ratio fell in it."""
    return "/ratio_le_" in metric


# -- do the runs differ in the grid and the seed alone? ----------------------------------------------
LAUNCHER_KEYS = ("slurm.",)  # how a run was launched (local: slurm.requeue=off), not what it trained


def run_settings(config: dict, run_dirs: list[str | None], run_id: str) -> dict[str, str]:
    """A run's resolved config as dotted key -> JSON value, its own folder and id replaced by placeholders (every
    run has its own: they are no setting) and launcher keys left out."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif not prefix.startswith(LAUNCHER_KEYS):
            text = json.dumps(node, sort_keys=True)
            for run_dir in sorted({d for d in run_dirs if d}, key=len, reverse=True):
                text = text.replace(run_dir, "<run_dir>")
            flat[prefix[:-1]] = text.replace(run_id, "<run_id>")

    walk(config, "")
    return flat


def _is_group(key: str) -> bool:
    """Whether a grid key picks a config group (``masking``, ``experiment``): its options may set keys anywhere."""
    from vampnet_pl.config import conf_dir

    try:
        return (conf_dir() / key.split("@")[0].lstrip("+~").replace(".", "/")).is_dir()
    except FileNotFoundError:  # no conf/ here: every grid key may be one
        return True


def unexplained_settings(records: list[RunRecord], grid_keys: list[str]) -> dict[str, dict[str, list[str]]]:
    """Config keys in which the finished runs differ although neither the grid nor the seed sets them apart (the
    config or its defaults changed between runs of the sweep): key -> value -> run ids.

    A key may differ where the grid sets it (the key, or one below it), where every run's value is its seed or a
    grid key's value (``data.seed: ${seed}``, interpolations), or, when a grid key picks a config group (which may
    set any key), where it is the same in every run of a condition."""
    runs = [r for r in records if r.status == "finished" and r.settings]
    paths = [k.split("@")[0].lstrip("+~") for k in grid_keys]
    groups = any(_is_group(k) for k in grid_keys)
    drift = {}
    for key in sorted(set().union(*[r.settings for r in runs]) if runs else ()):
        values = {r.run_id: r.settings.get(key, "(absent)") for r in runs}
        if len(set(values.values())) < 2 or any(key == p or key.startswith(p + ".") for p in paths):
            continue
        if all(values[r.run_id] == json.dumps(r.seed) for r in runs):
            continue
        if any(all(values[r.run_id] == r.settings.get(p) for r in runs) for p in paths):
            continue
        by_condition = {}
        for r in runs:
            by_condition.setdefault(r.condition_id, set()).add(values[r.run_id])
        if groups and all(len(v) == 1 for v in by_condition.values()):
            continue
        drift[key] = {}
        for r in runs:
            drift[key].setdefault(values[r.run_id], []).append(r.run_id)
    return drift


def drift_warning(drift: dict[str, dict[str, list[str]]], limit: int = 8) -> str:
    if not drift:
        return ""
    shown = []
    for key, by_value in list(drift.items())[:limit]:
        shown.append(f"`{key}`: " + "; ".join(f"{value} ({', '.join(f'`{r}`' for r in run_ids)})"
                                               for value, run_ids in by_value.items()))
    more = f"; and {len(drift) - limit} more keys" if len(drift) > limit else ""
    return ("**Warning:** the finished runs were trained with settings that neither the grid nor the seed sets "
            "apart (the config changed during the sweep?), so their differences are not the grid's alone: "
            + " — ".join(shown) + more + ".")


@dataclass
class Analysis:
    conditions: list[str]
    baseline: str
    primary: str
    values: dict[str, dict[str, dict[int, float]]]  # metric -> condition -> seed -> value
    estimates: dict[str, dict[str, stats.Estimate]]  # metric -> condition -> estimate
    differences: dict[str, dict[str, stats.Estimate]]  # metric -> condition -> paired difference vs baseline
    seeds: dict[str, list[int]] = field(default_factory=dict)  # metric -> the seeds its statistics use
    gaps: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # metric -> seed left out -> why
    adjusted: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> condition -> Holm p in its family
    family_sizes: dict[str, int] = field(default_factory=dict)  # family -> number of tests adjusted together

    def family(self, metric: str) -> str:
        """``primary`` (the ranking's metric), ``series`` (a point of a series) or ``headline`` (any other)."""
        return "primary" if metric == self.primary else "series" if classify(metric) else "headline"

    def adjust(self) -> None:
        """Holm-adjust the paired t-test p-values within each family (see :func:`stats.holm`)."""
        for name in FAMILIES:
            raw = {(m, c): d.p_value for m, by in self.differences.items() if self.family(m) == name
                   for c, d in by.items()}
            holm = stats.holm(raw)
            for (metric, condition), p in holm.items():
                self.adjusted.setdefault(metric, {})[condition] = p
            self.family_sizes[name] = sum(not math.isnan(p) for p in raw.values())


def analyse(sweep: dict, records: list[RunRecord], baseline: str | None = None, primary: str | None = None) -> Analysis:
    conditions = list(dict.fromkeys(r["condition_id"] for r in sweep["runs"]))
    baseline = baseline or sweep["baseline"]
    if baseline not in conditions:
        raise ValueError(f"baseline {baseline!r} is not a condition of this sweep: {conditions}")
    primary = primary or sweep.get("primary_metric") or "val/loss"
    if not stats.is_score(primary):
        raise ValueError(f"the primary metric {primary!r} is bookkeeping, not a score (see stats.is_score): the "
                         "ranking compares scores; pick one such as val/loss or val/acc1")
    values: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        if record.status == "finished":
            for metric, value in record.metrics.items():
                values.setdefault(metric, {}).setdefault(record.condition_id, {})[record.seed] = float(value)
    # every statistic of a metric over the same seeds: a mean over other seeds than the paired test's could rank a
    # condition against its own test (a failed run's seed dropped from one condition only)
    seeds = {m: stats.common_keys(by) for m, by in values.items()}
    kept = {m: {c: {s: by[c][s] for s in seeds[m] if s in by.get(c, {})} for c in conditions}
            for m, by in values.items()}
    estimates = {m: {c: stats.mean_ci(by[c].values()) for c in conditions} for m, by in kept.items()}
    differences = {m: {c: stats.paired_difference(by[c], by[baseline]) for c in conditions if c != baseline}
                   for m, by in kept.items() if stats.is_score(m)}
    gaps = {m: seed_gaps(by, seeds[m], records) for m, by in values.items()}
    analysis = Analysis(conditions, baseline, primary, values, estimates, differences, seeds, gaps)
    analysis.adjust()
    return analysis


def seed_gaps(by_condition: dict[str, dict[int, float]], seeds: list[int], records: list[RunRecord]) -> dict[int, list[str]]:
    """The sweep's seeds a metric's statistics leave out -> why: the runs of the conditions with values that have no
    value for that seed (failed, not started, NaN, ...)."""
    runs = {(r.condition_id, r.seed): r for r in records}
    compared = [c for c, by in by_condition.items() if any(not math.isnan(v) for v in by.values())]
    if not compared:  # no value anywhere: nothing compared, no seed left out of a comparison
        return {}
    gaps = {}
    for seed in sorted({r.seed for r in records} - set(seeds)):
        why = []
        for condition in compared:
            value = by_condition[condition].get(seed, math.nan)
            if not math.isnan(value):
                continue
            record = runs.get((condition, seed))
            if record is None:
                why.append(f"`{condition}` has no run with this seed")
            elif record.status != "finished":
                detail = record.detail if record.detail.startswith(record.status) else (  # "diverged: ..."
                    f"{record.status} ({record.detail})" if record.detail else record.status)
                why.append(f"`{record.run_id}` {detail}")
            else:
                why.append(f"`{record.run_id}` " + ("NaN" if seed in by_condition[condition] else "no value"))
        gaps[seed] = why
    return gaps


# -- markdown -------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _difference(estimate: stats.Estimate, adjusted_p: float = math.nan) -> str:
    """Mean ± CI half-width, the raw paired t-test p, the Holm-adjusted p, and * where that is below ALPHA."""
    if estimate.n == 0:
        return "–"
    text = estimate.format()
    if estimate.n > 1 and not math.isnan(estimate.p_value):
        text += f" (p={estimate.p_value:.2g}, Holm p={adjusted_p:.2g}){' *' if adjusted_p < ALPHA else ''}"
    return text


def _adjusted(analysis: Analysis, metric: str, condition: str) -> str:
    return _difference(analysis.differences[metric][condition], analysis.adjusted[metric][condition])


def _family_note(analysis: Analysis, names: tuple[str, ...]) -> str:
    if not any(seeds for by in analysis.values.values() for condition, seeds in by.items()
               if condition != analysis.baseline):  # the baseline alone has values
        return (f"**No comparison:** the sweep has no finished condition but the baseline (`{analysis.baseline}`), "
                "so there is nothing to test against it.")
    if not any(analysis.family_sizes.get(name, 0) for name in names):  # one seed: nothing to test, say so
        return ("**No paired test and no interval:** a paired t-test and a 95% CI need at least 2 seeds with a "
                "value in both the condition and the baseline; these differences are single values (n=1), and the "
                "order of the conditions is no evidence of a difference.")
    sizes = "; ".join(f"{name}: {analysis.family_sizes.get(name, 0)}" for name in names)
    return (f"p: paired t-test, not adjusted; Holm p: Holm-Bonferroni-adjusted within its family of comparisons "
            f"(tests per family: {sizes}); * where Holm p < {ALPHA:g}. The 95% CIs are per comparison, not adjusted.")


def seeds_note(analysis: Analysis, metrics: list[str], limit: int = 8) -> str:
    """Which seeds the statistics of ``metrics`` leave out, and why (metrics with the same gaps together)."""
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        if gaps := analysis.gaps.get(metric):
            text = "; ".join(f"seed {seed}: {_listed(why)}" for seed, why in gaps.items())
            groups.setdefault(text, []).append(metric)
    if not groups:
        return ""
    shown = [(f"{_names(names)}: " if len(metrics) > 1 else "") + text for text, names in list(groups.items())[:limit]]
    more = f"; and {len(groups) - limit} more" if len(groups) > limit else ""
    return ("**Seeds left out:** a metric's means, ranking and paired tests use the same seeds, those with a value "
            "in every condition that has any; " + " — ".join(shown) + more + ".")


def _listed(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def headline_metrics(analysis: Analysis) -> list[str]:
    names = [m for m in analysis.values if classify(m) is None and stats.is_score(m)]
    return sorted(names, key=lambda m: (not m.startswith("val/"), m != analysis.primary, m))


def ranking_section(analysis: Analysis) -> str:
    primary = analysis.primary
    if primary not in analysis.estimates:
        return f"No finished run has the primary metric `{primary}`."
    higher = stats.higher_is_better(primary)
    order = stats.rank(analysis.estimates[primary], higher)
    rows = []
    for place, condition in enumerate(order, 1):
        estimate = analysis.estimates[primary][condition]
        diff = "baseline" if condition == analysis.baseline else _adjusted(analysis, primary, condition)
        rows.append([str(place), f"`{condition}`", estimate.format(), str(estimate.n), diff])
    direction = "higher" if higher else "lower"
    seeds = ", ".join(map(str, analysis.seeds[primary])) or "none"
    text = (f"By `{primary}` ({direction} is better). Mean ± 95% CI half-width over seeds {seeds}; Δ: paired "
            f"difference to the baseline by seed. {_family_note(analysis, ('primary',))}\n\n"
            + _table(["rank", "condition", primary, "seeds", "Δ vs baseline"], rows))
    unranked = [c for c in analysis.conditions if not analysis.values[primary].get(c)
                or all(math.isnan(v) for v in analysis.values[primary][c].values())]
    if unranked:
        text += f"\n\nNot ranked (no finished run with a value of `{primary}`): {_names(unranked)}."
    if note := seeds_note(analysis, [primary]):
        text += "\n\n" + note
    return text


def metrics_table(analysis: Analysis, metrics: list[str]) -> str:
    rows = [[f"`{m}`", *[analysis.estimates[m][c].format() for c in analysis.conditions]] for m in metrics]
    return _table(["metric", *[f"`{c}`" for c in analysis.conditions]], rows)


def differences_table(analysis: Analysis, metrics: list[str]) -> str:
    others = [c for c in analysis.conditions if c != analysis.baseline]
    rows = [[f"`{m}`", *[_adjusted(analysis, m, c) for c in others]] for m in metrics if m in analysis.differences]
    return _table(["metric", *[f"`{c}` − baseline" for c in others]], rows)


def runs_section(records: list[RunRecord]) -> str:
    problems = [r for r in records if r.status != "finished" or r.detail]
    done = sum(r.status == "finished" for r in records)
    text = f"{done} of {len(records)} runs finished."
    if problems:
        text += " These runs are missing from the statistics or need attention:\n\n" + _table(
            ["run", "status", "detail"], [[f"`{r.run_id}`", r.status, r.detail or ""] for r in problems])
    return text


def _natural(text: str) -> list:
    """Sort key with numbers compared as numbers: passes_4 before passes_12."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))]


def render(sweep: dict, records: list[RunRecord], analysis: Analysis, figures: list[Path]) -> str:
    protocols = sorted({r.protocol for r in records if r.status == "finished"})
    lines = [f"# Ablation report: {sweep['name']}", ""]
    seeds = sorted({int(r["seed"]) for r in sweep["runs"]})
    lines += [f"Conditions: {len(analysis.conditions)}; seeds: {', '.join(map(str, seeds))}; "
              f"baseline: `{analysis.baseline}`; "
              f"evaluation protocol: {', '.join(protocols) or '–'}.", ""]
    if len(protocols) > 1:
        lines += [f"**Warning:** the runs were scored under different protocols ({', '.join(protocols)}); "
                  "their scores are not comparable.", ""]
    grid_keys = sweep.get("grid_keys") or list(dict.fromkeys(k for r in sweep["runs"] for k in r.get("condition", {})))
    if warning := drift_warning(unexplained_settings(records, grid_keys)):
        lines += [warning, ""]
    lines += ["## Runs", "", runs_section(records), "", "## Ranking", "", ranking_section(analysis), ""]
    headline = headline_metrics(analysis)
    if headline:
        lines += ["## Final scores (mean ± 95% CI over seeds)", "", metrics_table(analysis, headline), ""]
        lines += [f"## Paired differences against `{analysis.baseline}`", "",
                  "Condition minus baseline, paired by seed: mean ± 95% CI half-width. "
                  + _family_note(analysis, ("primary", "headline"))
                  + f" The primary metric `{analysis.primary}` is its own family, as in the ranking.", "",
                  differences_table(analysis, headline), ""]
        if note := seeds_note(analysis, headline):
            lines += [note, ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.parent.name}/{p.name})" for p in figures] + [""]
    series = sorted((m for m in analysis.values if classify(m) is not None), key=_natural)
    if series:
        lines += ["## Every series metric (mean ± 95% CI)", "", metrics_table(analysis, series), ""]
        scored = [m for m in series if m in analysis.differences]
        if scored:
            lines += [f"### Paired differences against `{analysis.baseline}`", "", _family_note(analysis, ("series",)),
                      "", differences_table(analysis, scored), ""]
        if note := seeds_note(analysis, series):
            lines += [note, ""]
    return "\n".join(lines)


def summary_csv(analysis: Analysis) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "condition", "mean", "ci_half_width", "n", "diff_vs_baseline", "diff_ci_half_width",
                     "diff_n", "diff_p", "diff_p_holm", "diff_family", "seeds"])
    for metric, by in sorted(analysis.estimates.items()):
        for condition, e in by.items():
            d = analysis.differences.get(metric, {}).get(condition)
            extra = ((d.mean, d.half_width, d.n, d.p_value, analysis.adjusted[metric][condition], analysis.family(metric))
                     if d else ("",) * 6)
            writer.writerow([metric, condition, e.mean, e.half_width, e.n, *extra,
                             " ".join(map(str, analysis.seeds.get(metric, [])))])
    return out.getvalue()


# -- figures --------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n: int, width: float = 4.8, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def curve_runs(analysis: Analysis, records: list[RunRecord], metric: str, condition: str) -> list[RunRecord]:
    """The finished runs whose curve of ``metric`` a condition's band averages: those of the seeds its final scores'
    statistics use (a per-step log such as ``train/loss_step``: the primary metric's), so that the band ends where
    the tables are."""
    seeds = analysis.seeds.get(metric, analysis.seeds.get(analysis.primary))
    return [r for r in records if r.condition_id == condition and r.status == "finished" and metric in r.curves
            and (seeds is None or r.seed in seeds)]


def curves_figure(analysis: Analysis, records: list[RunRecord], path: Path) -> Path | None:
    names = sorted({k for r in records for k in r.curves if (k.startswith("val/") and classify(k) is None
                                                             and stats.is_score(k)) or k == "train/loss_step"})
    names = sorted(names, key=lambda m: (m != analysis.primary, m))[:6]
    if not names:
        return None
    fig, axes = _panels(len(names))
    for ax, metric in zip(axes, names):
        for condition in analysis.conditions:
            curves = [r.curves[metric] for r in curve_runs(analysis, records, metric, condition)]
            if not curves:
                continue
            steps, estimates = stats.band(curves)
            mean = [e.mean for e in estimates]
            half = [0.0 if math.isnan(e.half_width) else e.half_width for e in estimates]
            (line,) = ax.plot(steps, mean, label=condition, lw=1.4)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=line.get_color(), alpha=0.2, lw=0)
        ax.set(title=metric, xlabel="training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("curves over training (mean over seeds, 95% CI band)")
    return _save(fig, path)


def x_order(labels, kind: str) -> list[str]:
    """A series figure's x labels in reading order: numbers (mask ratios, passes) by value, prompts by name with
    their numbers compared as numbers (periodic:4 before periodic:16)."""
    return sorted(labels, key=(lambda x: float(x)) if kind != "prompt" else _natural)


def series_figure(analysis: Analysis, kind: str, path: Path) -> Path | None:
    families: dict[str, dict[str, str]] = {}  # family -> x label -> metric
    for metric in analysis.values:
        if (c := classify(metric)) and c[0] == kind and stats.is_score(metric) and stats.is_score(c[1]):
            families.setdefault(c[1], {})[c[2]] = metric
    if not families:
        return None
    fig, axes = _panels(len(families))
    width = 0.8 / max(1, len(analysis.conditions))
    for ax, (family, points) in zip(axes, sorted(families.items())):
        xs = x_order(points, kind)
        for i, condition in enumerate(analysis.conditions):
            es = [analysis.estimates[points[x]][condition] for x in xs]
            mean = [e.mean for e in es]
            err = [0.0 if math.isnan(e.half_width) else e.half_width for e in es]
            if kind == "prompt":
                ax.bar([j + (i - (len(analysis.conditions) - 1) / 2) * width for j in range(len(xs))], mean, width,
                       yerr=err, capsize=2, label=condition)
            else:
                ax.errorbar([float(x) for x in xs], mean, yerr=err, marker="o", ms=3, capsize=2, label=condition)
        if kind == "prompt":
            ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right", fontsize=7)
        elif kind == "passes":
            ax.set_xscale("log")
        ax.set(title=family, xlabel=SERIES_LABELS[kind])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"by {SERIES_LABELS[kind]} (mean over seeds, 95% CI)")
    return _save(fig, path)


def write_report(sweep_dir: str | Path, baseline: str | None = None, primary: str | None = None,
                 progress: bool = True) -> Path:
    sweep_dir = Path(sweep_dir)
    sweep, records = read_sweep(sweep_dir, progress)
    analysis = analyse(sweep, records, baseline, primary)
    figures_dir = sweep_dir / "figures"
    figures = [curves_figure(analysis, records, figures_dir / "curves.png")]
    figures += [series_figure(analysis, kind, figures_dir / f"by_{kind}.png") for kind in SERIES_LABELS]
    figures = [f for f in figures if f is not None]
    write_text_atomic(sweep_dir / "summary.csv", summary_csv(analysis))
    return write_text_atomic(sweep_dir / "report.md", render(sweep, records, analysis, figures))
