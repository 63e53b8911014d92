#!/usr/bin/env bash
# Training on a multi-host Cloud TPU VM slice (e.g. v4-32 = 4 hosts): the same command on
# every worker, started over ssh. JAX finds the slice's hosts from the TPU metadata
# (config.distributed.mode=on makes every worker call jax.distributed.initialize()).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh train \
#       --config=configs/vit_h14.py:imagenet21k --workdir=gs://my-bucket/runs/vit_h14
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh stop
#
# setup: copies this checkout to ~/vit_jax on every worker and installs it with jax[tpu].
# train: starts training on all workers; their output streams to this terminal and into
#        ~/vit_jax/train.log on each worker. --workdir must be shared: a gs:// bucket.
# stop:  kills the training processes (a TPU can only be opened by one process).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="${REMOTE_DIR:-vit_jax}"
cd "$(dirname "$0")/.."

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
      --command="$1"
}

quote_args() {
  local out=""
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  echo "$out"
}

case "${1:-}" in
  setup)
    tar czf /tmp/vit_jax_src.tgz --exclude=.git --exclude=.venv --exclude=workdir .
    gcloud compute tpus tpu-vm scp /tmp/vit_jax_src.tgz "$TPU_NAME:~/" --zone="$ZONE" \
        $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/vit_jax_src.tgz -C ~/$REMOTE_DIR && \
             cd ~/$REMOTE_DIR && pip install -q -U 'jax[tpu]' -e ."
    ;;
  train)
    shift
    args="$(quote_args "$@") --config.distributed.mode=on"
    ssh_all "cd ~/$REMOTE_DIR && python -m vit_jax.main $args 2>&1 | tee train.log"
    ;;
  stop)
    ssh_all "pkill -f 'python -m vit_jax.main' || true"
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 setup | train [main.py flags] | stop" >&2
    exit 2
    ;;
esac
