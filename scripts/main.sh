#!/usr/bin/env bash
# The main job: install, prepare the built-in synthetic dataset, train the tiny config on CPU.
# Extra arguments are passed to train_net.py as config overrides, e.g. SOLVER.MAX_ITER 200.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$ROOT/datasets}"
CONFIG="${CONFIG:-configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_2k_bs4_crop192x256.yaml}"
OUTPUT="${OUTPUT:-output/synthetic_tiny}"

T0=$(date +%s)
"$PY" datasets/prepare_synthetic.py --root "$DETECTRON2_DATASETS"
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUTPUT" "$@"
echo "[main] done in $(( $(date +%s) - T0 )) s; checkpoints and logs (metrics.json, TensorBoard) in $OUTPUT"
