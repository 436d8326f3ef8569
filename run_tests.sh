#!/usr/bin/env bash
# The test suite: unit tests plus real 2-rank DeepSpeed runs on CPU (tiny model). Extra args go to pytest.
# Tests run in parallel workers (pytest-xdist): a 2-rank run leaves a core idle about half its time (imports,
# start-up, the launcher, polling for a checkpoint), and with one worker per core the 2-core CI machine still sat
# 23% idle, so there is one worker more than cores. SFTBENCH_TEST_WORKERS sets their number (default: the CPU count
# plus one, at most 4; 0 runs in this process, as does passing -n yourself).
set -euo pipefail
source "$(dirname "$0")/scripts/env.sh"
cd "$SFTBENCH_ROOT"
workers="${SFTBENCH_TEST_WORKERS:-$("$PY" -c 'import os; print(min(4, len(os.sched_getaffinity(0)) + 1))')}"
parallel=()
if [ "$workers" != "0" ] && [[ " $* " != *" -n "* ]] && [[ " $* " != *" -p no:xdist "* ]]; then
  parallel=(-n "$workers" --dist loadgroup)  # loadgroup: the recipe tests share one worker (tests/conftest.py)
fi
exec "$PY" -m pytest "${parallel[@]}" "$@"
