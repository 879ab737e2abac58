#!/usr/bin/env bash
# Every check that needs a GPU, as one command for the lent machine (at most 9 minutes: each part has a time limit; results under $OUT):
#   here:  bash scripts/device_wheels.sh            # once: .whl/ with what that machine lacks
#   there: bash bench/gpu_checks.sh                 # device run, carry [".whl"], timeout_s 600
# 1. bench/run.py train-gpu: tokens/s, MFU and peak GiB of the paper-size coarse model per configuration
# 2. bench/run.py generate: 10 s of audio with the paper models, batch 1 to 16 (CUDA graphs, bf16)
# 3. the tests marked gpu (flex dropout kernel, CUDA graphs, strategies that refuse the CPU, batch sizing,
#    deterministic head gradients)
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout 320 python3 bench/run.py --out "$OUT" train-gpu 2>&1 | tee "$OUT/train_gpu.log"
timeout 105 python3 bench/run.py --out "$OUT" generate --device cuda --sizes paper --batches 1 2 4 8 16 --cuda-graphs \
    --bf16 2>&1 | tee "$OUT/generate.log"
timeout 115 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_batch_size.py tests/test_sampling.py \
    tests/test_vamp.py tests/test_train.py tests/test_requeue.py tests/test_attention.py tests/test_model.py 2>&1 | tee "$OUT/pytest_gpu.log"
