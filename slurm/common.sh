# Sourced by the submit scripts (prep.sh, train.sh, eval.sh): site settings -> sbatch options.
#   PARTITION, ACCOUNT, QOS   where the jobs run (default: the cluster's defaults)
#   LOG_DIR                   job logs (default: slurm-logs/)
#   SBATCH_EXTRA              any other sbatch options, e.g. "--constraint=a100 --exclusive"
#   VAMPNET_SETUP, VAMPNET_VENV  how a job finds vampnet-pl (slurm/env.sh)
set -euo pipefail
VAMPNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VAMPNET_ROOT
LOG_DIR="${LOG_DIR:-slurm-logs}"
mkdir -p "$LOG_DIR"

site_options=()
if [ -n "${PARTITION:-}" ]; then site_options+=(--partition="$PARTITION"); fi
if [ -n "${ACCOUNT:-}" ]; then site_options+=(--account="$ACCOUNT"); fi
if [ -n "${QOS:-}" ]; then site_options+=(--qos="$QOS"); fi
# shellcheck disable=SC2206
if [ -n "${SBATCH_EXTRA:-}" ]; then site_options+=($SBATCH_EXTRA); fi

# sbatch OPTIONS... SCRIPT ARGS...: submit, print the job id. Called as job=$(submit ...), where `set -e` does
# not apply inside, so a failed sbatch (or one that prints no job id) is checked here: the message goes to
# stderr, the subshell exits 1, and the caller's assignment fails, which stops the script (set -e).
submit() {
  local out id
  if ! out=$(sbatch --parsable --export=ALL ${site_options[@]+"${site_options[@]}"} "$@"); then
    echo "error: sbatch failed (see its message above); nothing more is submitted" >&2
    exit 1
  fi
  id="${out%%;*}"
  if ! [[ "$id" =~ ^[0-9]+$ ]]; then
    echo "error: sbatch printed no job id (got '$out'); nothing more is submitted" >&2
    exit 1
  fi
  echo "$id"
}

# parse_gpus NAME VALUE: a GPU count (2) or a type and a count (a100:2), as --gres=gpu:... takes them.
# Sets gpu_count (the number) and gpu_gres (the --gres option, empty for 0); anything else stops the script.
parse_gpus() {
  if [[ "$2" =~ ^[0-9]+$ ]]; then
    gpu_count=$((10#$2))
  elif [[ "$2" =~ ^[A-Za-z0-9_.-]+:([0-9]+)$ ]]; then
    gpu_count=$((10#${BASH_REMATCH[1]}))
  else
    echo "error: $1=$2: give a GPU count (2) or a GPU type and a count (a100:2)" >&2
    exit 2
  fi
  gpu_gres=""
  if [ "$gpu_count" -gt 0 ]; then gpu_gres="--gres=gpu:$2"; fi
}

# require_override KEY ARGS...: stop the script unless ARGS set KEY (KEY=, +KEY= or ++KEY=): a required setting left
# out would fail the job only at its start, after its wait in the queue.
require_override() {
  local key="$1" arg
  shift
  for arg in "$@"; do
    if [[ "$arg" =~ ^\+{0,2}([^=]*)= ]] && [ "${BASH_REMATCH[1]}" = "$key" ]; then return 0; fi
  done
  echo "error: give $key=... (a Hydra override); nothing is submitted" >&2
  exit 2
}
