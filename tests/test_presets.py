"""sftbench.presets: the model's positions bound --seq-len (train.py and the plan refuse a longer one)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env, run
from sftbench.presets import SeqLenError, check_seq_len


def test_seq_len_within_the_positions_passes_and_beyond_is_refused_naming_both(tmp_path):
    assert check_seq_len("pangu-2.6b", 1024) == 1024
    with pytest.raises(SeqLenError, match="--seq-len 4096 is longer than pangu-2.6b's 1024 positions"):
        check_seq_len("pangu-2.6b", 4096)
    folder = tmp_path / "gpt2-like"  # a config that spells the table n_positions
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
                                                    "n_positions": 256}))
    with pytest.raises(SeqLenError, match="--seq-len 512 is longer than .*'s 256 positions"):
        check_seq_len(str(folder), 512)


def test_train_and_plan_refuse_a_seq_len_beyond_the_positions_before_any_work(tmp_path):
    p = run([sys.executable, str(REPO / "train.py"), "--ds", "none", "--model", "pangu-tiny", "--seq-len", "4096",
             "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")], cpu_env())
    assert p.returncode != 0
    assert "error: --seq-len 4096 is longer than pangu-tiny's 1024 positions" in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # before the data is tokenised
    q = subprocess.run([sys.executable, "-m", "sftbench.plan", "--model", "pangu-2.6b", "--gpus", "1", "--gpu-mem",
                        "80", "--host-mem", "64", "--seq-len", "4096"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert q.returncode != 0
    assert "plan: --seq-len 4096 is longer than pangu-2.6b's 1024 positions" in q.stderr
