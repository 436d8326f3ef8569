#!/usr/bin/env bash
# The whole benchmark: every model x DeepSpeed config x precision on the visible GPUs (a small CPU sweep where
# there is none), then the report in results/<sweep>/. Resumable: run it again to continue or to add runs.
#
#   ./run_all.sh                          # the default plan (see: ./run_all.sh --dry-run)
#   ./run_all.sh --max-minutes 9          # batch a long sweep into bounded commands; re-run to resume
#   ./run_all.sh --models pangu-350m --configs 'z2*,none' --precisions bf16 --steps 20
#   SFTBENCH_GPUS=1 SFTBENCH_STEPS=5 ./run_all.sh
#   ./run_all.sh --epoch --models pangu-350m --configs z0   # one full epoch: checks the table's epoch estimate
#   ./run_all.sh --hostfile hostfile --gpus 8             # every run on the hostfile's nodes (README: Several nodes)
#
# Every option: python -m sftbench.sweep --help. The logic lives in sftbench/sweep.py and sftbench/report/.
set -euo pipefail
source "$(dirname "$0")/scripts/env.sh"
cd "$SFTBENCH_ROOT"
for arg in "$@"; do
  case "$arg" in
    -h|--help|--dry-run) exec "$PY" -m sftbench.sweep run "$@" ;;
  esac
done
"$PY" -m sftbench.sweep run "$@"
# The report reads only the logs: its own CLI, on the folders the sweep names (other nodes' copies: --node-dir).
IFS=$'\t' read -r -a dirs < <("$PY" -m sftbench.sweep dirs "$@")
nodes=()
for d in "${dirs[@]:2}"; do nodes+=(--node-dir "$d"); done
"$PY" -m sftbench.report "${dirs[0]}" --out "${dirs[1]}" ${nodes[@]+"${nodes[@]}"}
