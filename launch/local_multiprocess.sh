#!/usr/bin/env bash
# Runs one training job as N JAX processes on this machine (CPU), the way a multi-host job
# runs on N hosts: a coordinator on 127.0.0.1, one process id each, every process reading
# only its own shard of the data. Useful to rehearse multi-host runs without a cluster.
#
#   launch/local_multiprocess.sh [--config=configs/default.py] [--workdir=DIR] [--config.X=Y ...]
#
# Environment:
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  XLA CPU devices per process (default 1)
#   PORT                 coordinator port (default: a free one)
#   LOG_DIR              where processes 1..N-1 write their logs (default: a temp dir);
#                        process 0 prints to this terminal.
# Exits with the first non-zero exit status of any process; Ctrl-C stops them all.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PYTHON="${PYTHON:-python}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t vit_multiprocess.XXXXXX)}"
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

echo "Starting ${NUM_PROCESSES} processes x ${DEVICES_PER_PROCESS} CPU devices, coordinator" \
     "127.0.0.1:${PORT}; logs of processes 1..$((NUM_PROCESSES - 1)) in ${LOG_DIR}" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  args=("$@"
        "--config.distributed.coordinator_address=127.0.0.1:${PORT}"
        "--config.distributed.num_processes=${NUM_PROCESSES}"
        "--config.distributed.process_id=${i}")
  cmd=(env JAX_PLATFORMS=cpu
       XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
       "$PYTHON" -m vit_jax.main "${args[@]}")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    rc=$?
    if ((status == 0)); then status=$rc; cleanup; fi
  fi
done
exit "$status"
