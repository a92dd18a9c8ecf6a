#!/usr/bin/env bash
# All GPU benchmarks of benchmarks/ in one go; results appended to ${OUT:-benchmarks/results}/*.jsonl.
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m benchmarks.overhead --device cuda --data synthetic --out "$out/overhead.jsonl"
python3 -m benchmarks.vectorized --device cuda --out "$out/vectorized.jsonl"
for n in 1 2 4; do
  python3 -m torch.distributed.run --nproc_per_node=$n benchmarks/workers.py --device cuda --out "$out/workers.jsonl" 2>&1 | grep '"benchmark"'
done
for n in 1 2 4; do
  OMP_NUM_THREADS=2 python3 -m torch.distributed.run --nproc_per_node=$n benchmarks/workers.py --device cpu \
    --set server_config.num_clients_per_iteration=12 --out "$out/workers.jsonl" 2>&1 | grep '"benchmark"'
done
