#!/usr/bin/env bash
# One-shot accelerator check: model and train-step throughput on the GPU, and
# the ops/model tests run there. Expects ml_collections (and friends) as wheels in
# .whl/ when the machine lacks them; writes logs to $OUT (or ./gpu_logs).
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
{
  timeout 110 python3 bench/bench_models.py --batch 128 --steps 20
  timeout 110 python3 bench/bench_models.py --batch 128 --steps 20 --dtype bfloat16
  timeout 100 python3 bench/bench_train.py --config experiments/mnist.py --steps 30
  timeout 120 python3 bench/bench_train.py --config experiments/cifar10.py --steps 30
} 2>&1 | grep -v "^I1\|^W1" | tee "$OUT/bench.txt"
timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/test_ops.py tests/test_models.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
