#!/usr/bin/env bash
# Data prep on SLURM: a scan job, an array of encode jobs, then finalize + verify, chained by dependencies.
# Prints the three job ids on stdout (messages go to stderr).
#
#   PARTITION=cpu ACCOUNT=mylab TASKS=16 slurm/prep.sh catalog=/data/music out_dir=/data/codes codec=dac_44khz
#
# Arguments: conf/prep.yaml overrides (catalog= and out_dir= are required). Environment:
#   TASKS (8)          array tasks; task i encodes units i, i+TASKS, ... Re-running skips finished units.
#   GPUS_PER_TASK (0)  >0: each task encodes on that many GPUs, one worker process per GPU (a type too: a100:1)
#   CPUS_PER_TASK (4)  MEM (16G, per task)  TIME (04:00:00, per task)
#   and the site settings of slurm/common.sh (PARTITION, ACCOUNT, QOS, LOG_DIR, SBATCH_EXTRA).
source "$(dirname "$0")/common.sh"
TASKS="${TASKS:-8}"
if ! [[ "$TASKS" =~ ^[0-9]+$ ]] || [ "$((10#$TASKS))" -lt 1 ]; then  # checked before anything is submitted
  echo "error: TASKS=$TASKS: give the number of encode array tasks, 1 or more" >&2
  exit 2
fi
TASKS=$((10#$TASKS))
require_override catalog "$@"  # conf/prep.yaml leaves both unset
require_override out_dir "$@"
parse_gpus GPUS_PER_TASK "${GPUS_PER_TASK:-0}"
CPUS_PER_TASK="${CPUS_PER_TASK:-4}"
resources=(--cpus-per-task="$CPUS_PER_TASK" --mem="${MEM:-16G}" --time="${TIME:-04:00:00}")
encode_resources=()
workers=1
if [ "$gpu_count" -gt 0 ]; then
  encode_resources=("$gpu_gres")
  workers="$gpu_count"
fi
after() { echo "--dependency=afterok:$1 --kill-on-invalid-dep=yes"; }
job="$VAMPNET_ROOT/slurm/prep.sbatch"
# A failed submission stops the script (submit in common.sh): name the jobs already queued.
submitted=()
trap 'if [ $? -ne 0 ] && [ ${#submitted[@]} -gt 0 ]; then
  echo "prep.sh stopped; already submitted: ${submitted[*]} (scancel them, or let them run and submit again)" >&2; fi' EXIT

scan=$(submit "${resources[@]}" --job-name=vampnet-prep-scan --output="$LOG_DIR/%x-%j.out" \
  "$job" scan scan_workers="$CPUS_PER_TASK" "$@")
submitted+=("$scan")
# shellcheck disable=SC2046
encode=$(submit "${resources[@]}" ${encode_resources[@]+"${encode_resources[@]}"} $(after "$scan") --array="0-$((TASKS - 1))" \
  --job-name=vampnet-prep-encode --output="$LOG_DIR/%x-%A_%a.out" "$job" encode workers="$workers" "$@")
submitted+=("$encode")
# shellcheck disable=SC2046
finalize=$(submit "${resources[@]}" $(after "$encode") --job-name=vampnet-prep-finalize \
  --output="$LOG_DIR/%x-%j.out" "$job" finalize "$@")

echo "scan job $scan -> encode array $encode ($TASKS tasks) -> finalize + verify job $finalize" >&2
echo "follow: squeue -j $scan,$encode,$finalize   logs: $LOG_DIR/vampnet-prep-*" >&2
echo "$scan $encode $finalize"
