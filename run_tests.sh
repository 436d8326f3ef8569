#!/usr/bin/env bash
# The test suite: unit tests plus real 2-rank DeepSpeed runs on CPU (tiny model). Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/scripts/env.sh"
cd "$SFTBENCH_ROOT"
exec "$PY" -m pytest "$@"
