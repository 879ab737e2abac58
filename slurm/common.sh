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

# sbatch OPTIONS... SCRIPT ARGS...: submit, print the job id
submit() {
  local out
  out=$(sbatch --parsable --export=ALL "${site_options[@]}" "$@")
  echo "${out%%;*}"
}
