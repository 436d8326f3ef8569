"""Recipe tests: train.py for real on CPU with the tiny model, assertions on the JSONL log. Through the real
launcher on 2 or 3 ranks over gloo where the point is multi-rank (ZeRO, sharding, rank logs, killed jobs); as
one process (`python train.py`, world size 1, still a real DeepSpeed engine) where it is not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (LAST_PORT, META_NULL, NO_DS_NULL, REPO, SAMPLES, STEP_NULL, SUMMARY_NULL, cpu_env, ds_shm_names,
                      leaked_shm, launch_cmd, leftover_shm, nulls, read_jsonl, run, write_overfit_config)
from sftbench.runlog import parse_lines

COMMON = ["--model", "pangu-tiny", "--seq-len", "64", "--max-steps", "8", "--warmup-steps", "2",
          "--precision", "fp32", "--seed", "7"]


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES) + "\n")
    return p


def check_schema(recs: list[dict], meta_null: set[str] = META_NULL, step_null: set[str] | None = STEP_NULL,
                 summary_null: set[str] | None = SUMMARY_NULL) -> tuple[dict, list[dict], dict]:
    """The run's meta, step and summary records, each with exactly the named keys null (None: not checked here,
    the caller asserts the values)."""
    assert recs[0]["type"] == "meta" and recs[-1]["type"] == "summary"
    assert nulls(recs[0]) == meta_null
    steps = [r for r in recs if r["type"] == "step"]
    if step_null is not None:
        assert [nulls(r) for r in steps] == [step_null] * len(steps)
    if summary_null is not None:
        assert nulls(recs[-1]) == summary_null
    return recs[0], steps, recs[-1]


def check_run_logs(run_dir, out: str, *, ranks: int, stage: int | None, offload: str | None, meta_null: set[str],
                   grad_accum: int, steps: int, warmup: int, steps_per_epoch: int, port: int | None) -> list[dict]:
    """What every finished multi-step run leaves, read on each rank: the meta, step and summary records with exactly
    ``meta_null`` (and the steps' and summary's CPU fields) null, the engine that ran, every step logged and the
    first ``warmup`` flagged; rank 0 alone prints a line per step (``out``: the launch's stdout and stderr);
    DeepSpeed's start-up noise silenced and its shm buffers released (``port``: the launch's, None for one process).
    Returns each rank's summary."""
    summaries = []
    for rank in range(ranks):
        meta, recs, summary = check_schema(read_jsonl(run_dir / f"rank{rank}.jsonl"), meta_null)
        assert (meta["rank"], meta["world_size"]) == (rank, ranks)
        assert meta["zero_stage"] == stage
        assert (meta["grad_accum"], meta["micro_batch"], meta["precision"]) == (grad_accum, 1, "fp32")
        assert meta["offload_optimizer"] == offload
        assert meta["steps_per_epoch"] == steps_per_epoch
        assert [s["step"] for s in recs] == list(range(1, steps + 1))
        assert [s["warmup"] for s in recs] == [True] * warmup + [False] * (steps - warmup)
        assert all(s["step_s"] > 0 and s["gpu_mem_used_mib"] is None for s in recs)
        assert summary["status"] == "ok" and summary["measured_steps"] == steps - warmup
        if stage is not None:
            assert meta["ds_config"]["zero_optimization"]["stage"] == stage
        summaries.append(summary)
    assert out.count(f"step {steps}/{steps}") == 1  # rank 0 prints one line per step; rank 1 none of them
    # DeepSpeed's start-up noise is silenced on every rank (sftbench.engine_checks.silence_startup_noise)
    assert "Attempting to get learning rate from scheduler" not in out
    assert "all_gather_into_tensor` is deprecated" not in out
    if port is not None:  # DeepSpeed's 66 MB shm file per CPU rank is released, not left in RAM (sftbench/shm.py)
        assert leftover_shm(ranks, port) == []
    return summaries


