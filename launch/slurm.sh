#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all the node's
# GPUs. Submit with
#
#   sbatch launch/slurm.sh --config=configs/vit_l16.py:imagenet2012,pretrain \
#       --workdir=/shared/runs/vit_l16 [--config.X=Y ...]
#
# srun starts the same command as every task. Each trainer maps its SLURM_* variables to
# jax.distributed.initialize arguments with vit_jax.parallel.slurm.slurm_distributed_kwargs
# (config.distributed.mode 'auto' initialises because SLURM_NTASKS > 1):
#   coordinator  the first host of the node list, port $VIT_JAX_COORDINATOR_PORT or
#                61440 + SLURM_JOB_ID % 4096;
#   process      SLURM_PROCID of SLURM_NTASKS;
#   GPUs         all the node's GPUs with one task per node; with several tasks per node
#                (--ntasks-per-node=8 --gpus-per-task=1) each task drives its own.
# This script computes the coordinator the same way before srun, so that a bad node list
# fails here and the log says which host and port the tasks meet on.
# --workdir must be on a filesystem all nodes see (checkpoints are written together by
# all processes). config.batch_size is global: each task loads batch_size / tasks.
#SBATCH --job-name=vit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=vit-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
set -euo pipefail

# Submitted with sbatch, $0 is a copy of this script; run from the submission directory.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${PYTHON:-python}"

# Let XLA use almost all GPU memory; keep the data workers' threads per process sane.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

coordinator="$("$PYTHON" -m vit_jax.parallel.slurm)"
echo "SLURM job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-1} tasks on" \
     "${SLURM_JOB_NODELIST:-?}; coordinator ${coordinator}" >&2

# Exit status 75 (vit_jax.training.loop.PREEMPTED_EXIT_CODE): the trainer was preempted
# (SIGTERM, e.g. `scancel --signal=TERM` or the end of --time with --signal=TERM@120) and
# saved a checkpoint: requeue the job, which resumes from it. Any other failure ends it.
# (#SBATCH --requeue is needed on clusters where requeueing is off by default.)
status=0
srun --kill-on-bad-exit=1 "$PYTHON" -m vit_jax.main "$@" || status=$?
if [[ "$status" -eq 75 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "Preempted: requeueing SLURM job ${SLURM_JOB_ID}" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
