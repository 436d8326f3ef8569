"""sftbench.sweep: the plan, failure classification, timeouts, resume, the time budget; one real CPU epoch (slow)."""
from __future__ import annotations

import json
import os
import sys
import shutil
import time
from pathlib import Path

import pytest

from conftest import REPO
from sftbench import runlog, sweep

H100 = [sweep.Gpu(0, "NVIDIA H100 80GB HBM3", 81559.0, "9.0", "GPU-aaaa")]
V100x3 = [sweep.Gpu(i, "Tesla V100-SXM2-16GB", 16384.0, "7.0", f"GPU-v{i}") for i in range(3)]
REF = sweep.read_reference_map()


def plan(gpus, argv=()):
    args = sweep.build_parser().parse_args(["plan", *argv])
    return sweep.resolve(args, gpus=gpus)


# ============================================================================================== reference map

def test_reference_map_is_read_from_the_readme():
    assert len(REF) == 41
    by_row = {r.row: r for r in REF}
    assert (by_row[1].model, by_row[1].precision, by_row[1].file) == ("pangu-350m", "fp32", None)
    assert (by_row[3].model, by_row[3].precision, by_row[3].file) == ("pangu-350m", "fp16", "z0")
    assert (by_row[28].model, by_row[28].precision, by_row[28].file) == ("pangu-2.6b", "bf16", None)
    assert (by_row[41].precision, by_row[41].file) == ("bf16", "z3_offload_param_overlap_live2e8")
    files = {p.stem for p in (REPO / "ds_configs").glob("*.json")}
    # every shipped config is some reference row, except the documented speed variant beyond the reference
    assert {r.file for r in REF if r.file} == files - {"z2_offload_5e8_acc32"}


def test_epoch_plan_runs_one_full_epoch_under_its_own_name():
    """--epoch: every entry runs train.py --max-steps 0 (one epoch) in <run>__epoch, with a long default timeout."""
    short = plan(H100, ["--models", "pangu-350m", "--configs", "z0", "--precisions", "bf16"])
    res = plan(H100, ["--models", "pangu-350m", "--configs", "z0", "--precisions", "bf16", "--epoch"])
    assert [e.run for e in res.entries] == [short.entries[0].run + "__epoch"]
    e = res.entries[0]
    assert e.max_steps == 0 and e.warmup_steps == short.entries[0].warmup_steps
    assert res.timeout == sweep.EPOCH_TIMEOUT_S and short.timeout < res.timeout
    cmd = sweep.train_command(e, Path("/tmp/x"), {})
    assert cmd[cmd.index("--max-steps") + 1] == "0"
    assert plan(H100, ["--configs", "z0", "--epoch", "--timeout", "60"]).timeout == 60


def test_reference_precisions():
    assert sweep.reference_precisions(REF, "pangu-350m", "none") == (["fp32", "fp16"], [1, 2])
    assert sweep.reference_precisions(REF, "pangu-2.6b", "z0") == (["fp16", "bf16"], [18, 29])
    # a combination the reference never ran: the config's precisions, no row numbers
    assert sweep.reference_precisions(REF, "pangu-350m", "z3_ag5e8") == (["bf16"], [])
    assert sweep.resolve_precisions("ref+bf16", ["fp16"], "cuda", True) == ["fp16", "bf16"]
    assert sweep.resolve_precisions("ref", ["fp16"], "cpu", True) == ["fp32"]
    assert sweep.resolve_precisions("ref+bf16", ["bf16"], "cuda", False) == ["fp16"]
    assert sweep.resolve_precisions("bf16", ["fp16"], "cuda", True) == ["bf16"]
    assert sweep.resolve_precisions("fp32,bf16", [], "cuda", True) == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        sweep.resolve_precisions("int8", [], "cuda", True)


# ============================================================================================== plans

def test_plan_one_gpu():
    res = plan(H100)
    es = res.entries
    assert res.accelerator == "cuda" and res.sweep == "h100x1"
    assert all(e.num_gpus == 1 and e.accelerator == "cuda" and e.data == sweep.BENCH_DATA for e in es)
    assert all(e.run.endswith("__g1") for e in es)
    names = [e.run for e in es]
    assert len(names) == len(set(names))
    assert names[:4] == ["pangu-350m__none__fp32__g1", "pangu-350m__none__fp16__g1", "pangu-350m__none__bf16__g1",
                         "pangu-350m__z0__fp16__g1"]
    # model-major order, every config of ds_configs/ for both models, reference precision first then bf16
    models = [e.model for e in es]
    assert models == sorted(models, key=["pangu-350m", "pangu-2.6b"].index)
    cfgs = {p.stem for p in (REPO / "ds_configs").glob("*.json")} | {"none"}
    for m in ("pangu-350m", "pangu-2.6b"):
        assert {e.config_name for e in es if e.model == m} == cfgs
        for c in cfgs:
            precs = [e.precision for e in es if e.model == m and e.config_name == c]
            ref, _ = sweep.reference_precisions(REF, m, c)
            assert precs[:len(ref)] == ref and "bf16" in precs and len(precs) == len(set(precs))
    e = next(x for x in es if x.run == "pangu-2.6b__z2_offload_5e8__bf16__g1")
    assert e.ref_rows == [33] and e.ds_config == "ds_configs/z2_offload_5e8.json" and e.ds_config_sha1
    e = next(x for x in es if x.run == "pangu-350m__z2_offload_5e8__fp16__g1")
    assert e.ref_rows == []  # the reference ran this config on 3 GPUs only: no 1-GPU row to compare with
    assert (e.max_steps, e.warmup_steps, e.seq_len) == (10 + 17, 3, 512)  # fp16: plus the loss-scale warm-up
    e = next(x for x in es if x.run == "pangu-350m__z2_offload_5e8__bf16__g1")
    assert (e.max_steps, e.warmup_steps, e.seq_len) == (10, 3, 512)


