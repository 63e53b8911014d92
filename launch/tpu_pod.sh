#!/usr/bin/env bash
# Training on a Cloud TPU VM slice through launch/tpu.py, with the slice given once in the
# environment. Each subcommand is one tpu.py call (see launch/README.md):
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32   # PROJECT=... optional
#   launch/tpu_pod.sh create --spot
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train --config=configs/vit_h14.py:imagenet21k \
#       --workdir=gs://my-bucket/runs/vit_h14 --restart-on-preemption [--config.X=Y ...]
#   launch/tpu_pod.sh logs --follow
#   launch/tpu_pod.sh stop
#   launch/tpu_pod.sh delete
#
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
here="$(cd "$(dirname "$0")" && pwd)"
command="${1:-}"

case "$command" in
  create|setup|train|logs|stop|delete) shift ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR=v4-32] $0" \
         "create | setup | train [tpu.py train flags] | logs | stop | delete" >&2
    exit 2
    ;;
esac

args=("$command" --name="$TPU_NAME" --zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  args+=(--project="$PROJECT")
fi
if [[ "$command" == create || "$command" == train ]]; then
  if [[ -n "${ACCELERATOR:-}" ]]; then
    args+=(--accelerator-type="$ACCELERATOR")
  elif [[ "$command" == create ]]; then
    echo "set ACCELERATOR to the slice type, e.g. ACCELERATOR=v4-32" >&2
    exit 2
  fi
fi
if [[ -n "${DRY_RUN:-}" ]]; then
  args+=(--dry-run)
fi
exec "${PYTHON:-python3}" "$here/tpu.py" "${args[@]}" "$@"
