#!/usr/bin/env bash
# Sets up everything deeperlab_d2 needs in ./.venv (or $DEEPERLAB_VENV). Idempotent: every
# step first checks whether its result is already there, so a second run takes seconds.
#
#   1. a virtual environment (with --system-site-packages when the base python already has
#      detectron2, so that a user's own detectron2/torch build is kept)
#   2. torch 2.14.1 + torchvision 0.29.1, unless the venv already imports torch+torchvision
#   3. detectron2, unless the venv already imports it: the PyPI sdist pb1-detectron2==0.6
#      (upstream v0.6, checked by sha256) plus this project's minimal csrc/vision.cpp
#   4. panopticapi (panopticapi-lite, --no-deps), pytest, pytest-xdist, ruff; timm, onnx,
#      onnxruntime, onnxscript
#   5. this plugin: pip install --no-build-isolation -e .
# Every pip call uses scripts/constraints.txt. Each step prints its wall time ("[install] NAME:
# N s") and the total at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPERLAB_VENV:-$ROOT/.venv}"
BASE_PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
D2_SDIST="pb1-detectron2==0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

log() { echo "[install] $*"; }
T0=$(date +%s)
# Per-step wall time: `step NAME` starts a step (ending the previous one), `step_end` ends it;
# each prints "[install] NAME: N s" so that a slow install shows where the time went.
STEP_NAME=""
STEP_T0=0
step_end() {
  if [ -n "$STEP_NAME" ]; then log "$STEP_NAME: $(( $(date +%s) - STEP_T0 )) s"; fi
  STEP_NAME=""
}
step() {
  step_end
  STEP_NAME="$1"
  STEP_T0=$(date +%s)
}

# ---- 1. venv -----------------------------------------------------------------------------
step "venv"
if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PYTHON" -c "import detectron2" >/dev/null 2>&1; then
    log "base python already has detectron2: creating $VENV with --system-site-packages to keep it"
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    "$BASE_PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

have() { "$PY" -c "$1" >/dev/null 2>&1; }

if ! have "import setuptools, wheel, sys; import pkg_resources"; then
  step "build tools"
  log "installing build tools"
  "${PIP[@]}" install -c "$CONSTRAINTS" setuptools wheel
fi

# ---- 2. torch ----------------------------------------------------------------------------
if ! have "import torch, torchvision; torchvision.ops.nms"; then
  step "torch + torchvision"
  log "installing torch + torchvision (about 1 min, ~5.5 GB)"
  "${PIP[@]}" install -c "$CONSTRAINTS" torch torchvision
fi

# ---- 3. detectron2 -----------------------------------------------------------------------
if have "import detectron2, detectron2._C; from detectron2.modeling import build_model"; then
  log "detectron2 present: $("$PY" -c 'import detectron2; print(detectron2.__file__)')"
else
  log "installing detectron2 from the $D2_SDIST sdist (about 1.5 min)"
  # its runtime dependencies first, under the same pins
  step "detectron2: numpy, pillow, ninja"
  "${PIP[@]}" install -c "$CONSTRAINTS" numpy pillow ninja
  step "detectron2: sdist download and check"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  "${PIP[@]}" download --no-deps --no-binary :all: -d "$WORK" "$D2_SDIST"
  TARBALL="$(ls "$WORK"/*.tar.gz)"
  echo "$D2_SHA256  $TARBALL" | sha256sum -c --quiet - || {
    echo "[install] sha256 mismatch for $TARBALL: refusing to install it" >&2
    exit 1
  }
  tar -xzf "$TARBALL" -C "$WORK"
  SRC="$(find "$WORK" -maxdepth 1 -mindepth 1 -type d | head -n 1)"
  mkdir -p "$SRC/detectron2/layers/csrc"
  cp "$ROOT/scripts/detectron2_vision.cpp" "$SRC/detectron2/layers/csrc/vision.cpp"
  # No GPU kernels of detectron2 are needed (see the .cpp): build its CPU-only shim.
  step "detectron2: build and install (with its dependencies)"
  FORCE_CUDA=0 CUDA_HOME="" MAX_JOBS="${MAX_JOBS:-2}" \
    "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation "$SRC"
  rm -rf "$WORK"
  trap - EXIT
fi

# ---- 4. panopticapi, test tools ----------------------------------------------------------
if ! have "from panopticapi.evaluation import pq_compute"; then
  step "panopticapi"
  log "installing panopticapi (panopticapi-lite, --no-deps)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --no-deps panopticapi-lite==0.2.0
fi
# pytest-xdist: scripts/test.sh runs the suite on 2 worker processes
if ! have "import pytest, xdist"; then
  step "pytest, pytest-xdist, ruff"
  log "installing pytest, pytest-xdist, ruff"
  "${PIP[@]}" install -c "$CONSTRAINTS" pytest pytest-xdist ruff
fi
# the optional extras the tests exercise: timm (the Xception-71 converter), onnx + onnxruntime +
# onnxscript (ONNX export); pip install "deeperlab_d2[convert,export]" outside this script
if ! have "import timm, onnx, onnxruntime, onnxscript"; then
  step "timm, onnx, onnxruntime, onnxscript"
  log "installing timm, onnx, onnxruntime, onnxscript"
  "${PIP[@]}" install -c "$CONSTRAINTS" timm onnx onnxruntime onnxscript
fi

# ---- 5. the plugin -----------------------------------------------------------------------
STAMP="$VENV/.deeperlab_d2.stamp"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$CONSTRAINTS" \
  $(find "$ROOT/deeperlab_d2" -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null | sort) \
  | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] \
  && have "import deeperlab_d2, deeperlab_d2.layers as L; assert L.HAS_COMPILED_OP"; then
  log "deeperlab_d2 up to date"
else
  step "deeperlab_d2 (compile + editable install)"
  log "installing deeperlab_d2 (editable)"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"; fi
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"
  echo "$HASH" >"$STAMP"
fi

step_end
log "ready in $(( $(date +%s) - T0 )) s: $VENV"
