"""sftbench.args: the harness dataclass refuses bad values with the flag's name; --max-steps 0 means one epoch."""
from __future__ import annotations

import json

import pytest

from sftbench.args import ArgsError, HarnessArgs, parse_args, planned_levers, repo_relative
from sftbench.paths import REPO


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


def test_epochs_or_max_steps_and_the_save_eval_flags():
    assert HarnessArgs().max_steps == 20 and HarnessArgs(epochs=2).max_steps is None
    with pytest.raises(ArgsError, match="give --max-steps or --epochs, not both"):
        HarnessArgs(max_steps=5, epochs=1)
    with pytest.raises(ArgsError, match="--save-every needs --save DIR"):
        HarnessArgs(save_every=10)
    with pytest.raises(ArgsError, match="--eval-every needs --eval-data FILE or --eval-split"):
        HarnessArgs(eval_every=10)
    with pytest.raises(ArgsError, match="--eval-split must be a fraction in"):
        HarnessArgs(eval_split=1.5)
    with pytest.raises(ArgsError, match="--eval-data: file not found: nope.jsonl"):
        HarnessArgs(eval_data="nope.jsonl")


def test_batch_and_lr_flags_default_to_the_config_and_to_the_plain_loop_s_own():
    a = parse_args([])
    assert (a.grad_accum, a.micro_batch, a.lr, a.lr_warmup_steps) == (None, None, None, None)
    b = parse_args(["--ds", "none"])
    assert (b.grad_accum, b.micro_batch, b.lr, b.lr_warmup_steps) == (8, 1, 1e-5, 100)
    c = parse_args(["--lr", "1e-3", "--grad-accum", "1", "--micro-batch", "4", "--epochs", "1.5"])
    assert (c.lr, c.grad_accum, c.micro_batch, c.epochs) == (1e-3, 1, 4, 1.5)


def graphs_planned(flags, *, on_cuda, ds_cfg, world_size, memory_mib=None):
    """Whether the lever plan made before the run (``planned_levers``, on an sm_90 GPU) turns the graphs on;
    ``memory_mib``: (predicted with graphs, without, the GPU's MiB)."""
    from sftbench import memory

    oracle, total = None, None
    if memory_mib:
        with_graphs, eager, total = memory_mib
        oracle = lambda graphs, window: with_graphs if graphs else eager  # noqa: E731
    plan = planned_levers(memory.RunShape(ds_cfg, world_size, "bf16", cuda=on_cuda), memory.Limits(total), flags,
                          gpu="sm_90", gpu_mib=oracle)
    return bool(plan and plan.on("cuda_graphs"))


def test_graphs_planned_reads_the_flags_as_train_py_does():
    """What the sweep and the plan predict with: --cuda-graphs and --compile read by train.py's parser and decided
    by the lever plan (memory-aware auto included); what train.py would refuse is eager."""
    Z = {n: json.loads((REPO / "ds_configs" / f"{n}.json").read_text()) for n in ("z2_5e8", "z2_offload_5e8")}
    z2 = dict(on_cuda=True, ds_cfg=Z["z2_5e8"], world_size=1)
    assert graphs_planned([], **z2) is True
    assert graphs_planned(["--cuda-graphs", "off"], **z2) is False
    assert graphs_planned(["--cuda-graphs=off"], **z2) is False
    assert graphs_planned(["--compile", "model"], **z2) is False  # auto: refused with --compile
    assert graphs_planned(["--compile", "model", "--cuda-graphs", "on"], **z2) is False  # train.py refuses it
    assert graphs_planned(["--cuda-graphs", "on", "--compile"], **z2) is False  # a bare --compile is model
    assert graphs_planned(["--max-steps", "x"], **z2) is False  # train.py's parser refuses it: no run
    dc = {**Z["z2_5e8"], "compile": {"deepcompile": True}}  # compiled through engine.compile(): no graphs
    assert graphs_planned([], on_cuda=True, ds_cfg=dc, world_size=1) is False
    assert graphs_planned([], **{**z2, "on_cuda": False}) is False
    # optimizer offload: graphs only inside the coalesced window (where their evidence was measured)
    assert graphs_planned(["--coalesce-reduction", "off"], on_cuda=True, ds_cfg=Z["z2_offload_5e8"], world_size=1) \
        is False
    assert graphs_planned([], memory_mib=(69_102, 64_095, 66_757), **z2) is False


