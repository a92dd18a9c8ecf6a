#!/usr/bin/env bash
# All GPU benchmarks of benchmarks/ in one go; results appended to ${OUT:-benchmarks/results}/*.jsonl.
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
only=${1:-all}
export PYTHONPATH="/tmp/site:$PYTHONPATH"  # wheels installed from .whl/core below or by frameworks/install_gpu_wheels.sh
if ! python3 -c "import pydantic" 2>/dev/null && [[ -d .whl/core ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/core/*.whl
fi
python3 -c "import pydantic" 2>/dev/null || {
  echo "run_gpu.sh: pydantic is not installed here; run benchmarks/frameworks/fetch_gpu_wheels.sh on the"
  echo "development machine and carry .whl/core (benchmarks/gpu_core_wheels.txt) in this call"; exit 2; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [[ $only == all || $only == sync ]]; then  # no host-device sync in a round's training (the device image has pytest)
  python3 -m pytest -q -p no:cacheprovider testing/test_gpu.py
fi
if [[ $only == all || $only == overhead ]]; then
  python3 -m benchmarks.overhead --device cuda --data synthetic --out "$out/overhead.jsonl"
fi
if [[ $only == compile ]]; then  # CUDA graphs through torch.compile, both sides of the overhead ratio
  python3 -m benchmarks.overhead --device cuda --data synthetic --set client_config.compile=true \
    --set client_config.compile_mode=reduce-overhead --out "$out/overhead.jsonl"
fi
if [[ $only == all || $only == vectorized ]]; then
  python3 -m benchmarks.vectorized --device cuda --out "$out/vectorized.jsonl"
  python3 -m benchmarks.dispatch --device cuda --out "$out/dispatch.jsonl"  # operator counts with CUDA's foreach SGD
fi
if [[ $only == evaluation ]]; then  # an evaluation round vs the full-test pass it no longer makes
  python3 -m benchmarks.evaluation --device cuda --data synthetic --out "$out/evaluation.jsonl"
  python3 -m benchmarks.evaluation --device cuda --data synthetic --config experiments/cv/config.yaml \
    --out "$out/evaluation.jsonl"
fi
if [[ $only == all || $only == precision ]]; then
  python3 -m benchmarks.precision --device cuda --out "$out/precision.jsonl"
  python3 -m benchmarks.precision --device cuda --config benchmarks/configs/pfl_cnn_50x50.yaml --out "$out/precision.jsonl"
fi
if [[ $only == all || $only == workers ]]; then
  for n in 1 2 4; do  # one thread per process, as torchrun sets for n > 1 (n = 1 would take every core)
    OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nproc_per_node=$n benchmarks/workers.py --device cuda --out "$out/workers.jsonl" 2>&1 | grep '"benchmark"'
  done
  for n in 1 2 4; do
    OMP_NUM_THREADS=2 python3 -m torch.distributed.run --nproc_per_node=$n benchmarks/workers.py --device cpu \
      --set server_config.num_clients_per_iteration=12 --out "$out/workers.jsonl" 2>&1 | grep '"benchmark"'
  done
fi
if [[ $only == all || $only == scale ]]; then
  for clients in 10000 100000; do
    python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/scale.py --device cuda --clients $clients \
      --out "$out/scale.jsonl" 2>&1 | grep '"benchmark"'
  done
fi
