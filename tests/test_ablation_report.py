"""The ablation report from a sweep folder of recorded runs (no training): statistics, tables, figures, gaps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from vampnet_pl.ablation import report, stats
from vampnet_pl.ablation.results import final_metrics, read_curves
from vampnet_pl.cli import main

CONDITIONS = {"schedule-cosine": 0.0, "schedule-linear": 0.2, "schedule-square": -0.1}  # offsets of val/loss
SEEDS = [0, 1, 2]
SEED_EFFECT = {0: 0.0, 1: 0.5, 2: 1.0}  # shared by all conditions: pairing removes it


def metrics_for(condition: str, seed: int) -> dict[str, float]:
    loss = 3.0 + CONDITIONS[condition] + SEED_EFFECT[seed] + 0.01 * seed * (condition == "schedule-linear")
    metrics = {"val/loss": loss, "val/acc1": 0.5 - loss / 10, "val/acc25": 0.9, "train/loss_epoch": loss + 0.1}
    for ratio in (0.1, 0.5, 1.0):
        metrics[f"val/acc1/ratio_{ratio:.2f}"] = 0.6 - ratio / 2 - CONDITIONS[condition]
    for k in (1, 2, 3):
        metrics[f"val/loss/codebook_{k}"] = loss + k
    for prompt in ("periodic:16", "prefix:1.0"):
        metrics[f"val/acc1/prompt_{prompt}"] = 0.4
        for name in ("mel", "mel_dac", "fad", "kad"):
            metrics[f"gen/{name}/{prompt}"] = 1.0 + CONDITIONS[condition] + 0.1 * seed
        metrics[f"gen/n_embeddings/{prompt}"] = 64.0
    for passes in (1, 4, 12, 36):
        metrics[f"gen/mel/passes_{passes}"] = 2.0 / math.sqrt(passes)
        metrics[f"gen/fad/passes_{passes}"] = 3.0 / math.sqrt(passes)
    return metrics


def write_run(sweep_dir: Path, condition: str, seed: int, status: str) -> dict:
    run_id = f"{condition}_seed-{seed}"
    run_dir = sweep_dir / "runs" / run_id
    run = {"run_id": run_id, "condition_id": condition, "condition": {"masking.schedule": condition.split("-")[1]},
           "seed": seed, "overrides": [], "run_dir": str(run_dir)}
    run_dir.mkdir(parents=True)
    if status == "finished":
        metrics = metrics_for(condition, seed)
        config = {"logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run_dir),
                                     "name": "csv", "version": ""}}, "eval_protocol": {"name": "v1"}}
        (run_dir / "results.json").write_text(json.dumps({**run, "status": "finished", "metrics": metrics,
                                                          "protocol": "v1", "final_step": 20, "metrics_step": 20,
                                                          "config": config}))
        # the curves: an earlier attempt to step 10, then the live log from step 10 (its value wins) to 20
        (run_dir / "curves").mkdir()
        rows = {"curves/attempt-0.csv": [(5, 9.0), (10, 99.0)], "csv/metrics.csv": [(10, 5.0), (20, metrics["val/loss"])]}
        for name, points in rows.items():
            (run_dir / name).parent.mkdir(exist_ok=True)
            with open(run_dir / name, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["epoch", "step", "train/loss_step", "val/loss"])
                for step, value in points:
                    writer.writerow([0, step, value + 1, value])
    elif status == "failed":
        (run_dir / "failure.json").write_text(json.dumps({**run, "status": "failed", "reason": "exit status -9 (SIGKILL)"}))
    return run


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    runs = [write_run(tmp_path, c, s, "finished") for c in CONDITIONS for s in SEEDS]
    runs.append(write_run(tmp_path, "schedule-square", 3, "failed"))
    runs.append({**runs[0], "run_id": "schedule-cosine_seed-4", "seed": 4, "run_dir": str(tmp_path / "runs" / "never")})
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "fake", "baseline": "schedule-cosine",
                                                     "primary_metric": "val/loss", "runs": runs}))
    return tmp_path


def test_curves_join_attempts_and_final_metrics_skip_step_columns(sweep_dir):
    curves = read_curves(sweep_dir / "runs" / "schedule-cosine_seed-0")
    assert curves["val/loss"] == {6: 9.0, 11: 5.0, 21: 3.0}  # steps trained: Lightning's 0-based index + 1  # the resumed attempt's step 10 replaced the first one's
    scores = final_metrics(curves)
    assert scores.metrics == {"val/loss": 3.0} and scores.metrics_step == 21 and scores.missing == []


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, sorted({k for row in rows for k in row}))
        writer.writeheader()
        writer.writerows(rows)


def test_final_scores_are_the_last_validation_and_the_last_generation_evaluation(tmp_path):
    # max_steps 2000: the run diverged before its last validation; the generation evaluation ran at 1000 (every
    # 1000 steps) and 2000, where the time budget skipped `inpaint`; grad norm is logged at other steps
    write_csv(tmp_path / "csv" / "metrics.csv", [
        {"epoch": 0, "step": 999, "val/loss": 3.0, "val/acc1": 0.3, "gen/fad/inpaint": 5.0, "gen/fad/prefix": 4.0},
        {"epoch": 0, "step": 1499, "train/grad_norm": 1.5},
        {"epoch": 1, "step": 1999, "val/loss": "nan", "val/acc1": 0.01, "train/loss_epoch": "nan",
         "gen/fad/prefix": 9.0},
        {"epoch": 1, "step": 1999, "train/grad_norm": "nan"},
    ])
    curves = read_curves(tmp_path)
    assert math.isnan(curves["val/loss"][2000])  # a logged NaN is kept; an empty cell is no value
    assert set(curves["train/grad_norm"]) == {1500, 2000} and set(curves["gen/fad/inpaint"]) == {1000}
    scores = final_metrics(curves)
    assert scores.metrics_step == 2000 and scores.gen_metrics_step == 2000
    assert math.isnan(scores.metrics["val/loss"]) and math.isnan(scores.metrics["train/loss_epoch"])
    assert scores.metrics["val/acc1"] == 0.01 and scores.metrics["gen/fad/prefix"] == 9.0
    assert "gen/fad/inpaint" not in scores.metrics and scores.missing == ["gen/fad/inpaint"]
    # the generation evaluation's step need not be the last validation's: gen/ scores come from their own
    write_csv(tmp_path / "csv" / "metrics.csv", [
        {"step": 999, "val/loss": 3.0, "gen/fad/prefix": 4.0},
        {"step": 1199, "val/loss": 2.5},
    ])
    scores = final_metrics(read_curves(tmp_path))
    assert scores.metrics == {"val/loss": 2.5, "gen/fad/prefix": 4.0}
    assert (scores.metrics_step, scores.gen_metrics_step, scores.missing) == (1200, 1000, [])


def test_the_report_flags_scores_not_measured_at_the_final_step(sweep_dir):
    path = sweep_dir / "runs" / "schedule-linear_seed-1" / "results.json"
    saved = json.loads(path.read_text())
    saved["metrics"]["val/loss"] = math.nan
    saved["metrics"]["val/top1_masked/ratio_le_0.25"] = math.nan  # no example's mask ratio fell in that bucket
    saved.update(gen_metrics_step=10, missing_metrics=["gen/fad/prefix:1.0"])
    path.write_text(json.dumps(saved))
    sweep, records = report.read_sweep(sweep_dir, progress=False)
    detail = next(r.detail for r in records if r.run_id == "schedule-linear_seed-1")
    assert detail == ("gen/ scores from the generation evaluation at step 10, training ended at 20; "
                      "no value at the last evaluation, left out: `gen/fad/prefix:1.0`; "
                      "NaN (diverged?), left out of the means: `val/loss`; "
                      "NaN (no masked token in that mask-ratio bucket), left out of the means: "
                      "`val/top1_masked/ratio_le_0.25`")
    analysis = report.analyse(sweep, records)
    assert analysis.estimates["val/loss"]["schedule-linear"].n == 2
    assert "| `schedule-linear_seed-1` | finished | gen/ scores from the generation evaluation at step 10" in \
        report.render(sweep, records, analysis, [])


def test_statistics_per_condition_and_paired_by_seed(sweep_dir):
    sweep, records = report.read_sweep(sweep_dir, progress=False)
    assert [r.status for r in records].count("finished") == 9
    assert {r.run_id: r.status for r in records if r.status != "finished"} == {
        "schedule-square_seed-3": "failed", "schedule-cosine_seed-4": "not started"}
    analysis = report.analyse(sweep, records)
    cosine = analysis.estimates["val/loss"]["schedule-cosine"]
    assert cosine.mean == pytest.approx(3.5) and cosine.n == 3
    assert cosine.half_width == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-6)  # sd 0.5 over seeds
    linear = analysis.differences["val/loss"]["schedule-linear"]  # differences 0.20, 0.21, 0.22
    assert linear.mean == pytest.approx(0.21) and linear.n == 3
    assert linear.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert linear.low > 0  # the seed effect (sd 0.5) is paired away
    assert "gen/n_embeddings/periodic:16" not in analysis.differences  # counts are reported, not compared
    assert report.classify("val/acc1/ratio_0.10") == ("ratio", "val/acc1", "0.10")
    assert report.classify("val/top1_masked/ratio_le_0.25") == ("ratio", "val/top1_masked", "0.25")
    assert report.classify("gen/fad/passes_12") == ("passes", "gen/fad", "12")
    assert report.classify("gen/kad/periodic:16") == ("prompt", "gen/kad", "periodic:16")
    assert report.classify("eval/periodic:8/fad") == ("prompt", "eval/fad", "periodic:8")
    assert report.classify("val/loss") is None


def test_report_markdown_figures_and_gaps(sweep_dir, capsys):
    assert main(["ablate", "report", str(sweep_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (sweep_dir / "report.md").read_text()
    assert "9 of 11 runs finished" in text
    assert "`schedule-square_seed-3` | failed | exit status -9 (SIGKILL)" in text
    assert "`schedule-cosine_seed-4` | not started" in text
    ranking = text.split("## Ranking")[1].split("##")[0]
    assert ranking.index("schedule-square") < ranking.index("schedule-cosine") < ranking.index("schedule-linear")
    assert "| 1 | `schedule-square` | 3.4 ± 1.2 | 3 | -0.1 ± " in ranking
    assert "0.21 ± 0.025 (p=0.00076, Holm p=0.00076) *" in ranking  # linear - cosine, paired; 2 tests in its family
    assert "evaluation protocol: v1" in text
    for figure in ("curves", "by_ratio", "by_codebook", "by_passes", "by_prompt"):
        assert (sweep_dir / "figures" / f"{figure}.png").stat().st_size > 5000
        assert f"figures/{figure}.png" in text
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    row = next(r for r in rows if r["metric"] == "val/loss" and r["condition"] == "schedule-linear")
    assert float(row["diff_vs_baseline"]) == pytest.approx(0.21) and row["n"] == "3"
    assert row["diff_family"] == "primary" and float(row["diff_p_holm"]) == pytest.approx(float(row["diff_p"]))
    # another baseline, another primary metric
    assert main(["ablate", "report", str(sweep_dir), "--baseline", "schedule-linear", "--metric", "val/acc1"]) == 0
    text = (sweep_dir / "report.md").read_text()
    assert "baseline: `schedule-linear`" in text and "By `val/acc1` (higher is better)" in text
    assert main(["ablate", "report", str(sweep_dir), "--baseline", "schedule-nope"]) == 2
    # a bookkeeping number ranks nothing (it has no paired differences: the ranking raised KeyError)
    assert main(["ablate", "report", str(sweep_dir), "--metric", "gen/n_embeddings/periodic:16"]) == 2
    assert "is bookkeeping, not a score" in capsys.readouterr().err


def test_ranking_and_paired_tests_use_the_same_seeds_and_the_report_says_which_were_left_out(sweep_dir):
    """Linear's hardest seed failed. Its mean over seeds 0 and 1 (3.46) was ranked above the baseline's over
    0, 1 and 2 (3.5), while the paired test (seeds 0 and 1) found linear worse by 0.2."""
    run_dir = sweep_dir / "runs" / "schedule-linear_seed-2"
    (run_dir / "results.json").unlink()
    (run_dir / "failure.json").write_text(json.dumps({"status": "failed", "reason": "exit status 1"}))
    sweep, records = report.read_sweep(sweep_dir, progress=False)
    analysis = report.analyse(sweep, records)
    linear = analysis.differences["val/loss"]["schedule-linear"]
    assert linear.mean > 0 and linear.n == 2  # worse than the baseline on the seeds both have: ranked below it
    assert stats.rank(analysis.estimates["val/loss"], False) == ["schedule-square", "schedule-cosine", "schedule-linear"]
    assert {c: e.n for c, e in analysis.estimates["val/loss"].items()} == dict.fromkeys(CONDITIONS, 2)
    assert analysis.estimates["val/loss"]["schedule-cosine"].mean == pytest.approx(3.25)
    assert analysis.seeds["val/loss"] == [0, 1]
    assert analysis.gaps["val/loss"] == {2: ["`schedule-linear_seed-2` failed (exit status 1)"],
                                         3: ["`schedule-cosine` has no run with this seed",
                                             "`schedule-linear` has no run with this seed",
                                             "`schedule-square_seed-3` failed (exit status -9 (SIGKILL))"],
                                         4: ["`schedule-cosine_seed-4` not started",
                                             "`schedule-linear` has no run with this seed",
                                             "`schedule-square` has no run with this seed"]}
    text = report.render(sweep, records, analysis, [])
    ranking = text.split("## Ranking")[1].split("\n## ")[0]
    assert "over seeds 0, 1;" in ranking
    assert "| 2 | `schedule-cosine` | 3.25 ± 3.2 | 2 | baseline |" in ranking
    assert "**Seeds left out:** a metric's means, ranking and paired tests use the same seeds" in ranking
    assert "seed 2: `schedule-linear_seed-2` failed (exit status 1)" in ranking
    scores = text.split("## Paired differences")[1].split("\n## ")[0]
    assert "`val/loss`, `val/acc1`, `val/acc25`, `train/loss_epoch`: seed 2: `schedule-linear_seed-2` failed" in scores
    rows = list(csv.DictReader(report.summary_csv(analysis).splitlines()))
    row = next(r for r in rows if r["metric"] == "val/loss" and r["condition"] == "schedule-cosine")
    assert row["n"] == "2" and row["seeds"] == "0 1"
    for metric in ("val/loss", "train/loss_step"):  # the curves' bands end where the tables are
        assert [r.seed for r in report.curve_runs(analysis, records, metric, "schedule-cosine")] == [0, 1]
    # a NaN (a diverged run) leaves its seed out of that metric's comparisons alone, and says so
    path = sweep_dir / "runs" / "schedule-square_seed-0" / "results.json"
    saved = json.loads(path.read_text())
    saved["metrics"]["val/acc25"] = math.nan
    path.write_text(json.dumps(saved))
    analysis = report.analyse(*report.read_sweep(sweep_dir, progress=False))
    assert analysis.seeds["val/acc25"] == [1] and analysis.seeds["val/loss"] == [0, 1]
    assert analysis.gaps["val/acc25"][0] == ["`schedule-square_seed-0` NaN"]


def test_a_sweep_of_one_seed_says_that_nothing_was_tested(tmp_path):
    """With one seed there is no paired test: the report described p-values, Holm families and stars that it did not
    have (tests per family: 0), and never said that the ranking is no evidence."""
    runs = [write_run(tmp_path, c, 0, "finished") for c in CONDITIONS]
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "one", "baseline": "schedule-cosine",
                                                     "primary_metric": "val/loss", "runs": runs}))
    sweep, records = report.read_sweep(tmp_path, progress=False)
    text = report.render(sweep, records, report.analyse(sweep, records), [])
    assert text.count("**No paired test and no interval:**") == 3  # the ranking, the headline and the series tables
    assert "p=" not in text and "Holm p" not in text and "*" not in text.replace("**", "")
    assert "| 1 | `schedule-square` | 2.9 (n=1) | 1 | -0.1 (n=1) |" in text
    # the baseline alone finished (every other condition failed): no comparison at all, not 'single values (n=1)'
    alone = tmp_path / "alone"
    runs = [write_run(alone, c, 0, "finished" if c == "schedule-cosine" else "failed") for c in CONDITIONS]
    (alone / "sweep.json").write_text(json.dumps({"name": "one", "baseline": "schedule-cosine",
                                                  "primary_metric": "val/loss", "runs": runs}))
    sweep, records = report.read_sweep(alone, progress=False)
    text = report.render(sweep, records, report.analyse(sweep, records), [])
    assert "No paired test" not in text and "**No comparison:** the sweep has no finished condition but the " \
        "baseline (`schedule-cosine`)" in text


def test_a_damaged_record_is_listed_and_named_not_a_bare_json_error(sweep_dir, capsys):
    """A results.json cut short (a partial copy of the sweep from the cluster): `ablate report` failed as a whole with
    'error: Expecting value: line 1 column 1 (char 0)', naming no file; so did `ablate run`."""
    damaged = sweep_dir / "runs" / "schedule-linear_seed-2" / "results.json"
    damaged.write_text('{"metrics": {"val/lo')
    assert main(["ablate", "report", str(sweep_dir)]) == 0
    text = (sweep_dir / "report.md").read_text()
    assert f"| `schedule-linear_seed-2` | unreadable | {damaged} is damaged (" in text
    assert "seed 2: `schedule-linear_seed-2` unreadable" in text  # and its seed left out of the comparisons
    from vampnet_pl.ablation import results

    with pytest.raises(ValueError, match=f"{damaged} is damaged .*copy it again"):
        results.trained_overrides(damaged.parent)
    (sweep_dir / "sweep.json").write_text("")
    assert main(["ablate", "report", str(sweep_dir)]) == 2
    assert f"{sweep_dir / 'sweep.json'} is damaged" in capsys.readouterr().err


def test_stars_are_holm_adjusted_within_each_family_and_raw_p_is_kept():
    """Two differences with raw p 0.035 and 0.044 were both starred; adjusted over their family of 2, neither is."""
    diffs = {"b": (1.0, 1.5, 2.0), "c": (1.0, 1.6, 2.2)}  # t 5.20 and 4.62 on 2 degrees of freedom
    runs, records = [], []
    for condition in ("a", "b", "c"):
        for seed in range(3):
            loss = 3.0 + seed + (diffs[condition][seed] if condition in diffs else 0.0)
            run = {"run_id": f"{condition}_seed-{seed}", "condition_id": condition, "seed": seed}
            runs.append(run)
            records.append(report.RunRecord(run["run_id"], condition, seed, "finished",
                                            metrics={"val/loss": loss, "val/acc1": 0.5 - seed / 10,
                                                     "val/acc1/ratio_0.50": 0.4 + seed / 10}))
    sweep = {"name": "holm", "baseline": "a", "primary_metric": "val/loss", "runs": runs}
    analysis = report.analyse(sweep, records)
    raw = {c: analysis.differences["val/loss"][c].p_value for c in diffs}
    assert raw["b"] == pytest.approx(0.0351, abs=2e-4) and raw["c"] == pytest.approx(0.0438, abs=2e-4)
    assert analysis.adjusted["val/loss"] == pytest.approx({"b": 2 * raw["b"], "c": 2 * raw["b"]})
    assert analysis.family_sizes == {"primary": 2, "headline": 2, "series": 2}
    text = report.render(sweep, records, analysis, [])
    ranking = text.split("## Ranking")[1].split("##")[0]
    assert "1.5 ± 1.2 (p=0.035, Holm p=0.07) |" in ranking and "*" not in ranking.split("|---|")[1]
    assert "Holm-Bonferroni-adjusted within its family of comparisons (tests per family: primary: 2)" in ranking
    assert "(tests per family: primary: 2; headline: 2)" in text and "(tests per family: series: 2)" in text
    rows = list(csv.DictReader(report.summary_csv(analysis).splitlines()))
    row = next(r for r in rows if r["metric"] == "val/loss" and r["condition"] == "b")
    assert float(row["diff_p"]) == pytest.approx(raw["b"]) and float(row["diff_p_holm"]) == pytest.approx(2 * raw["b"])


def test_bookkeeping_metrics_are_not_compared_nor_counted_in_a_holm_family():
    """Every run logs data-health counts (data/), throughput (perf/) and the gradient norm beside its scores; counted
    as headline comparisons they made the family 5 tests instead of 1 and multiplied val/acc1's p by 5."""
    runs, records = [], []
    for condition in ("a", "b"):
        for seed in range(3):
            run = {"run_id": f"{condition}_seed-{seed}", "condition_id": condition, "seed": seed}
            runs.append(run)
            records.append(report.RunRecord(run["run_id"], condition, seed, "finished", metrics={
                "val/loss": 3.0 + seed, "val/acc1": 0.5 + seed / 10 + (0.1 + seed / 1000 if condition == "b" else 0),
                "data/samples_read": 70.0, "data/skipped/undecodable": 0.0, "perf/tokens_per_s": 2000.0 + seed,
                "train/grad_norm": 0.5 + seed / 10 + (condition == "b")}))
    sweep = {"name": "bookkeeping", "baseline": "a", "primary_metric": "val/loss", "runs": runs}
    analysis = report.analyse(sweep, records)
    assert set(analysis.differences) == {"val/loss", "val/acc1"}
    assert analysis.family_sizes["headline"] == 1
    p = analysis.differences["val/acc1"]["b"].p_value
    assert analysis.adjusted["val/acc1"]["b"] == pytest.approx(p)
    assert report.headline_metrics(analysis) == ["val/loss", "val/acc1"]
    rows = {r["metric"]: r for r in csv.DictReader(report.summary_csv(analysis).splitlines()) if r["condition"] == "b"}
    assert float(rows["data/samples_read"]["mean"]) == 70.0 and rows["data/samples_read"]["diff_p"] == ""  # kept


