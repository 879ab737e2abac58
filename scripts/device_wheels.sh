#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks, for bench/gpu_checks.sh: that machine has Python 3.12 with the packages in
# `present` below, and no package registry. Versions are this checkout's .venv's (make .venv/.installed first); about
# 16 MB, in .whl/ (git-ignored).
#   bash scripts/device_wheels.sh [OUT_DIR]
set -euo pipefail
out=${1:-.whl}
pip=.venv/bin/pip
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# On the lent machine already (its image), and relied on by the wheels below: tests/test_bench.py checks that these
# and the wheels cover what the project needs. A machine with torch alone cannot be served this way: llvmlite (for
# librosa's numba), scipy and numpy are about 110 MB of wheels, and a device run carries at most 64 MiB.
present=(torch torchaudio lightning torchmetrics peft numpy scipy pyyaml tensorboard matplotlib tqdm rich xxhash pytest
         pytest-timeout numba scikit-learn joblib lazy-loader msgpack einops ninja psutil py-cpuinfo packaging protobuf
         pygments requests typing-extensions)
# Needed by none of the GPU checks: PyAV (read only for formats libsndfile lacks and odd sample rates), and the SLURM
# launcher of Hydra sweeps.
unneeded=(av hydra-submitit-launcher)
# Binary wheels for CPython 3.12 on x86-64 Linux.
binary=(hydra-core omegaconf webdataset braceexpand descript-audio-codec descript-audiotools soundfile cffi pycparser
        librosa audioread soxr pooch decorator isal submitit pyloudnorm julius flatten-dict ffmpy fire termcolor
        importlib_resources markdown2 pystoi torch-stoi docstring_parser platformdirs ipython ipython_pygments_lexers
        traitlets jedi parso pexpect ptyprocess prompt_toolkit wcwidth stack-data executing asttokens pure_eval
        matplotlib-inline hjson pydantic pydantic_core annotated-types typing-inspection)
# Published as source only: built here into pure-Python wheels.
source=(antlr4-python3-runtime argbind randomname deepspeed)
mkdir -p "$out"
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out" "${specs[@]}"
specs=()
for name in "${source[@]}"; do specs+=("$name==$(version "$name")"); done
"$pip" wheel -q --no-deps -w "$out" "${specs[@]}"
du -sh "$out"