def test_plan_three_gpus_without_bf16():
    res = plan(V100x3)
    es = res.entries
    assert res.sweep == "v100x3"
    assert all(e.num_gpus == 3 and e.run.endswith("__g3") for e in es)
    assert not any(e.precision == "bf16" for e in es)  # V100: bf16 becomes fp16
    # bf16-only reference rows run in fp16 there, once
    live = [e for e in es if e.config_name == "z3_offload_param_overlap_live2e8" and e.model == "pangu-2.6b"]
    assert [e.precision for e in live] == ["fp16"]
    none = [e.precision for e in es if e.config_name == "none" and e.model == "pangu-350m"]
    assert none == ["fp32", "fp16"]
    e = next(x for x in es if x.run == "pangu-350m__z2_offload_5e8__fp16__g3")
    assert e.ref_rows == [7]
    # fp16 DeepSpeed runs get the loss-scale warm-up (2^32 down to 2^16, plus the hysteresis step) on top
    assert e.max_steps == 10 + 17 and e.warmup_steps == 3
    assert [x.max_steps for x in es if x.config_name == "none" and x.model == "pangu-350m"] == [10, 10]


def test_loss_scale_warmup_steps(tmp_path):
    def cfg(**fp16):
        p = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        p.write_text(json.dumps({"fp16": {"enabled": True, **fp16}}))
        return str(p)
    assert sweep.loss_scale_warmup_steps("ds_configs/z0.json", "fp16") == 17
    assert sweep.loss_scale_warmup_steps("ds_configs/z0.json", "bf16") == 0
    assert sweep.loss_scale_warmup_steps(None, "fp16") == 0                       # --ds none: torch's GradScaler
    assert sweep.loss_scale_warmup_steps(cfg(), "fp16") == 1                      # DeepSpeed's defaults: 2^16, 2
    assert sweep.loss_scale_warmup_steps(cfg(initial_scale_power=20, hysteresis=1), "fp16") == 4
    assert sweep.loss_scale_warmup_steps(cfg(loss_scale=128, initial_scale_power=32), "fp16") == 0  # static
    assert sweep.loss_scale_warmup_steps(str(tmp_path / "missing.json"), "fp16") == 0
    es = sweep.build_plan(models=["pangu-350m"], configs=["z0"], precisions="fp16", gpu_counts=[3],
                          accelerator="cuda", steps=0, warmup=2, data="d.jsonl", seq_len=512, bf16_ok=True, ref=REF)
    assert [e.max_steps for e in es] == [0]  # 0 = one full epoch: nothing to add


def test_reference_rows_match_gpu_count_then_precision():
    # 3 GPUs: the reference's 3xV100 fp16 row, also for a bf16 run (the precision columns show the difference)
    assert sweep.reference_rows(REF, "pangu-2.6b", "z1", "bf16", 3) == [19]
    assert sweep.reference_rows(REF, "pangu-2.6b", "z1", "fp16", 3) == [19]
    # 1 GPU: the 1xA100 bf16 row, never the 3-GPU one
    assert sweep.reference_rows(REF, "pangu-2.6b", "z1", "bf16", 1) == [30]
    assert sweep.reference_rows(REF, "pangu-2.6b", "none", "fp16", 1) == [17, 27]
    assert sweep.reference_rows(REF, "pangu-2.6b", "none", "bf16", 1) == [28]
    # no reference row with that GPU count, or a config it never ran for that model
    assert sweep.reference_rows(REF, "pangu-2.6b", "z1", "bf16", 2) == []
    assert sweep.reference_rows(REF, "pangu-350m", "z3_ag5e8", "bf16", 3) == []


def test_plan_overrides_and_env(monkeypatch):
    monkeypatch.setenv("SFTBENCH_STEPS", "7")
    monkeypatch.setenv("SFTBENCH_GPUS", "1,3")
    res = plan(V100x3, ["--models", "pangu-350m", "--configs", "z2_offload*,none", "--precisions", "ref",
                        "--extra-args=--compile --seed 3"])
    es = res.entries
    assert res.sweep == "v100x1-3"
    assert {e.max_steps for e in es if e.config_name == "none" or e.precision != "fp16"} == {7}
    assert {e.max_steps for e in es if e.config_name != "none" and e.precision == "fp16"} == {7 + 17}
    assert {e.warmup_steps for e in es} == {3}
    assert [e.num_gpus for e in es] == sorted(e.num_gpus for e in es) and {e.num_gpus for e in es} == {1, 3}
    assert [e.config_name for e in es if e.num_gpus == 1] == [
        "none", "none", "z2_offload_2e8", "z2_offload_5e8", "z2_offload_1e9", "z2_offload_5e9",
        "z2_offload_overlap_5e8", "z2_offload_5e8_acc32"]
    assert es[0].extra_args == ["--compile", "--seed", "3"]
    with pytest.raises(SystemExit):
        plan(V100x3, ["--configs", "z9*"])


