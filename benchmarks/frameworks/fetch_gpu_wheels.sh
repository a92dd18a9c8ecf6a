#!/usr/bin/env bash
# Run HERE (a machine with pip and registry access), from anywhere: downloads the cp312 manylinux x86_64
# wheels named in gpu_wheels.txt (Flower's simulation engine: flwr + ray + the dependencies the GPU
# machine lacks) into .whl/ at the repository root (git-ignored), splits Ray's wheel (~74 MB) in two and
# sorts everything into two carry groups of < 60 MiB each:
#   .whl/call1/  ray.part-aa + some wheels        -> carried by device call 1
#   .whl/call2/  ray.part-ab + the other wheels   -> carried by device call 2 (+ ray.sha256)
#   .whl/core/   pydantic and its dependencies    -> all pfedsim needs for benchmarks/run_gpu.sh (one call)
# One folder per call because a device call's `carry` names at most 8 paths. Then, on the GPU machine
# (call 2, repository root): bash benchmarks/frameworks/install_gpu_wheels.sh && export PYTHONPATH=/tmp/site
# Prints `CALL1: ...` and `CALL2: ...` headers, each followed by its files (paths relative to the
# repository root, one a line).
set -euo pipefail
cd "$(dirname "$0")/../.."
REQ=benchmarks/frameworks/gpu_wheels.txt
LIMIT=$((60 * 1024 * 1024))   # per call group; the repo itself (~1 MB) travels too, 64 MiB in all
PY=${PYTHON:-python3}

rm -rf .whl/dl .whl/call1 .whl/call2 .whl/core .whl/ray.part-*
mkdir -p .whl/dl .whl/call1 .whl/call2 .whl/core

# --no-deps: the lists name every package that has to travel; pure-python (py3-none-any) wheels
# match these --platform tags too.
download() {  # DIR REQUIREMENTS
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" -r "$2"
}
download .whl/dl "$REQ"

# exactly one wheel of the listed version for each line of gpu_wheels.txt
norm() { tr 'A-Z.-' 'a-z__'; }
n_req=0
while IFS= read -r line; do
  line=${line%%#*}; line=${line//[[:space:]]/}
  [ -n "$line" ] || continue
  n_req=$((n_req + 1))
  name=$(printf '%s' "${line%%==*}" | norm); ver=${line#*==}
  found=$(find .whl/dl -maxdepth 1 -name '*.whl' -printf '%f\n' | while IFS= read -r f; do
            if [ "$(printf '%s' "${f%%-*}" | norm)" = "$name" ] && [ "$(cut -d- -f2 <<<"$f")" = "$ver" ]; then echo "$f"; fi
          done)
  [ "$(printf '%s' "$found" | grep -c .)" = 1 ] || { echo "fetch_gpu_wheels: no single wheel for $line (got: ${found:-none})" >&2; exit 1; }
done < "$REQ"
n_whl=$(find .whl/dl -maxdepth 1 -name '*.whl' | wc -l)
[ "$n_whl" = "$n_req" ] || { echo "fetch_gpu_wheels: $n_whl wheels for $n_req requirements" >&2; exit 1; }

# Ray's wheel: two halves + its name and checksum (install_gpu_wheels.sh re-joins and checks it)
ray_whl=$(find .whl/dl -maxdepth 1 -name 'ray-*.whl')
[ "$(printf '%s\n' "$ray_whl" | grep -c .)" = 1 ] || { echo "fetch_gpu_wheels: expected one ray wheel" >&2; exit 1; }
(cd .whl/dl && sha256sum "$(basename "$ray_whl")") > .whl/call2/ray.sha256
split -n 2 "$ray_whl" .whl/dl/ray.part-
rm "$ray_whl"
mv .whl/dl/ray.part-aa .whl/call1/
mv .whl/dl/ray.part-ab .whl/call2/

# the other wheels, largest first, each to the lighter group
size() { stat -c %s "$1"; }
dir_size() { local s=0 f; for f in "$1"/*; do s=$((s + $(size "$f"))); done; echo "$s"; }
while IFS= read -r f; do
  if [ "$(dir_size .whl/call1)" -le "$(dir_size .whl/call2)" ]; then mv "$f" .whl/call1/; else mv "$f" .whl/call2/; fi
done < <(find .whl/dl -maxdepth 1 -name '*.whl' -printf '%s %p\n' | sort -rn | cut -d' ' -f2-)
rmdir .whl/dl

for g in 1 2; do
  s=$(dir_size .whl/call$g)
  [ "$s" -lt "$LIMIT" ] || { echo "fetch_gpu_wheels: .whl/call$g is $s bytes, over 60 MiB" >&2; exit 1; }
  printf 'CALL%s: carry [".whl/call%s"]  %s files, %s bytes (%s MiB)\n' "$g" "$g" \
    "$(find .whl/call$g -type f | wc -l)" "$s" "$(awk -v s="$s" 'BEGIN{printf "%.1f", s/1048576}')"
  find .whl/call$g -type f | sort
done

# pfedsim's own needs beyond the device image (pydantic): one small carry, enough for benchmarks/run_gpu.sh
download .whl/core benchmarks/gpu_core_wheels.txt
printf 'CORE: carry [".whl/core"]  %s files, %s bytes (enough for benchmarks/run_gpu.sh)\n' \
  "$(find .whl/core -type f | wc -l)" "$(dir_size .whl/core)"
find .whl/core -type f | sort