# ZeRO-1, ZeRO-2 + optimizer offload, ZeRO-3 and --ds none run as the recipes (their schema:
# test_recipe_runs_log_every_field_on_every_rank); these are the other engines.
@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["z0", "z2_5e8", "z3_offload_param"])
def test_two_rank_cpu_run(cfg, tmp_path, overfit_data):
    ds = str(write_overfit_config(f"{cfg}.json", tmp_path / f"{cfg}.json"))
    run_dir = tmp_path / "run"
    p = run(launch_cmd(2, "--ds", ds, "--data", str(overfit_data), "--run-dir", str(run_dir),
                       "--cache-dir", str(tmp_path / "cache"), *COMMON), cpu_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta_null = META_NULL - {"offload_param", "offload_optimizer"} if cfg == "z3_offload_param" else META_NULL
    summaries = check_run_logs(run_dir, p.stdout + p.stderr, ranks=2, stage=int(cfg[1]),
                               offload="cpu" if "offload" in cfg else None, meta_null=meta_null, grad_accum=2,
                               steps=8, warmup=2, steps_per_epoch=1,  # ceil(4 / (1 * 2 * 2))
                               port=LAST_PORT["port"])
    for summary in summaries:
        # The model's own init ran (under ZeRO-3 too): the first loss is near ln(vocab), not in the hundreds.
        assert 9.5 < summary["first_loss"] < 11.5, summary["first_loss"]
        # Overfitting four samples: the loss must fall clearly (it starts near ln(40000) = 10.6).
        assert summary["final_loss"] < summary["first_loss"] - 1.0, (summary["first_loss"], summary["final_loss"])


@pytest.mark.slow
def test_zenflow_runs_its_own_accumulation_and_says_so(tmp_path, overfit_data):
    """ds_configs/engines/z2_offload_zenflow.json on two CPU ranks: DeepSpeed's ZenFlow takes its update_interval (4)
    as the accumulation whatever the file's gradient_accumulation_steps (8) says; the run steps 4 micro-batches at a
    time, logs that accumulation, and says why on the console; the levers that patch DeepSpeed's ZeRO-2 optimizer
    stay off, naming ZenFlow. ZenFlow's CPU optimizer process ends with the run (left running, it would hold the
    launcher's output pipes: the job would never end for this test, which then fails on its time limit)."""
    import psutil

    started = time.time()
    run_dir = tmp_path / "run"
    p = run(launch_cmd(2, "--ds", "engines/z2_offload_zenflow", "--data", str(overfit_data), "--run-dir",
                       str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--model", "pangu-tiny", "--seq-len", "64",
                       "--max-steps", "2", "--warmup-steps", "1", "--precision", "fp32", "--seed", "7"), cpu_env(),
            timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    left = [q.pid for q in psutil.process_iter(["cmdline", "create_time"])
            if q.info["create_time"] >= started and "spawn_main" in " ".join(q.info["cmdline"] or [])]
    assert left == []
    assert ("warning: DeepSpeed's ZenFlow runs 4 micro-batches per optimizer step, not the config's "
            "gradient_accumulation_steps 8") in p.stdout
    for rank in (0, 1):
        recs = read_jsonl(run_dir / f"rank{rank}.jsonl")
        meta, summary = recs[0], recs[-1]
        assert meta["grad_accum"] == 4 and meta["ds_config"]["gradient_accumulation_steps"] == 8
        assert meta["ds_config"]["zero_optimization"]["zenflow"]["update_interval"] == 4
        assert summary["status"] == "ok" and [r["step"] for r in recs if r["type"] == "step"] == [1, 2]
        opt = meta["optimizations"]
        for lever in ("coalesce_reduction", "overflow_check"):
            assert opt[f"{lever}_why"] == (
                "auto: ZenFlow's optimizer replaces DeepSpeed's reduction and step with its own "
                "(zero_optimization.zenflow), which this was not checked against"), lever


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z1", "z2_offload", "z3", "none"])
def test_recipe_runs_log_every_field_on_every_rank(name, recipe_run):
    """The recipes' runs (tests/test_recipes.py: 8 steps, the first a warm-up) read for what every run's log holds:
    each rank's meta, step and summary records with exactly the fields that do not apply null, the engine that
    ran, one console line per step from rank 0 only, DeepSpeed's start-up noise silenced and its shm buffers
    released."""
    from conftest import GRAD_ACCUM, RECIPES, STEPS

    run_dir = recipe_run(name)
    ranks, ds, _ = RECIPES[name]
    out = (run_dir.parent / "stdout.txt").read_text() + (run_dir.parent / "stderr.txt").read_text()
    offload = "cpu" if name == "z2_offload" else None
    meta_null = (META_NULL - {"offload_optimizer"} if offload else META_NULL) | (NO_DS_NULL if ds == "none" else set())
    check_run_logs(run_dir, out, ranks=ranks, stage=None if ds == "none" else int(name[1]), offload=offload,
                   meta_null=meta_null, grad_accum=GRAD_ACCUM, steps=STEPS, warmup=1,
                   steps_per_epoch=-(-12 // (ranks * GRAD_ACCUM)),  # 12 samples, no eval split
                   port=int((run_dir.parent / "port.txt").read_text()) if ranks > 1 else None)


@pytest.mark.slow
def test_killed_run_leaves_parseable_logs_without_summary(tmp_path, overfit_data):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(2, "--ds", str(REPO / "ds_configs" / "z1.json"), "--data", str(overfit_data),
                     "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--model", "pangu-tiny",
                     "--seq-len", "64", "--max-steps", "100000", "--precision", "fp32", launcher="deepspeed")
    proc = subprocess.Popen(cmd, env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            f = run_dir / "rank1.jsonl"
            if f.exists() and f.read_text().count('"type": "step"') >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("run produced no steps in time")
        live = _once(run_dir)  # while it runs: running, with an ETA
        print("\n--- monitor.py --once, live run ---\n" + live)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pids = []
    for rank in (0, 1):
        recs, bad = parse_lines((run_dir / f"rank{rank}.jsonl").read_text().splitlines())
        assert bad == []
        assert recs[0]["type"] == "meta"
        assert not any(r["type"] == "summary" for r in recs)
        pids.append(recs[0]["pid"])
    for _ in range(600):  # the launcher is reaped; its ranks take a moment longer to die
        if all(_gone(p) for p in pids):
            break
        time.sleep(0.1)
    # Released right after init, so even SIGKILLed ranks leave no shm file behind.
    assert leftover_shm(2) == []
    assert f"run {run_dir.name}  [running]" in live and "| ETA " in live
    # Killed: the monitor says dead (with its last record) and drops the ETA; the report files it as dead.
    dead = _once(run_dir)
    print("\n--- monitor.py --once, killed run ---\n" + dead)
    head = dead.split("\nRANKS")[0]
    assert f"run {run_dir.name}  [dead]" in head and "ETA" not in head
    assert "dead: no process of this run is left on this host and it wrote no summary; last record" in head
    r = run([sys.executable, "-m", "sftbench.report", str(tmp_path), "--out", str(tmp_path / "res")], cpu_env())
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "res" / "results.md").read_text(encoding="utf-8")
    assert "| Dead [1] |" in md and "1. run: Dead: no process of this run is left on this host" in md


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie: dead, not yet reaped
    except FileNotFoundError:
        return True


def _once(target) -> str:
    r = subprocess.run([sys.executable, str(REPO / "monitor.py"), "--once", str(target)], cwd=REPO,
                       env=dict(os.environ, SFTBENCH_NO_NVML="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _single(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`python train.py ...`: one process, no launcher, still a real DeepSpeed engine (world size 1)."""
    return run([str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else "python",
                str(REPO / "train.py"), *args], cpu_env(), timeout=timeout)


@pytest.mark.slow
def test_single_process_without_launcher(tmp_path, overfit_data):
    """`python train.py --ds ...` with no launcher is one rank (DeepSpeed alone would try MPI and need mpi4py)."""
    shm_before = ds_shm_names()
    run_dir = tmp_path / "run"
    p = _single(["--ds", str(REPO / "ds_configs" / "z1.json"), "--data", str(overfit_data), "--run-dir", str(run_dir),
                 "--cache-dir", str(tmp_path / "cache"), *COMMON[:2], "--seq-len", "64", "--max-steps", "2",
                 "--warmup-steps", "1", "--precision", "fp32"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta, steps, summary = check_schema(read_jsonl(run_dir / "rank0.jsonl"))
    assert meta["world_size"] == 1 and meta["zero_stage"] == 1 and summary["status"] == "ok" and len(steps) == 2
    assert leaked_shm(shm_before) == set()


def test_auto_value_is_refused_naming_the_key(tmp_path):
    """An "auto" that neither the Trainer's rules nor DeepSpeed resolve stops the run before it starts."""
    cfg = json.loads((REPO / "ds_configs" / "z2_5e8.json").read_text())
    cfg["zero_optimization"]["stage"] = "auto"
    p = tmp_path / "auto.json"
    p.write_text(json.dumps(cfg))
    r = _single(["--ds", str(p), "--run-dir", str(tmp_path / "run")])
    assert r.returncode != 0
    assert "auto.json" in r.stderr and "zero_optimization.stage" in r.stderr and '"auto"' in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_trainer_config_and_a_run_config_file_run_with_every_auto_named(tmp_path, overfit_data):
    """The transformers documentation's ZeRO-2 config with its "auto" values, given through a --config YAML file of
    train.py's flags (one flag overridden on the command line): the run fills each "auto" in, prints and logs it,
    DeepSpeed runs the filled-in config, and the YAML file is in the run folder."""
    from test_dsconfig import TRAINER_ZERO2
    ds = tmp_path / "trainer_zero2.json"
    ds.write_text(json.dumps(TRAINER_ZERO2))
    run_dir = tmp_path / "run"
    conf = tmp_path / "run.yaml"
    conf.write_text(f"ds: {ds}\nmodel: pangu-tiny\ndata: {overfit_data}\nseq-len: 64\nmax_steps: 9\n"
                    f"precision: fp32\nlr: 0.001\ngrad-accum: 2\nlr-warmup-steps: 2\nmask-prompt: false\n"
                    f"run-dir: {run_dir}\ncache-dir: {tmp_path / 'cache'}\n")
    p = _single(["--config", str(conf), "--max-steps", "3"], timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta, steps, summary = check_schema(read_jsonl(run_dir / "rank0.jsonl"))
    assert len(steps) == 3 and meta["harness"]["mask_prompt"] is False  # the command line's --max-steps won
    assert (run_dir / "run_config.yaml").read_text() == conf.read_text()
    assert '"auto"' not in json.dumps(meta["ds_config"])
    assert meta["ds_config"]["scheduler"]["params"] == {
        "warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 2, "total_num_steps": 3}
    for line in ('train_micro_batch_size_per_gpu: "auto" -> 1 (--micro-batch not given: the harness\'s default)',
                 'gradient_accumulation_steps: "auto" -> 2 (--grad-accum)',
                 'train_batch_size: "auto" -> 2 (world 1 x micro batch 1 x accumulation 2)',
                 'optimizer.params.lr: "auto" -> 0.001 (--lr)',
                 'bf16.enabled: "auto" -> False (precision fp32)',
                 'zero_optimization.reduce_bucket_size: "auto" -> 4096 (hidden size 64 squared, as the Trainer)',
                 'scheduler.params.total_num_steps: "auto" -> 3 (the run\'s steps)'):
        assert line in meta["overrides"], (line, meta["overrides"])
        assert f"override: {line}" in p.stdout


def test_missing_config_and_data_are_clear(tmp_path):
    r = _single(["--ds", str(tmp_path / "nope.json")])
    assert r.returncode != 0 and "DeepSpeed config not found" in r.stderr and "nope.json" in r.stderr
    r = _single(["--ds", "none", "--data", str(tmp_path / "missing.jsonl")])
    assert r.returncode != 0 and "missing.jsonl" in r.stderr
    r = _single(["--ds", "none", "--precision", "fp8"])
    assert r.returncode != 0 and "--precision" in r.stderr


@pytest.mark.slow
def test_dropping_the_pad_mask_keeps_the_loss_curve(tmp_path, overfit_data):
    """The default speed lever (no padding mask on right-padded batches, so SDPA can use flash) must not change
    what is computed: the same fixed-seed run with the mask gives the same losses step by step. One process (a real
    DeepSpeed engine, world size 1, no launcher): the mask is a per-sample matter, not a multi-rank one."""
    ds = str(write_overfit_config("z0.json", tmp_path / "cfg.json"))
    losses = {}
    for mode in ("auto", "always"):
        run_dir = tmp_path / mode
        p = _single(["--ds", ds, "--data", str(overfit_data), "--run-dir", str(run_dir),
                     "--cache-dir", str(tmp_path / "cache"), "--pad-mask", mode, *COMMON])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        recs = read_jsonl(run_dir / "rank0.jsonl")
        assert recs[0]["optimizations"]["pad_mask"] is (mode == "always")
        losses[mode] = [r["loss"] for r in recs if r["type"] == "step"]
    assert losses["auto"] == pytest.approx(losses["always"], rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_three_ranks_like_the_reference(tmp_path, overfit_data):
    """The reference ran most rows on 3 GPUs: ZeRO-2 with offload over 3 CPU ranks, uneven 4-sample shards."""
    ds = str(write_overfit_config("z2_offload_5e8.json", tmp_path / "cfg.json"))
    run_dir = tmp_path / "run"
    p = run(launch_cmd(3, "--ds", ds, "--data", str(overfit_data), "--run-dir", str(run_dir),
                       "--cache-dir", str(tmp_path / "cache"), *COMMON), cpu_env())
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in range(3):
        meta, steps, summary = check_schema(read_jsonl(run_dir / f"rank{rank}.jsonl"),
                                            META_NULL - {"offload_optimizer"})
        assert meta["world_size"] == 3 and meta["rank"] == rank
        assert meta["steps_per_epoch"] == 1  # ceil(4 / (1 * 3 * 2))
        assert summary["status"] == "ok" and len(steps) == 8
    assert leftover_shm(3) == []


@pytest.mark.slow
def test_compiled_under_deepspeed(tmp_path, overfit_data):
    """--compile blocks and --compile model (engine.compile()) run under the real engine and are recorded in the
    log; the default, auto, stays eager (it is off everywhere: the lever plan, sftbench.levers). One process (world
    size 1, no launcher): the engine around the compiled module is the real one, but no gradient is reduced across
    ranks.
    Numerics: on a dropout-free checkpoint of the tiny model (dropout masks are the one thing inductor draws
    differently) the fixed-seed loss curve of each compiled mode matches eager's step by step, within 1e-4 relative
    (fp32; fusion only reorders floating-point sums)."""
    import torch
    from sftbench.pangu import PanguForCausalLM, preset_config

    ckpt = tmp_path / "tiny-nodropout"
    torch.manual_seed(7)
    PanguForCausalLM._from_config(preset_config("pangu-tiny", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
                                  ).save_pretrained(ckpt)
    ds = str(write_overfit_config("z1.json", tmp_path / "cfg.json"))
    curves = {}
    for mode in ("auto", "blocks", "model"):
        run_dir = tmp_path / mode
        # on a cold inductor cache (a fresh machine) the first compiled step alone took ~30 s on 2 CPU cores:
        # more room than _single's default
        p = _single(["--ds", ds, "--data", str(overfit_data), "--run-dir", str(run_dir),
                     "--cache-dir", str(tmp_path / "cache"), "--compile", mode, "--model", str(ckpt),
                     "--seq-len", "64", "--max-steps", "4", "--warmup-steps", "1", "--precision", "fp32",
                     "--seed", "7"], timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        meta, steps, summary = check_schema(read_jsonl(run_dir / "rank0.jsonl"))
        target = "off" if mode == "auto" else mode
        assert meta["optimizations"]["compile"] == target
        assert meta["optimizations"]["compile_why"] == ("auto: CPU run" if mode == "auto" else "asked for")
        assert meta["optimizations"]["compile_mode"] == (None if target == "off" else "default")
        assert summary["status"] == "ok"
        curves[mode] = [s["loss"] for s in steps]
    # The curve moves (the check compares trained steps, not four copies of the initial loss) ...
    assert curves["auto"][-1] < curves["auto"][0] - 0.1, curves["auto"]
    # ... and compiling does not change it.
    assert curves["blocks"] == pytest.approx(curves["auto"], rel=1e-4)
    assert curves["model"] == pytest.approx(curves["auto"], rel=1e-4)


@pytest.mark.slow
def test_a_three_step_run_has_measured_steps_and_names_its_epoch(tmp_path):
    """Three steps with the default warm-up: two warm-up, one measured (the rule is printed); the whole epoch ran,
    so its time is measured and said so; DeepSpeed's scheduler start-up message is not printed; --ds takes a name."""
    data = tmp_path / "24.jsonl"
    data.write_text("\n".join(json.dumps(SAMPLES[i % 4], ensure_ascii=False) for i in range(24)) + "\n")
    run_dir = tmp_path / "run"
    p = _single(["--ds", "z1", "--data", str(data), "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"),
                 "--model", "pangu-tiny", "--seq-len", "32", "--max-steps", "0"])  # 24 / (1 x 8) = 3 steps
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta, steps, summary = check_schema(read_jsonl(run_dir / "rank0.jsonl"))
    assert meta["ds_config_path"].endswith("ds_configs/z1.json") and meta["precision"] == "bf16"
    assert meta["max_steps"] == 3 and meta["warmup_steps"] == 2 and meta["harness"]["warmup_steps"] is None
    assert [s["warmup"] for s in steps] == [True, True, False]
    assert summary["measured_steps"] == 1 and summary["step_s_median"] is not None
    assert summary["epoch_s_measured"] is not None
    assert "note: warm-up: 2 step(s) instead of the default 3, so that 1 of the 3 step(s) are measured" in p.stdout
    assert f"epoch {summary['epoch_s_measured']:.1f} s (measured)" in p.stdout and "estimated" not in p.stdout
    assert "Attempting to get learning rate from scheduler" not in p.stdout + p.stderr


@pytest.mark.slow
def test_no_measured_step_names_only_the_causes_that_apply(tmp_path, overfit_data):
    """Warm-up asked for over every step of a bf16 run: said so, no fp16 wording; --ds none runs fp16 on CPU."""
    common = ["--data", str(overfit_data), "--cache-dir", str(tmp_path / "cache"), "--model", "pangu-tiny",
              "--seq-len", "32", "--max-steps", "2", "--warmup-steps", "2"]
    p = _single(["--ds", "z1", "--run-dir", str(tmp_path / "a"), *common])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "--warmup-steps 2 covers all 2 step(s): none will be measured (as asked" in p.stdout
    assert ("done (no measured step: of the 2 step(s), 2 warm-up (--warmup-steps 2); run more steps or lower "
            "--warmup-steps)") in p.stdout
    assert "fp16" not in p.stdout and "loss scale" not in p.stdout
    # fp16 on CPU: the plain loop runs it (torch has it); DeepSpeed's CPU accelerator is what refuses it
    p = _single(["--ds", "none", "--precision", "fp16", "--run-dir", str(tmp_path / "b"), *common[:-2],
                 "--warmup-steps", "1", "--grad-accum", "1"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # fp16: GradScaler's scale is logged; 2 of the epoch's 4 steps ran: no measured epoch
    meta, steps, summary = check_schema(read_jsonl(tmp_path / "b" / "rank0.jsonl"), META_NULL | NO_DS_NULL,
                                        STEP_NULL - {"loss_scale"}, SUMMARY_NULL | {"epoch_s_measured"})
    assert meta["precision"] == "fp16" and summary["measured_steps"] == 1
    p = _single(["--ds", "z1", "--precision", "fp16", "--run-dir", str(tmp_path / "c"), *common])
    assert p.returncode != 0 and "fp16 with DeepSpeed is not supported on CPU" in p.stderr
    assert "--ds none" in p.stderr and not (tmp_path / "c").exists()
    p = _single(["--ds", "z9", "--run-dir", str(tmp_path / "d"), *common])
    assert p.returncode != 0 and "DeepSpeed config not found: z9 (neither a file nor a name in ds_configs/:" in p.stderr
    assert "z1," in p.stderr


@pytest.mark.slow
def test_a_non_finite_update_stops_the_run_naming_the_key(tmp_path, overfit_data):
    """The shipped ZeRO-1 config (bf16.check_grad_overflow false) with a learning rate that blows the weights up: the
    first NaN loss whose update was applied stops the run with status error and a message naming the step and the
    config key; every step record before it is kept, the NaN one included (as null)."""
    run_dir = tmp_path / "run"
    p = _single(["--ds", str(REPO / "ds_configs" / "z1.json"), "--data", str(overfit_data), "--run-dir",
                 str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--model", "pangu-tiny", "--seq-len", "32",
                 "--grad-accum", "1", "--max-steps", "8", "--warmup-steps", "1", "--precision", "bf16",
                 "--lr", "1e30"])
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-3000:]
    # the NaN step's loss is null and the statistics are what the steps before it gave: asserted below
    meta, steps, summary = check_schema(read_jsonl(run_dir / "rank0.jsonl"), step_null=None, summary_null=None)
    assert meta["ds_config"]["bf16"]["check_grad_overflow"] is False
    assert summary["status"] == "error"
    assert steps[-1]["loss"] is None and not steps[-1]["skipped"] and len(steps) < 8
    assert all(isinstance(s["loss"], float) for s in steps[:-1])
    assert summary["error"].startswith(f"step {steps[-1]['step']}: the loss is nan and the optimizer applied")
    assert "z1.json sets bf16.check_grad_overflow to false" in summary["error"]
    assert "bf16.check_grad_overflow" in p.stderr


def test_a_deepcompile_config_on_cpu_is_refused_naming_the_key(tmp_path, overfit_data):
    """compile.deepcompile in the JSON is CUDA-only in DeepSpeed, which would otherwise train eager and say so in one
    log line: train.py refuses it before it writes anything, naming the file and the key."""
    cfg = json.loads((REPO / "ds_configs" / "z3.json").read_text())
    cfg["compile"] = {"deepcompile": True}
    path = tmp_path / "z3_dc.json"
    path.write_text(json.dumps(cfg))
    p = _single(["--ds", str(path), "--data", str(overfit_data), "--run-dir", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), "--model", "pangu-tiny", "--max-steps", "1"])
    assert p.returncode != 0
    assert f"{path} sets compile.deepcompile, which DeepSpeed runs on CUDA GPUs only" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------- --pack
PACK_ARGS = ["--model", "pangu-tiny", "--seq-len", "128", "--warmup-steps", "1", "--precision", "fp32", "--seed", "7",
             "--data", str(REPO / "data" / "sample_sft.jsonl"), "--pack"]


def _packed_rows(cache_dir, eval_split: float = 0.0):
    """The encoded file and its packed training rows as train.py builds them (the cache the run wrote, same rule)."""
    from sftbench.data import holdout_split, load_or_build_cache
    from sftbench.models.resolve import resolve
    from sftbench.pack import PackedSet, pack

    tok = resolve("pangu-tiny").tokenizer()
    ds = load_or_build_cache(REPO / "data" / "sample_sft.jsonl", tok, 128, cache_dir, local_rank=0)
    train = holdout_split(ds.n, eval_split, 7)[0] if eval_split else range(ds.n)
    return ds, PackedSet(ds, pack(ds.lengths.tolist(), train, 128), tok.pad_id)


@pytest.mark.slow
def test_packed_two_rank_run_logs_real_tokens_and_the_packed_epoch(tmp_path):
    """--pack on 2 ranks (ZeRO-1): 231 samples of the shipped file in fuller rows of 128 tokens, each step's real
    tokens exactly those of the rows it ran (rank 0's and rank 1's order), the packed epoch's steps and the loss
    falling."""
    from sftbench.data import ShardedOrder

    ds = str(write_overfit_config("z1.json", tmp_path / "cfg.json"))  # lr 3e-3, GA 2: 4 rows per step
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    p = run(launch_cmd(2, "--ds", ds, "--run-dir", str(run_dir), "--cache-dir", str(cache), "--max-steps", "8",
                       *PACK_ARGS), cpu_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data, packed = _packed_rows(cache)
    assert data.n == 231 and packed.packing.real_share > 0.9  # one sample per row: 71% real at 128 tokens
    rows_per_epoch = -(-packed.n // 4)
    order = [ShardedOrder(packed.n, r, 2, 7).take(8 * 2) for r in (0, 1)]
    for rank in (0, 1):
        # 8 steps of a longer epoch: its time is not measured
        meta, steps, summary = check_schema(read_jsonl(run_dir / f"rank{rank}.jsonl"),
                                            summary_null=SUMMARY_NULL | {"epoch_s_measured"})
        assert meta["packing"] == {"packed": True, "rows": packed.n, "samples": 231,
                                   "real_share": round(packed.packing.real_share, 6), "steps_per_epoch_unpacked": 58}
        assert meta["steps_per_epoch"] == summary["steps_per_epoch"] == rows_per_epoch  # fewer than 58
        assert meta["dataset_samples"] == 231
        assert meta["optimizations"]["pad_mask"] is True and "packed rows" in meta["optimizations"]["pad_mask_why"]
        for k, s in enumerate(steps):
            rows = [i for r in (0, 1) for i in order[r][2 * k:2 * k + 2]]
            assert s["real_tokens_per_s"] * s["step_s"] == pytest.approx(
                int(packed.attention_mask[rows].sum()), rel=1e-9)
            assert s["tokens_per_s"] * s["step_s"] == pytest.approx(4 * 128, rel=1e-9)
        assert summary["status"] == "ok" and summary["final_loss"] < summary["first_loss"] - 1.0, summary
    assert f"packed: 231 samples into {packed.n} rows of 128 tokens" in p.stdout
    assert f"{rows_per_epoch} steps/epoch (packed; 58 unpacked)" in p.stdout
    assert "tok/s (" in p.stdout and " real)" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["z3_offload_param", "none"])
def test_packed_rows_run_under_zero3_and_the_plain_loop(cfg, tmp_path):
    """--pack under ZeRO-3 with its parameters offloaded (gathered inside the forward, where the packed rows'
    block-diagonal mask meets DeepSpeed's module hooks) and under the plain loop, with evaluation (one sample per
    row) after the last step: two steps, the rows' real tokens counted. (ZeRO-1: the two tests below; the other
    stages differ from ZeRO-1 after the backward, where a packed row is an ordinary row.)"""
    from sftbench.data import ShardedOrder

    ds = "none" if cfg == "none" else str(write_overfit_config(f"{cfg}.json", tmp_path / f"{cfg}.json"))
    extra = ["--grad-accum", "2", "--lr", "3e-3", "--lr-warmup-steps", "1"] if cfg == "none" else []
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    p = run(launch_cmd(2, "--ds", ds, "--run-dir", str(run_dir), "--cache-dir", str(cache), "--max-steps", "2",
                       "--eval-split", "0.05", *PACK_ARGS, *extra), cpu_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = read_jsonl(run_dir / "rank0.jsonl")
    meta, summary, steps = recs[0], recs[-1], [r for r in recs if r["type"] == "step"]
    _, packed = _packed_rows(cache, eval_split=0.05)
    assert meta["packing"]["packed"] is True and meta["packing"]["samples"] == 219  # 12 of 231 held out
    assert meta["packing"]["rows"] == packed.n and summary["status"] == "ok" and len(steps) == 2
    first = [i for r in (0, 1) for i in ShardedOrder(packed.n, r, 2, 7).take(2)]  # step 1: two rows per rank
    assert steps[0]["real_tokens_per_s"] * steps[0]["step_s"] == pytest.approx(
        int(packed.attention_mask[first].sum()), rel=1e-9)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["eval_samples"] for e in evals] == [12] and evals[0]["eval_loss"] > 0


@pytest.mark.slow
def test_packed_resume_continues_the_same_rows(tmp_path):
    """A packed run saved at step 3 and resumed runs steps 4-6 on the same rows with the same engine state: the same
    losses as the run that went through. Refused when resumed unpacked (the data order would not continue)."""
    ds = str(write_overfit_config("z1.json", tmp_path / "cfg.json"))
    base = ["--ds", ds, "--cache-dir", str(tmp_path / "cache"), "--max-steps", "6", *PACK_ARGS]
    whole = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "a"), "--save", str(tmp_path / "ck"),
                           "--save-every", "3"), cpu_env())
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "b"), "--resume",
                             str(tmp_path / "ck" / "checkpoint-3")), cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = [r for r in read_jsonl(tmp_path / "a" / "rank0.jsonl") if r["type"] == "step"]
    b = [r for r in read_jsonl(tmp_path / "b" / "rank0.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a[3:]], rel=1e-5, abs=1e-5)
    unpacked = run(launch_cmd(2, *[x for x in base if x != "--pack"], "--run-dir", str(tmp_path / "c"), "--resume",
                              str(tmp_path / "ck" / "checkpoint-3")), cpu_env())
    assert unpacked.returncode != 0
    assert "packed_rows" in unpacked.stderr and "checkpoint-3" in unpacked.stderr