def test_cpu_default_plan():
    res = plan([])
    es = res.entries
    assert res.accelerator == "cpu" and res.sweep == "cpu"
    assert {e.model for e in es} == {"pangu-tiny"}
    assert [e.config_name for e in es][::2] == list(sweep.CPU_CONFIGS)
    assert all(e.precision in ("fp32", "bf16") for e in es)  # fp16 is refused on CPU
    assert all(e.num_gpus == 2 and e.run.endswith("__cpu2") and e.data == sweep.SAMPLE_DATA for e in es)
    assert all(e.max_steps <= 5 and e.seq_len == 128 for e in es)


def test_train_command(monkeypatch):
    e = plan(H100).entries[4]
    cmd = sweep.train_command(e, REPO / "runs" / "s" / e.run, {})
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "1"
    i = cmd.index("train.py")
    assert cmd[i + 1:i + 5] == ["--ds", "ds_configs/z0.json", "--model", "pangu-350m"]
    assert cmd[cmd.index("--run-dir") + 1] == f"runs/s/{e.run}"  # relative: no machine paths in the logs
    # the launcher ignores CUDA_VISIBLE_DEVICES when --num_gpus is given: the sweep passes --include instead
    cmd = sweep.train_command(e, REPO / "x", {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert "--num_gpus" not in cmd and cmd[cmd.index("--include") + 1] == "localhost:2"
    cpu = plan([]).entries[0]
    assert sweep.run_env(cpu, {})["DS_ACCELERATOR"] == "cpu"
    none = sweep.train_command(cpu, REPO / "x", {})
    assert none[none.index("--ds") + 1] == "none"


def test_one_machine_plan_and_command_are_unchanged():
    """Without --hostfile the sweep launches on this host exactly as before the several-nodes options."""
    e = plan(H100).entries[4]
    assert e.num_nodes == 1 and e.hostfile is None and e.world_size == 1 and e.run.endswith("__g1")
    assert plan(H100).sweep == "h100x1" and plan([]).sweep == "cpu"
    cmd = sweep.train_command(e, REPO / "x", {})
    assert not {"--hostfile", "--num_nodes", "--master_addr", "--launcher", "--no_ssh"} & set(cmd)
    assert cmd[4:8] == ["--master_port", cmd[5], "--num_gpus", "1"]
    # a run directory written before the node fields existed is still the same run (resume skips it)
    old = {k: v for k, v in e.to_json().items() if k not in ("num_nodes", "hostfile", "master_addr", "launcher")}
    assert sweep.PlanEntry.from_json(old).key() == e.key()


def test_hostfile_plan_passes_nodes_to_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=4\n")
    h100x8 = [sweep.Gpu(i, "NVIDIA H100 80GB HBM3", 81559.0, "9.0", f"GPU-{i}") for i in range(8)]
    res = plan(h100x8, ["--hostfile", str(hf), "--num-nodes", "2", "--models", "pangu-2.6b", "--configs", "z1",
                        "--precisions", "bf16", "--master-addr", "10.0.0.1"])
    assert res.sweep == "h100x8-2nodes" and res.nodes.num_nodes == 2
    (e,) = res.entries
    assert (e.num_gpus, e.num_nodes, e.world_size, e.run) == (8, 2, 16, "pangu-2.6b__z1__bf16__n2g8")
    cmd = sweep.train_command(e, REPO / "x", {})
    i = cmd.index("--hostfile")
    assert cmd[i:i + 8] == ["--hostfile", str(hf), "--num_nodes", "2", "--num_gpus", "8", "--master_addr",
                            "10.0.0.1"]
    assert "--include" not in cmd and "--launcher" not in cmd and cmd.index("train.py") > i
    # memory: the job's host figure and one node's share of it (8 of the 16 ranks), fits judged per node
    pred = sweep.predict_entry(e, h100x8)
    assert pred["inputs"]["world_size"] == 16
    # (the per-rank figure is rounded to 0.1 MiB, so the products may differ from the sums by that much per rank)
    assert pred["host_mib_per_node"] == pytest.approx(8 * pred["host_mib_per_rank"], abs=8 * 0.05)
    assert pred["host_mib"] == pytest.approx(16 * pred["host_mib_per_rank"], abs=16 * 0.05)
    # every host of the hostfile by default; a backend passed through as given
    res = plan(h100x8, ["--hostfile", str(hf), "--gpus", "4", "--launcher", "slurm"])
    assert {e.num_nodes for e in res.entries} == {3}
    cmd = sweep.train_command(res.entries[0], REPO / "x", {})
    assert cmd[cmd.index("--launcher") + 1] == "slurm" and "--master_addr" not in cmd
    # a hostfile with one node keeps the names of one machine, and still goes to the launcher as asked
    e1 = plan(h100x8, ["--hostfile", str(hf), "--num-nodes", "1", "--configs", "z0"]).entries[0]
    assert e1.run.endswith("__g8") and sweep.train_command(e1, REPO / "x", {}).count("--hostfile") == 1


@pytest.mark.parametrize("argv, match", [
    (["--num-nodes", "2"], "--num-nodes 2 needs --hostfile"),
    (["--master-addr", "10.0.0.1"], "--master-addr applies only with --hostfile"),
    (["--hostfile", "{hf}", "--num-nodes", "3"], "--num-nodes 3: hostfile .* lists 2 host"),
    (["--hostfile", "{hf}", "--gpus", "8"], r"line 2: host 'gpu-b' has 4 slot\(s\), 8 rank\(s\) per node"),
    (["--hostfile", "{hf}.missing"], "cannot read it"),
])
def test_bad_node_options_are_refused(tmp_path, argv, match):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=8\ngpu-b slots=4\n")
    h100x8 = [sweep.Gpu(i, "NVIDIA H100 80GB HBM3", 81559.0, "9.0", f"GPU-{i}") for i in range(8)]
    with pytest.raises(SystemExit, match=match):
        plan(h100x8, [a.replace("{hf}", str(hf)) for a in argv])


def test_visible_devices_do_not_reach_other_nodes(tmp_path, monkeypatch):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=1\ngpu-b slots=1\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES is set, but it does not reach the other nodes"):
        plan(H100, ["--hostfile", str(hf)])
    assert plan([], ["--hostfile", str(hf), "--gpus", "1"]).entries[0].num_nodes == 2  # CPU runs: not used


def test_sweep_report_reads_other_nodes_folders(tmp_path, monkeypatch, capsys):
    from sftbench import report
    seen = []
    monkeypatch.setattr(report, "main", lambda argv: seen.append(argv) or 0)
    (tmp_path / "runs" / "cpu").mkdir(parents=True)
    assert sweep.main(["report", "--cpu", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path),
                       "--node-dir", "b/runs/cpu", "--node-dir", "c/runs/cpu"]) == 0
    assert seen[0][1:] == ["--out", str(tmp_path / "cpu"), "--node-dir", "b/runs/cpu", "--node-dir", "c/runs/cpu"]
    # run_all.sh reads the report's folders from `dirs`: one machine's line as before, other nodes' copies after it
    assert sweep.main(["dirs", "--cpu", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'runs' / 'cpu'}\t{tmp_path / 'cpu'}\n"
    assert sweep.main(["dirs", "--cpu", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path),
                       "--node-dir", "b/runs/cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\t")[2:] == ["b/runs/cpu"]


def test_model_shape_without_torch():
    s = sweep.model_shape("pangu-2.6b")
    assert (s["hidden"], s["n_layers"], s["n_heads"], s["vocab"]) == (2560, 32, 32, 40000)
    with pytest.raises(ValueError):
        sweep.model_shape("no-such-model")


# ============================================================================================== running (fake train)

OK_SCRIPT = """
import sys
from sftbench.runlog import RunLog
d = sys.argv[1]
for rank in (0, 1):
    log = RunLog(d, rank)
    log.meta(run="fake", world_size=2, rank=rank, precision="fp32", micro_batch=1, grad_accum=8, steps_per_epoch=10,
             warmup_steps=1, device="cpu", model="pangu-tiny")
    for i in range(3):
        log.step(step=i + 1, step_s=0.5, warmup=i < 1, loss=1.0, host_rss_mib=100.0)
    log.summary(status="ok", steps=3, measured_steps=2, step_s_median=0.5, epoch_s_est=5.0, host_rss_mib_peak=100.0)
print("fake train: ok")
"""
OOM_SCRIPT = ("import sys; print('step 1/4'); print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
              "20.00 MiB', file=sys.stderr); sys.exit(1)")
HANG_SCRIPT = """
import subprocess, sys, time
from sftbench.runlog import RunLog
log = RunLog(sys.argv[1], 0)
log.meta(run="hang", world_size=1, rank=0, warmup_steps=0, steps_per_epoch=100)
log.step(step=1, step_s=0.25, warmup=False, loss=2.0, host_rss_mib=50.0)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1] + "/child.pid", "w").write(str(child.pid))
print("hanging", flush=True)
time.sleep(120)
"""


def fake(scripts: dict[str, str]):
    """command_fn for run_sweep: the script by config name (default OK)."""
    def command(entry, run_dir, env):
        return [sys.executable, "-c", scripts.get(entry.config_name, OK_SCRIPT), str(run_dir)]
    return command


def cpu_entries(n: int = 3, steps: int = 4) -> list[sweep.PlanEntry]:
    args = sweep.build_parser().parse_args(["plan", "--configs", "none,z0,z2_offload_5e8", "--precisions", "fp32",
                                            "--steps", str(steps)])
    return sweep.resolve(args, gpus=[]).entries[:n]


def quiet(*_a, **_k):
    pass


def _status(rd: Path) -> dict:
    return runlog.load_run(rd).final_summary()


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


def test_failure_becomes_oom_and_the_sweep_goes_on(tmp_path):
    es = cpu_entries()
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=fake({"none": OOM_SCRIPT}), say=quiet)
    assert [o.status for o in out] == ["oom", "ok", "ok"]
    rd = tmp_path / es[0].run
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "oom" and s["synthesized"] is True and "CUDA out of memory" in s["error"]
    # The script wrote no rank file: no step, no statistic, no loss; only the process's wall time is known.
    assert (s["type"], s["steps"], s["measured_steps"], s["step_s_median"], s["final_loss"], s["saved"]) == (
        "summary", 0, 0, None, None, None)
    assert 0 < s["wall_s"] < 60  # the sweep's timeout_s
    assert "CUDA out of memory" in (rd / "console.log").read_text()
    assert json.loads((rd / "plan_entry.json").read_text())["run"] == es[0].run
    assert "gpu_mib" in json.loads((rd / "predicted.json").read_text())
    # train.py's own summary is kept, no summary.json beside it
    assert not (tmp_path / es[1].run / "summary.json").exists()
    plan_json = json.loads((tmp_path / "plan.json").read_text())
    assert plan_json["sweep"] == "t" and [e["run"] for e in plan_json["entries"]] == [e.run for e in es]
    for k in ("run", "model", "ds_config", "precision", "num_gpus", "max_steps", "warmup_steps", "accelerator"):
        assert k in plan_json["entries"][0]


def test_timeout_kills_the_process_group(tmp_path):
    es = cpu_entries(1)
    t0 = time.time()
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=3, command_fn=fake({"none": HANG_SCRIPT}), say=quiet)
    assert time.time() - t0 < 60
    assert out[0].status == "timeout"
    rd = tmp_path / es[0].run
    s = _status(rd)
    assert s["status"] == "timeout" and s["synthesized"] and "3 s" in s["error"]
    assert s["steps"] == 1 and s["step_s_median"] == 0.25  # statistics from the steps it logged
    child = int((rd / "child.pid").read_text())
    for _ in range(50):
        if _dead(child):
            break
        time.sleep(0.1)
    assert _dead(child), "a grandchild of the timed-out run survived"


