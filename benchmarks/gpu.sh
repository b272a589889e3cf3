#!/usr/bin/env bash
# One call on a GPU host (one H100/H200): the accelerator suite, then every GPU benchmark row with its
# peer, each in its own process under its own time limit, within 8 minutes by construction
# (benchmarks/gpu_rows.py holds the rows and their limits). Prints each table and a summary, and writes
# gpu_results.json and gpu_log.txt under $OUT when it is set, else under benchmarks/.
#
#   bash benchmarks/gpu.sh                       # on the GPU host, from a checkout (PYTHONPATH is set here)
#   EMJAX_GPU_SH_TINY=1 bash benchmarks/gpu.sh   # the same plumbing with tiny sizes, on any CPU
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Needs jax with its CUDA plugin, flax, optax, orbax, transformers, and for the peers torch and peft
# (a row whose peer is missing is reported as skipped). Exits non-zero if the accelerator suite fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
exec "$PYTHON" benchmarks/gpu_rows.py
