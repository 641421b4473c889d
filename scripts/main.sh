#!/usr/bin/env bash
# The main job: install, prepare the built-in synthetic dataset, train the tiny config on CPU,
# evaluate it on the synthetic val split (PQ, Parsing Covering, mIoU, AP), draw pictures and
# break the PQ down by branch (benchmarks/diagnose_pq.py).
# The training gets TRAIN_MINUTES (default 12) of this machine's time, as loaded as it is: the
# step time is measured first and SOLVER.MAX_ITER set to the iterations that fit
# (train_net.py --train-minutes; the plan is in $OUTPUT/schedule.json). TRAIN_MINUTES=0 keeps
# the config's MAX_ITER (1200).
# Extra arguments are passed to train_net.py as config overrides, e.g. SOLVER.MAX_ITER 200
# (with TRAIN_MINUTES=0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$ROOT/datasets}"
CONFIG="${CONFIG:-configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml}"
OUTPUT="${OUTPUT:-output/synthetic_tiny}"
TRAIN_MINUTES="${TRAIN_MINUTES:-12}"
BUDGET=()
if [ "$TRAIN_MINUTES" != "0" ]; then
  BUDGET=(--train-minutes "$TRAIN_MINUTES")
fi

T0=$(date +%s)
"$PY" datasets/prepare_synthetic.py --root "$DETECTRON2_DATASETS"
# trains, then evaluates on DATASETS.TEST (the synthetic val split) at the end
"$PY" train_net.py --config-file "$CONFIG" ${BUDGET[@]+"${BUDGET[@]}"} OUTPUT_DIR "$OUTPUT" "$@"
"$PY" demo.py --config-file "$CONFIG" --input "$DETECTRON2_DATASETS/deeperlab_synthetic/val" \
  --max-images 6 --ground-truth deeperlab_synthetic_val --keypoint-maps --output "$OUTPUT/pictures" \
  --opts MODEL.WEIGHTS "$OUTPUT/model_final.pth" "$@"
# where the PQ is lost: the model's outputs with the semantic / instance branch made ideal
"$PY" benchmarks/diagnose_pq.py --config-file "$CONFIG" --weights "$OUTPUT/model_final.pth" \
  --root "$DETECTRON2_DATASETS" "$@" | tee "$OUTPUT/diagnosis.md"
echo "[main] done in $(( $(date +%s) - T0 )) s: checkpoints, logs (metrics.json, TensorBoard),"
echo "[main] evaluation results (inference/), pictures (pictures/) and diagnosis.md in $OUTPUT"
