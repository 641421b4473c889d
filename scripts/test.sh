#!/usr/bin/env bash
# The test command: install (idempotent), then run the whole test suite on CPU.
# Extra arguments are passed to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
"${DEEPERLAB_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
