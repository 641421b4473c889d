#!/usr/bin/env bash
# The main job: install, prepare the built-in synthetic dataset, train the tiny config on CPU,
# evaluate it on the synthetic val split (PQ, Parsing Covering, mIoU, AP), draw pictures and
# break the PQ down by branch (benchmarks/diagnose_pq.py).
# The whole job aims at MAIN_MINUTES (default 18) of wall time on this machine, as loaded as it
# is: what the install and the dataset took is subtracted, 90 s are kept for the evaluation,
# pictures and diagnosis, and the training gets the rest divided by 1.15 (a run's steps come out
# up to ~15 % slower than the steps timed before it); train_net.py --train-minutes measures the
# step time and sets SOLVER.MAX_ITER to the iterations that fit (the plan is in
# $OUTPUT/schedule.json). TRAIN_MINUTES=<m> fixes the training time instead; TRAIN_MINUTES=0
# keeps the config's MAX_ITER (1200).
# Extra arguments are passed to train_net.py as config overrides, e.g. SOLVER.MAX_ITER 200 (an
# explicit SOLVER.MAX_ITER turns the time budget off).
set -euo pipefail
T_START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$ROOT/datasets}"
CONFIG="${CONFIG:-configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml}"
OUTPUT="${OUTPUT:-output/synthetic_tiny}"
MAIN_MINUTES="${MAIN_MINUTES:-18}"

T0=$(date +%s)
"$PY" datasets/prepare_synthetic.py --root "$DETECTRON2_DATASETS"
for arg in "$@"; do  # an explicit SOLVER.MAX_ITER override wins over the time budget
  if [ "$arg" = "SOLVER.MAX_ITER" ]; then TRAIN_MINUTES=0; fi
done
if [ -z "${TRAIN_MINUTES:-}" ]; then
  TRAIN_MINUTES=$("$PY" -c "import sys; m, spent = float(sys.argv[1]), float(sys.argv[2]); \
print(f'{max(1.0, (m * 60 - spent - 90) / 1.15 / 60):.2f}')" "$MAIN_MINUTES" "$(( $(date +%s) - T_START ))")
  echo "[main] $(( $(date +%s) - T_START )) s spent of MAIN_MINUTES=$MAIN_MINUTES: training for $TRAIN_MINUTES min"
fi
BUDGET=()
if [ "$TRAIN_MINUTES" != "0" ]; then
  BUDGET=(--train-minutes "$TRAIN_MINUTES")
fi
# trains, then evaluates on DATASETS.TEST (the synthetic val split) at the end
"$PY" train_net.py --config-file "$CONFIG" ${BUDGET[@]+"${BUDGET[@]}"} OUTPUT_DIR "$OUTPUT" "$@"
"$PY" demo.py --config-file "$CONFIG" --input "$DETECTRON2_DATASETS/deeperlab_synthetic/val" \
  --max-images 6 --ground-truth deeperlab_synthetic_val --keypoint-maps --output "$OUTPUT/pictures" \
  --opts MODEL.WEIGHTS "$OUTPUT/model_final.pth" "$@"
# where the PQ is lost: the model's outputs with the semantic / instance branch made ideal
"$PY" benchmarks/diagnose_pq.py --config-file "$CONFIG" --weights "$OUTPUT/model_final.pth" \
  --root "$DETECTRON2_DATASETS" "$@" | tee "$OUTPUT/diagnosis.md"
echo "[main] done in $(( $(date +%s) - T_START )) s ($(( T0 - T_START )) s of them the install check):"
echo "[main] checkpoints, logs (metrics.json, TensorBoard),"
echo "[main] evaluation results (inference/), pictures (pictures/) and diagnosis.md in $OUTPUT"
