#!/usr/bin/env bash
# The test command: install (idempotent), then run the whole test suite on CPU.
# Extra arguments are passed to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
# Passive OpenMP waiting keeps torch CPU ops from spinning when the machine is shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PY="${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python"
# Test files are spread over DEEPERLAB_TEST_WORKERS pytest-xdist processes (default 2; 0 runs
# them in this process). --dist loadfile keeps each file in one worker, so a module fixture (e.g.
# the export of tests/test_export.py) is still computed once. Much of the suite is
# single-threaded Python (data loading, evaluation, post-processing), which 2 workers overlap.
WORKERS="${DEEPERLAB_TEST_WORKERS:-2}"
XDIST=()
if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
T0=$(date +%s)
status=0
"$PY" -m pytest -q -p no:cacheprovider --durations=20 "${XDIST[@]}" tests "$@" || status=$?
echo "[test] pytest: $(( $(date +%s) - T0 )) s"
exit "$status"
