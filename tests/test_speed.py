"""Speed levers: the compile lever (same numbers as eager, fp32, CPU inductor, same parameter names, recorded by
train.py) and the one-kernel gradient norm (equal to DeepSpeed's on real engines)."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch

from sftbench.args import ArgsError, HarnessArgs, parse_args
from sftbench.pangu import build_model
from conftest import REPO, cpu_env
import lever_calls
from sftbench import levers
from sftbench.levers import LeverError, check_compile
from sftbench.models.resolve import resolve
from sftbench.models.spec import ModelError
from sftbench.speed import compile_blocks

resolve_compile = lever_calls.compile_target  # --compile as the lever plan decides it


def measured(lever: str, kind: str) -> str:
    """The evidence a lever's auto cites on one sm_90 GPU for this configuration kind."""
    return levers.evidence_text(levers.evidence_for(lever, kind, "sm_90", 1))


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
    with pytest.raises(LeverError, match="--compile-mode"):
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
        with pytest.raises(LeverError, match=f"--compile {target}, but x.json sets compile.deepcompile: DeepCompile "
                                             r"runs only through engine.compile\(\)"):
            resolve_compile(target, False, dc, "x.json")
    with pytest.raises(LeverError, match="the DeepSpeed config sets compile.deepcompile, which DeepSpeed runs on "
                                         "CUDA GPUs only"):
        resolve_compile("auto", True, dc)
    for cfg in ({"compile": {"deepcompile": False}}, {"compile": True}, None):
        assert resolve_compile("auto", False, cfg)[0] == "off"


def test_blocks_are_the_transformer_layers_including_the_query_layer():
    m = build_model("pangu-tiny")
    assert resolve("pangu-tiny").blocks(m) == list(m.transformer.h)
    with pytest.raises(ModelError, match="no list of decoder layers found"):
        resolve("llama-tiny").blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    """Six AdamW steps, fp32, dropout on: the loss curve of the compiled model matches eager to 1e-4 (relative), and
    the state dict keys are unchanged (checkpoints and DeepSpeed's parameter names do not see the compile)."""
    import torch._inductor.config as inductor_config
    # Same dropout masks as eager, for comparison. Through the config's own patch(): a monkeypatched attribute is
    # deleted at teardown, which hides the option from every later compile in this process.
    with inductor_config.patch(fallback_random=True):
        _compiled_blocks_train_like_eager()


def _compiled_blocks_train_like_eager():
    torch.manual_seed(0)
    eager = build_model("pangu-tiny")
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    assert compile_blocks(list(compiled.transformer.h)) == len(compiled.transformer.h)
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


def test_one_pass_lever_flag_values_and_the_plain_loop():
    """--grad-norm and --overflow-check take auto, foreach or deepspeed; the plain loop keeps its own code under auto
    and refuses foreach."""
    resolve_grad_norm = lever_calls.grad_norm

    assert parse_args([]).grad_norm == "auto"
    with pytest.raises(ArgsError, match="--grad-norm must be one of auto, foreach, deepspeed, got 'fp32'"):
        HarnessArgs(grad_norm="fp32")
    with pytest.raises(LeverError, match="--grad-norm must be one of"):
        levers.check_choice("grad_norm", "on")

    class Plain:  # the --ds none engine: no DeepSpeed methods
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    assert resolve_grad_norm("auto", Plain(), on_cuda=True) == (
        False, "auto: the plain loop (--ds none), whose clip_grad_norm_ is torch's multi-tensor norm already")
    assert resolve_grad_norm("deepspeed", Plain(), on_cuda=True) == (False, "asked for")
    with pytest.raises(LeverError, match="--grad-norm foreach does not apply: the plain loop"):
        resolve_grad_norm("foreach", Plain(), on_cuda=True)
    resolve_overflow_check = lever_calls.overflow_check
    assert parse_args([]).overflow_check == "auto"
    with pytest.raises(ArgsError, match="--overflow-check must be one of auto, foreach, deepspeed, got 'off'"):
        HarnessArgs(overflow_check="off")
    assert resolve_overflow_check("auto", Plain(), on_cuda=True) == (
        False, "auto: the plain loop (--ds none) has no per-gradient check (fp16: torch's GradScaler checks in one "
               "pass)")
    with pytest.raises(LeverError, match="--overflow-check foreach does not apply: the plain loop"):
        resolve_overflow_check("foreach", Plain(), on_cuda=True)


