#!/usr/bin/env bash
# Training on SLURM: NODES x GPUS_PER_NODE processes, one per device. The job checkpoints and requeues
# itself 90 s before its time limit or on preemption, and resumes where it stopped. Prints the job id.
#
#   PARTITION=gpu ACCOUNT=mylab NODES=2 GPUS_PER_NODE=4 slurm/train.sh \
#       experiment=vampnet_coarse data.dataset_dir=/data/codes codec=dac_44khz strategy=fsdp
#
# Arguments: conf/train.yaml overrides (the strategy is one: strategy=ddp|fsdp|fsdp2|deepspeed_zero2|...).
# Environment:
#   NODES (1)  GPUS_PER_NODE (1; a type too: a100:2; 0 trains on CPUs)  TASKS_PER_NODE (= the GPU count, or 1 on CPUs)
#   CPUS_PER_TASK (8)  MEM (per node; default: the site's)  TIME (24:00:00)
#   RUN_NAME   the run directory's name (default: <experiment>-<job id>); an earlier run's name resumes it
#   and the site settings of slurm/common.sh (PARTITION, ACCOUNT, QOS, LOG_DIR, SBATCH_EXTRA).
source "$(dirname "$0")/common.sh"
NODES="${NODES:-1}"
parse_gpus GPUS_PER_NODE "${GPUS_PER_NODE:-1}"
if [ "$gpu_count" -gt 0 ]; then
  TASKS_PER_NODE="${TASKS_PER_NODE:-$gpu_count}"
  options=("$gpu_gres")
  defaults=(trainer=gpu)
else
  TASKS_PER_NODE="${TASKS_PER_NODE:-1}"
  options=()
  defaults=(trainer=cpu)
fi
options+=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="${CPUS_PER_TASK:-8}"
  --time="${TIME:-24:00:00}")
if [ -n "${MEM:-}" ]; then options+=(--mem="$MEM"); fi
if [ -n "${RUN_NAME:-}" ]; then
  if [[ "$RUN_NAME" =~ [\'\\] ]]; then  # they would end or escape the quoted Hydra value below
    echo "error: RUN_NAME=$RUN_NAME: give a name without ' or \\" >&2
    exit 2
  fi
  defaults+=("run_name='$RUN_NAME'")  # quoted for Hydra: a comma or brackets are part of the name
fi

job=$(submit "${options[@]}" --output="$LOG_DIR/%x-%j.out" "$VAMPNET_ROOT/slurm/train.sbatch" "${defaults[@]}" "$@")
echo "training job $job: $NODES node(s) x $TASKS_PER_NODE process(es)" >&2
echo "follow: squeue -j $job; tail -f $LOG_DIR/vampnet-train-$job.out" >&2
echo "$job"
