"""sftbench/__init__.py: `import sftbench` registers the Pangu classes with the transformers Auto classes, and the
monitor's imports (sftbench.monitor, sftbench.runlog, sftbench.metrics) still never import torch."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def _py(code: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_monitor_imports_no_torch():
    got = _py("import sys, json, runpy\n"
              "import sftbench, sftbench.runlog, sftbench.metrics, sftbench.monitor.session, "
              "sftbench.monitor.snapshot\n"
              "import monitor\n"
              "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'deepspeed')}))")
    assert got == {"torch": False, "transformers": False, "deepspeed": False}


def test_import_sftbench_registers_config_model_and_tokenizer_either_order():
    probe = ("from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
             "from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING\n"
             "cfg = AutoConfig.for_model('gpt_pangu', vocab_size=64, hidden_size=8, num_layers=2, num_heads=2)\n"
             "m = AutoModelForCausalLM.from_config(cfg)\n"
             "print(json.dumps([type(cfg).__name__, type(m).__name__, TOKENIZER_MAPPING[type(cfg)].__name__]))\n")
    want = ["PanguConfig", "PanguForCausalLM", "PanguHFTokenizer"]
    assert _py("import json\nimport sftbench\n" + probe) == want  # before transformers: the import hook
    assert _py("import json\nimport transformers\nimport sftbench\n" + probe) == want  # after: at once