_NORMS = r'''
import json
from pathlib import Path
import deepspeed, torch
from deepspeed.runtime.utils import inf
import lever_calls
from sftbench import ds_patches, levers
from sftbench.pangu import PanguForCausalLM, preset_config
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
out = {}
for name, cfg in json.loads(Path(__file__).with_suffix(".json").read_text()).items():  # argv has --local_rank
    torch.manual_seed(0)
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=64, num_layers=2, num_heads=2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    res = {"unfit": ds_patches.norm_unfit(engine), "auto_gpu": lever_calls.grad_norm("auto", engine, True),
           "auto_cpu": lever_calls.grad_norm("auto", engine, False)}
    try:
        lever_calls.grad_norm("foreach", engine, True)
    except levers.LeverError as e:
        res["foreach_refused"] = str(e)
    if res["unfit"] is None:
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch: the partitions' norms differ
        ids = torch.randint(10, 40000, (1, 32), generator=g)
        out_ = engine(input_ids=ids, labels=ids)
        engine.backward(out_.loss)  # grad accumulation 1: the boundary, the gradients reduced into the partitions
        opt = engine.optimizer
        grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
        ds_norm = opt.scaled_global_norm().item()
        ds_inf = opt.get_grad_norm_direct(grads, params, inf).item()
        ds_patches.foreach_grad_norm(opt)
        res["norms"] = [ds_norm, opt.scaled_global_norm().item()]
        res["inf_norms"] = [ds_inf, opt.get_grad_norm_direct(grads, params, inf).item()]
        engine.step()
        res["logged"] = float(engine.get_global_grad_norm())
        saved = grads[0].clone()
        grads[0].view(-1)[0] = float("nan")  # a non-finite gradient: DeepSpeed's -1 sentinel, on every rank
        res["nan_norm"] = opt.get_grad_norm_direct(grads, params).item()
        grads[0].copy_(saved)
    out[name] = res
# A file per rank: the launcher merges the ranks' stdout, where two lines can interleave.
Path(__file__).with_name(f"norms{rank}.json").write_text(json.dumps(out))
'''