KILLME_SCRIPT = """
import os, sys, time
from sftbench.runlog import RunLog
log = RunLog(sys.argv[1], 0)
log.meta(run="killme", world_size=1, rank=0, warmup_steps=0, steps_per_epoch=100, pid=os.getpid())
log.step(step=1, step_s=0.25, warmup=False, loss=2.0, host_rss_mib=50.0, host_used_mib=1.0)
open(sys.argv[1] + "/self.pid", "w").write(str(os.getpid()))
time.sleep(120)
"""


def test_a_run_killed_from_outside_is_killed_not_oom(tmp_path):
    """SIGKILL from outside the sweep (a user, a scheduler), no memory evidence: ``killed``, never ``oom``."""
    import signal
    import threading
    es = cpu_entries(1)
    rd = tmp_path / es[0].run

    def killer():
        for _ in range(300):
            if (rd / "self.pid").is_file() and (rd / "self.pid").read_text():
                os.kill(int((rd / "self.pid").read_text()), signal.SIGKILL)
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=fake({"none": KILLME_SCRIPT}), say=quiet)
    t.join()
    assert out[0].status == "killed"
    s = _status(rd)
    assert s["status"] == "killed" and s["synthesized"] and "signal 9" in s["error"] and s["steps"] == 1


TERM_SCRIPT = """
import pathlib, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pathlib.Path(sys.argv[1], "child.pid").write_text(str(child.pid))
def on_term(signum, frame):  # what DeepSpeed's multi-node launcher does: stop the ranks on every node, then exit
    pathlib.Path(sys.argv[1], "term").write_text("stopped the nodes")
    sys.exit(1)
signal.signal(signal.SIGTERM, on_term)
time.sleep(120)
"""


