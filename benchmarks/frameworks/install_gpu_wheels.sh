#!/usr/bin/env bash
# Run THERE (the GPU machine, no internet), after device call 1 carried .whl/call1 and call 2 carried
# .whl/call2 (see fetch_gpu_wheels.sh): re-joins Ray's wheel, installs every carried wheel with --no-deps
# into /tmp/site and checks that flwr and ray import from there. Then: export PYTHONPATH=/tmp/site
#   bash benchmarks/frameworks/install_gpu_wheels.sh && export PYTHONPATH=/tmp/site
#   or: source benchmarks/frameworks/install_gpu_wheels.sh   (exports PYTHONPATH itself on success)
# PYTHON (default python3) and SITE (default /tmp/site) override the interpreter and the target.

_fw_install_gpu_wheels() (
  set -euo pipefail
  trap 'echo "install_gpu_wheels: FAILED (line $LINENO)" >&2' ERR
  cd "$(dirname "${BASH_SOURCE[0]}")/../.."
  PY=${PYTHON:-python3}
  SITE=${SITE:-/tmp/site}
  REQ=benchmarks/frameworks/gpu_wheels.txt

  # Ray: the two halves, in name order (ray.part-aa, ray.part-ab), wherever under .whl they came
  mapfile -t parts < <(find .whl -type f -name 'ray.part-*' -printf '%f %p\n' | sort | cut -d' ' -f2-)
  [ "${#parts[@]}" -eq 2 ] || { echo "install_gpu_wheels: need 2 ray.part-* under .whl, found ${#parts[@]}: ${parts[*]:-}" >&2; exit 1; }
  sumfile=$(find .whl -type f -name ray.sha256 | head -n1)
  if [ -n "$sumfile" ]; then ray_name=$(awk '{print $2}' "$sumfile"); else ray_name=ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl; fi
  ray_whl=/tmp/$ray_name
  cat "${parts[@]}" > "$ray_whl"
  if [ -n "$sumfile" ]; then
    (cd /tmp && sha256sum -c --quiet "$OLDPWD/$sumfile") || { echo "install_gpu_wheels: $ray_whl does not match $sumfile" >&2; exit 1; }
  fi

  # one of each file name: .whl/core (carried earlier for run_gpu.sh) repeats some of call1/call2
  mapfile -t wheels < <(find .whl -type f -name '*.whl' -printf '%f %p\n' | sort -u -k1,1 | cut -d' ' -f2-)
  echo "install_gpu_wheels: installing $ray_name + ${#wheels[@]} wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$ray_whl" "${wheels[@]}"
  rm -f "$ray_whl"

  # every name==version of gpu_wheels.txt is now in $SITE
  installed=$(ls "$SITE" | tr 'A-Z.-' 'a-z__')
  missing=0
  while IFS= read -r line; do
    line=${line%%#*}; line=${line//[[:space:]]/}
    [ -n "$line" ] || continue
    name=$(printf '%s' "${line%%==*}" | tr 'A-Z.-' 'a-z__'); ver=${line#*==}
    if ! grep -qx "${name}_${ver//[.-]/_}_dist_info" <<<"$installed"; then
      echo "install_gpu_wheels: $line not installed in $SITE" >&2; missing=1
    fi
  done < "$REQ"
  [ "$missing" = 0 ]

  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import flwr, ray
import flwr.simulation, flwr.client, flwr.clientapp, flwr.server, flwr.serverapp, flwr.server.strategy, flwr.common
import numpy, google.protobuf, grpc
print('flwr', flwr.__version__, 'ray', ray.__version__, '| numpy', numpy.__version__,
      'protobuf', google.protobuf.__version__, 'grpcio', grpc.__version__)
assert flwr.__file__.startswith('$SITE/') and ray.__file__.startswith('$SITE/'), (flwr.__file__, ray.__file__)
"
  echo "install_gpu_wheels: OK. Now: export PYTHONPATH=$SITE"
)

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then   # sourced: export PYTHONPATH on success
  _fw_install_gpu_wheels; _fw_rc=$?
  if [ "$_fw_rc" -eq 0 ]; then export PYTHONPATH="${SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}"; fi
  unset -f _fw_install_gpu_wheels
  return "$_fw_rc"
else
  set -euo pipefail
  _fw_install_gpu_wheels
fi
