#!/usr/bin/env bash
# The GPU check of lightning-jit: CUDA precision, DDP and FSDP2 checks on every GPU, the FSDP1 probe, the no-knob path
# on ResNet18 and a small ViT (peak memory against their own training step), and the JiT step benchmark against the
# reference loop: about 5 minutes on one H100-class card, stopped at 8 (GPU_CHECK_TIMEOUT, seconds).
#
#   benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-smoke     # every part on the CPU, tiny sizes, 2 gloo processes (tests run it)
#   benchmarks/gpu_check.sh --out DIR       # where the results go (default: $OUT or ./gpu_check_out)
#
# Results: DIR/gpu_check.md (a dated section to paste into docs/benchmarks.md, replacing the previous figures),
# DIR/gpu_check.json (every figure) and DIR/gpu_check.log (the raw output).
#
# It installs nothing it does not need: it uses the python that already has torch (PYTHON, else python3), puts the
# repository on PYTHONPATH, and installs missing packages only from local wheels (WHEELS, default ./.whl) or the
# machine's own index. Exit status: 0 if every check passed (the FSDP1 probe is informational), 1 otherwise.
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

if [[ " $* " != *" --cpu "* && " $* " != *" --cpu-smoke "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m benchmarks.gpu_bench "$@"
