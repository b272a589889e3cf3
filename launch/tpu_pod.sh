#!/usr/bin/env bash
# Run emjax on every host of a Cloud TPU pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE --config=gemma27b [--config.mesh.fsdp=-1 ...]
# Each host runs the same command; emjax.distributed.initialize() discovers the
# coordinator from the TPU metadata, so no addresses are passed by hand.
set -euo pipefail
tpu=$1 zone=$2
shift 2
repo=${EMJAX_REPO_DIR:-~/emjax}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd $repo
  [ -d .venv ] || (python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]')
  .venv/bin/python -m emjax.main$args
"