@pytest.mark.parametrize("nodes_stop_s, told", [(0.0, False), (20.0, True)])
def test_a_run_on_several_nodes_is_stopped_through_its_launcher(tmp_path, nodes_stop_s, told):
    """On one machine the sweep SIGKILLs the run's group at once; on several nodes the launcher gets SIGTERM first
    (only it can reach the ranks on the other nodes), then the group is killed all the same."""
    rc, timed_out, wall, reason = sweep.launch([sys.executable, "-c", TERM_SCRIPT, str(tmp_path)], dict(os.environ),
                                               tmp_path, timeout_s=3, nodes_stop_s=nodes_stop_s)
    assert timed_out and reason == "timeout" and wall < 30
    assert (tmp_path / "term").exists() is told
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        if _dead(child):
            break
        time.sleep(0.1)
    assert _dead(child)


def test_resume_force_and_retry(tmp_path):
    es = cpu_entries()
    cmd = fake({"z0": OOM_SCRIPT})
    sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=cmd, say=quiet)
    mtime = (tmp_path / es[0].run / "rank0.jsonl").stat().st_mtime_ns
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=cmd, say=quiet)
    assert [o.action for o in out] == ["skipped-ok", "skipped-failed", "skipped-ok"]
    assert (tmp_path / es[0].run / "rank0.jsonl").stat().st_mtime_ns == mtime
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=fake({}), say=quiet, retry_failed=True)
    assert [o.action for o in out] == ["skipped-ok", "ran", "skipped-ok"] and out[1].status == "ok"
    assert not (tmp_path / es[1].run / "summary.json").exists()  # the old synthesized summary went with the retry
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=fake({}), say=quiet, force=True)
    assert [o.action for o in out] == ["ran"] * 3
    # a changed plan entry (other step count) is a different run: re-run without --force
    changed = cpu_entries(steps=6)
    assert changed[0].run == es[0].run
    out = sweep.run_sweep(changed, tmp_path, sweep="t", timeout_s=60, command_fn=fake({}), say=quiet)
    assert [o.action for o in out] == ["ran"] * 3


