"""Ablation sweeps: a spec (grid x seeds) -> runs (local or SLURM, resumable) -> results.json -> a report with CIs.

``spec.py`` expands and validates a spec, ``runner.py`` executes its runs, ``results.py`` writes and reads each
run's ``results.json`` and curves, ``stats.py`` holds the pure statistics, ``report.py`` writes ``report.md``.
"""