@pytest.mark.slow
def test_foreach_grad_norm_equals_deepspeeds_on_two_ranks(tmp_path):
    """Two CPU ranks over gloo, real ZeRO-1 and ZeRO-2 bf16 engines, each rank on its own batch: the one-kernel norm
    equals DeepSpeed's (both sum in fp64; rtol 1e-9) on both ranks, after the same all-reduce; the infinity
    norm is DeepSpeed's own; the step logs the norm; a NaN gradient gives DeepSpeed's -1. ZeRO-0 keeps DeepSpeed's
    code under auto and refuses foreach; auto on a CPU run keeps it too."""
    from conftest import BIN, run
    from sftbench.buildenv import free_port

    def cfg(stage):
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    script = tmp_path / "norms.py"
    script.write_text(_NORMS)
    script.with_suffix(".json").write_text(json.dumps({"z0": cfg(0), "z1": cfg(1), "z2": cfg(2)}))
    p = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(script)],
            env={**cpu_env(), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"norms{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        # torch's Adam (no op build on CPU) gives ZeRO-0 DeepSpeed's unfused FP16 optimizer; FusedAdam the fused one
        assert re.match(r"the engine's optimizer is FP16_UnfusedOptimizer, not DeepSpeed's ZeRO-1/2 one",
                        got["z0"]["unfit"]), got["z0"]
        assert got["z0"]["auto_gpu"] == [False, "auto: " + got["z0"]["unfit"]]
        assert got["z0"]["foreach_refused"].startswith("--grad-norm foreach does not apply: the engine's optimizer")
        for z in ("z1", "z2"):
            r = got[z]
            assert r["unfit"] is None and "foreach_refused" not in r
            # ZeRO-2 on one GPU runs inside the coalesced window under auto: that kind's row
            kind = "ZeRO-1" if z == "z1" else "ZeRO-2 + coalesced reduction"
            assert r["auto_gpu"] == [True, "auto: " + measured("grad_norm", kind)]
            assert r["auto_cpu"] == [False, "auto: CPU run (measured on the GPU only)"]
            ds_norm, ours = r["norms"]
            assert ds_norm > 0 and ours == pytest.approx(ds_norm, rel=1e-9), (z, r)
            assert r["inf_norms"][0] == r["inf_norms"][1] > 0
            assert r["logged"] == pytest.approx(ds_norm, rel=1e-6)
            assert r["nan_norm"] == -1.0
    # One global norm: the all-reduce made both ranks agree although their batches differ.
    for z in ("z1", "z2"):
        assert ranks[0][z]["norms"][1] == pytest.approx(ranks[1][z]["norms"][1], rel=1e-6)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_foreach_norm_sums_in_fp64_like_deepspeed(device, monkeypatch):
    """On a GPU (and on the CPU) sftbench's one-kernel norm (ds_patches.foreach_grad_norm, fp64 sums) gives DeepSpeed's
    fp64 norm over bf16 gradients of several sizes (rtol 1e-6: the float32 result), where fp32 sums would drift on
    26M values; it
    reduces over the data-parallel group and the model-parallel ranks, and leaves other norms to DeepSpeed's code.
    One process: the stand-in optimizer has the attributes of DeepSpeed's ZeRO-1/2 optimizer that the norm reads,
    and the data-parallel all-reduce is recorded (a sum over one rank is the value itself)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from deepspeed import comm as dist

    from sftbench import ds_patches

    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: reduced.append((op, group)))

    class ZeroOptimizer:  # what foreach_grad_norm reads of DeepSpeed's DeepSpeedZeroOptimizer
        model_parallel_rank = 0
        dp_process_group = "the dp group"

        def __init__(self):
            self.mp_reduced = []

        def get_grad_norm_direct(self, gradients, params, norm_type=2):
            return f"deepspeed's norm {norm_type}"

        def _model_parallel_all_reduce(self, tensor, op):
            self.mp_reduced.append(op)

    torch.manual_seed(0)
    grads = [(torch.randn(n, device=device) * s).bfloat16() for n, s in ((2560 * 10240, 1e-3), (2560, 1.0), (7, 5.0))]
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    opt = ZeroOptimizer()
    opt.device = torch.device(device)
    ds_patches.foreach_grad_norm(opt)
    got = opt.get_grad_norm_direct(grads, params)
    want = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).pow(2).sum().sqrt()  # DeepSpeed's
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert reduced == [(dist.ReduceOp.SUM, "the dp group")] and opt.mp_reduced == [dist.ReduceOp.SUM]
    assert opt.get_grad_norm_direct(grads, params, float("inf")) == "deepspeed's norm inf"


def _train(tmp_path, name: str, *extra: str):
    from conftest import run
    cmd = [sys.executable, str(REPO / "train.py"), "--run-dir", str(tmp_path / name), "--cache-dir",
           str(tmp_path / "cache"), "--data", str(REPO / "data" / "sample_sft.jsonl"), "--model", "pangu-tiny",
           "--seq-len", "64", "--seed", "7", *extra]
    return run(cmd, env=cpu_env(), timeout=600)


@pytest.mark.slow
def test_train_py_one_pass_levers_train_like_deepspeeds_code_and_are_refused_where_they_do_not_apply(tmp_path):
    """train.py, CPU. ZeRO-1 fp32 with clipping at a learning rate that clips: --grad-norm foreach gives DeepSpeed's
    loss curve (rtol 1e-5; only the order of the norm's sums differs). ZeRO-0 bf16: --overflow-check foreach gives
    exactly the curve of DeepSpeed's check (the same bool decides nothing else), and so does ZeRO-2 + optimizer
    offload's check with one sync (bf16, check_grad_overflow off: no check at all). The log and console say which ran;
    each lever where it does not apply ends in a clear error in the log, not in other code."""
    from conftest import read_jsonl, write_overfit_config

    cfg = json.loads(write_overfit_config("z1.json", tmp_path / "z1.json", lr=3e-2).read_text())
    cfg["gradient_clipping"] = 0.1  # so that every step clips: the norm decides the update
    (tmp_path / "z1.json").write_text(json.dumps(cfg))
    write_overfit_config("z0.json", tmp_path / "z0.json", lr=3e-2)
    write_overfit_config("z2_offload_5e8.json", tmp_path / "z2_offload_5e8.json", lr=3e-2)
    runs = {"norm_ds": ["z1", "--grad-norm", "deepspeed"], "norm_foreach": ["z1", "--grad-norm", "foreach"],
            "check_auto": ["z0"], "check_foreach": ["z0", "--overflow-check", "foreach"],
            "offload_ds": ["z2_offload_5e8", "--overflow-check", "deepspeed"],
            "offload_foreach": ["z2_offload_5e8", "--overflow-check", "foreach"]}
    curves, metas, stdout = {}, {}, {}
    for name, (cfg_name, *flags) in runs.items():
        precision = "fp32" if cfg_name == "z1" else "bf16"
        p = _train(tmp_path, name, "--ds", str(tmp_path / f"{cfg_name}.json"), "--precision", precision,
                   "--max-steps", "4", "--warmup-steps", "1", *flags)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        recs = read_jsonl(tmp_path / name / "rank0.jsonl")
        metas[name], stdout[name] = recs[0]["optimizations"], p.stdout
        curves[name] = [r["loss"] for r in recs if r["type"] == "step"]
        assert recs[-1]["status"] == "ok"
    assert (metas["norm_foreach"]["grad_norm"], metas["norm_foreach"]["grad_norm_why"]) == ("foreach", "asked for")
    assert (metas["norm_ds"]["grad_norm"], metas["norm_ds"]["grad_norm_why"]) == ("deepspeed", "asked for")
    assert re.search(r"gradient norm +one multi-tensor kernel +asked for", stdout["norm_foreach"])
    assert curves["norm_ds"][-1] < curves["norm_ds"][0] - 0.1, curves["norm_ds"]
    assert curves["norm_foreach"] == pytest.approx(curves["norm_ds"], rel=1e-5)
    assert metas["check_auto"]["overflow_check"] == "deepspeed"
    assert metas["check_auto"]["overflow_check_why"] == "auto: CPU run (measured on the GPU only)"
    assert metas["check_auto"]["grad_norm_why"].startswith("auto: the engine's optimizer is FP16_Optimizer,")
    assert (metas["check_foreach"]["overflow_check"], metas["check_foreach"]["overflow_check_why"]) == (
        "foreach", "asked for")
    assert re.search(r"inf/NaN check +one sync +asked for", stdout["check_foreach"])
    assert curves["check_auto"][-1] < curves["check_auto"][0] - 0.1, curves["check_auto"]
    assert curves["check_foreach"] == curves["check_auto"]
    assert metas["offload_foreach"]["overflow_check"] == "foreach"
    assert metas["offload_ds"]["overflow_check"] == "deepspeed"
    assert curves["offload_ds"][-1] < curves["offload_ds"][0] - 0.1, curves["offload_ds"]
    assert curves["offload_foreach"] == curves["offload_ds"]

    for name, cfg_name, flag in (("bad_norm", "z0", "--grad-norm"), ("bad_check", "z1", "--overflow-check")):
        p = _train(tmp_path, name, "--ds", str(tmp_path / f"{cfg_name}.json"), "--precision", "bf16",
                   "--max-steps", "1", flag, "foreach")
        assert p.returncode != 0
        assert f"{flag} foreach does not apply: the engine's optimizer is" in p.stderr, p.stderr[-2000:]
        summary = read_jsonl(tmp_path / name / "rank0.jsonl")[-1]
        assert summary["type"] == "summary" and summary["status"] == "error"
        assert summary["error"].startswith(f"{flag} foreach does not apply"), summary


_OVERFLOW = r'''
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
import lever_calls
from sftbench import ds_patches, levers
from sftbench.pangu import PanguForCausalLM, preset_config
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for name, cfg in json.loads(sys.argv[2]).items():
    torch.manual_seed(0)
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=64, num_layers=2, num_heads=2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    res = {"optimizer": type(engine.optimizer).__name__, "unfit": ds_patches.overflow_unfit(engine),
           "auto": lever_calls.overflow_check("auto", engine, on_cuda=False),
           "auto_gpu": lever_calls.overflow_check("auto", engine, on_cuda=True)}
    try:
        lever_calls.overflow_check("foreach", engine, on_cuda=False)
    except levers.LeverError as e:
        res["foreach_refused"] = str(e)
    if res["unfit"] is None:
        ids = torch.randint(10, 40000, (1, 32), generator=torch.Generator().manual_seed(1))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        checker = engine.optimizer.overflow_checker
        deepspeeds = checker.has_overflow_serial
        ds_patches.foreach_overflow_check(engine.optimizer)
        params = [p for p in checker.params if p.grad is not None]
        g = params[len(params) // 2].grad
        verdicts = []
        for bad in (None, float("inf"), float("-inf"), float("nan")):
            saved = g.view(-1)[3].clone()
            if bad is not None:
                g.view(-1)[3] = bad
            verdicts.append([bool(deepspeeds(params)), checker.has_overflow_serial(params),
                             checker.has_overflow(params)])
            g.view(-1)[3] = saved
        res["verdicts"] = verdicts
        res["no_grads"] = checker.has_overflow_serial([torch.nn.Parameter(torch.ones(2))])
        engine.step()  # the step runs with the replaced check
        res["skipped"] = engine.skipped_steps
    out[name] = res
print("OVERFLOW " + json.dumps(out))
'''


@pytest.mark.slow
def test_one_pass_overflow_check_gives_deepspeeds_answer(tmp_path):
    """A real ZeRO-0 bf16 engine (CPU, one rank): the one-pass check answers as DeepSpeed's loop for finite
    gradients and for one +inf, -inf or NaN element, also through has_overflow; a step runs with it. auto runs it
    on a GPU (where it was measured) and keeps DeepSpeed's check on CPU; ZeRO-1 and fp32 ZeRO-0 are refused with
    the reason."""
    from sftbench.buildenv import free_port

    def cfg(stage, bf16=True):
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": bf16},
                "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    configs = {"z0": cfg(0), "z1": cfg(1), "z0_fp32": cfg(0, bf16=False)}
    p = subprocess.run([sys.executable, "-c", _OVERFLOW, str(free_port()), json.dumps(configs)], cwd=REPO,
                       env=_with_helpers(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    got = json.loads(p.stdout.split("OVERFLOW ", 1)[1])
    z0 = got["z0"]
    assert z0["unfit"] is None and "foreach_refused" not in z0
    assert z0["auto"] == [False, "auto: CPU run (measured on the GPU only)"]
    assert z0["auto_gpu"] == [True, "auto: " + measured("overflow_check", "ZeRO-0")]
    assert z0["verdicts"] == [[False, False, False], [True, True, True], [True, True, True], [True, True, True]]
    assert z0["no_grads"] is False and z0["skipped"] == 0
    for name in ("z1", "z0_fp32"):
        r = got[name]
        assert r["unfit"].startswith(f"the engine's optimizer is {r['optimizer']}, not one of ZeRO-0's FP16"), r
        assert r["auto"] == r["auto_gpu"] == [False, "auto: " + r["unfit"]]
        assert r["foreach_refused"] == f"--overflow-check foreach does not apply: {r['unfit']}; use auto or deepspeed"


_OFFLOAD_OVERFLOW = r"""
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
import deepspeed.runtime.utils as ds_utils
import lever_calls
from sftbench import ds_patches
from sftbench.pangu import PanguForCausalLM, preset_config
deepspeed.init_distributed(dist_backend="gloo")
checks = [0]
deepspeeds_check = ds_utils.has_inf_or_nan
def counted(x):
    checks[0] += 1
    return deepspeeds_check(x)
import deepspeed.runtime.zero.stage_1_and_2 as ds_zero
ds_utils.has_inf_or_nan = ds_zero.has_inf_or_nan = counted  # DeepSpeed's check and the lever's are counted alike
out = {}
for name, spec in json.loads(sys.argv[2]).items():
    torch.manual_seed(0)
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=64, num_layers=2, num_heads=2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=spec["cfg"])
    res = {"unfit": ds_patches.overflow_unfit(engine),
           "auto_gpu": lever_calls.overflow_check("auto", engine, on_cuda=True)}
    if spec["lever"]:
        ds_patches.foreach_overflow_check(engine.optimizer)
    if spec["bad"]:
        target = dict(model.named_parameters())["transformer.h.0.attn.k_proj.weight"]
        target.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("inf")))
    checks[0] = 0
    ids = torch.randint(10, 40000, (1, 32), generator=torch.Generator().manual_seed(1))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    res["checks"] = checks[0]
    res["deepspeeds_flag"] = bool(engine.optimizer.local_overflow)  # set at once by DeepSpeed's tracker only
    engine.step()
    res["skipped"] = engine.skipped_steps
    res["param_sum"] = sum(float(p.detach().float().sum()) for p in model.parameters())
    out[name] = res