def test_restore_rebuilds_the_runs_from_the_results_folder_and_the_sweep_resumes(tmp_path, monkeypatch, capsys):
    """runs/ is not committed: in a new checkout `sweep restore` rebuilds the run folders from results/<sweep>/ (plan
    entries, metas, summaries, sweep_info), the next batch skips what ended ok or failed and runs only the rest,
    and the report keeps the restored rows as they were."""
    import csv
    from sftbench import report
    monkeypatch.setattr(sweep, "MIN_BUDGET_LEFT_S", 0.5)
    es = cpu_entries()
    runs, results = tmp_path / "runs", tmp_path / "results"
    sweep.write_sweep_info(runs / "t", "t", [], "cpu", "sweep --first-batch")
    sweep.run_sweep(es[:2], runs / "t", sweep="t", timeout_s=60, command_fn=fake({"z0": OOM_SCRIPT}), say=quiet)
    report.make_report(runs / "t", results / "t")
    before = list(csv.DictReader(open(results / "t" / "results.csv", encoding="utf-8")))
    assert "uuid" not in (results / "t" / "sweep_info.json").read_text()
    shutil.rmtree(runs)  # a new checkout: only results/ came with it
    rc = sweep.main(["restore", "--cpu", "--sweep-name", "t", "--runs-dir", str(runs), "--results-dir", str(results)])
    assert rc == 0 and "restored 2 run(s)" in capsys.readouterr().out
    assert sweep.entry_state(runs / "t" / es[0].run, es[0])[0] == "ok"
    assert sweep.entry_state(runs / "t" / es[1].run, es[1])[0] == "failed"  # the sweep's summary.json came back
    assert not list((runs / "t" / es[0].run).glob("console.log"))
    out = sweep.run_sweep(es, runs / "t", sweep="t", timeout_s=60, command_fn=fake({}), say=quiet)
    assert [o.action for o in out] == ["skipped-ok", "skipped-failed", "ran"]
    report.make_report(runs / "t", results / "t")
    after = {r["run"]: r for r in csv.DictReader(open(results / "t" / "results.csv", encoding="utf-8"))}
    assert len(after) == 3
    for row in before:  # the restored rows, as the first report had them
        assert {k: v for k, v in after[row["run"]].items()} == row, row["run"]
    assert "sweep --first-batch" in (results / "t" / "results.md").read_text(encoding="utf-8")
    # restoring again touches nothing; a results folder without summaries.jsonl is an error naming it
    assert sweep.restore_runs(results / "t", runs / "t", "t") == []
    with pytest.raises(SystemExit, match="summaries.jsonl not found"):
        sweep.restore_runs(tmp_path / "nowhere", runs / "t", "t")


def test_budget_leaves_the_rest_queued_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "MIN_BUDGET_LEFT_S", 0.5)
    es = cpu_entries()
    slow = "import time; time.sleep(30)"
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, max_minutes=2 / 60,
                          command_fn=fake({"none": slow}), say=quiet)
    assert out[0].status == "interrupted" and [o.action for o in out[1:]] == ["queued", "queued"]
    assert "max-minutes" in _status(tmp_path / es[0].run)["error"]
    out = sweep.run_sweep(es, tmp_path, sweep="t", timeout_s=60, command_fn=fake({}), say=quiet)
    assert [(o.action, o.status) for o in out] == [("ran", "ok")] * 3  # interrupted runs are simply re-run


def test_cli_name_and_dry_run(capsys):
    assert sweep.main(["name", "--cpu"]) == 0
    assert capsys.readouterr().out.strip() == "cpu"
    assert sweep.main(["run", "--cpu", "--dry-run", "--sweep-name", "x", "--runs-dir", "/nonexistent-dir"]) == 0
    txt = capsys.readouterr().out
    assert "pangu-tiny__z0__bf16__cpu2" in txt and "CPU" in txt
    assert not Path("/nonexistent-dir").exists()


# ============================================================================================== real train.py

