"""The benchmark entry point runs end to end on CPU with tiny models (train-gpu --smoke, generate)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_gpu_smoke_runs_every_configuration_on_cpu(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--out", str(tmp_path), "train-gpu", "--smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 8  # header + one row per configuration
    assert any("FSDP2" in row for row in table) and any("checkpointing" in row for row in table)
    assert sum("dropout 0.1" in row for row in table) == 2
    assert (tmp_path / "train_gpu_smoke.md").read_text().count("\n| ") == 1 + 8


def test_generate_writes_its_table(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--out", str(tmp_path), "generate", "--sizes",
                           "tiny", "--batches", "1", "2", "--seconds", "1", "--repeats", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in (tmp_path / "generate.md").read_text().splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]
    assert "synthetic DAC" in done.stdout and all(float(row.split("|")[4]) > 0 for row in rows)  # decode timed
    first = (tmp_path / "generate.md").read_text().splitlines()[0]
    assert first.startswith("# PYTHONPATH=") and "run.py --out" in first and "--batches 1 2" in first  # its command


def test_train_cpu_times_our_step_in_its_own_processes_without_the_original(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--out", str(tmp_path), "train-cpu", "--sizes",
                           "tiny", "--steps", "1", "--warmup", "1", "--rounds", "2", "--batch", "2", "--frames", "40"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in (tmp_path / "train_cpu_vs_original.md").read_text().splitlines() if line.startswith("| tiny"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and cells[3] == "-"  # our s/step; no original column
    assert "our column only" in done.stdout


def test_cpu_attention_bench_times_every_path():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_cpu_attention import main

    lines = main(["--batch", "1", "--heads", "2", "--frames", "17", "--head-dim", "4", "--repeats", "1"])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in lines if line.startswith("| ") and "ms" not in line}
    assert set(rows) == {"sdpa", "autograd", "ours", "F.dropout", "ours: dropout"} and all(t > 0 for t in rows.values())


def test_cpu_layers_bench_times_every_product_the_norm_and_a_step():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_cpu_layers import SMALL_LAYERS, layer_rows, norm_rows, step_rows
    from vampnet_pl.model.linear import onednn_available

    if not onednn_available():
        pytest.skip("needs oneDNN on an x86 CPU")
    lines = layer_rows(300, 1, layers=SMALL_LAYERS[:1])
    assert lines[-1].startswith("| qkv | 300 x 512 -> 1536 |") and lines[-1].endswith("x |")
    assert norm_rows(30, 1, width=16)[-1].startswith("| RMSNorm, 30 x 16 |")
    lines = step_rows("tiny", 2, 16, steps=1, warmup=0)
    assert lines[-1].startswith("| tiny |") and "x**" in lines[-1]


def test_the_gpu_script_runs_every_test_file_with_gpu_tests():
    """A test marked gpu runs only where bench/gpu_checks.sh takes it: the one command for a lent GPU."""
    script = (ROOT / "bench" / "gpu_checks.sh").read_text()
    marked = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                    if "pytest.mark.gpu" in p.read_text() and p.name != Path(__file__).name)
    assert marked and [name for name in marked if f"tests/{name}" not in script] == []


def command_blocks(markdown: str) -> list[str]:
    """The fenced and the 4-space-indented blocks of a Markdown text."""
    blocks, current, fenced = [], [], False
    for line in markdown.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            current.append(line)
            continue
        if current and not fenced:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_benchmarks_md_says_a_command_writes_a_file_only_where_it_does():
    """bench/run.py writes its tables (to --out, default bench/results); the bench_*.py scripts print theirs, and
    write one only when given --out."""
    claims = re.compile(r"#[^\n]*(output:|writes |results:)[^\n]*bench/results/")
    wrong = []
    for block in command_blocks((ROOT / "BENCHMARKS.md").read_text()):
        if claims.search(block):
            for script, options in re.findall(r"python (bench/\S+\.py)((?:[^\n]*\\\n)*[^\n]*)", block):
                if script != "bench/run.py" and "--out" not in options:
                    wrong.append(f"{script}{options.split('#')[0]}")
    assert wrong == []


def shell_array(script: str, name: str) -> set[str]:
    """The normalised package names of a bash array ``name=(...)`` in ``script`` (empty when there is none)."""
    found = re.search(rf"^{name}=\(([^)]*)\)", script, re.M)
    return {re.sub(r"[-_.]+", "-", word).lower() for word in found.group(1).split()} if found else set()


def test_the_device_wheels_and_the_lent_machine_cover_every_dependency():
    """What the project needs on the lent GPU machine (its dependencies, with the dev extra's, for CPython 3.12 on
    Linux) is there or carried: each requirement is on the machine (``present``), not needed by the GPU checks
    (``unneeded``), or a wheel of scripts/device_wheels.sh, whose own requirements are covered the same way."""
    try:
        metadata.distribution("vampnet-pl")
    except metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (make .venv/.installed)")
    script = (ROOT / "scripts" / "device_wheels.sh").read_text()
    carried = shell_array(script, "binary") | shell_array(script, "source")
    covered = shell_array(script, "present") | shell_array(script, "unneeded")
    target = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}

    def needs(name: str, extras: tuple[str, ...] = ()) -> list:
        wanted = [Requirement(line) for line in metadata.distribution(name).requires or []]
        return [r for r in wanted if r.marker is None or any(r.marker.evaluate({**target, "extra": e})
                                                                 for e in (*extras, ""))]

    missing, seen, stack = set(), set(), needs("vampnet-pl", ("dev",))
    while stack:
        requirement = stack.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in seen or name in covered:
            continue
        seen.add(name)
        if name not in carried:
            missing.add(name)
        else:
            stack += needs(requirement.name, tuple(requirement.extras))
    assert sorted(missing) == []
