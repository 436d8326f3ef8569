# Sourced by run_all.sh and run_tests.sh: pick a Python that has what sftbench needs, or make one.
# A machine that already has torch + deepspeed (a GPU box set up from the wheelhouse) uses its own python3;
# anywhere else a .venv is created once from requirements.txt (torch 2.13 CPU build).
SFTBENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_needs="import torch, deepspeed, transformers, sentencepiece, jieba, psutil"
if [ -n "${SFTBENCH_PYTHON:-}" ]; then
  PY="$SFTBENCH_PYTHON"
elif [ -x "$SFTBENCH_ROOT/.venv/bin/python" ]; then
  PY="$SFTBENCH_ROOT/.venv/bin/python"
elif python3 -c "$_needs" >/dev/null 2>&1; then
  PY="$(command -v python3)"
else
  echo "setting up $SFTBENCH_ROOT/.venv (first run only) ..." >&2
  python3 -m venv "$SFTBENCH_ROOT/.venv"
  "$SFTBENCH_ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  "$SFTBENCH_ROOT/.venv/bin/python" -m pip install -q -r "$SFTBENCH_ROOT/requirements.txt"
  PY="$SFTBENCH_ROOT/.venv/bin/python"
fi
export PATH="$(dirname "$PY"):$PATH"
# Compiled DeepSpeed ops (CPU Adam, fused Adam) are cached inside the checkout: compiled once, reused by every run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$SFTBENCH_ROOT/.cache/torch_extensions}"