print("OFFLOAD " + json.dumps(out))
"""


@pytest.mark.slow
def test_offload_overflow_check_gives_deepspeeds_steps_with_one_sync(tmp_path):
    """A real ZeRO-2 + CPU optimizer offload engine (bf16, CPU, one rank): with check_grad_overflow on, the one-sync
    check checks every gradient on the device, leaves local_overflow alone until has_overflow reads it, and skips the
    step with an inf gradient and takes it without one exactly as DeepSpeed's per-gradient check does (the same
    weights after the step); with it off (the shipped configs) it runs no check at all and the step is DeepSpeed's.
    auto runs it on a GPU, where it was measured faster."""
    from sftbench.buildenv import free_port

    def cfg(check):
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "bf16": {"enabled": True, "check_grad_overflow": check}, "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    specs = {f"{check}_{lever}_{bad}": {"cfg": cfg(check), "lever": lever, "bad": bad}
             for check in (True, False) for lever in (False, True) for bad in (False, True) if not (bad and not check)}
    p = subprocess.run([sys.executable, "-c", _OFFLOAD_OVERFLOW, str(free_port()), json.dumps(specs)], cwd=REPO,
                       env=_with_helpers(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    got = json.loads(p.stdout.split("OFFLOAD ", 1)[1])
    assert all(r["unfit"] is None for r in got.values()), got
    # on one GPU auto opens the coalesced window for ZeRO-2 offload too: the row measured inside it
    kind = "ZeRO-2 + optimizer offload + coalesced reduction"
    assert all(r["auto_gpu"] == [True, "auto: " + measured("overflow_check", kind)] for r in got.values()), got
    # DeepSpeed's check runs once per gradient (each a host sync); the lever's too, but it syncs once, later.
    assert got["True_True_False"]["checks"] == got["True_False_False"]["checks"] > 10
    assert got["True_False_True"]["deepspeeds_flag"] is True and got["True_True_True"]["deepspeeds_flag"] is False
    for bad in (False, True):
        ds, ours = got[f"True_False_{bad}"], got[f"True_True_{bad}"]
        assert (ds["skipped"], ours["skipped"]) == ((1, 1) if bad else (0, 0)), (ds, ours)
        assert ours["param_sum"] == ds["param_sum"]
    assert got["False_True_False"]["checks"] == 0 and got["False_False_False"]["checks"] > 10
    assert got["False_True_False"]["param_sum"] == got["False_False_False"]["param_sum"]
    assert got["False_True_False"]["skipped"] == 0


def _with_helpers() -> dict:
    """The CPU environment with tests/ on the path (lever_calls) for the scripts run in a subprocess."""
    return {**cpu_env(), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}


class _Zero:
    """A stand-in for a DeepSpeed engine, with what ``resolve_coalesce`` reads (real engines: the tests below)."""

    def __init__(self, stage: int, offload: bool = False, optimizer=None, managed: bool = True,
                 accum=torch.bfloat16):
        self.get_data_types = lambda: (torch.bfloat16, accum)
        self.zero_optimization = lambda: stage > 0
        self.zero_optimization_stage = lambda: stage
        self.zero_cpu_offload = lambda: offload
        self.managed_gradient_accumulation = lambda: managed
        self.coalesce_grad_reduction = object()
        self.optimizer = optimizer if optimizer is not None else type("DeepSpeedZeroOptimizer", (), {
            "_coalesce_grad_reduction": False})()


def test_coalesce_auto_is_on_only_on_one_gpu_where_measured_and_predicted_to_fit():
    resolve_coalesce, coalesce_expected = lever_calls.coalesce, lever_calls.coalesce_expected

    assert parse_args([]).coalesce_reduction == "auto"
    with pytest.raises(ArgsError, match="--coalesce-reduction must be one of auto, on, off, got 'yes'"):
        HarnessArgs(coalesce_reduction="yes")
    with pytest.raises(LeverError, match="--coalesce-reduction must be one of"):
        levers.check_choice("coalesce_reduction", "1")
    z2, off2, z3, z1 = _Zero(2), _Zero(2, offload=True), _Zero(3), _Zero(1)
    assert resolve_coalesce("auto", z2, True, 1) == (True, "auto: " + measured("coalesce_reduction", "ZeRO-2"))
    assert resolve_coalesce("auto", off2, True, 1) == (True, "auto: " + measured("coalesce_reduction", "ZeRO-2 + "
                                                                                 "optimizer offload"))
    assert resolve_coalesce("auto", z3, True, 1) == (
        False, "auto: not measured here (ZeRO-3 on sm_90, world 1; --coalesce-reduction on applies it)")
    assert resolve_coalesce("auto", z1, True, 1)[0] is False
    assert resolve_coalesce("auto", z2, False, 1) == (False, "auto: CPU run (measured on the GPU only)")
    assert resolve_coalesce("auto", z2, True, 2)[1].startswith("auto: not measured here (ZeRO-2 on sm_90, world 2;")
    assert resolve_coalesce("auto", z2, True, 1, fits=False) == (
        False, "auto: ZeRO-2 was measured faster with it, but the full 16-bit gradients it holds are predicted not "
               "to fit this GPU (2 of 2 MiB)")
    assert resolve_coalesce("auto", z2, True, 1, fits=None)[0] is True  # no prediction: the measurement decides
    for engine in (z1, z2, off2, z3):  # on applies it wherever DeepSpeed has it, several ranks and CPU included
        assert resolve_coalesce("on", engine, False, 4) == (True, "on: asked for")
        assert resolve_coalesce("off", engine, True, 1) == (False, "off: asked for")

    class Plain:  # the --ds none engine
        pass
    refusals = {"the plain loop (--ds none) reduces once per step already": Plain(),
                "ZeRO-0 reduces once per step already": _Zero(0),
                "the engine's optimizer is BF16_Optimizer, which DeepSpeed does not coalesce":
                    _Zero(1, optimizer=type("BF16_Optimizer", (), {})()),
                "managed_gradient_accumulation is false": _Zero(2, managed=False),
                "data_types.grad_accum_dtype is float32 while the weights are bfloat16: ZeRO-3 adds each micro-batch "
                "into a buffer of that dtype, and inside the window the micro-batches would be summed in the "
                "weights' dtype first": _Zero(3, accum=torch.float32)}
    for why, engine in refusals.items():
        assert resolve_coalesce("auto", engine, True, 1) == (False, f"auto: {why}" + (
            " (DDP's no_sync)" if isinstance(engine, Plain) else " (at the boundary)" if "ZeRO-0" in why else
            " (the caller owns the boundary)" if "managed" in why else ""))
        with pytest.raises(LeverError, match=re.escape(f"--coalesce-reduction on does not apply: {why}")):
            resolve_coalesce("on", engine, True, 1)
    old = _Zero(2)
    del old.coalesce_grad_reduction
    assert resolve_coalesce("auto", old, True, 1)[1] == (
        "auto: this DeepSpeed has no engine.coalesce_grad_reduction() (DeepSpeed 0.19.2 added it)")

    # Before the engine exists (--cuda-graphs auto): read from the config as resolve_coalesce will decide.
    def cfg(stage, offload=False):
        return {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu" if offload else "none"}}}
    assert coalesce_expected("auto", cfg(2), 1, True, "bf16") is True
    assert coalesce_expected("auto", cfg(2, offload=True), 1, True, "bf16") is True
    assert coalesce_expected("auto", cfg(3), 1, True, "bf16") is False
    assert coalesce_expected("auto", cfg(2), 2, True, "bf16") is False
    assert coalesce_expected("auto", cfg(2), 1, False, "bf16") is False
    assert coalesce_expected("on", cfg(1), 3, False, "bf16") is True
    assert coalesce_expected("on", cfg(0), 1, True, "bf16") is False
    assert coalesce_expected("off", cfg(2), 1, True, "bf16") is False
    assert coalesce_expected("on", None, 1, True, "bf16") is False
    acc32 = {**cfg(2, offload=True), "data_types": {"grad_accum_dtype": "fp32"}}  # refused by the engine, see above
    assert coalesce_expected("auto", acc32, 1, True, "bf16") is False
    assert coalesce_expected("on", acc32, 1, True, "bf16") is False
    assert coalesce_expected("auto", acc32, 1, True, "fp32") is True  # fp32 weights: the same dtype


@pytest.mark.slow
def test_coalesced_reduction_trains_like_deepspeeds_reduction_per_micro_batch_on_two_ranks(tmp_path, recipe_run):
    """train.py through the launcher, two CPU ranks over gloo, fp32, grad accumulation 2 at a learning rate that
    moves the loss: with --coalesce-reduction on, ZeRO-2 + optimizer offload and ZeRO-3 give the loss curve of
    DeepSpeed's reduction per micro-batch on both ranks (rel 1e-5: the same gradients, summed before rather than
    after the reduction) and the same learning rate at every step (the engine stepped once per step), and the log
    and console say which ran. The reference curves are the recipes' (tests/test_recipes.py, which pin
    --coalesce-reduction off). (ZeRO-2 without offload, and a resume across the window:
    tests/test_checkpoint.py::test_a_coalesced_run_trains_and_resumes_like_deepspeeds_reduction.)"""
    from conftest import STEPS, curve, read_jsonl, recipe_cmd, run

    for recipe in ("z2_offload", "z3"):
        p = run(recipe_cmd(recipe, "--max-steps", str(STEPS), "--run-dir", str(tmp_path / recipe), "--cache-dir",
                           str(tmp_path / "cache"), "--coalesce-reduction", "on"), cpu_env())
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert re.search(r"gradient reduction +once per step +on: asked for", p.stdout), p.stdout[-3000:]
        for mode, run_dir in (("on", tmp_path / recipe), ("off", recipe_run(recipe))):
            recs = read_jsonl(run_dir / "rank0.jsonl")
            assert recs[-1]["status"] == "ok", recs[-1]
            opt = recs[0]["optimizations"]
            assert (opt["coalesce_reduction"], opt["coalesce_reduction_why"]) == (mode == "on", f"{mode}: asked for")
        for rank in (0, 1):
            (off_loss, off_lr), (on_loss, on_lr) = curve(recipe_run(recipe), rank), curve(tmp_path / recipe, rank)
            assert off_loss[-1] < off_loss[0] - 0.1, (recipe, off_loss)
            assert on_lr == off_lr, (recipe, rank)
            assert on_loss == pytest.approx(off_loss, rel=1e-5), (recipe, rank)


@pytest.mark.slow
def test_coalesced_reduction_is_refused_where_deepspeed_has_no_window_and_auto_says_why(tmp_path):
    """One process each: --coalesce-reduction on under ZeRO-0 or --ds none ends in an error naming why, with a
    summary record; auto on a CPU run keeps DeepSpeed's reduction and the log says why."""
    from conftest import read_jsonl, write_overfit_config

    write_overfit_config("z0.json", tmp_path / "z0.json")
    for name, ds, why in (("z0", str(tmp_path / "z0.json"), "ZeRO-0 reduces once per step already"),
                          ("none", "none", "the plain loop (--ds none) reduces once per step already")):
        p = _train(tmp_path, name, "--ds", ds, "--precision", "fp32", "--max-steps", "1",
                   "--coalesce-reduction", "on")
        assert p.returncode != 0
        assert f"--coalesce-reduction on does not apply: {why}" in p.stderr, p.stderr[-2000:]
        # decided from the config before anything is built: nothing is written
        assert not (tmp_path / name).exists()
    write_overfit_config("z2_5e8.json", tmp_path / "z2.json")
    p = _train(tmp_path, "auto", "--ds", str(tmp_path / "z2.json"), "--precision", "fp32", "--max-steps", "2",
               "--warmup-steps", "1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    opt = read_jsonl(tmp_path / "auto" / "rank0.jsonl")[0]["optimizations"]
    assert (opt["coalesce_reduction"], opt["coalesce_reduction_why"]) == (
        False, "auto: CPU run (measured on the GPU only)")
    assert re.search(r"gradient reduction +as DeepSpeed does +auto: CPU run \(measured on the GPU only\)", p.stdout)
