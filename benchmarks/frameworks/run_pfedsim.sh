#!/usr/bin/env bash
# pfedsim side of the framework comparison: the shared workload from benchmarks/configs/pfl_cnn_50x50.yaml
# (1,000 IID clients x 50 CIFAR-10 samples, 50 clients/round, 1 local epoch, batch 10, SGD 0.05, FedAvg,
# 20 rounds, PflCNN), pinned to core FW_CORE (default 1; a list such as 0,1 also works) with one thread
# per process; FW_NPROC=N runs N processes under torch.distributed.run (gloo) instead of one.
# Usage: benchmarks/frameworks/run_pfedsim.sh [DATA_PATH] [RUN_NAME] [extra e2e_trainer args, e.g. --set K=V]
# Writes results_pfedsim.json (results_pfedsim_<tag>.json when FW_TAG is set).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PFEDSIM_PYTHON:-$REPO/.venv/bin/python}"
DATA="${1:-/work/shared/data/cifar10}"
NAME="${2:-fw_pfedsim_$(date +%Y%m%d_%H%M%S)}"
shift $(( $# > 2 ? 2 : $# ))
RESULT="$HERE/results_pfedsim${FW_TAG:+_$FW_TAG}.json"
OUT="${FW_OUT:-/tmp/fw_runs}"

cd "$REPO"
start=$(date +%s.%N)
NPROC="${FW_NPROC:-1}"
if [ "$NPROC" -gt 1 ]; then  # rank 0 serves and trains a share, the other ranks train theirs (gloo)
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" e2e_trainer.py -backend gloo)
else
  LAUNCH=("$PY" e2e_trainer.py)
fi
taskset -c "${FW_CORE:-1}" env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1 "${LAUNCH[@]}" \
  -dataPath "$DATA" -outputPath "$OUT" -config benchmarks/configs/pfl_cnn_50x50.yaml -task cv -run_name "$NAME" "$@"
end=$(date +%s.%N)

"$PY" - "$OUT/$NAME/metrics.jsonl" "$RESULT" "$start" "$end" "$REPO" "$*" "$NPROC" "${FW_CORE:-1}" <<'PYEOF'
import json, subprocess, sys
metrics, dest, start, end, repo, extra, nproc, cores = sys.argv[1:]
recs = [json.loads(line) for line in open(metrics) if line.strip()]
last = max(recs, key=lambda r: r["round"])
round_s = [s for r in sorted(recs, key=lambda r: r["round"]) for s in r["round_s"]]  # every round's training time
commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "core", "experiments", "utils", "e2e_trainer.py"],
                       capture_output=True, text=True).stdout
dirty = sorted({line[3:] for line in dirty.splitlines() if line.strip()})
if dirty:
    commit += " + uncommitted changes in " + ", ".join(dirty)
out = {"framework": "pfedsim", "processes": int(nproc), "cores": cores, "version": f"git {commit}", "rounds": last["round"],
       "wall_s": round(last["elapsed_s"], 2), "s_per_round": round(last["elapsed_s"] / last["round"], 3),
       "final_test_acc": round(last["global_test_acc"], 4),
       "s_per_round_2_20": round(sum(round_s[1:] or round_s) / len(round_s[1:] or round_s), 3),
       "round_s": [round(v, 3) for v in round_s],
       "included": "pfedsim's own elapsed_s at the last round: the 20 training rounds (cohort sampling, "
                   "broadcast, local training, aggregation); excludes data loading, model/engine set-up "
                   "and the final test-set evaluation",
       "process_wall_s": round(float(end) - float(start), 2)}
if extra:
    out["extra_args"] = extra
json.dump(out, open(dest, "w"), indent=1)
print(json.dumps(out))
PYEOF