def test_a_sweep_folder_copied_elsewhere_is_reported_from_where_it_is(sweep_dir, tmp_path_factory):
    """sweep.json and results.json hold absolute paths; a sweep copied from the cluster to be reported elsewhere
    read as 'not started' everywhere."""
    import shutil

    copy = tmp_path_factory.mktemp("copied") / "sweep"
    shutil.copytree(sweep_dir, copy)
    shutil.rmtree(sweep_dir / "runs")
    sweep, records = report.read_sweep(copy, progress=False)
    assert [r.status for r in records].count("finished") == 9
    assert next(r for r in records if r.run_id == "schedule-square_seed-3").status == "failed"
    assert read_curves(copy / "runs" / "schedule-cosine_seed-0") == next(  # the live CSV log found, not only curves/
        r.curves for r in records if r.run_id == "schedule-cosine_seed-0")
    assert next(r.curves for r in records if r.run_id == "schedule-cosine_seed-0")["val/loss"][21] == 3.0


def test_a_moved_sweep_run_again_in_its_new_place_keeps_its_curves(sweep_dir, tmp_path_factory):
    """`ablate run` in the new place rewrites sweep.json's run folders; the finished runs' configs still name the
    old ones. The report looked for the CSV logs there: every curve was lost, without a word."""
    import shutil

    copy = tmp_path_factory.mktemp("moved") / "sweep"
    shutil.copytree(sweep_dir, copy)
    shutil.rmtree(sweep_dir / "runs")
    recorded = json.loads((copy / "sweep.json").read_text())
    for run in recorded["runs"]:
        run["run_dir"] = str(copy / "runs" / run["run_id"])  # as write_sweep_record writes it in the new place
    (copy / "sweep.json").write_text(json.dumps(recorded))
    sweep, records = report.read_sweep(copy, progress=False)
    curves = next(r.curves for r in records if r.run_id == "schedule-cosine_seed-0")
    assert curves == read_curves(copy / "runs" / "schedule-cosine_seed-0") and curves["val/loss"][21] == 3.0


