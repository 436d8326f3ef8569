"""Tests of the live monitor: tailer, state model, GPU sources, sweep statuses, the Textual app (headless pilot)
and ``monitor.py --once``. Fixture logs are written with ``sftbench.runlog.RunLog``; no GPU needed."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftbench.monitor.gpu import (FakeGpuSource, FakeHostSource, GpuInfo, GpuProcess, NoGpuSource,  # noqa: E402
                                  NvmlSource, default_gpu_source)
from sftbench.monitor.rows import chart, gpu_rows, match_processes, series  # noqa: E402
from sftbench.monitor.session import Session, Target, resolve_target  # noqa: E402
from sftbench.monitor.state import EMA_ALPHA, RankState, header_lines  # noqa: E402
from sftbench.monitor.table import SORTS, entry_status  # noqa: E402
from sftbench.monitor.tail import FileTailer, RunDirScanner, RunWatcher, probe_run  # noqa: E402
from sftbench.runlog import RunLog  # noqa: E402

HOST = "nodeA"


# ------------------------------------------------------------------------------------------------------------
# fixtures

def write_meta(log: RunLog, run: str, rank: int, world: int = 2, max_steps: int = 50, warmup: int = 2,
               pid: int | None = None, host: str = HOST, precision: str = "bf16", **extra) -> None:
    log.meta(run=run, time=time.time(), argv=["train.py"], ds_config_path="ds_configs/zero2_offload.json",
             ds_config={"zero_optimization": {"stage": 2}}, harness={}, model="pangu-350m", n_params=350_000_000,
             flops_per_token=2.1e9, world_size=world, rank=rank, local_rank=rank, host=host,
             pid=pid if pid is not None else 1000 + rank, device=f"cuda:{rank}", device_name="NVIDIA H100 80GB HBM3",
             device_uuid=f"GPU-uuid-{rank}", gpu_index=rank, peak_tflops=989.0, precision=precision, zero_stage=2,
             offload_optimizer="cpu", offload_param=None, micro_batch=4, grad_accum=2, seq_len=1024,
             dataset_path="data/sft.jsonl", dataset_samples=10_000, real_tokens=1, pad_tokens=1,
             steps_per_epoch=625, max_steps=max_steps, warmup_steps=warmup, **extra)


def step_s_of(step: int, warmup: int = 2) -> float:
    return 2.0 if step <= warmup else 0.5 + 0.01 * step


def write_step(log: RunLog, step: int, rank: int, warmup: int = 2, step_s: float | None = None,
               skipped: bool = False) -> None:
    s = step_s if step_s is not None else step_s_of(step, warmup)
    log.step(step=step, time=time.time(), elapsed_s=float(step), step_s=s, warmup=step <= warmup,
             samples_per_s=16 / s, tokens_per_s=16384 / s, real_tokens_per_s=10_000 / s, loss=3.0 - 0.05 * step,
             lr=1e-5, loss_scale=None, skipped=skipped, tflops=100.0, mfu_pct=40.0,
             gpu_mem_used_mib=30_000 + 10 * step + rank, torch_peak_alloc_mib=20_000.0,
             torch_peak_reserved_mib=25_000.0, host_rss_mib=4000.0 + rank, host_used_mib=60_000.0)


def write_summary(log: RunLog, status: str = "ok", steps: int = 20, median: float = 0.6) -> None:
    log.summary(status=status, error=None if status == "ok" else "CUDA out of memory. Tried to allocate 2 GiB",
                time=time.time(), wall_s=30.0, steps=steps, measured_steps=steps - 2, step_s_median=median,
                step_s_p90=median * 1.1, step_s_mean=median, tokens_per_s=16384 / median,
                tokens_per_s_per_gpu=8192 / median, gpu_mem_used_mib_peak=30_200.0, host_used_mib_peak=60_000.0,
                host_rss_mib_peak=4000.0, steps_per_epoch=625, epoch_s_est=625 * median, final_loss=2.0,
                first_loss=2.95)


def make_run(d: Path, steps: int = 20, world: int = 2, summary: str | None = None, max_steps: int = 50,
             median: float = 0.6, pid_base: int = 1000, pids: list[int] | None = None, host: str = HOST) -> Path:
    for r in range(world):
        log = RunLog(d, r)
        write_meta(log, d.name, r, world=world, max_steps=max_steps, pid=pids[r] if pids else pid_base + r, host=host)
        for s in range(1, steps + 1):
            write_step(log, s, r)
        if summary:
            write_summary(log, summary, steps, median)
        log.close()
    return d


def fake_gpus() -> list[GpuInfo]:
    return [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-uuid-0", 30_000.0, 81_559.0, 97.0, 650.0, 700.0, 71.0,
                [GpuProcess(1000, 29_000.0)]),
        # container case: NVML reports a host pid that matches no rank -> matched through the UUID
        GpuInfo(1, "NVIDIA H100 80GB HBM3", "GPU-uuid-1", 78_000.0, 81_559.0, 20.0, 300.0, 700.0, 88.0,
                [GpuProcess(424242, 29_000.0)]),
    ]


def session_for(path: Path, *, gpus=True, **kw) -> Session:
    src = FakeGpuSource(fake_gpus()) if gpus else NoGpuSource("no NVML in this test")
    return Session(resolve_target(str(path)), src, FakeHostSource(hostname=HOST, rss={1000: 5120.0}), **kw)


def text(cell) -> str:
    return cell.plain if hasattr(cell, "plain") else str(cell)


def run_app(coro_fn, session: Session, size=(170, 50), **app_kw):
    """Run an async pilot test body against a fresh MonitorApp (no pytest-asyncio needed)."""
    from sftbench.monitor.app import MonitorApp

    async def main():
        app = MonitorApp(session, **app_kw)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await coro_fn(app, pilot)

    asyncio.run(main())


async def wait_for(pilot, cond, timeout: float = 6.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await pilot.pause(0.05)
    assert cond(), "condition not reached in time"


# ------------------------------------------------------------------------------------------------------------
# import hygiene / start-up

def test_app_import_pulls_no_torch():
    code = ("import sys; import sftbench.monitor.app, sftbench.monitor.snapshot; "
            "bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ------------------------------------------------------------------------------------------------------------
# tailer

def test_tailer_reads_only_new_bytes_and_keeps_partial_line(tmp_path):
    p = tmp_path / "rank0.jsonl"
    p.write_bytes(b'{"type": "meta", "run": "x"}\n{"type": "step", "st')
    t = FileTailer(p)
    u = t.poll()
    assert [r["type"] for r in u.records] == ["meta"] and u.bad == 0 and t.pending_partial
    assert t.offset == p.stat().st_size
    assert t.poll().records == []                       # nothing new: nothing read
    with open(p, "ab") as f:
        f.write(b'ep": 1}\n')
    u = t.poll()
    assert u.records == [{"type": "step", "step": 1}] and not t.pending_partial and not u.reset


def test_tailer_counts_garbage(tmp_path):
    p = tmp_path / "rank0.jsonl"
    p.write_bytes(b'{"type": "meta"}\nnot json\n[1, 2]\n{"no_type": 1}\n\xff\xfe\n\n{"type": "step", "step": 1}\n')
    u = FileTailer(p).poll()
    assert [r["type"] for r in u.records] == ["meta", "step"]
    assert u.bad == 4


def test_tailer_truncation_rereads_from_start(tmp_path):
    p = tmp_path / "rank0.jsonl"
    p.write_text('{"type": "meta"}\n{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n')
    t = FileTailer(p)
    assert len(t.poll().records) == 3
    with open(p, "w") as f:                              # truncate in place (same inode), shorter
        f.write('{"type": "meta", "again": true}\n')
    u = t.poll()
    assert u.reset and u.records == [{"type": "meta", "again": True}]


def test_tailer_replacement_and_rewrite(tmp_path):
    p = tmp_path / "rank0.jsonl"
    p.write_text('{"type": "meta", "v": 1}\n')
    t = FileTailer(p)
    t.poll()
    q = tmp_path / "new.jsonl"
    q.write_text('{"type": "meta", "v": 2}\n{"type": "step", "step": 1}\n')
    os.replace(q, p)                                     # new inode
    u = t.poll()
    assert u.reset and [r.get("v") for r in u.records] == [2, None]
    # rewritten in place with the same inode but longer than before: the first bytes differ -> reread
    with open(p, "r+") as f:
        f.write('{"type": "meta", "v": 3}\n{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n')
    u = t.poll()
    assert u.reset and [r.get("v") for r in u.records][0] == 3 and len(u.records) == 3
    p.unlink()
    u = t.poll()
    assert u.reset and u.gone


def test_run_watcher_resets_rank_on_truncation(tmp_path):
    d = make_run(tmp_path / "r", steps=10)
    w = RunWatcher(d)
    assert w.poll()
    assert w.state.ranks[0].n_steps == 10
    assert not w.poll()                                   # unchanged: version stays
    p = d / "rank0.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:4]))                      # meta + 3 steps
    assert w.poll()
    assert w.state.ranks[0].n_steps == 3 and w.state.ranks[1].n_steps == 10


def test_run_watcher_budgeted_catch_up(tmp_path):
    d = make_run(tmp_path / "r", steps=300)
    w = RunWatcher(d)
    w.CHUNK = 4096                                        # a few records per round
    w.poll(budget_s=0.0)                                  # one round only
    assert w.behind and 0 < w.progress()[0] < w.progress()[1]
    rounds = 1
    while w.behind:
        w.poll(budget_s=0.0)
        rounds += 1
    assert rounds > 5 and w.state.ranks[0].n_steps == 300 and w.state.ranks[1].n_steps == 300
    assert w.state.bad_lines == 0                         # chunk borders never split a record into garbage


# ------------------------------------------------------------------------------------------------------------
# model

def test_rank_stats_exclude_warmup_and_header(tmp_path):
    d = make_run(tmp_path / "run1", steps=20)
    st = RunWatcher(d).read_all()
    r0 = st.ranks[0]
    measured = sorted(step_s_of(s) for s in range(3, 21))
    assert r0.n_warmup == 2 and len(r0.measured) == 18
    assert r0.median_s == pytest.approx((measured[8] + measured[9]) / 2)
    ema = None
    for s in range(3, 21):
        ema = step_s_of(s) if ema is None else ema + EMA_ALPHA * (step_s_of(s) - ema)
    assert r0.ema == pytest.approx(ema)
    h = st.header()
    assert h["status"] == "running" and h["step"] == 20 and h["max_steps"] == 50
    assert h["eta_s"] == pytest.approx(30 * ema)
    assert h["epoch_s_est"] == pytest.approx(625 * r0.median_s)
    lines = header_lines(h)
    assert "step 20 of 50" in lines[2] and "zero2_offload.json" in lines[1] and "ZeRO 2" in lines[1]


def test_rank_stats_exclude_fp16_overflow_steps(tmp_path):
    # Steps 3-6 overflow (fp16 loss scale coming down): shown and counted, not in the EMA or the median; the note
    # names the cause the precision implies (a bf16 run skips steps only with bf16.check_grad_overflow on).
    for precision, cause in (("fp16", "4 fp16 overflow step(s) that skipped the optimizer update while the loss "
                                      "scale came down"),
                             ("bf16", "4 step(s) with non-finite bf16 gradients that skipped the optimizer update")):
        d = tmp_path / f"{precision}run"
        log = RunLog(d, 0)
        write_meta(log, d.name, 0, world=1, precision=precision)
        for s in range(1, 11):
            write_step(log, s, 0, step_s=0.1 if 3 <= s <= 6 else None, skipped=3 <= s <= 6)
        log.close()
        st = RunWatcher(d).read_all()
        r0 = st.ranks[0]
        assert r0.n_warmup == 2 and r0.n_skipped == 4 and r0.measured == sorted(step_s_of(s) for s in range(7, 11))
        assert r0.ema is not None and r0.ema > 0.5
        h = st.header()
        assert h["skipped_steps"] == 4 and h["measured_steps"] == 4
        assert cause in header_lines(h)[-1] and "not measured" in header_lines(h)[-1]
        assert "warning:" not in header_lines(h)[-1]


def _run_with_meta(d, **fields):
    """A one-rank run folder whose meta record carries these extra fields (and nothing else yet)."""
    log = RunLog(d, 0)
    write_meta(log, d.name, 0, world=1)
    log.close()
    meta = json.loads((d / "rank0.jsonl").read_text().splitlines()[0])
    (d / "rank0.jsonl").write_text(json.dumps({**meta, **fields}) + "\n")


def test_engine_warnings_from_the_meta_are_shown(tmp_path):
    d = tmp_path / "z0fp16"
    _run_with_meta(d, warnings=["fp16 with ZeRO stage 0: the model does not learn"])
    h = RunWatcher(d).read_all().header()
    assert "warning: fp16 with ZeRO stage 0: the model does not learn" in header_lines(h)[-1]


def test_a_fine_tuning_run_shows_its_eval_loss_and_where_it_resumed(tmp_path):
    d = tmp_path / "ft"
    _run_with_meta(d, resumed_from={"path": "save/checkpoint-40", "step": 40})
    log = RunLog(d, 0)
    for s in (41, 42):
        write_step(log, s, 0)
    log.eval(step=42, epoch=0.07, time=time.time(), eval_loss=2.34567, eval_tokens=900, eval_samples=12, eval_s=0.5)
    write_step(log, 43, 0)
    log.close()
    h = RunWatcher(d).read_all().header()
    assert h["eval_loss"] == pytest.approx(2.34567) and h["eval_step"] == 42 and h["step"] == 43
    assert "resumed from step 40 | eval loss 2.3457 (step 42)" in header_lines(h)[-1]


def test_status_waiting_then_ok(tmp_path):
    d = tmp_path / "r"
    w = RunWatcher(d)
    w.poll()
    assert w.state.status() == "waiting"
    d.mkdir()
    w.poll()
    assert w.state.status() == "waiting"
    (d / "rank0.jsonl").write_text("")  # train.py opened its log; the model is still being built
    w.poll()
    assert w.state.status() == "starting"
    assert "starting: 1 rank file(s) open, no record yet" in header_lines(w.state.header())[1]
    (d / "rank0.jsonl").unlink()
    make_run(d, steps=5, summary="ok", median=0.55)
    w.read_all()
    assert w.state.status() == "ok"
    h = w.state.header()
    assert h["s_it_median"] == 0.55 and h["eta_s"] is None


def test_chart_bounded_and_warmup_flags():
    rs = RankState(0, history=50)
    rs.feed({"type": "meta", "warmup_steps": 3})
    for s in range(1, 201):
        rs.feed({"type": "step", "step": s, "step_s": 9.0 if s <= 3 else 1.0 + (s % 5) * 0.1, "loss": 1.0})
    assert len(rs.history) == 50 and rs.history[0].step == 151
    vals, warm, steps = series(rs, "step_s")
    lines, wcols, lo, hi = chart(vals, warm, 20, 2)
    assert len(lines) == 2 and all(len(x) == 20 for x in lines) and not any(wcols)
    assert 1.0 <= lo < hi <= 1.4          # bucket means of the measured points
    # warm-up points are flagged and do not set the scale
    lines, wcols, lo, hi = chart([9.0, 9.0, 1.0, 2.0], [True, True, False, False], 10, 1)
    assert wcols == [True, True, False, False] and hi == 2.0


def test_gpu_process_matching_pid_then_uuid(tmp_path):
    st = RunWatcher(make_run(tmp_path / "r", steps=3)).read_all()
    gm = match_processes(fake_gpus(), st, HOST)
    assert [(p.rank, p.how) for p in gm[0]] == [(0, "pid")]
    assert [(p.rank, p.how, p.pid) for p in gm[1]] == [(1, "uuid", 424242)]   # paired 1:1 on the GPU
    # pid of another host never matches by pid
    gm = match_processes(fake_gpus(), st, "elsewhere")
    assert [(p.rank, p.how) for p in gm[0]] == [(0, "uuid")]
    rows = dict(gpu_rows(FakeGpuSource(fake_gpus()).sample(), st, HOST))
    assert rows["1"]["mem"].style == "bold red" and rows["1"]["temp"].style == "bold red"
    assert rows["0"]["temp"].style == "green" and "rank 0 (pid 1000)" in rows["0"]["procs"].text


# ------------------------------------------------------------------------------------------------------------
# GPU sources without NVML

def test_no_nvml_sources(monkeypatch):
    monkeypatch.setenv("SFTBENCH_NO_NVML", "1")
    snap = default_gpu_source().sample()
    assert snap.gpus == [] and "SFTBENCH_NO_NVML" in snap.unavailable
    monkeypatch.delenv("SFTBENCH_NO_NVML")
    assert "--no-gpu" in default_gpu_source(disabled=True).sample().unavailable
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import pynvml -> ImportError
    snap = NvmlSource().sample()
    assert snap.gpus == [] and "pynvml not installed" in snap.unavailable


def test_nvml_error_is_a_reason(monkeypatch):
    import types

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(NVMLError("Driver Not Loaded")))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = NvmlSource().sample()
    assert snap.unavailable == "NVML error: Driver Not Loaded"


# ------------------------------------------------------------------------------------------------------------
# sweep / results / follow

def make_sweep(root: Path) -> Path:
    sw = root / "sweep1"
    entries = []
    for name in ("a_ok", "b_oom", "c_running", "d_queued", "e_timeout"):
        entries.append({"run": name, "model": "pangu-350m", "ds_config": f"ds_configs/{name}.json",
                        "precision": "bf16", "num_gpus": 2, "max_steps": 50, "warmup_steps": 2,
                        "accelerator": "cuda"})
    sw.mkdir(parents=True)
    (sw / "plan.json").write_text(json.dumps({"sweep": "sweep1", "created": time.time(), "entries": entries}))
    make_run(sw / "a_ok", steps=20, summary="ok", median=0.61)
    make_run(sw / "b_oom", steps=3, summary="oom", median=0.9)
    make_run(sw / "e_timeout", steps=4, median=0.7)
    (sw / "e_timeout" / "summary.json").write_text(json.dumps(
        {"type": "summary", "status": "timeout", "error": "no progress for 600 s", "synthesized": True}))
    time.sleep(0.02)
    make_run(sw / "c_running", steps=7)
    return sw


def test_sweep_statuses(tmp_path):
    sw = make_sweep(tmp_path)
    plan = json.loads((sw / "plan.json").read_text())
    plan["entries"].append(dict(plan["entries"][0], run="f_dead"))
    (sw / "plan.json").write_text(json.dumps(plan))
    make_run(sw / "f_dead", steps=5, pid_base=3000)  # no summary, and its pids are gone (FakeHostSource alive)
    old = time.time() - 60  # older than c_running, which the run view follows
    for p in [sw / "f_dead", *(sw / "f_dead").iterdir()]:
        os.utime(p, (old, old))
    assert resolve_target(str(sw)).kind == "sweep"
    s = Session(resolve_target(str(sw)), FakeGpuSource(fake_gpus()),
                FakeHostSource(hostname=HOST, rss={1000: 5120.0}, alive={1000, 1001}))
    s.load_all()
    by = {e.run: e for e in s.table.entries}
    assert [e.run for e in s.table.entries] == ["a_ok", "b_oom", "c_running", "d_queued", "e_timeout", "f_dead"]
    # a run without a summary is running only while its processes exist (f_dead's pids 3000/3001 are gone)
    assert {k: e.status for k, e in by.items()} == {
        "a_ok": "done", "b_oom": "OOM", "c_running": "running", "d_queued": "queued", "e_timeout": "timeout",
        "f_dead": "dead"}
    assert by["a_ok"].median_s == 0.61 and by["a_ok"].peak_gpu_mib == pytest.approx(30_200.0)
    assert by["a_ok"].host_mib == 60_000.0 and by["b_oom"].error.startswith("CUDA out of memory")
    assert by["c_running"].step == 7 and by["d_queued"].step is None
    # the sweep's run view follows its newest run (the running one)
    assert s.run.run_dir == sw / "c_running"
    assert entry_status(False, 0, None) == "queued"
    assert entry_status(True, 2, None) == "running"
    assert entry_status(True, 2, None, "dead") == "dead"
    assert entry_status(True, 2, {"status": "killed"}) == "killed (signal 9)"
    assert entry_status(True, 2, {"status": "cuda_error"}) == "CUDA error"


def test_follow_moves_to_next_run(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "old", steps=5, summary="ok")
    s = session_for(runs, scan_interval=0.0, table_interval=0.0)
    # a folder of runs named on the command line is a results table; following is what no argument gives
    assert s.target == Target("results", runs) and resolve_target(None, runs) == Target("follow", runs)
    s = Session(Target("follow", runs), FakeGpuSource(fake_gpus()), FakeHostSource(hostname=HOST),
                scan_interval=0.0, table_interval=0.0)
    s.poll()
    assert s.run.run_dir == runs / "old"
    time.sleep(0.02)
    (runs / "sweepX").mkdir()
    (runs / "sweepX" / "plan.json").write_text(json.dumps({"sweep": "sweepX", "entries": [{"run": "new"}]}))
    (runs / "sweepX" / "new").mkdir()
    (runs / "sweepX" / "new" / "predicted.json").write_text("{}")
    changed = s.poll()
    assert "switched" in changed and s.run.run_dir == runs / "sweepX" / "new"
    assert s.run.status() == "waiting"
    assert s.table.kind == "sweep" and s.table.entries[0].status == "running"


def test_results_dir_lists_runs(tmp_path):
    res = tmp_path / "results" / "h100x1"
    make_run(res / "sweepA" / "r1", steps=4, summary="ok")
    make_run(res / "r2", steps=4, summary="oom")
    (res / "summaries.jsonl").write_text("{}\n")
    t = resolve_target(str(res))
    assert t.kind == "results"
    s = session_for(res)
    s.load_all()
    assert sorted((e.run, e.status) for e in s.table.entries) == [("r1", "done"), ("r2", "OOM")]


def test_scanner_newest(tmp_path):
    make_run(tmp_path / "a", steps=1)
    time.sleep(0.02)
    make_run(tmp_path / "s" / "b", steps=1)
    sc = RunDirScanner(tmp_path)
    sc.scan()
    assert sc.newest() == tmp_path / "s" / "b"
    pr = probe_run(tmp_path / "a")
    assert pr.exists and pr.n_rank_files == 2 and pr.meta0["model"] == "pangu-350m"


# ------------------------------------------------------------------------------------------------------------
# the Textual app, headless

def test_app_run_view_numbers_keys_and_live_append(tmp_path):
    d = make_run(tmp_path / "run1", steps=20)
    session = session_for(d)

    async def body(app, pilot):
        from textual.widgets import DataTable
        rt = app.query_one("#rank-table", DataTable)
        assert rt.row_count == 2
        ema = session.run.ranks[0].ema
        assert text(rt.get_cell("0", "step")) == "20"
        assert text(rt.get_cell("0", "loss")) == "2.0000"
        assert text(rt.get_cell("0", "s_ema")) == f"{ema:.3f}"
        assert text(rt.get_cell("0", "s_last")) == "0.700"
        assert text(rt.get_cell("1", "mem")) == "29.5 GiB / 24.4 GiB"
        assert text(rt.get_cell("0", "rss")) == "5.0 GiB live"       # pid 1000 alive per the fake host source
        assert text(rt.get_cell("1", "rss")) == "3.9 GiB log"
        assert text(rt.get_cell("0", "tps")) == "23,406"
        assert "GPU 0" in text(app.query_one("#gpu-brief").render())
        # a line appended to a log appears after the next refresh
        with _Append(d, 0) as log:
            write_step(log, 21, 0)
        await wait_for(pilot, lambda: text(rt.get_cell("0", "step")) == "21")
        assert text(rt.get_cell("1", "step")) == "20"
        # views
        await pilot.press("tab")
        assert app.view == "sweep"
        await pilot.press("tab")
        assert app.view == "gpu"
        gt = app.query_one("#gpu-table", DataTable)
        assert gt.row_count == 2 and "rank 1 (by UUID)" in text(gt.get_cell("1", "procs"))
        assert "88 C" == text(gt.get_cell("1", "temp"))
        await pilot.press("tab")
        assert app.view == "run"
        # pause: appended lines are not read until resumed
        await pilot.press("p")
        assert app.paused
        with _Append(d, 0) as log:
            write_step(log, 22, 0)
        await pilot.pause(0.4)
        assert text(rt.get_cell("0", "step")) == "21"
        await pilot.press("p")
        assert not app.paused
        await wait_for(pilot, lambda: text(rt.get_cell("0", "step")) == "22")
        # help screen
        await pilot.press("question_mark")
        from sftbench.monitor.app import HelpScreen
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("tab")                     # view keys do nothing under the help screen
        assert app.view == "run"
        with _Append(d, 1) as log:                   # updates go on under the help screen
            write_step(log, 21, 1)
        await wait_for(pilot, lambda: text(rt.get_cell("1", "step")) == "21")
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    run_app(body, session, refresh=0.1)


class _Append:
    """Append records to an existing rank file through the real writer."""

    def __init__(self, d: Path, rank: int):
        self.log = RunLog(d, rank)

    def __enter__(self) -> RunLog:
        return self.log

    def __exit__(self, *exc) -> None:
        self.log.close()


def test_app_survives_garbage_partial_and_truncation(tmp_path):
    d = make_run(tmp_path / "run1", steps=10)
    session = session_for(d, gpus=False)

    async def body(app, pilot):
        from textual.widgets import DataTable
        rt = app.query_one("#rank-table", DataTable)
        p = d / "rank1.jsonl"
        with open(p, "a") as f:
            f.write("this is not json\n{\"type\": \"step\", \"step\": 11, \"step_s\"")   # garbage + partial line
        await wait_for(pilot, lambda: text(rt.get_cell("1", "bad")) == "1")
        assert "garbage lines skipped: 1" in text(app.query_one("#run-header").render())
        assert "incomplete last line" in text(app.query_one("#run-header").render())
        assert text(rt.get_cell("1", "step")) == "10"
        with open(p, "a") as f:
            f.write(': 0.6, "loss": 1.5, "warmup": false}\n')
        await wait_for(pilot, lambda: text(rt.get_cell("1", "step")) == "11")
        assert text(rt.get_cell("1", "loss")) == "1.5000"
        # truncate rank 0 to meta + 2 warm-up steps: state reset, step shown as warm-up
        lines = (d / "rank0.jsonl").read_text().splitlines(keepends=True)
        (d / "rank0.jsonl").write_text("".join(lines[:3]))
        await wait_for(pilot, lambda: text(rt.get_cell("0", "step")) == "2 warm-up")
        assert text(rt.get_cell("0", "s_ema")) == "-"     # warm-up excluded from the EMA
        assert "GPU metrics unavailable: no NVML in this test" in text(app.query_one("#gpu-brief").render())
        await pilot.press("tab", "tab")
        assert "GPU metrics unavailable" in text(app.query_one("#gpu-status").render())

    run_app(body, session, refresh=0.1)


def test_app_waiting_run(tmp_path):
    session = session_for(tmp_path / "not_yet")

    async def body(app, pilot):
        assert "waiting" in text(app.query_one("#run-header").render())
        make_run(tmp_path / "not_yet", steps=3)
        await wait_for(pilot, lambda: "step 3 of 50" in text(app.query_one("#run-header").render()))

    run_app(body, session, refresh=0.1)


def test_app_sweep_sort_enter_and_export(tmp_path):
    sw = make_sweep(tmp_path)
    session = session_for(sw)
    out = tmp_path / "exports"

    async def body(app, pilot):
        from textual.widgets import DataTable
        await pilot.press("tab")
        assert app.view == "sweep"
        st = app.query_one("#sweep-table", DataTable)
        keys = lambda: [Path(r.key.value).name for r in st.ordered_rows]  # noqa: E731
        assert keys() == ["a_ok", "b_oom", "c_running", "d_queued", "e_timeout"]
        assert text(st.get_cell(str(sw / "b_oom"), "status")) == "OOM"
        assert text(st.get_cell(str(sw / "d_queued"), "status")) == "queued"
        assert text(st.get_cell(str(sw / "a_ok"), "median")) == "0.610"
        assert text(st.get_cell(str(sw / "a_ok"), "gpu_peak")) == "29.5 GiB"
        await pilot.press("s")                               # -> by run name
        assert SORTS[app.sort_index][0] == "run"
        await pilot.press("s")                               # -> by status
        assert keys() == ["c_running", "d_queued", "a_ok", "b_oom", "e_timeout"]
        await pilot.press("s")                               # -> by median s/it
        assert keys() == ["c_running", "a_ok", "b_oom", "d_queued", "e_timeout"]   # 0.55 < 0.61 < 0.9 < none
        # Enter opens the run under the cursor in the run view
        st.move_cursor(row=keys().index("b_oom"))
        await pilot.press("enter")
        assert app.view == "run" and session.run.run_dir == sw / "b_oom" and session.pinned
        await wait_for(pilot, lambda: "[oom]" in text(app.query_one("#run-header").render()))
        # command palette: Export view as JSON
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"export view")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.last_export is not None)
        data = json.loads(app.last_export.read_text())
        assert app.last_export.parent == out
        assert data["view"] == "run" and data["run"]["status"] == "oom"
        assert [r["rank"] for r in data["ranks"]] == [0, 1]
        await pilot.press("tab")
        app.action_export_json()
        data = json.loads(app.last_export.read_text())
        assert data["view"] == "sweep" and len(data["table"]["entries"]) == 5

    run_app(body, session, refresh=0.2, export_dir=out)


# ------------------------------------------------------------------------------------------------------------
# --once

def test_ranks_of_two_hosts(tmp_path):
    """A job on two nodes (nodeA: ranks 0-1, nodeB: ranks 2-3), logs in one folder: every rank shows its node, the
    header the node count; the same pid on the other host is not this host's process (no live RSS for it)."""
    from sftbench.monitor.snapshot import snapshot_text
    d = tmp_path / "job"
    for r in range(4):
        host = "nodeA" if r < 2 else "nodeB"
        log = RunLog(d, r)
        write_meta(log, "job", r, world=4, pid=1000 + r % 2, host=host, node=host, node_rank=r // 2, num_nodes=2,
                   local_world_size=2)
        for s in range(1, 6):
            write_step(log, s, r)
        log.close()
    session = session_for(d, gpus=False)
    out = snapshot_text(session)
    session.close()
    assert "world 4 on 2 nodes (nodeA, nodeB)" in out
    ranks = out.split("RANKS")[1].split("HISTORY")[0].splitlines()
    rows = {ln.split()[0]: ln for ln in ranks if ln[:1].isdigit()}
    assert {k: v.split()[1] for k, v in rows.items()} == {"0": "nodeA", "1": "nodeA", "2": "nodeB", "3": "nodeB"}
    assert "live" in rows["0"] and "live" not in rows["2"]  # pid 1000 lives on nodeA (this host), not on nodeB
    # only node A's rank files in the folder (node-local disks): the header says what is missing
    for r in (2, 3):
        (d / f"rank{r}.jsonl").unlink()
    session = session_for(d, gpus=False)
    out = snapshot_text(session)
    session.close()
    assert "world 4 on 2 nodes (nodeA), logs of 1 here" in out
    # in a sweep's table the GPUs column counts the job's GPUs (the plan entry's num_gpus is per node)
    sw = tmp_path / "sweep"
    sw.mkdir()
    entry = {"run": "job", "model": "pangu-350m", "ds_config": None, "precision": "bf16", "num_gpus": 2,
             "num_nodes": 2, "max_steps": 50, "warmup_steps": 2, "accelerator": "cuda"}
    (sw / "plan.json").write_text(json.dumps({"sweep": "sweep", "created": time.time(), "entries": [entry]}))
    s = session_for(sw, gpus=False)
    s.load_all()
    assert [e.num_gpus for e in s.table.entries] == [4]
    s.close()


