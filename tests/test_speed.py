"""The compile lever: same numbers as eager (fp32, CPU inductor), same parameter names, and train.py records it."""
from __future__ import annotations

import copy

import pytest
import torch

from sftbench.args import ArgsError, HarnessArgs, parse_args
from sftbench.pangu import build_model
from sftbench.speed import SpeedError, blocks_of, check_compile, compile_blocks, resolve_compile


def test_bare_compile_flag_means_model_and_bad_values_are_refused():
    assert parse_args(["--compile"]).compile == "model"
    assert parse_args([]).compile == "auto"
    a = parse_args(["--compile", "blocks", "--compile-mode", "max-autotune-no-cudagraphs"])
    assert (a.compile, a.compile_mode) == ("blocks", "max-autotune-no-cudagraphs")
    for mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: measured to fail with gradient accumulation
        with pytest.raises(ArgsError, match="CUDA graphs"):
            HarnessArgs(compile="model", compile_mode=mode)
    with pytest.raises(ArgsError, match="--compile must be one of"):
        HarnessArgs(compile="everything")
    with pytest.raises(SpeedError, match="--compile-mode"):
        check_compile("blocks", "fastest")


def test_auto_compiles_nothing_and_a_named_target_is_used_as_asked():
    """auto = off on every machine (no configuration measured faster compiled with >= 20 measured steps); a named
    target is used as asked, on CPU too."""
    assert resolve_compile("auto", on_cpu=False) == ("off", "auto: not measured faster with >= 20 measured steps "
                                                            "(docs/performance.md)")
    assert resolve_compile("auto", on_cpu=True) == ("off", "auto: CPU run")
    assert resolve_compile("blocks", on_cpu=True) == ("blocks", "asked for")
    assert resolve_compile("model", on_cpu=False) == ("model", "asked for")
    assert resolve_compile("off", on_cpu=False) == ("off", "asked for")


def test_a_config_asking_for_deepcompile_gets_engine_compile_or_a_clear_refusal():
    """compile.deepcompile in the DeepSpeed JSON runs only through engine.compile(): auto becomes model (so the key
    is not silently ignored, as DeepSpeed would with one log line), model keeps it; off, blocks and a CPU run are
    refused naming the file and the key; a config without the key is decided as before."""
    dc = {"zero_optimization": {"stage": 3}, "compile": {"deepcompile": True}}
    assert resolve_compile("auto", False, dc, "ds_configs/x.json") == (
        "model", "auto: ds_configs/x.json sets compile.deepcompile (DeepCompile runs through engine.compile())")
    assert resolve_compile("model", False, dc, "x.json") == ("model", "asked for; DeepCompile: x.json sets "
                                                                      "compile.deepcompile")
    for target in ("off", "blocks"):
        with pytest.raises(SpeedError, match=f"--compile {target}, but x.json sets compile.deepcompile: DeepCompile "
                                             r"runs only through engine.compile\(\)"):
            resolve_compile(target, False, dc, "x.json")
    with pytest.raises(SpeedError, match="the DeepSpeed config sets compile.deepcompile, which DeepSpeed runs on "
                                         "CUDA GPUs only"):
        resolve_compile("auto", True, dc)
    for cfg in ({"compile": {"deepcompile": False}}, {"compile": True}, None):
        assert resolve_compile("auto", False, cfg)[0] == "off"


def test_blocks_are_the_transformer_layers_including_the_query_layer():
    m = build_model("pangu-tiny")
    assert blocks_of(m) == list(m.transformer.h)
    with pytest.raises(SpeedError, match="no transformer blocks"):
        blocks_of(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(monkeypatch):
    """Six AdamW steps, fp32, dropout on: the loss curve of the compiled model matches eager to 1e-4 (relative), and
    the state dict keys are unchanged (checkpoints and DeepSpeed's parameter names do not see the compile)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # same dropout masks as eager, for comparison
    torch.manual_seed(0)
    eager = build_model("pangu-tiny")
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    assert compile_blocks(compiled) == len(compiled.transformer.h)
    assert list(compiled.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 40000, (6, 1, 48), generator=g)
    curves = []
    for m in (eager, compiled):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        torch.manual_seed(5)
        losses = []
        for x in ids:
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it trains
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_checking_the_flags_does_not_import_torch():
    """train.py parses its flags before importing torch (the CUDA arch fix comes first); the check must stay light."""
    import subprocess
    import sys
    code = ("import sys; from sftbench.args import parse_args; parse_args(['--compile', 'blocks']); "
            "print('torch' in sys.modules)")
    from conftest import REPO
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
