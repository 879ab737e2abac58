#!/usr/bin/env bash
# Offline evaluation on SLURM: every prompt preset scored by mel distance and FAD, plus a passes sweep.
# Prints the job id.
#
#   PARTITION=gpu ACCOUNT=mylab slurm/eval.sh coarse=models/coarse.pt c2f=models/c2f.pt \
#       dataset_dir=/data/codes codec.source=44khz out_dir=eval/run1
#
# Arguments: conf/eval.yaml overrides. Export models first: vampnet-pl export CHECKPOINT OUT.pt
# Environment: GPUS (1; a type too: a100:1; 0 evaluates on CPUs)  CPUS_PER_TASK (8)  MEM  TIME (02:00:00)
#   and the site settings of slurm/common.sh (PARTITION, ACCOUNT, QOS, LOG_DIR, SBATCH_EXTRA).
source "$(dirname "$0")/common.sh"
require_override coarse "$@"  # conf/eval.yaml leaves both unset
require_override dataset_dir "$@"
parse_gpus GPUS "${GPUS:-1}"
options=(--ntasks=1 --cpus-per-task="${CPUS_PER_TASK:-8}" --time="${TIME:-02:00:00}")
if [ -n "$gpu_gres" ]; then options+=("$gpu_gres"); fi
if [ -n "${MEM:-}" ]; then options+=(--mem="$MEM"); fi
job=$(submit "${options[@]}" --output="$LOG_DIR/%x-%j.out" "$VAMPNET_ROOT/slurm/eval.sbatch" "$@")
echo "evaluation job $job" >&2
echo "follow: squeue -j $job; tail -f $LOG_DIR/vampnet-eval-$job.out" >&2
echo "$job"