def test_planned_prediction_holds_the_coalesced_window_where_train_py_will_open_it():
    """The sweep's and the plan's prediction: one-GPU ZeRO-2 offload opens the window under auto (and then the
    graphs), so the prediction holds the full 16-bit gradients and the graphs' buffers; two GPUs, a flag turning it
    off, a wider grad_accum_dtype and a GPU too small for the window predict without it, as train.py would run."""
    from sftbench import memory
    from sftbench.args import planned_prediction
    from sftbench.presets import model_shape

    shape = memory.ModelShape.of(model_shape("pangu-2.6b"))
    off = json.loads((REPO / "ds_configs" / "z2_offload_5e8.json").read_text())
    acc32 = json.loads((REPO / "ds_configs" / "z2_offload_5e8_acc32.json").read_text())

    def planned(cfg, world=1, flags=(), gpu=143_771.0):
        run = memory.RunShape(cfg, world, "bf16")
        p = planned_prediction(shape, run, memory.Limits(gpu, None), list(flags), gpu="sm_90").run
        return p.coalesce_reduction, p.cuda_graphs

    assert planned(off) == (True, True)
    assert planned(off, world=2) == (False, False)
    assert planned(off, flags=["--coalesce-reduction", "off"]) == (False, False)
    assert planned(off, flags=["--coalesce-reduction=on", "--cuda-graphs", "off"]) == (True, False)
    assert planned(acc32) == (False, False)
    assert planned(off, gpu=12_000.0) == (False, False)  # 10.8 GB eager fits, 15.5 GB with the window does not
    # Just short of the window with the graphs (20.9 GB measured): the graphs' check, made first, counts the
    # window's gradients and drops the graphs; the window alone fits and stays, as train.py decides
    both = memory.predict(shape, memory.RunShape(off, 1, "bf16", cuda_graphs=True, coalesce_reduction=True)).gpu_mib
    assert planned(off, gpu=both - 100) == (True, False)
    def coalesce_planned(flags, cfg, world, cuda):
        plan = planned_levers(memory.RunShape(cfg, world, "bf16", cuda=cuda), memory.Limits(), flags, gpu="sm_90")
        return plan and plan.on("coalesce_reduction")
    assert coalesce_planned(["--coalesce-reduction", "sometimes"], off, 1, True) is None  # train.py refuses
    assert coalesce_planned([], off, 1, True) is True
    assert coalesce_planned(["--coalesce-reduction", "on"], off, 4, False) is True


def test_overwrite_needs_a_save_folder():
    with pytest.raises(ArgsError, match=r"--overwrite applies to --save DIR only"):
        HarnessArgs(overwrite=True)
    assert HarnessArgs(overwrite=True, save="out").overwrite is True


def test_a_config_file_holds_the_flags_and_the_command_line_overrides_it(tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text("ds: none\nlr-schedule: linear\nmax_steps: 40\nmask-prompt: false\nlr: 2.0e-5\n")
    args = parse_args(["--config", str(conf), "--max-steps", "7"])
    assert (args.ds, args.lr_schedule, args.max_steps, args.mask_prompt, args.lr) == ("none", "linear", 7, False, 2e-5)
    js = tmp_path / "run.json"
    js.write_text('{"ds": "none", "seq-len": 128}')
    assert parse_args(["--config", str(js)]).seq_len == 128


@pytest.mark.parametrize("text, message", [
    ("ds: none\nlearning_rate: 1e-5\n", "key 'learning_rate' is not a train.py flag"),
    ("mask-prompt: maybe\n", "key 'mask-prompt' must be true or false, got 'maybe'"),
    ("- ds\n", "the top level must be a mapping of flags, got list"),
    ("ds: [none\n", "not valid YAML"),
])
def test_a_bad_config_file_is_refused_naming_file_and_key(tmp_path, text, message):
    from sftbench.args import config_file_argv
    conf = tmp_path / "bad.yaml"
    conf.write_text(text)
    with pytest.raises(ArgsError, match=f"--config {conf}: .*" if message == "not valid YAML" else
                       f"--config {conf}: {message}".replace("[", r"\[").replace("(", r"\(")):
        config_file_argv(str(conf))
