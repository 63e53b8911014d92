#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all the node's
# GPUs. Submit with
#
#   sbatch launch/slurm.sh --config=configs/vit_l16.py:imagenet2012,pretrain \
#       --workdir=/shared/runs/vit_l16 [--config.X=Y ...]
#
# Every process runs the same command. JAX finds the job's nodes, this process's rank and
# the coordinator (the first node) from the SLURM_* variables: config.distributed.mode
# 'auto' calls jax.distributed.initialize() because SLURM_NTASKS > 1. --workdir must be on
# a filesystem all nodes see (checkpoints are written together by all processes).
# config.batch_size is global: each node loads batch_size / nodes examples per step.
#
# One process per GPU also works (--ntasks-per-node=8 --gpus-per-task=1); JAX then gives
# each process the GPU SLURM assigned it.
#SBATCH --job-name=vit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=vit-%j.out
set -euo pipefail

# Submitted with sbatch, $0 is a copy of this script; run from the submission directory.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# Let XLA use almost all GPU memory; keep the data workers' threads per process sane.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

srun --kill-on-bad-exit=1 python -m vit_jax.main "$@"
