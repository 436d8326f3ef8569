"""The synthetic benchmark set (sftbench/benchset.py): deterministic, valid for the reader, and the CLI writes the
same bytes as the function."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
from sftbench.benchset import write_bench_file
from sftbench.data import read_sft_jsonl


def test_bench_generator_deterministic_and_valid(tmp_path):
    a = write_bench_file(tmp_path / "a.jsonl", n=60, seed=0)
    b = write_bench_file(tmp_path / "b.jsonl", n=60, seed=0)
    c = write_bench_file(tmp_path / "c.jsonl", n=60, seed=1)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    ex, rep = read_sft_jsonl(a, strict=True)
    assert rep.n_ok == 60 and rep.n_lines == 60
    objs = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert all(set(o) == {"prompt", "answers", "prefix"} for o in objs)
    # best answer listed first, so "highest score" and the reference's answers[0] agree
    assert all(o["answers"][0]["score"] == max(x["score"] for x in o["answers"]) for o in objs)
    assert any(ord(ch) > 0x4E00 for p, _ in ex for ch in p) and any(p.isascii() for p, _ in ex)


def test_make_bench_cli_matches_function(tmp_path):
    out = tmp_path / "cli.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "data" / "make_bench.py"), "--out", str(out), "--n", "25",
                        "--seed", "7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == write_bench_file(tmp_path / "fn.jsonl", 25, 7).read_bytes()