def test_runs_trained_under_a_changed_config_are_flagged(sweep_dir):
    """The sweep was resumed after a config default changed: every linear run trained with another learning rate
    (the same overrides, so `ablate run` skipped the finished cosine runs). The report compared them silently."""
    for path in sorted((sweep_dir / "runs").glob("*/results.json")):
        saved = json.loads(path.read_text())
        schedule, seed = saved["condition"]["masking.schedule"], saved["seed"]
        saved["config"].update(seed=seed, data={"seed": seed}, masking={"schedule": schedule},
                               optim={"lr": 0.02 if schedule == "linear" else 0.002})
        path.write_text(json.dumps(saved))
    sweep, records = report.read_sweep(sweep_dir, progress=False)
    drift = report.unexplained_settings(records, ["masking.schedule"])
    assert drift == {"optim.lr": {"0.002": [f"schedule-{c}_seed-{s}" for c in ("cosine", "square") for s in SEEDS],
                                  "0.02": [f"schedule-linear_seed-{s}" for s in SEEDS]}}
    text = report.render(sweep, records, report.analyse(sweep, records), [])
    warning = text.split("## Runs")[0]
    assert "**Warning:** the finished runs were trained with settings that neither the grid nor the seed" in warning
    assert "`optim.lr`: 0.002 (`schedule-cosine_seed-0`" in warning and "0.02 (`schedule-linear_seed-0`" in warning
    # what the grid, the seed and each run's own folder set apart is no drift; a group in the grid may set any key
    # the same way in all of a condition's runs
    assert "data.seed" not in warning and "masking.schedule" not in warning and "logger" not in warning
    assert report.unexplained_settings(records, ["masking"]) == {}
    for record in records:
        record.settings.pop("optim.lr", None)
    assert "**Warning:** the finished runs" not in report.render(sweep, records, report.analyse(sweep, records), [])


def test_series_figures_order_prompts_with_their_numbers_as_numbers():
    assert report.x_order(["periodic:16", "periodic:4", "onset:2:1", "prefix:1.0"], "prompt") == [
        "onset:2:1", "periodic:4", "periodic:16", "prefix:1.0"]
    assert report.x_order(["0.5", "0.25", "1.0"], "ratio") == ["0.25", "0.5", "1.0"]
