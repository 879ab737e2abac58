#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks, for bench/gpu_checks.sh: that machine has Python 3.12 with torch,
# lightning, torchmetrics, peft, numpy, scipy, PyYAML and tensorboard, and no package registry. Versions are
# this checkout's .venv's (make .venv/.installed first); about 14 MB, in .whl/ (git-ignored).
#   bash scripts/device_wheels.sh [OUT_DIR]
set -euo pipefail
out=${1:-.whl}
pip=.venv/bin/pip
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
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
