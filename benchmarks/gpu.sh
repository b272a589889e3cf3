#!/usr/bin/env bash
# Every GPU preset in one call, for one lent H100/H200: each benchmark prints its own table,
# and this script prints them one after another with the wall time of each (budget: 9 minutes).
#
#   bash benchmarks/gpu.sh                      # all presets
#   SKIP_PEERS=1 bash benchmarks/gpu.sh         # emjax only (no torch peers), when time is short
#
# Assumes the project is installed with the `cuda` and `bench` extras (pip install -e ".[cuda,bench]").
set -uo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

run() {  # run NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo; echo "=== $name"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - start)) s"
}

peers=()
[ -n "${SKIP_PEERS:-}" ] && peers=(--skip_transformers)
run "forward gemma2-2b" 70 "$python" forward.py --preset=gemma2-2b "${peers[@]}"
run "forward llama31-8b" 70 "$python" forward.py --preset=llama31-8b "${peers[@]}"
run "forward gpt-oss-20b-layers" 70 "$python" forward.py --preset=gpt-oss-20b-layers "${peers[@]}"
run "sae encode 16k-1M" 70 "$python" sae.py --preset=gpu
run "similarity 131k" 40 "$python" similarity.py --preset=gpu-131k
run "selection permutation test" 60 "$python" selection_test.py --preset=gpu
run "similarity 1M" 40 "$python" similarity.py --preset=gpu-1m
run "lora step gemma2-2b" 70 "$python" train.py --preset=gemma2-2b "${peers[@]}"
for extra in features generate; do  # the study benchmarks, where they have a GPU preset
  [ -f "$extra.py" ] && grep -q 'gpu' "$extra.py" && run "$extra gpu" 40 "$python" "$extra.py" --preset=gpu
done
echo; echo "total: $SECONDS s"
