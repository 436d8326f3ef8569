"""The peer benchmark scripts in bench/: the commands compare.py plans, its table, the Trainer peer's sample order
and config handling; one real CPU run of the whole comparison (slow)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, ds_shm_names, leaked_shm, run

BENCH = REPO / "bench"


def load(name: str):
    """Import a bench/ script as a module (bench/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_dry_run_prints_every_command():
    p = run([sys.executable, "bench/compare.py", "--cpu", "--dry-run", "--models", "pangu-tiny",
             "--configs", "z1,z2_offload_5e8", "--seq-len", "64", "--steps", "3", "--warmup-steps", "1",
             "--data", "data/sample_sft.jsonl", "--tokenizer", "data/tokenizer/spm.model",
             "--work-dir", "runs/compare-test"], cpu_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    cmds = [ln for ln in p.stdout.splitlines() if ln and not ln.startswith("#")]
    assert len(cmds) == 2 + 3 * 2  # peer_torch, peer_compiled once per model; ours, bare, peer_trainer per config
    assert "bench/peer_torch.py" in cmds[0] and "--compile" not in cmds[0] and "--attention-mask" not in cmds[0]
    assert "bench/peer_torch.py" in cmds[1] and ("--compile reduce-overhead --no-attention-mask --batches-on-device "
                                                 "--grads-preallocated --compile-backend inductor") in cmds[1]
    for cfg, block in (("z1", cmds[2:5]), ("z2_offload_5e8", cmds[5:8])):
        ours, bare, trainer = block
        assert "train.py" in ours and f"--ds ds_configs/{cfg}.json" in ours and "--max-steps 3" in ours
        assert "--run-dir runs/compare-test/" in ours
        assert "--no-mask-prompt --lr-schedule config" in ours  # the reference's layout, as the peers train it
        assert "bench/bare_engine.py" in bare and "bench/peer_trainer.py" in trainer
        for c in block:
            assert "deepspeed.launcher.runner" in c and "--num_gpus 1" in c
    for c in cmds:  # same data, tokenizer, length and seed for every tool
        for flag in ("--data data/sample_sft.jsonl", "--tokenizer data/tokenizer/spm.model", "--seq-len 64",
                     "--seed 1234", "--warmup-steps 1"):
            assert flag in c, (flag, c)
        assert str(REPO) not in c  # no machine-specific paths
    assert "DS_ACCELERATOR=cpu" in p.stdout


def test_compare_paths_are_the_callers_and_a_missing_input_stops_before_any_run(tmp_path):
    """Typed from another directory, relative paths name the caller's files (the runs start in the checkout, where
    they would name others); a tokenizer that is not there is refused at once, not after every run failed on it."""
    p = run([sys.executable, str(REPO / "bench" / "compare.py"), "--cpu", "--dry-run", "--models", "pangu-tiny",
             "--configs", "z1", "--steps", "3", "--warmup-steps", "1", "--tokenizer",
             str(Path("..") / "data" / "tokenizer" / "spm.model")], cpu_env(), timeout=120,
            cwd=REPO / "tests")
    assert p.returncode == 0, p.stderr
    cmds = [ln for ln in p.stdout.splitlines() if "train.py" in ln]
    assert cmds and all("--tokenizer data/tokenizer/spm.model" in c for c in cmds), cmds
    p = run([sys.executable, str(REPO / "bench" / "levers.py"), "--cpu", "--tokenizer", "vocab.model", "z1"],
            cpu_env(), timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "--tokenizer: not found: vocab.model" in p.stderr, p.stderr


def test_compare_table_ratios_and_overhead(tmp_path):
    cmp = load("compare")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "num_layers": 2, "vocab_size": 1000}))
    args = cmp.parse_args(["--models", str(folder), "--configs", "z1", "--seq-len", "64", "--steps", "4",
                           "--warmup-steps", "1"])
    jobs = cmp.plan(args, gpu=True, work=tmp_path)
    assert [j["tool"] for j in jobs] == ["peer_torch", "peer_compiled", "ours", "bare", "peer_trainer"]
    h100 = "NVIDIA H100 80GB HBM3"
    m = str(folder)
    results = {
        ("ours", m, "z1"): {"status": "ok", "step_s_median": 1.1, "tokens_per_s": 4000.0,
                            "tokens_per_s_per_gpu": 4000.0, "device_name": h100, "precision": "bf16"},
        ("bare", m, "z1"): {"status": "ok", "step_s_median": 1.0, "tokens_per_s": 4400.0, "device_name": h100},
        ("peer_torch", m, None): {"status": "ok", "step_s_median": 2.0, "tokens_per_s": 2000.0,
                                  "device_name": h100},
        ("peer_compiled", m, None): {"status": "ok", "step_s_median": 1.6, "tokens_per_s": 3200.0,
                                     "device_name": h100, "compile_s": 61.4},
        ("peer_trainer", m, "z1"): {"status": "error", "error": "boom"},
    }
    rows = cmp.build_rows(args, jobs, results)
    assert len(rows) == 1
    r = rows[0]
    assert r["harness_overhead_pct"] == pytest.approx(10.0)
    assert r["ours_over_peer_torch"] == pytest.approx(2.0)
    assert r["ours_over_peer_compiled"] == pytest.approx(1.25) and r["peer_compiled_compile_s"] == 61.4
    assert r["ours_over_peer_trainer"] is None
    from sftbench.metrics import flops_per_token, peak_tflops
    from types import SimpleNamespace
    f = flops_per_token(SimpleNamespace(hidden_size=64, num_layers=2, vocab_size=1000), 64)
    assert r["ours_mfu_pct"] == pytest.approx(100 * f * 4000 / (peak_tflops(h100, "bf16") * 1e12))
    md = cmp.markdown(args, rows, h100)
    line = next(ln for ln in md.splitlines() if ln.startswith("| m |"))
    assert "2.00x" in line and "+10.0%" in line and "error" in line
    assert "| 3,200 (61) |" in line and "| 1.25x |" in line  # peer_compiled's tok/s with its compile seconds
    assert "boom" in md


