#!/usr/bin/env bash
# The test command: install (idempotent), then run the whole test suite on CPU.
# Extra arguments are passed to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
# Passive OpenMP waiting keeps torch CPU ops from spinning when the machine is shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
