"""The README's Python snippets run as written: each ```python block, in a fresh interpreter, in a folder holding
`out/my-model` (the tiny model saved as train.py saves it). A block that needs what a test cannot have (a GPU, a
trained model, the network) is preceded by the line `<!-- not run by tests: why -->` and skipped here; today there is
none. The shell blocks' commands are covered by the tests of each tool."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SKIP_MARK = "<!-- not run by tests:"


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """(code, runs) for every ```python block of a Markdown text; runs is False after a SKIP_MARK line."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((m.group(1), not before.startswith(SKIP_MARK)))
    return out


@pytest.mark.slow
def test_the_readmes_python_snippets_run_on_the_tiny_model(tmp_path):
    import torch

    from sftbench import checkpoint
    from sftbench.pangu import build_model
    from sftbench.tokenizer import PanguTokenizer

    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    runnable = [code for code, runs in blocks if runs]
    assert runnable, "the README has no runnable Python block"
    torch.manual_seed(0)
    model = build_model("pangu-tiny")
    folder = tmp_path / "out" / "my-model"
    folder.mkdir(parents=True)
    checkpoint.write_model_folder(folder, checkpoint.full_state_dict(model, None, 0), model.config,
                                  PanguTokenizer.for_model("pangu-tiny", None))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for i, code in enumerate(runnable):
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, f"README python block {i + 1}:\n{code}\n{p.stderr[-3000:]}"


@pytest.mark.parametrize("text, want", [
    ("```python\nprint(1)\n```\n", [("print(1)\n", True)]),
    ("<!-- not run by tests: needs a GPU -->\n```python\nimport x\n```\n", [("import x\n", False)]),
])
def test_blocks_are_found_and_marked_ones_skipped(text, want):
    assert python_blocks(text) == want
