#!/usr/bin/env bash
# Item 5 on a GPU machine without internet: pfedsim (sequential and vectorized) and Flower on the shared
# workload (1,000 clients x 50 samples, 50 per round, batch 10, PflCNN, 20 rounds), on synthetic
# CIFAR-shaped images (the CIFAR-10 files do not travel in one call; speed only, accuracy is chance).
#
# Before: run benchmarks/frameworks/fetch_gpu_wheels.sh here, then carry its two groups of .whl/ files
# in two back-to-back device calls (the first call can just `ls .whl`); in the second call run, from the
# repository root:   OUT=$OUT bash benchmarks/frameworks/run_gpu.sh
# Results: $OUT/frameworks_gpu.jsonl (pfedsim, one line per variant) and $OUT/results_flower_gpu*.json.
# Compare like with like: pfedsim's sec_per_round is the mean of rounds 2-20, so take Flower's
# s_per_round_2_20 (its round 1 includes Ray's start). pfl is not run here: its wheels are not in
# the carried set (run_pfl.py takes FW_DEVICE=cuda where pfl is installed).
set -euo pipefail
out=${OUT:-/tmp/fw_gpu}
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
bash benchmarks/frameworks/install_gpu_wheels.sh
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

for variant in "" "--set client_config.vectorize=true"; do
  # shellcheck disable=SC2086  # $variant is two words on purpose
  python3 benchmarks/workers.py --device cuda --data synthetic --rounds 20 $variant --out "$out/frameworks_gpu.jsonl"
done

for actors in 1 4; do
  FW_DEVICE=cuda FW_DATA=synthetic FW_ACTORS=$actors FW_TAG="gpu_${actors}actor" FW_CACHE=/tmp/fw_cache \
    timeout 240 python3 benchmarks/frameworks/run_flower.py || echo "flower with $actors actors failed: $?"
  cp benchmarks/frameworks/results_flower_gpu_${actors}actor.json "$out/" 2>/dev/null || true
done
