"""sftbench.args: the harness dataclass refuses bad values with the flag's name; --max-steps 0 means one epoch."""
from __future__ import annotations

import pytest

from sftbench.args import REPO, ArgsError, HarnessArgs, parse_args, repo_relative


def test_max_steps_zero_is_one_epoch_and_negatives_are_refused():
    assert parse_args(["--max-steps", "0"]).max_steps == 0
    with pytest.raises(ArgsError, match=r"--max-steps must be >= 1, or 0 for one epoch, got -1"):
        HarnessArgs(max_steps=-1)


@pytest.mark.parametrize("name", ["grad_accum", "micro_batch", "seq_len", "log_every"])
def test_counts_below_one_are_refused_by_flag_name(name):
    with pytest.raises(ArgsError, match=f"--{name.replace('_', '-')} must be >= 1, got 0"):
        HarnessArgs(**{name: 0})


def test_bad_precision_and_warmup_are_refused():
    with pytest.raises(ArgsError, match="--precision must be fp32, fp16 or bf16"):
        HarnessArgs(precision="int8")
    with pytest.raises(ArgsError, match="--warmup-steps must be >= 0"):
        HarnessArgs(warmup_steps=-1)


def test_the_parser_exits_with_the_message(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "-3"])
    assert "--max-steps must be >= 1, or 0 for one epoch, got -3" in capsys.readouterr().err


def test_repo_relative_names_no_machine_folder(tmp_path, monkeypatch):
    """Paths inside the repo are written relative to it, however they were given; others stay as given."""
    assert repo_relative(REPO / "data" / "bench_10k.jsonl") == "data/bench_10k.jsonl"
    monkeypatch.chdir(REPO)
    assert repo_relative("runs/x/../y") == "runs/y"
    assert repo_relative(tmp_path / "z.jsonl") == str(tmp_path / "z.jsonl")


def test_warmup_default_leaves_a_measured_step_and_an_asked_one_is_kept():
    from sftbench.args import resolve_warmup
    assert parse_args([]).warmup_steps is None and parse_args(["--warmup-steps", "5"]).warmup_steps == 5
    assert resolve_warmup(None, 20) == (3, None)
    n, note = resolve_warmup(None, 3)
    assert n == 2 and "2 step(s) instead of the default 3, so that 1 of the 3 step(s) are measured" in note
    assert resolve_warmup(None, 1)[0] == 0
    n, note = resolve_warmup(4, 3)  # asked for: honoured, and said
    assert n == 4 and "--warmup-steps 4 covers all 3 step(s): none will be measured (as asked" in note
    assert resolve_warmup(1, 3) == (1, None)
