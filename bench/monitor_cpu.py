#!/usr/bin/env python
"""CPU cost of the live monitor while it follows a large run.

Writes ``--ranks`` rank files of ``--steps`` step records each (real ``RunLog`` records) into a temp dir, starts a
writer process that appends ``--rate`` steps per second to every rank file, and measures:

1. in-process: ``MonitorApp`` driven headless (``App.run_test``) at ``--refresh`` for ``--seconds``; CPU seconds
   of this process per wall second over the steady state (after the initial load);
2. pty: the real ``python monitor.py --runs-root TMP`` (default mode: follow the newest run) in a pseudo-terminal,
   its CPU per wall second from psutil (skipped with ``--no-pty``);
3. start-up: wall time of ``python monitor.py --once RUN_DIR`` on that run and the import time of
   ``sftbench.monitor.app`` (median of 3 fresh interpreters).

Usage: python bench/monitor_cpu.py [--seconds 20] [--ranks 8] [--steps 10000] [--rate 2] [--refresh 1.0]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench
from sftbench.paths import REPO  # noqa: E402

from sftbench.runlog import RunLog  # noqa: E402

WRITER = r"""
import sys, time, socket, os
sys.path.insert(0, sys.argv[1])
from sftbench.runlog import RunLog
run_dir, ranks, start, rate = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
logs = [RunLog(run_dir, r) for r in range(ranks)]
step = start
while True:
    t0 = time.time()
    for r, lg in enumerate(logs):
        lg.step(step=step, time=t0, elapsed_s=float(step), step_s=0.5, warmup=False, samples_per_s=128.0,
                tokens_per_s=131072.0, real_tokens_per_s=100000.0, loss=2.0, lr=1e-5, loss_scale=None,
                skipped=False, tflops=300.0, mfu_pct=30.3, gpu_mem_used_mib=60000.0 + r, torch_peak_alloc_mib=50000.0,
                torch_peak_reserved_mib=55000.0, host_rss_mib=8000.0, host_used_mib=120000.0)
    step += 1
    time.sleep(max(0.0, 1.0 / rate - (time.time() - t0)))