def _once(*args: str) -> str:
    env = dict(os.environ, SFTBENCH_NO_NVML="1")
    r = subprocess.run([sys.executable, str(ROOT / "monitor.py"), "--once", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_once_run_and_sweep(tmp_path):
    d = make_run(tmp_path / "run1", steps=20)
    out = _once(str(d))
    assert "run run1  [running]" in out and "step 20 of 50" in out
    assert "GPU metrics unavailable: disabled (SFTBENCH_NO_NVML=1)" in out
    assert "29.5 GiB / 24.4 GiB" in out and "2.0000" in out
    sw = make_sweep(tmp_path / "s")
    out = _once(str(sw))
    assert "SWEEP sweep sweep1: 5 entries" in out
    for word in ("done", "OOM", "running", "queued", "timeout"):
        assert word in out
    out = _once("--runs-root", str(tmp_path / "empty"), "--no-gpu")
    assert out.splitlines()[0] == f"no run found under {tmp_path / 'empty'}"
    assert f"RUNS runs under {tmp_path / 'empty'}: 0 entries\n(no entries)" in out and "waiting" not in out


def test_once_a_path_that_does_not_exist_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "monitor.py"), "--once", str(tmp_path / "typo_dir")], cwd=ROOT,
                       env=dict(os.environ, SFTBENCH_NO_NVML="1"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "typo_dir does not exist" in r.stderr and "waiting" not in r.stdout


def test_liveness_dead_stalled_running_with_real_processes(tmp_path):
    """pids of this host: a finished process reads dead, a sleeping one running; silence beyond the rule stalled?"""
    import socket
    here = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        make_run(tmp_path / "dead", steps=6, world=2, pids=[gone.pid, gone.pid], host=here)
        make_run(tmp_path / "live", steps=6, world=2, pids=[live.pid, live.pid], host=here)
        make_run(tmp_path / "elsewhere", steps=6, world=2, host="another-node")
        out = _once(str(tmp_path / "dead"))
        head = out.splitlines()[:4]
        assert "run dead  [dead]" in head[0] and not any("ETA" in x for x in head)
        assert "dead: no process of this run is left on this host and it wrote no summary; last record" in out
        out = _once(str(tmp_path / "live"))
        assert "run live  [running]" in out and "ETA" in out
        # the table of a results folder says the same
        out = _once(str(tmp_path))
        rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in ("dead", "live")}
        assert " dead " in rows["dead"] and " running " in rows["live"]
        # silence: with the processes alive, or not checkable (another host), the stall rule decides
        for name in ("live", "elsewhere"):
            st = RunWatcher(tmp_path / name).read_all()
            st.set_alive({0: True, 1: True} if name == "live" else {0: None, 1: None})
            now = st.last_record_time
            slow = st.slowest_step_s  # 2.0 s warm-up steps: the 5-minute floor applies
            assert st.status(now + 299) == "running" and st.status(now + 301) == "stalled?"
            assert slow == 2.0 and st.header(now + 301)["eta_s"] is None
            assert "stalled?: nothing written for longer than 5m" in header_lines(st.header(now + 301))[-1]
    finally:
        live.kill()
        live.wait()


def test_stall_rule():
    from sftbench import liveness
    assert liveness.stall_limit_s(None) == 900 and liveness.stall_limit_s(2.0) == 300
    assert liveness.stall_limit_s(60.0) == 600
    assert liveness.classify([False, False], None, None) == "dead"
    assert liveness.classify([False, True], 0.0, 1.0, now=10.0) == "running"  # one rank still there
    assert liveness.classify([None], 0.0, 1.0, now=301.0) == "stalled?"
    assert liveness.classify([], 0.0, None, now=899.0) == "running"