def test_compare_marks_ratios_its_steps_do_not_decide(tmp_path):
    """A ratio of medians whose runs' measured steps overlap in time is marked ~ (not decided by these steps);
    ranges apart are not; warm-up steps are left out of the ranges; ours' steps come from its step records."""
    cmp = load("compare")
    args = cmp.parse_args(["--models", "pangu-tiny", "--configs", "z1", "--steps", "4", "--warmup-steps", "1"])
    jobs = cmp.plan(args, gpu=True, work=tmp_path)
    h100 = "NVIDIA H100 80GB HBM3"

    def res(times, warm=1):
        meas = sorted(times[warm:])
        return {"status": "ok", "step_s_median": meas[len(meas) // 2], "tokens_per_s": 4096 / meas[len(meas) // 2],
                "device_name": h100, "precision": "bf16", "step_times_s": times, "warmup_steps": warm}

    results = {
        ("ours", "pangu-tiny", "z1"): res([9.0, 0.50, 0.52, 0.55]),
        ("bare", "pangu-tiny", "z1"): res([9.0, 0.49, 0.51, 0.60]),      # overlaps ours: overhead not decided
        ("peer_torch", "pangu-tiny", None): res([0.1, 0.70, 0.75, 0.80]),  # apart: decided (its warm-up left out)
        ("peer_trainer", "pangu-tiny", "z1"): {"status": "error", "error": "boom"},
    }
    r = cmp.build_rows(args, jobs, results)[0]
    assert r["overhead_resolved"] is False and r["peer_torch_resolved"] is True
    assert r["peer_trainer_resolved"] is None
    line = next(ln for ln in cmp.markdown(args, [r], h100).splitlines() if ln.startswith("| pangu-tiny |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0.520 (0.500-0.550)"
    assert cells[6].startswith("~") and not cells[10].startswith("~") and cells[10].endswith("x")
    assert (cells[8], cells[11]) == ("—", "n/a")  # peer_compiled did not run
    # the warm-up step of 0.1 s would have made the peer's range overlap ours
    assert cmp.resolved(results[("ours", "pangu-tiny", "z1")], dict(results[("peer_torch", "pangu-tiny", None)],
                                                                     warmup_steps=0)) is False


def test_bench_results_name_no_machine_folder():
    """The bench JSON is committed as results: the default dataset (an absolute path inside the repo) is recorded
    relative to the repo."""
    pt = load("peer_torch")
    from types import SimpleNamespace

    import torch

    args = SimpleNamespace(warmup_steps=1, seq_len=8, precision="bf16")
    res = pt.summarize("peer_torch", "m", None, args, torch.device("cpu"), None, 1.0, [1.0, 0.5], [], [], [], 1, 1,
                       1, {"dataset_path": str(REPO / "data" / "bench_10k.jsonl"), "dataset_samples": 3})
    assert res["dataset_path"] == "data/bench_10k.jsonl" and res["dataset_samples"] == 3


def test_read_ours_keeps_each_step_time(tmp_path):
    """ours' per-step times and warm-up count are read from its rank-0 step records, as the peers' JSON has them."""
    cmp = load("compare")
    from sftbench.runlog import RunLog

    log = RunLog(tmp_path, rank=0)
    log.meta(micro_batch=1, grad_accum=8, seq_len=64, world_size=1, device_name="cpu")
    for i, (t, w) in enumerate([(2.0, True), (0.5, False), (0.6, False)], start=1):
        log.step(step=i, step_s=t, warmup=w, elapsed_s=float(i))
    log.summary(status="ok", step_s_median=0.55, tokens_per_s=900.0)
    log.close()
    got = cmp.read_ours(tmp_path)
    assert got["step_times_s"] == [2.0, 0.5, 0.6] and got["warmup_steps"] == 1
    assert cmp.measured_steps(got) == [0.5, 0.6]


def test_trainer_sampler_gives_each_rank_trains_order():
    pt = load("peer_trainer")
    from sftbench.data import ShardedOrder

    n, world, per_rank, mb = 10, 3, 9, 1
    s = pt.OrderSampler(n, world, per_rank, mb, seed=5)
    seq = list(s)
    assert len(seq) == len(s) == world * per_rank
    for r in range(world):
        # accelerate hands batches of micro_batch round-robin to the ranks
        got = seq[r::world]
        order = ShardedOrder(n, r, world, 5)  # 4 a rank per epoch: epochs 0, 1, 2 back to back
        want = order.indices(0) + order.indices(1) + order.indices(2)
        assert got == want[:per_rank]


def test_trainer_args_match_every_shipped_config():
    """The Trainer refuses a DeepSpeed JSON that disagrees with its arguments: the ones peer_trainer derives from
    each shipped config must pass the Trainer's own check."""
    pytest.importorskip("accelerate")
    pt = load("peer_trainer")
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from sftbench.dsconfig import load_ds_config

    for path in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = load_ds_config(path)
        ta = pt.ds_trainer_args(cfg)
        args = SimpleNamespace(world_size=1, save_on_each_node=False, fp16_full_eval=False, bf16_full_eval=False,
                               get_warmup_steps=lambda n, w=ta["warmup_steps"]: w, **ta)
        hf = HfTrainerDeepSpeedConfig(cfg)
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 20)
        assert hf.mismatches == [], (path.name, hf.mismatches)


@pytest.mark.slow
def test_compare_cpu_smoke(tmp_path):
    """All four tools for real on CPU (tiny model, 2 steps): the table and JSON come out, every run ok."""
    pytest.importorskip("accelerate")
    out = tmp_path / "cmp.md"
    shm_before = ds_shm_names()
    # the committed dropout-free tiny checkpoint in fp32: peer_compiled's losses can be compared with peer_torch's
    p = run([sys.executable, "bench/compare.py", "--cpu", "--models", "tests/fixtures/tiny-pangu", "--configs", "z1",
             "--precision", "fp32", "--seq-len", "32", "--steps", "2", "--warmup-steps", "1",
             "--data", "data/sample_sft.jsonl",
             "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--out", str(out),
             "--compiled-backend", "aot_eager"],  # inductor's code generation on CPU: minutes, not what is checked
            cpu_env(), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    (row,) = res["rows"]
    assert all(v["status"] == "ok" for v in row["results"].values())
    assert row["results"]["peer_trainer"]["order_matches"] is True
    ours = row["results"]["ours"]
    assert len(ours["step_times_s"]) == 2 and ours["warmup_steps"] == 1  # every tool's steps, read alike
    assert all(row[k] in (True, False) for k in ("overhead_resolved", "peer_torch_resolved", "peer_trainer_resolved"))
    for k in ("ours_tokens_per_s", "bare_tokens_per_s", "peer_torch_tokens_per_s", "peer_compiled_tokens_per_s",
              "peer_trainer_tokens_per_s"):
        assert row[k] > 0
    compiled = row["results"]["peer_compiled"]
    assert (compiled["tool"], compiled["compile"], compiled["compile_backend"]) == (
        "peer_compiled", "reduce-overhead", "aot_eager")
    assert (compiled["attention_mask"], compiled["batches_on_device"], compiled["grads_preallocated"]) == (
        False, True, True)
    # the same model, batches, order and update rule as peer_torch: the same losses (fp32, no dropout; the causal
    # mask alone and the padding mask give right-padded rows' real tokens the same attention)
    assert compiled["first_loss"] == pytest.approx(row["results"]["peer_torch"]["first_loss"], rel=1e-5)
    assert compiled["final_loss"] == pytest.approx(row["results"]["peer_torch"]["final_loss"], rel=1e-5)
    assert "| tiny-pangu | z1 |" in out.read_text()
    # Each tool ran on a fresh port: none of them left DeepSpeed's CPU shm buffer behind.
    assert leaked_shm(shm_before) == set()


def test_lever_variants_parse_and_derive_configs(tmp_path):
    lv = load("levers")
    v = lv.parse_variant("z2_offload_5e8 --compile set:data_types.grad_accum_dtype=fp32 "
                         "set:zero_optimization.reduce_bucket_size=2e8 env:OMP_NUM_THREADS=8")
    assert v["config"] == "z2_offload_5e8" and v["flags"] == ["--compile"] and not v["plain"]
    assert v["sets"] == {"data_types.grad_accum_dtype": "fp32", "zero_optimization.reduce_bucket_size": 2e8}
    assert v["env"] == {"OMP_NUM_THREADS": "8"}
    assert lv.parse_variant("z1")["plain"]
    for bad in ("", "z1 set:novalue", "z1 env:=1", "none set:a.b=1"):
        with pytest.raises(ValueError):
            lv.parse_variant(bad)
    path = Path(lv.derived_config("z2_offload_5e8", v["sets"], tmp_path / "d.json"))
    cfg = json.loads(path.read_text())
    base = json.loads((REPO / "ds_configs" / "z2_offload_5e8.json").read_text())
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 2e8
    assert cfg["zero_optimization"]["offload_optimizer"] == base["zero_optimization"]["offload_optimizer"]
    with pytest.raises(ValueError, match="'type' is not an object in ds_configs/z1.json"):
        lv.derived_config("z1", {"optimizer.type.x": 1}, tmp_path / "e.json")


def test_table_paths_add_the_suffix_to_dotted_names():
    """--out results/levers_2.6b must write levers_2.6b.md, not levers_2.md (a model name has a dot in it)."""
    cmp = load("compare")
    assert cmp.table_paths("r/levers_2.6b") == (Path("r/levers_2.6b.md"), Path("r/levers_2.6b.json"))
    assert cmp.table_paths("r/cmp.md") == (Path("r/cmp.md"), Path("r/cmp.json"))
    assert cmp.table_paths(Path("cmp")) == (Path("cmp.md"), Path("cmp.json"))


@pytest.mark.slow
def test_levers_cpu_smoke(tmp_path):
    """Two variants for real on CPU: the table has both, the changed config is the one the run logged."""
    out = tmp_path / "lev"
    p = run([sys.executable, "bench/levers.py", "--cpu", "--models", "pangu-tiny", "--seq-len", "32", "--steps", "2",
             "--warmup-steps", "1", "--data", "data/sample_sft.jsonl", "--work-dir", str(tmp_path / "work"),
             "--out", str(out), "z1", "z1 set:zero_optimization.reduce_bucket_size=2e8"], cpu_env(), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["x_base"] == 1.0 and rows[1]["x_base"] > 0
    meta = json.loads((tmp_path / "work" / "pangu-tiny__01_z1_set_zero_optimization.reduce_bucket_size=2e8"
                       / "rank0.jsonl").read_text().splitlines()[0])
    assert meta["ds_config"]["zero_optimization"]["reduce_bucket_size"] == 2e8
    table = out.with_suffix(".md").read_text()
    assert "| pangu-tiny | `z1 set:zero_optimization.reduce_bucket_size=2e8` | ok |" in table
    assert json.loads(out.with_suffix(".json").read_text())["complete"] is True
    # --collect tables the runs a call left (as one stopped by its time limit leaves them) without running any:
    # the same medians, each row's call named, a variant no call ran is said so, and the ratio to a baseline of
    # another call is not given.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "work" / "pangu-tiny__01_z1_set_zero_optimization.reduce_bucket_size=2e8",
                    other / "pangu-tiny__00_z1")
    got = tmp_path / "got"
    c = run([sys.executable, "bench/levers.py", "--collect", f"{other},{tmp_path / 'work'}", "--models", "pangu-tiny",
             "--steps", "2", "--warmup-steps", "1", "--out", str(got), "z1",
             "z1 set:zero_optimization.reduce_bucket_size=2e8", "z3"], cpu_env(), timeout=120)
    assert c.returncode == 1, c.stdout[-2000:] + c.stderr[-2000:]  # one variant was never run
    crow = json.loads(got.with_suffix(".json").read_text())["rows"]
    assert [r.get("call") for r in crow] == [0, 1, None] and crow[2]["status"] == "not run"
    assert crow[0]["step_s_median"] == rows[1]["step_s_median"]  # "z1" found first in the first folder given
    assert crow[1]["step_s_median"] == rows[1]["step_s_median"] and crow[1]["x_base"] is None
    md = got.with_suffix(".md").read_text()
    assert f"call 1: `{other}`, 2 steps (1 warm-up) x 32 tokens" in md
    assert "| pangu-tiny | `z3` | - | not run: in none of the --collect folders |" in md


def test_profile_phase_table_attributes_kernels_to_the_phase_that_launched_them():
    """bare_engine --profile's phase table: host wall time summed per named phase, each kernel counted in the phase
    whose launch call it came from (even when it ran on the device after that phase ended), stray ranges ignored."""
    bare = load("bare_engine")

    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}
    trace = {"traceEvents": [
        x("user_annotation", "micro.forward", 0, 1000), x("user_annotation", "micro.backward", 1000, 2000),
        x("user_annotation", "micro.forward", 3000, 1000), x("user_annotation", "boundary.step", 4000, 5000),
        x("user_annotation", "nccl:all_reduce", 4500, 10),  # not one of the loop's phases
        x("cuda_runtime", "cudaGraphLaunch", 100, 5, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 1500, 5, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 4100, 5, correlation=3),
        x("kernel", "fwd", 200, 800, correlation=1),
        x("kernel", "bwd", 3500, 1500, correlation=2),  # ran after its phase ended: still the backward's
        x("gpu_memcpy", "copy", 4200, 250, correlation=3),
        x("kernel", "orphan", 9000, 100, correlation=99),  # no launch recorded: counted nowhere
    ]}
    got = bare.phase_table(trace)
    assert got[:2] == ["| phase | calls | host wall ms | kernels | device ms |", "|---|---|---|---|---|"]
    assert got[2:] == ["| micro.forward | 2 | 2.00 | 1 | 0.80 |", "| micro.backward | 1 | 2.00 | 1 | 1.50 |",
                       "| boundary.step | 1 | 5.00 | 1 | 0.25 |"]
    assert bare.phase_table({"traceEvents": []}) == ["(no named phases in the trace)"]


def test_profile_family_table_counts_kernels_not_the_gpu_side_ranges_around_them():
    """The kernel-family table sums kernels, copies and memsets only: the GPU-side range the profiler records for
    each named phase (``gpu_user_annotation``) spans those kernels and must not be counted again."""
    bare = load("bare_engine")

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}
    trace = {"traceEvents": [
        x("gpu_user_annotation", "micro.backward", 0, 5000), x("gpu_user_annotation", "_ReplayBackward", 0, 4000),
        x("kernel", "nvjet_sm90_tst_320x128_NTT", 0, 3000), x("kernel", "vectorized_elementwise_kernel", 3000, 500),
        x("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 3500, 1000), x("gpu_memset", "Memset", 4500, 500),
        x("cuda_runtime", "cudaLaunchKernel", 0, 10),
    ]}
    got = bare.family_table(trace)
    assert got[0] == "device busy (sum of kernel times): 5.0 ms, 4 kernels"
    assert got[4:] == ["| gemm | 3.00 | 60.0% |", "| memcpy/memset | 1.50 | 30.0% |",
                       "| elementwise/other | 0.50 | 10.0% |"]


@pytest.mark.slow
def test_bare_engine_profile_cpu_leaves_the_writing_out_of_the_step_times(tmp_path):
    """bare_engine --profile for real on CPU: the profile has its phase table, and the seconds spent writing it
    (the GPU idle) count in no step and not in the wall-clock figure."""
    from sftbench.buildenv import free_port
    prof, out = tmp_path / "prof.md", tmp_path / "bare.json"
    p = run([sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
             "--num_gpus", "1", "bench/bare_engine.py", "--ds", "ds_configs/z1.json", "--model", "pangu-tiny",
             "--steps", "5", "--warmup-steps", "1", "--seq-len", "32", "--data", "data/sample_sft.jsonl",
             "--cache-dir", str(tmp_path / "cache"), "--profile", str(prof), "--out", str(out)], cpu_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = prof.read_text()
    assert "| boundary.step | 1 |" in text and "## top operators by host time" in text
    res = json.loads(out.read_text())
    times = res["step_times_s"]
    assert len(times) == 5  # one per step: the writing is no interval of its own
    # On CPU the step times are the wall clock between step boundaries, the writing's interval left out: the
    # wall-clock figure over the 4 measured steps is their sum to the clock's resolution (a busy machine slows the
    # steps, in both figures alike), so the writing (its tables take far longer than 50 ms) is in neither or both ...
    measured = times[1:]
    assert res["step_s_wall"] * len(measured) == pytest.approx(sum(measured), abs=0.05), (res["step_s_wall"], times)
    # ... and not in the step after it (step 2 came right after the writing): no slower than the plain steps by the
    # time the writing takes. (Step 1, profiled, is slowed by the profiler itself.)
    assert times[2] < max(times[3:]) + 0.5, times


@pytest.mark.slow
def test_bare_engine_runs_the_coalesced_window_as_train_py_does(tmp_path):
    """bare_engine on CPU, ZeRO-2 fp32, two ranks: with --coalesce-reduction on its last loss is the one of
    DeepSpeed's reduction per micro-batch (rel 1e-5), its summary says the window ran, and the profile times the
    window's one reduction as its own phase, before the one step() of the step."""
    from sftbench.buildenv import free_port
    res = {}
    for mode in ("off", "on"):
        out, prof = tmp_path / f"bare_{mode}.json", tmp_path / f"prof_{mode}.md"
        p = run([sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
                 "--num_gpus", "2", "bench/bare_engine.py", "--ds", "ds_configs/z2_5e8.json", "--model",
                 "pangu-tiny", "--precision", "fp32", "--steps", "3", "--warmup-steps", "1", "--seq-len", "32",
                 "--data", "data/sample_sft.jsonl", "--cache-dir", str(tmp_path / "cache"), "--profile", str(prof),
                 "--coalesce-reduction", mode, "--out", str(out)], cpu_env(), timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        what = "once per step" if mode == "on" else "as DeepSpeed does"  # the lever table bare_engine prints
        assert re.search(rf"gradient reduction +{what} +{mode}: asked for", p.stdout), p.stdout[-3000:]
        res[mode] = json.loads(out.read_text())
        assert res[mode]["coalesce_reduction"] is (mode == "on")
    text = (tmp_path / "prof_on.md").read_text()
    assert "| boundary.reduce | 1 |" in text and "| boundary.step | 1 |" in text and "| micro.step |" not in text
    assert "| micro.step | 7 |" in (tmp_path / "prof_off.md").read_text()  # GA 8: 7 step() calls before the boundary
    assert res["on"]["final_loss"] == pytest.approx(res["off"]["final_loss"], rel=1e-5)


def test_committed_results_name_no_machine_folder():
    """The committed results (summaries, tables, reports) name run folders relative to the repo, never a folder of
    the machine that ran them (a --work-dir outside the repo is recorded as given, so it is cleaned before commit)."""
    import re
    absolute = re.compile(r"""["'(\s](/(?:root|tmp|home|work|mnt|scratch|Users)/[^"'\s)]*)""")
    found = []
    for f in sorted((REPO / "results").rglob("*")):
        if f.suffix in (".json", ".md", ".csv", ".txt") and f.is_file():
            found += [f"{f.relative_to(REPO)}: {m}" for m in absolute.findall(f.read_text(errors="replace"))[:3]]
    assert not found, found[:10]


@pytest.mark.slow
def test_offload_floor_cpu_times_the_host_parts_of_a_real_adamw_step(tmp_path):
    """offload_floor for real on CPU: DeepSpeed's CPU Adam step, the host copy and the 16-bit cast are timed, the
    update is checked against torch's AdamW, and the floor is the sum of the parts that run on this machine."""
    out = tmp_path / "floor.json"
    p = run([sys.executable, "bench/offload_floor.py", "--numel", "200000", "--repeats", "2", "--out", str(out)],
            cpu_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] is None and res["numel"] == 200000 and res["device"] == "cpu"
    assert set(res["ms"]) == {"cpu_adam", "host_copy", "cast_bf16_host.pageable"}  # no GPU: no PCIe parts
    assert res["adam_vs_torch_max_abs"] < 1e-6
    assert res["host_floor_ms.pageable"] == pytest.approx(res["ms"]["cpu_adam"] + res["ms"]["cast_bf16_host.pageable"],
                                                          abs=0.11)
    assert "host_floor_ms.pageable" in p.stdout


def test_offload_floor_fails_when_the_timed_step_is_not_adamw(monkeypatch):
    """The agreement check can fail: an optimizer that is not the configured AdamW (here torch's with another lr,
    standing in for DeepSpeed's) makes the script exit 1 instead of printing a floor for the wrong step."""
    import torch
    from deepspeed.ops import adam

    floor = load("offload_floor")

    def wrong(params, lr, **kw):
        return torch.optim.AdamW(params, lr=lr * 10, **{k: v for k, v in kw.items() if k != "adamw_mode"})

    monkeypatch.setattr(adam, "DeepSpeedCPUAdam", wrong)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert floor.main(["--numel", "5000", "--repeats", "1"]) == 1