"""


def make_run(run_dir: Path, ranks: int, steps: int, warmup: int = 5) -> None:
    host = os.uname().nodename
    for r in range(ranks):
        lg = RunLog(run_dir, r)
        lg.meta(run=run_dir.name, time=time.time(), argv=["train.py"], ds_config_path="ds_configs/zero3.json",
                ds_config={"zero_optimization": {"stage": 3}}, harness={}, model="pangu-2.6b", n_params=2_600_000_000,
                flops_per_token=1.6e10, world_size=ranks, rank=r, local_rank=r, host=host, pid=4_000_000 + r,
                device=f"cuda:{r}", device_name="NVIDIA H100 80GB HBM3", device_uuid=f"GPU-bench-{r}", gpu_index=r,
                peak_tflops=989.0, precision="bf16", zero_stage=3, offload_optimizer=None, offload_param=None,
                micro_batch=4, grad_accum=4, seq_len=1024, dataset_path="data/bench_10k.jsonl",
                dataset_samples=10_000, real_tokens=1, pad_tokens=1, steps_per_epoch=79, max_steps=1_000_000,
                warmup_steps=warmup)
        for s in range(1, steps + 1):
            st = 3.0 if s <= warmup else 0.5 + (s % 7) * 0.001
            lg.step(step=s, time=time.time(), elapsed_s=float(s), step_s=st, warmup=s <= warmup,
                    samples_per_s=128.0 / st, tokens_per_s=131072.0 / st, real_tokens_per_s=100000.0 / st,
                    loss=3.0 - s * 1e-4, lr=1e-5, loss_scale=None, skipped=False, tflops=300.0, mfu_pct=30.3,
                    gpu_mem_used_mib=60000.0 + r, torch_peak_alloc_mib=50000.0, torch_peak_reserved_mib=55000.0,
                    host_rss_mib=8000.0, host_used_mib=120000.0)
        lg.close()


def start_writer(run_dir: Path, ranks: int, start_step: int, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(run_dir), str(ranks), str(start_step),
                             str(rate)])


def fake_gpus(n: int):
    from sftbench.monitor.gpu import GpuInfo, GpuProcess
    return [GpuInfo(i, "NVIDIA H100 80GB HBM3", f"GPU-bench-{i}", 60000.0, 81559.0, 95.0, 600.0, 700.0, 70.0,
                    [GpuProcess(999_000 + i, 59000.0)]) for i in range(n)]


def bench_inprocess(run_dir: Path, seconds: float, refresh: float, ranks: int) -> dict:
    from sftbench.monitor.app import MonitorApp
    from sftbench.monitor.gpu import FakeGpuSource, HostSource
    from sftbench.monitor.session import Session, resolve_target

    out: dict = {}

    async def main():
        session = Session(resolve_target(str(run_dir)), FakeGpuSource(fake_gpus(ranks)), HostSource())
        app = MonitorApp(session, refresh=refresh)
        c0, w0 = time.process_time(), time.perf_counter()
        async with app.run_test(size=(200, 60)):
            while session.catching_up:
                await asyncio.sleep(0.01)
            out["backlog_read_s"] = time.perf_counter() - w0
            out["backlog_cpu_s"] = time.process_time() - c0
            await asyncio.sleep(min(3.0, seconds / 4))          # settle
            step0 = session.run.ranks[0].step
            c1, w1, t1 = time.process_time(), time.perf_counter(), app.ticks
            await asyncio.sleep(seconds)
            c2, w2, t2 = time.process_time(), time.perf_counter(), app.ticks
            out["steady_cpu_per_wall"] = (c2 - c1) / (w2 - w1)
            out["ticks"] = t2 - t1
            out["steps_followed"] = session.run.ranks[0].step - step0
            out["last_step"] = session.run.ranks[0].step
            out["cell_updates"] = app.rank_sync.cell_updates
        session.close()

    asyncio.run(main())
    return out


def bench_pty(run_dir: Path, seconds: float, refresh: float) -> dict:
    import fcntl
    import pty
    import struct
    import termios

    import psutil

    env = dict(os.environ, TERM="xterm-256color", SFTBENCH_NO_NVML="1", COLUMNS="200", LINES="60")
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        # default mode: no target, follow the newest run under --runs-root (exercises the run discovery too)
        os.execve(sys.executable, [sys.executable, "monitor.py", "--runs-root", str(run_dir.parent),
                                   "--refresh", str(refresh)], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    received = [0]
    t_start = time.perf_counter()
    first_data: list[float] = []
    tail = [b""]

    def drain():
        while True:
            try:
                b = os.read(fd, 65536)
            except OSError:
                return
            if not b:
                return
            received[0] += len(b)
            if not first_data:
                tail[0] = (tail[0] + b)[-65536:]
                if b"s/it EMA" in tail[0]:          # the run header with numbers is on screen
                    first_data.append(time.perf_counter() - t_start)

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    proc = psutil.Process(pid)
    time.sleep(max(4.0, seconds / 4))                        # start-up + initial load + settle
    ct = proc.cpu_times()
    c1, w1, b1 = ct.user + ct.system, time.perf_counter(), received[0]
    time.sleep(seconds)
    ct = proc.cpu_times()
    c2, w2, b2 = ct.user + ct.system, time.perf_counter(), received[0]
    try:
        os.write(fd, b"q")
        for _ in range(50):
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 15)
            os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return {"steady_cpu_per_wall": (c2 - c1) / (w2 - w1), "tty_bytes_per_s": (b2 - b1) / (w2 - w1),
            "first_screen_with_data_s": first_data[0] if first_data else None}


def timed(cmd: list[str], n: int = 3, env: dict | None = None) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def import_time(n: int = 3) -> float:
    code = ("import time; t = time.perf_counter(); import sftbench.monitor.app; "
            "print(time.perf_counter() - t)")
    ts = []
    for _ in range(n):
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
        ts.append(float(r.stdout.strip()))
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=2.0, help="steps appended per second to every rank file")
    ap.add_argument("--refresh", type=float, default=1.0)
    ap.add_argument("--no-pty", action="store_true", help="skip the real-terminal measurement")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = ap.parse_args()

    res: dict = {"ranks": args.ranks, "steps": args.steps, "rate_steps_per_s": args.rate, "refresh_s": args.refresh,
                 "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="sftbench-moncpu-") as tmp:
        run_dir = Path(tmp) / "bench_run"
        t = time.perf_counter()
        make_run(run_dir, args.ranks, args.steps)
        size = sum(p.stat().st_size for p in run_dir.glob("rank*.jsonl"))
        print(f"fixture: {args.ranks} rank files x {args.steps} steps, {size / 2**20:.1f} MiB, "
              f"written in {time.perf_counter() - t:.1f}s")
        env = dict(os.environ, SFTBENCH_NO_NVML="1")
        res["once_startup_s"] = timed([sys.executable, "monitor.py", "--once", str(run_dir)], env=env)
        res["app_import_s"] = import_time()
        print(f"start-up: monitor.py --once on that run {res['once_startup_s']:.2f}s; "
              f"import sftbench.monitor.app {res['app_import_s']:.3f}s")

        writer = start_writer(run_dir, args.ranks, args.steps + 1, args.rate)
        try:
            r = bench_inprocess(run_dir, args.seconds, args.refresh, args.ranks)
            res["inprocess"] = r
            print(f"in-process headless app: whole backlog read {r['backlog_read_s']:.2f}s after start"
                  f" ({r['backlog_cpu_s']:.2f} CPU s); steady state "
                  f"{100 * r['steady_cpu_per_wall']:.2f}% of one "
                  f"core over {args.seconds:.0f}s ({r['ticks']} ticks, followed {r['steps_followed']} new steps per "
                  f"rank, now at step {r['last_step']})")
            if not args.no_pty:
                try:
                    p = bench_pty(run_dir, args.seconds, args.refresh)
                except Exception as e:  # no pty / psutil on this platform
                    print(f"pty measurement skipped: {type(e).__name__}: {e}")
                else:
                    res["pty"] = p
                    fs = p["first_screen_with_data_s"]
                    print(f"monitor.py in a pseudo-terminal: first screen with numbers after "
                          f"{'-' if fs is None else f'{fs:.2f}s'} (process start included); steady state "
                          f"{100 * p['steady_cpu_per_wall']:.2f}% of one core "
                          f"({p['tty_bytes_per_s']:.0f} bytes/s to the terminal)")
        finally:
            writer.terminate()
            writer.wait()
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
