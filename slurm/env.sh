# Sourced by the job scripts (*.sbatch): makes `vampnet-pl` runnable on the compute node.
#   VAMPNET_SETUP  site commands to run first, e.g. "module load cuda/12.4"
#   VAMPNET_VENV   the virtual environment to activate (default: <checkout>/.venv when it exists; when set, it must exist)
set -euo pipefail
VAMPNET_ROOT="${VAMPNET_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ -n "${VAMPNET_SETUP:-}" ]; then
  eval "$VAMPNET_SETUP"
fi
venv="${VAMPNET_VENV:-$VAMPNET_ROOT/.venv}"
if [ -n "${VAMPNET_VENV:-}" ] && [ ! -f "$venv/bin/activate" ]; then  # a typo would run whatever is on PATH
  echo "VAMPNET_VENV=$VAMPNET_VENV: no environment there (no bin/activate); as the compute node sees it" >&2
  exit 2
fi
if [ -f "$venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
fi
if ! command -v vampnet-pl >/dev/null; then
  echo "vampnet-pl is not on PATH: set VAMPNET_VENV or VAMPNET_SETUP (slurm/README.md)" >&2
  exit 2
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1  # a hard crash (segfault, abort) prints every thread's Python stack to the log
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID}" \
  "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $*"
