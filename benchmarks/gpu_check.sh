#!/usr/bin/env bash
# The GPU check of lightning-jit: CUDA precision/strategy checks and the JiT step benchmark, in under 5 minutes.
#
#   benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu           # the same code on the CPU, tiny configuration (what CI runs)
#   benchmarks/gpu_check.sh --out DIR       # where gpu_check.json / gpu_check.md go (default: $OUT or ./gpu_check_out)
#
# It installs nothing it does not need: it uses the python that already has torch (PYTHON, else python3), puts the
# repository on PYTHONPATH, and installs missing packages only from local wheels (WHEELS, default ./.whl) or the
# machine's own index. Exit status: 0 if every check passed (the FSDP probe is informational), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "torchvision", "lightning", "sklearn", "torchmetrics"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  declare -A pip_name=([sklearn]=scikit-learn)
  pkgs=""
  for m in $missing; do pkgs="$pkgs ${pip_name[$m]:-$m}"; done
  echo "installing:$pkgs"
  WHEELS="${WHEELS:-.whl}"
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $pkgs
  else
    "$PY" -m pip install -q $pkgs
  fi
fi

if [[ " $* " != *" --cpu "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" -m benchmarks.gpu_bench "$@"