@pytest.mark.slow
def test_epoch_estimate_matches_a_measured_epoch(tmp_path):
    """A full epoch on CPU (pangu-tiny, z0, 2 ranks, grad accum 8, seq 64): epoch_s_est is steps per epoch x the
    median step, the measured epoch is the clock at the epoch's last step, and the report compares the two. Goes
    through the sweep with the real launcher, then the report. (How close the two are is the machine's business:
    on a busy 2-core machine a few slow steps move the measured epoch, not the median.)"""
    if not (REPO / "train.py").is_file():
        pytest.skip("train.py not there yet")
    lines = [ln for ln in (REPO / "data" / "sample_sft.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    data = tmp_path / "d320.jsonl"
    data.write_text("\n".join(lines[i % len(lines)] for i in range(320)) + "\n", encoding="utf-8")
    # 320 samples / (micro batch 1 x 2 ranks x grad accum 8) = 20 steps per epoch
    # a short run, then the same run for one full epoch (--max-steps 0, as sweep --epoch plans it)
    kw = dict(model="pangu-tiny", ds_config="ds_configs/z0.json", precision="fp32", num_gpus=2, warmup_steps=2,
              accelerator="cpu", data=str(data), seq_len=64)
    short = sweep.PlanEntry(run="pangu-tiny__z0__fp32__cpu2", max_steps=5, **kw)
    e = sweep.PlanEntry(run=short.run + sweep.EPOCH_SUFFIX, max_steps=0, **kw)
    out = sweep.run_sweep([short, e], tmp_path / "runs", sweep="epoch", timeout_s=400, say=quiet)
    rd = tmp_path / "runs" / e.run
    console = (rd / "console.log").read_text(errors="replace")
    assert [o.status for o in out] == ["ok", "ok"], console[-3000:]
    s = runlog.load_run(rd).summary[0]
    assert s["steps_per_epoch"] == 20 and s["steps"] == 20
    assert s["epoch_s_measured"] is not None, "train.py did not record the measured epoch"
    steps = runlog.load_run(rd).steps[0]
    assert s["epoch_s_est"] == pytest.approx(20 * s["step_s_median"], rel=1e-9)
    assert s["epoch_s_measured"] == steps[19]["elapsed_s"] and steps[19]["step"] == 20
    # the measured epoch holds the 20 step times and little else: the estimate is not compared with a stray figure
    assert sum(r["step_s"] for r in steps) <= s["epoch_s_measured"] < sum(r["step_s"] for r in steps) + 5.0
    from sftbench import report
    res = report.make_report(tmp_path / "runs", tmp_path / "results")
    assert res["rows"] == 2 and res["failures"] == 0
    md = (tmp_path / "results" / "results.md").read_text()
    assert "CPU" in md and "1*CPU" not in md and "2*CPU" in md
    check = md.split("## Epoch check")[1].split("##")[0]
    assert "`pangu-tiny__z0__fp32__cpu2`: one full epoch (20 steps) took" in check
    assert "the short run estimated" in check and "%" in check


def test_plan_json_merges_batches_in_order(tmp_path):
    es = cpu_entries()
    sweep._merge_plan(tmp_path / "plan.json", "t", es[:2])
    sweep._merge_plan(tmp_path / "plan.json", "t", [es[2], es[0]])
    runs = [e["run"] for e in json.loads((tmp_path / "plan.json").read_text())["entries"]]
    assert runs == [es[0].run, es[1].run, es[2].run]


def test_json_files_are_written_whole_and_garbage_summary_reads_as_none(tmp_path):
    sweep.write_json(tmp_path / "summary.json", {"status": "oom", "note": "显存"})
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["note"] == "显存"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    assert runlog.load_run(tmp_path).final_summary()["status"] == "oom"
    for garbage in ('["not", "an", "object"]', '{"status": "o', "\udcff"):
        (tmp_path / "summary.json").write_text(garbage, encoding="utf-8", errors="surrogateescape")
        assert runlog.load_run(tmp_path).final_summary() is None


def test_env_switches_read_zero_as_off(monkeypatch):
    from sftbench import sweep
    monkeypatch.setenv("SFTBENCH_FORCE", "0")
    assert sweep.build_parser().parse_args(["plan"]).force is False
    monkeypatch.setenv("SFTBENCH_FORCE", "1")
    assert sweep.build_parser().parse_args(["plan"]).force is True


def test_sweep_info_keeps_every_command_and_the_report_lists_them(tmp_path):
    """Two sweeps on one host (each its own GPUs) and a resume: sweep_info.json keeps all three invocations, the
    report names the two different commands with their GPUs; a file from before the history is carried over."""
    from sftbench import report
    d = tmp_path / "h100x2"
    d.mkdir()
    (d / "sweep_info.json").write_text(json.dumps({"sweep": "h100x2", "time": 1.0, "command": "old command"}))
    h100 = "NVIDIA H100 80GB HBM3"
    a = [sweep.Gpu(0, h100), sweep.Gpu(1, h100)]
    b = [sweep.Gpu(2, h100), sweep.Gpu(3, h100)]
    sweep.write_sweep_info(d, "h100x2", a, "cuda", "sweep --models pangu-350m")
    sweep.write_sweep_info(d, "h100x2", b, "cuda", "sweep --models pangu-2.6b")
    sweep.write_sweep_info(d, "h100x2", a, "cuda", "sweep --models pangu-350m")
    info = json.loads((d / "sweep_info.json").read_text())
    assert [c["command"] for c in info["commands"]] == ["old command", "sweep --models pangu-350m",
                                                        "sweep --models pangu-2.6b", "sweep --models pangu-350m"]
    assert info["commands"][2]["gpus"] == [2, 3] and info["command"] == "sweep --models pangu-350m"
    assert info["hardware"]["gpus"][0]["index"] == 0
    lines = report.hardware_lines([], info)
    cmds = [x for x in lines if x.startswith("Command")]
    assert len(cmds) == 3, lines  # "old command" has no GPUs recorded, so it differs from the other two
    # "old command" predates the machine record: the others name their host (where this machine has a tag)
    host = "host A; " if sweep.host_tag() else ""
    assert any(x.startswith(f"Command 3 of 3 ({host}GPUs 2,3") and "pangu-2.6b" in x for x in cmds), cmds
    one = {"command": "just one", "commands": [{"command": "just one", "gpus": [0]}] * 3}
    assert "Command: `just one`" in report.hardware_lines([], one)


def test_a_folder_filled_on_two_machines_names_each_ones_cpu(tmp_path, monkeypatch):
    """Each invocation records its machine (a tag that names none) and CPU; a folder resumed on another machine
    gets one CPU line per machine and each command says where it ran; one machine keeps the single CPU line."""
    from sftbench import report
    d = tmp_path / "h100x2"
    d.mkdir()
    h100 = "NVIDIA H100 80GB HBM3"
    gpus = [sweep.Gpu(0, h100), sweep.Gpu(1, h100)]
    sweep.write_sweep_info(d, "h100x2", gpus, "cuda", "sweep --models pangu-350m")
    first = json.loads((d / "sweep_info.json").read_text())["commands"][0]
    assert first["cpu_count"] == os.cpu_count() and first["cpu_model"]
    assert first["host"] == sweep.host_tag() and (first["host"] is None or len(first["host"]) == 8)
    one_host = json.loads((d / "sweep_info.json").read_text())
    assert [x for x in report.hardware_lines([], one_host) if x.startswith("CPU")] == [
        f"CPU: {one_host['hardware']['cpu_model']}, {os.cpu_count()} logical cores, "
        f"{one_host['hardware']['host_mem_mib'] / 1024:.0f} GiB host memory (recorded by the sweep)"]
    monkeypatch.setattr(sweep, "host_tag", lambda: "0ther000")
    monkeypatch.setattr(sweep, "cpu_model", lambda: "Other Xeon")
    sweep.write_sweep_info(d, "h100x2", gpus, "cuda", "sweep --models pangu-350m")  # the same command, resumed
    lines = report.hardware_lines([], json.loads((d / "sweep_info.json").read_text()))
    cpus = [x for x in lines if x.startswith("CPU")]
    if first["host"] is not None:
        assert len(cpus) == 2 and cpus[1].startswith("CPU (host B): Other Xeon"), lines
        cmds = [x for x in lines if x.startswith("Command")]
        assert [c.split("; GPUs")[0] for c in cmds] == ["Command 1 of 2 (host A", "Command 2 of 2 (host B"], cmds


def test_commands_from_before_the_machine_record_do_not_borrow_a_later_cpu(tmp_path, monkeypatch):
    """A folder whose first commands predate the host record, resumed on a tagged machine: the tagged machine's CPU
    is named for its own commands only, and the older ones say their CPU was not recorded."""
    from sftbench import report
    monkeypatch.setattr(sweep, "host_tag", lambda: "abcd1234")
    d = tmp_path / "h100x1"
    d.mkdir()
    gpus = [sweep.Gpu(0, "NVIDIA H100 80GB HBM3")]
    sweep.write_sweep_info(d, "h100x1", gpus, "cuda", "sweep --configs z1")
    info = json.loads((d / "sweep_info.json").read_text())
    info["commands"].insert(0, {"command": "sweep --configs none", "time": 1.0})  # written by an older harness
    lines = report.hardware_lines([], info)
    cpus = [x for x in lines if x.startswith("CPU")]
    assert cpus[0].startswith("CPU (host A): ") and len(cpus) == 2
    assert cpus[1] == "CPU of the commands without a host: not recorded (they predate the sweep's machine record)"
    cmds = [x for x in lines if x.startswith("Command")]
    assert cmds[0] == "Command 1 of 2: `sweep --configs none`" and cmds[1].startswith("Command 2 of 2 (host A; GPUs 0")


def test_the_prediction_counts_the_graphs_where_train_py_runs_them(monkeypatch):
    """A GPU entry's prediction is of what train.py will run: with CUDA graphs under --cuda-graphs auto where they
    fit, eager where only the eager run fits the card (2.6B ZeRO-0 on 70 GB) or the flags turn them off."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    h100 = [sweep.Gpu(0, "NVIDIA H100 80GB HBM3", 81559.0, "9.0", "GPU-a")]
    small = [sweep.Gpu(0, "NVIDIA A100 70GB", 66757.0, "8.0", "GPU-b")]
    (e,) = plan(h100, ["--models", "pangu-2.6b", "--configs", "z0", "--precisions", "bf16"]).entries
    assert sweep.predict_entry(e, h100)["inputs"]["cuda_graphs"] is True
    assert sweep.predict_entry(e, small)["inputs"]["cuda_graphs"] is False
    (off,) = plan(h100, ["--models", "pangu-2.6b", "--configs", "z0", "--precisions", "bf16",
                         "--extra-args", "--cuda-graphs off"]).entries
    pred, eager = sweep.predict_entry(off, h100), sweep.predict_entry(e, small)
    assert pred["inputs"]["cuda_graphs"] is False and pred["gpu_mib"] == eager["gpu_mib"]


def test_the_dry_run_shows_the_plans_recommendation():
    """./run_all.sh --dry-run on 1 x H100: after the sweep's table, the recommendation python -m sftbench.plan
    gives for each model of the sweep on that GPU (the same function: sftbench.plan.recommend)."""
    res = plan(H100, ["--models", "pangu-2.6b", "--precisions", "bf16", "--configs", "z0,z1,z3_offload_param"])
    lines: list[str] = []
    sweep.print_plan(res, lines.append)
    text = "\n".join(lines)
    assert "plan for pangu-2.6b, bf16, seq 512 on 1 node(s) x 1 GPU(s)" in text
    assert "recommended (fastest that fits): z0: fastest by measured, eager s/step in results/h100x1-eager" in text


def test_the_sweep_runs_the_reference_layout_explicitly():
    """train.py's defaults train on the answers with a cosine schedule; the sweep's runs measure the reference's
    layout (every token in the loss, the config's WarmupLR), named on the command line."""
    res = plan(H100, ["--models", "pangu-350m", "--precisions", "bf16", "--configs", "z1"])
    cmd = sweep.train_command(res.entries[0], Path("runs/x"), {})
    assert cmd[cmd.index("--no-mask-prompt"):cmd.index("--no-mask-prompt") + 3] == [
        "--no-mask-prompt", "--lr-schedule", "config"]
