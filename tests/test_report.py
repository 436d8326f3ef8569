"""sftbench.report from fixture logs written with runlog.RunLog (no training)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO
from sftbench import report, runlog
from sftbench.dsconfig import apply_precision, load_ds_config

GPU = "NVIDIA H100 80GB HBM3"


def _entry(run, model, cfg, precision, n, accel="cuda", rows=()):
    return {"run": run, "model": model, "ds_config": f"ds_configs/{cfg}.json" if cfg != "none" else None,
            "precision": precision, "num_gpus": n, "max_steps": 10, "warmup_steps": 3, "accelerator": accel,
            "data": "data/bench_10k.jsonl", "seq_len": 512, "extra_args": [], "ref_rows": list(rows)}


def write_ok_run(root: Path, run: str, model: str, cfg: str, precision: str, world: int, step_s: float,
                 gpu_mib: float, rss_mib: float, *, accel="cuda", measured_epoch=None, rows=(), compile="off",
                 skipped: int = 0, meta_extra: dict | Callable[[int], dict] | None = None, seq_len: int = 512,
                 summary_extra: dict | None = None, pred: dict | None = None):
    rd = root / run
    ds = None if cfg == "none" else apply_precision(load_ds_config(REPO / "ds_configs" / f"{cfg}.json"), precision)
    pred = pred or {"gpu_mib": gpu_mib * 0.9, "host_mib": rss_mib * world * 1.1, "fits": True}
    for rank in range(world):
        log = runlog.RunLog(rd, rank)
        log.meta(run=run, time=1.0, argv=["train.py", "--ds", cfg, "--run-dir", str(REPO / "runs" / run)],
                 ds_config_path=None if cfg == "none" else f"ds_configs/{cfg}.json", ds_config=ds,
                 model=model, n_params=345_000_000, world_size=world, rank=rank, local_rank=rank, host="somehost",
                 pid=123, device="cpu" if accel == "cpu" else f"cuda:{rank}",
                 device_name=None if accel == "cpu" else GPU, precision=precision, micro_batch=1, grad_accum=8,
                 seq_len=seq_len, steps_per_epoch=1250 // world, max_steps=10, warmup_steps=3, predicted=pred,
                 versions={"python": "3.11", "torch": "2.13.0", "deepspeed": "0.19.8"}, git_commit="abc123def4567",
                 **{"optimizations": {"compile": compile},
                    **((meta_extra(rank) if callable(meta_extra) else meta_extra) or {})})
        for i in range(10):
            log.step(step=i + 1, step_s=step_s, warmup=i < 3, loss=2.0, tokens_per_s=8 * 512 * world / step_s,
                     gpu_mem_used_mib=None if accel == "cpu" else gpu_mib + rank, host_rss_mib=rss_mib,
                     skipped=i < skipped)
        # Overflow steps are out of the statistics (sftbench.metrics.StepStats): none left, no numbers.
        measured = 10 - max(3, skipped)
        med = step_s if measured else None
        log.summary(status="ok", steps=10, measured_steps=measured, skipped_steps=skipped, step_s_median=med,
                    step_s_p90=med, step_s_mean=med, tokens_per_s=8 * 512 * world / step_s if med else None,
                    tokens_per_s_per_gpu=8 * 512 / step_s if med else None, tflops=123.4 if med else None,
                    mfu_pct=12.5 if med else None,
                    gpu_mem_used_mib_peak=None if accel == "cpu" else gpu_mib + rank, host_rss_mib_peak=rss_mib,
                    steps_per_epoch=1250 // world, epoch_s_est=(1250 // world) * step_s if med else None,
                    epoch_s_measured=measured_epoch, synthesized=False, **(summary_extra or {}))
        log.close()
    (rd / "plan_entry.json").write_text(json.dumps(_entry(run, model, cfg, precision, world, accel, rows)))
    return rd


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs" / "h100x1"
    entries = []
    # two runs that worked
    write_ok_run(root, "pangu-350m__z0__bf16__g1", "pangu-350m", "z0", "bf16", 1, 0.52, 12345.0, 2100.0)
    write_ok_run(root, "pangu-350m__z3_offload_param__bf16__g1", "pangu-350m", "z3_offload_param", "bf16", 1, 3.1,
                 4321.0, 9000.0, rows=(12,))
    # died without a summary: the sweep synthesized one (no meta: it died before)
    rd = root / "pangu-2.6b__z0__fp16__g1"
    rd.mkdir(parents=True)
    e = _entry(rd.name, "pangu-2.6b", "z0", "fp16", 1, rows=(18,))
    (rd / "plan_entry.json").write_text(json.dumps(e))
    (rd / "predicted.json").write_text(json.dumps({"gpu_mib": 52374.4, "host_mib": 1500.0, "fits": True}))
    synth = {k: None for k in runlog.SUMMARY_KEYS}
    synth.update(type="summary", status="oom", error="torch.OutOfMemoryError: CUDA out of memory. Tried to "
                 "allocate 1.2 GiB", synthesized=True, steps=0)
    (rd / "summary.json").write_text(json.dumps(synth))
    (rd / "console.log").write_text("whatever the console says, the report does not read it\n")
    # train.py caught a CUDA error itself: a rank file with only a summary
    rd2 = root / "pangu-2.6b__z1__bf16__g1"
    log = runlog.RunLog(rd2, 0)
    log.summary(status="cuda_error", error="ValueError: invalid literal for int() with base 10: '0a'",
                synthesized=False)
    log.close()
    (rd2 / "plan_entry.json").write_text(json.dumps(_entry(rd2.name, "pangu-2.6b", "z1", "bf16", 1)))
    # an ok run whose console is full of alarming text: must stay ok
    rd3 = write_ok_run(root, "pangu-2.6b__z2_offload_5e8__bf16__g1", "pangu-2.6b", "z2_offload_5e8", "bf16", 1,
                       9.0, 13539.0, 40000.0, measured_epoch=11000.0, rows=(33,))
    (rd3 / "console.log").write_text("RuntimeError: CUDA out of memory\n")
    for d in sorted(root.iterdir()):
        entries.append(json.loads((d / "plan_entry.json").read_text()))
    order = ["pangu-350m__z0__bf16__g1", "pangu-350m__z3_offload_param__bf16__g1", "pangu-2.6b__z0__fp16__g1",
             "pangu-2.6b__z1__bf16__g1", "pangu-2.6b__z2_offload_5e8__bf16__g1"]
    entries.sort(key=lambda x: order.index(x["run"]))
    (root / "plan.json").write_text(json.dumps({"sweep": "h100x1", "created": 0, "entries": entries}))
    (root / "sweep_info.json").write_text(json.dumps({
        "command": "python -m sftbench.sweep run --gpus 1", "hardware": {
            "gpus": [{"index": 0, "name": GPU, "memory_mib": 81559}], "cpu_model": "Some CPU 9000",
            "cpu_count": 16, "host_mem_mib": 131072}}))
    return root


def test_markdown_table_headers_cells_and_footnotes(sweep_dir, tmp_path):
    out = tmp_path / "results" / "h100x1"
    res = report.make_report(sweep_dir, out)
    assert res == {"rows": 5, "failures": 2, "out": str(out)}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "Each run: `deepspeed --num_gpus N train.py " in md and "nodes;" not in md  # one machine: as before
    header = next(line for line in md.splitlines() if line.startswith("| 模型"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    # the reference's header row, in its order, with English beside it
    assert cells[:16] == ["模型 (model)", "整体耗时/epoch (epoch time)", "单条样本耗时 (s/it)", "s/sample",
                          "内存使用量 (host RAM)", "显存使用量 (GPU memory)", "GPU型号和数量 (GPU model and count)",
                          "fp16", "bf16", "deepspeed stage", "offload optimizer", "pin memory",
                          "offload param", "overlap comm", "allgather bucket size",
                          "stage3 max live parameters"]
    rows = {line.split("|")[-2].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ") and "__" in line}
    z0 = rows["pangu-350m__z0__bf16__g1"]
    assert z0[0] == "Pangu-350M" and z0[1] == "~10.8min" and z0[2] == "0.52s/it" and z0[3] == "0.065s"
    assert z0[4] == "2.1G" and z0[5] == "1*12345MB" and z0[6] == "1*H100 80GB HBM3"
    assert z0[7:16] == ["false", "true", "0", "-", "-", "-", "-", "-", "-"]
    z3 = rows["pangu-350m__z3_offload_param__bf16__g1"]
    assert z3[0] == "" and z3[9:16] == ["3", "true", "true", "true", "false", "1e9", "1e9"]
    assert z3[-2] == "-"  # the reference ran this config on 3 V100s only: no 1-GPU row to compare with
    oom = rows["pangu-2.6b__z0__fp16__g1"]
    assert oom[0] == "Pangu-2.6B" and oom[5] == "OOM [1]" and oom[1] == "-" and oom[7:10] == ["true", "false", "0"]
    assert oom[6] == "1*H100 80GB HBM3"  # GPU name from the sweep's record: the run died before its meta
    cuda = rows["pangu-2.6b__z1__bf16__g1"]
    assert cuda[5] == "CUDA Error [2]"
    ok = rows["pangu-2.6b__z2_offload_5e8__bf16__g1"]
    assert ok[5] == "1*13539MB" and ok[1] == "3.1h"  # measured epoch: no ~
    assert ok[9:15] == ["2", "true", "true", "-", "false", "5e8"]
    assert "1. pangu-2.6b__z0__fp16__g1: OOM (recorded by the sweep): torch.OutOfMemoryError: CUDA out of memory" in md
    assert "2. pangu-2.6b__z1__bf16__g1: CUDA Error: ValueError: invalid literal for int() with base 10: '0a'" in md
    assert "`~` = estimated" in md
    # preamble: hardware, versions, command; recommendation per model and GPU count
    assert "1 × H100 80GB HBM3" in md and "Some CPU 9000" in md and "deepspeed 0.19.8" in md
    assert "python -m sftbench.sweep run --gpus 1" in md
    rec = md[md.index("## Recommendation"):]
    assert "Pangu-350M on 1 × H100 80GB HBM3**: fastest `z0` bf16 (0.52s/it" in rec
    assert "least GPU memory: `z3_offload_param` bf16" in rec and "4321 MiB per GPU" in rec
    assert "Pangu-2.6B on 1 × H100 80GB HBM3**: fastest `z2_offload_5e8` bf16" in rec
    assert str(REPO) not in md and "somehost" not in md


def test_html_csv_png_and_summaries(sweep_dir, tmp_path):
    out = tmp_path / "res"
    report.make_report(sweep_dir, out)
    page = (out / "results.html").read_text(encoding="utf-8")
    for zh in ("模型", "整体耗时/epoch", "单条样本耗时", "内存使用量", "显存使用量", "GPU型号和数量", "offload param",
               "stage3 max live parameters"):
        assert zh in page
    assert '<td rowspan="2">Pangu-350M</td>' in page and "OOM [1]" in page and "CUDA Error [2]" in page
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert len(rows) == 5
    for k in runlog.SUMMARY_KEYS:
        if k != "type":
            assert k in reader.fieldnames, k
    for k in ("run", "model", "ds_config", "precision", "num_gpus", "zero_stage", "offload_optimizer",
              "predicted_gpu_mib", "s_per_sample"):
        assert k in reader.fieldnames
    by = {r["run"]: r for r in rows}
    assert by["pangu-2.6b__z0__fp16__g1"]["status"] == "oom"
    assert by["pangu-350m__z0__bf16__g1"]["step_s_median"] == "0.52"
    assert by["pangu-350m__z3_offload_param__bf16__g1"]["offload_param"] == "cpu"
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    recs = [json.loads(line) for line in (out / "summaries.jsonl").read_text(encoding="utf-8").splitlines()]
    metas = [r for r in recs if r["type"] == "meta"]
    sums = [r for r in recs if r["type"] == "summary"]
    assert len(metas) == 3 and {s["run"] for s in sums} == {r["run"] for r in rows}
    assert all("host" not in m and "argv" not in m for m in metas)
    assert not any(str(REPO) in json.dumps(r) for r in recs)


def test_compiled_runs_are_marked(tmp_path):
    """A run that used torch.compile says so next to its s/it (md) and in the csv's compile column."""
    root = tmp_path / "runs" / "h100x1"
    write_ok_run(root, "pangu-2.6b__z1__bf16__g1", "pangu-2.6b", "z1", "bf16", 1, 0.4585, 73587.0, 2300.0,
                 compile="model")
    write_ok_run(root, "pangu-2.6b__z0__bf16__g1", "pangu-2.6b", "z0", "bf16", 1, 0.443, 62000.0, 2300.0)
    out = tmp_path / "res"
    report.make_report(root, out)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| 0.46s/it (compiled: model) |" in md and "| 0.44s/it |" in md
    assert "- `(compiled: model)` after s/it: the run used torch.compile" in md
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        by = {r["run"]: r["compile"] for r in csv.DictReader(f)}
    assert by == {"pangu-2.6b__z1__bf16__g1": "model", "pangu-2.6b__z0__bf16__g1": "off"}


def _report_md(root: Path, out: Path) -> str:
    report.make_report(root, out)
    return (out / "results.md").read_text(encoding="utf-8")


def test_a_memory_prediction_outside_the_tolerance_is_marked_with_where_it_misses(tmp_path):
    """A row whose GPU or host prediction is more than 15% off its measurement gets a remark. GPU: the part that
    carries the gap (outside torch's pool, or the pool), then in the pool the allocator's reserve beyond its allocated
    peak where that covers at least half the gap, else what the predictor knows it leaves out for the config, else the
    largest term; host: the largest term; a row within 15% gets none."""
    root = tmp_path / "runs" / "h200x1"
    miss = {"gpu_mib": 60_280.0, "host_mib": 1_617.0, "fits": True,
            "gpu_breakdown_mib": {"params": 5007.0, "optimizer": 30044.0},
            "host_breakdown_mib": {"base_rss": 1500.0, "dataset": 117.0}}
    write_ok_run(root, "pangu-2.6b__z1__bf16__g1", "pangu-2.6b", "z1", "bf16", 1, 0.306, 69_945.0, 2_251.0,
                 pred=miss, summary_extra={"torch_peak_alloc_mib": 60_151.0, "torch_peak_reserved_mib": 68_610.0})
    write_ok_run(root, "pangu-2.6b__z3__bf16__g1", "pangu-2.6b", "z3", "bf16", 1, 4.1, 61_427.0, 2_182.0,
                 pred={**miss, "gpu_mib": 50_000.0, "host_mib": 2_100.0},
                 summary_extra={"torch_peak_alloc_mib": 55_000.0, "torch_peak_reserved_mib": 56_000.0})
    write_ok_run(root, "pangu-2.6b__z0__bf16__g1", "pangu-2.6b", "z0", "bf16", 1, 0.35, 79_311.0, 2_159.0)
    out = tmp_path / "res"
    md = _report_md(root, out)
    assert "`pangu-2.6b__z1__bf16__g1`: GPU" not in md  # 13.8% under: inside the band
    assert ("`pangu-2.6b__z1__bf16__g1`: host memory predicted 1,617 MiB, -28% of the measured 2,251 (outside ±15%): "
            "the prediction's largest term is `base_rss`." in md)
    # a 1,000 MiB reserve: not half the gap; z3.json has overlap_comm false: nothing known left out
    assert ("`pangu-2.6b__z3__bf16__g1`: GPU memory predicted 50,000 MiB, -19% of the measured 61,427 (outside "
            "±15%): torch's pool peaked at 56,000 MiB against the 50,000 predicted for it; its largest term is "
            "`optimizer`." in md)
    assert "`pangu-2.6b__z3__bf16__g1`: host" not in md and "`pangu-2.6b__z0__bf16__g1`: " not in md
    write_ok_run(root, "pangu-2.6b__z2_5e8__bf16__g1", "pangu-2.6b", "z2_5e8", "bf16", 1, 0.49, 80_000.0, 2_251.0,
                 pred={**miss, "host_mib": 2_100.0},
                 summary_extra={"torch_peak_alloc_mib": 60_151.0, "torch_peak_reserved_mib": 72_000.0})
    md = _report_md(root, out)
    assert ("`pangu-2.6b__z2_5e8__bf16__g1`: GPU memory predicted 60,280 MiB, -25% of the measured 80,000 (outside "
            "±15%): torch's pool peaked at 72,000 MiB against the 60,280 predicted for it: the allocator reserved "
            "11,849 MiB beyond its allocated peak" in md)
    # ZeRO-3 with overlap_comm: the predictor's known gap is named
    write_ok_run(root, "pangu-2.6b__z3_offload_param_overlap__bf16__g1", "pangu-2.6b", "z3_offload_param_overlap",
                 "bf16", 1, 5.0, 9_893.0, 71_625.0, pred={**miss, "gpu_mib": 7_353.0, "host_mib": 69_656.0,
                                                          "gpu_breakdown_mib": {"params": 5_000.0,
                                                                                "cuda_context": 770.0, "nccl": 570.0}},
                 summary_extra={"torch_peak_alloc_mib": 8_000.0, "torch_peak_reserved_mib": 8_500.0})
    # the context and NCCL measured far below their prediction: the remark says so with both numbers
    write_ok_run(root, "pangu-350m__z3_offload__bf16__g1", "pangu-350m", "z3_offload", "bf16", 1, 2.4, 4_819.0,
                 9_168.0, pred={**miss, "gpu_mib": 5_644.0, "host_mib": 9_962.0,
                                "gpu_breakdown_mib": {"params": 3_684.0, "cuda_context": 1_960.0}},
                 summary_extra={"torch_peak_alloc_mib": 3_300.0, "torch_peak_reserved_mib": 3_486.0})
    md = _report_md(root, out)
    assert ("`pangu-2.6b__z3_offload_param_overlap__bf16__g1`: GPU memory predicted 7,353 MiB, -26% of the measured "
            "9,893 (outside ±15%): torch's pool peaked at 8,500 MiB against the 6,013 predicted for it: ZeRO-3 "
            "`overlap_comm`: what its side streams allocate" in md)
    # the same config where the allocator's reserve covers the gap (as measured: same allocated peak as without
    # overlap_comm, 3 GB more reserved): the reserve is the number, the config's known gap is named beside it
    write_ok_run(root, "pangu-2.6b__z3_offload_param_overlap_ag5e8__bf16__g1", "pangu-2.6b",
                 "z3_offload_param_overlap_ag5e8", "bf16", 1, 5.0, 9_875.0, 71_625.0,
                 pred={**miss, "gpu_mib": 7_353.0, "host_mib": 69_656.0,
                       "gpu_breakdown_mib": {"params": 5_000.0, "cuda_context": 770.0, "nccl": 570.0}},
                 summary_extra={"torch_peak_alloc_mib": 5_493.0, "torch_peak_reserved_mib": 8_472.0})
    md = _report_md(root, out)
    assert ("`pangu-2.6b__z3_offload_param_overlap_ag5e8__bf16__g1`: GPU memory predicted 7,353 MiB, -26% of the "
            "measured 9,875 (outside ±15%): torch's pool peaked at 8,472 MiB against the 6,013 predicted for it: the "
            "allocator reserved 2,979 MiB beyond its allocated peak (cached segments and any CUDA-graph pool's "
            "working memory, not modelled); not modelled for this config: ZeRO-3 `overlap_comm`." in md)
    assert "`pangu-2.6b__z2_5e8__bf16__g1`: GPU" in md and "11,849 MiB beyond its allocated peak (cached segments " \
        "and any CUDA-graph pool's working memory, not modelled)." in md  # ZeRO-2: no known gap to name
    assert ("`pangu-350m__z3_offload__bf16__g1`: GPU memory predicted 5,644 MiB, +17% of the measured 4,819 (outside "
            "±15%): outside torch's pool (CUDA context, NCCL) it measured 1,333 MiB against the 1,960 predicted "
            "(`cuda_context` + `nccl`); the pool 3,486 against 3,684." in md)


def test_fp16_overflow_steps_are_named(tmp_path):
    """fp16 runs whose first steps overflowed: a note with the count; none left measured: no numbers, and why."""
    root = tmp_path / "runs" / "h100x3"
    write_ok_run(root, "pangu-350m__z0__fp16__g3", "pangu-350m", "z0", "fp16", 3, 0.45, 10000.0, 2000.0, skipped=5)
    write_ok_run(root, "pangu-350m__z1__fp16__g3", "pangu-350m", "z1", "fp16", 3, 0.30, 9000.0, 2000.0, skipped=10)
    write_ok_run(root, "pangu-350m__z1__bf16__g3", "pangu-350m", "z1", "bf16", 3, 0.44, 9000.0, 2000.0)
    # ZeRO-0 fp16 on DeepSpeed 0.19: flagged (does not learn); from the meta's warnings, or inferred for older logs
    write_ok_run(root, "pangu-2.6b__z0__fp16__g3", "pangu-2.6b", "z0", "fp16", 3, 0.72, 62000.0, 2000.0,
                 meta_extra={"zero_stage": 0, "optimizations": {"engine": "deepspeed", "compile": "off"}})
    write_ok_run(root, "pangu-350m__z0b__fp16__g3", "pangu-350m", "z0", "fp16", 3, 0.45, 10000.0, 2000.0,
                 meta_extra={"zero_stage": 0, "warnings": ["something the engine check said"]})
    out = tmp_path / "res"
    report.make_report(root, out)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert ("- `pangu-350m__z0__fp16__g3`: 5 fp16 overflow step(s) that skipped the optimizer update while the loss "
            "scale came down (it halves per overflow); like warm-up they are left out, 5 step(s) measured.") in md
    assert "| 0.45s/it |" in md and "0.30s/it" not in md
    # no measured step is not a failure: its own list, with the causes that apply
    assert "**Failures**" not in md and "| no measured step |" in md
    assert ("- `pangu-350m__z1__fp16__g3`: no measured step: of the 10 step(s), 3 warm-up (--warmup-steps 3) and 7 "
            "fp16 overflow step(s) that skipped the optimizer update while the loss scale came down") in md
    assert "pangu-350m__z1__bf16__g3`: " not in md
    assert ("- `pangu-2.6b__z0__fp16__g3`: warning: fp16 with ZeRO stage 0 on DeepSpeed 0.19.8: engine.backward does "
            "not apply the loss scale") in md
    assert "- `pangu-350m__z0b__fp16__g3`: warning: something the engine check said" in md
    assert "`pangu-350m__z0__fp16__g3`: warning" not in md  # its meta has no zero_stage: nothing inferred
    rec = md.split("## Recommendation")[1]
    assert "**Pangu-2.6B on 3 × H100 80GB HBM3**: no configuration finished that trains (see the warnings" in rec
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        by = {r["run"]: r["skipped_steps"] for r in csv.DictReader(f)}
    assert by == {"pangu-350m__z0__fp16__g3": "5", "pangu-350m__z1__fp16__g3": "10", "pangu-350m__z1__bf16__g3": "0",
                  "pangu-2.6b__z0__fp16__g3": "0", "pangu-350m__z0b__fp16__g3": "0"}


def test_a_fine_tuning_run_s_eval_loss_is_named_and_in_the_csv(tmp_path):
    root = tmp_path / "runs" / "cpu"
    write_ok_run(root, "pangu-tiny__z1__fp32__g2", "pangu-tiny", "z1", "fp32", 2, 0.2, 0.0, 600.0,
                 summary_extra={"eval_loss": 2.345678})
    write_ok_run(root, "pangu-tiny__z3__fp32__g2", "pangu-tiny", "z3", "fp32", 2, 0.3, 0.0, 600.0)
    out = tmp_path / "res"
    report.make_report(root, out)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "- `pangu-tiny__z1__fp32__g2`: eval loss 2.3457 at its last evaluation" in md
    assert "pangu-tiny__z3__fp32__g2`: eval loss" not in md
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        by = {r["run"]: r["eval_loss"] for r in csv.DictReader(f)}
    assert by == {"pangu-tiny__z1__fp32__g2": "2.345678", "pangu-tiny__z3__fp32__g2": ""}


def test_the_compile_note_only_where_a_row_compiled(sweep_dir, tmp_path):
    report.make_report(sweep_dir, tmp_path / "res")
    assert "(compiled" not in (tmp_path / "res" / "results.md").read_text(encoding="utf-8")


def test_epoch_check_compares_the_short_estimate_with_the_full_epoch(tmp_path):
    """A <run>__epoch run beside <run>: the report's epoch check gives both and the error; recommendations and the
    failure list ignore the longer twin."""
    root = tmp_path / "runs" / "h100x1"
    write_ok_run(root, "pangu-350m__z0__bf16__g1", "pangu-350m", "z0", "bf16", 1, 0.30, 10000.0, 2000.0)
    write_ok_run(root, "pangu-350m__z0__bf16__g1__epoch", "pangu-350m", "z0", "bf16", 1, 0.31, 10100.0, 2000.0,
                 measured_epoch=400.0)
    report.make_report(root, tmp_path / "res")
    md = (tmp_path / "res" / "results.md").read_text(encoding="utf-8")
    check = md.split("## Epoch check")[1].split("## Recommendation")[0]
    # short estimate 1250 x 0.30 = 375 s against 400 s measured: -6.2%; the epoch run's own 1250 x 0.31 = 388 s
    assert "one full epoch (1250 steps) took **6.7min** (400 s)" in check
    assert "estimated ~6.2min (375 s, from 7 measured steps): **-6.2%**" in check
    assert "gives 388 s (-3.1%" in check
    assert md.count("pangu-350m__z0__bf16__g1__epoch") == 1  # its table row only
    assert "<h2>Epoch check</h2>" in (tmp_path / "res" / "results.html").read_text(encoding="utf-8")


def test_cpu_runs_say_so(tmp_path):
    root = tmp_path / "cpu"
    write_ok_run(root, "pangu-tiny__z0__bf16__cpu2", "pangu-tiny", "z0", "bf16", 2, 0.6, 0.0, 550.0, accel="cpu")
    write_ok_run(root, "pangu-tiny__none__fp32__cpu2", "pangu-tiny", "none", "fp32", 2, 0.4, 0.0, 500.0,
                 accel="cpu")
    report.make_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert md.splitlines()[0].endswith("(CPU run)") and "**Ran on CPU**" in md
    row = next(line for line in md.splitlines() if "pangu-tiny__z0__bf16__cpu2" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "-" and cells[6] == "2*CPU" and cells[4] == "1.1G"
    # `none` is both the fastest (0.4 s/it) and the leanest (500 MiB per rank): one description, "it also uses"
    assert ("- **Pangu-tiny on CPU (2 ranks)**: fastest `none` fp32 (0.40s/it, 0.025 s/sample, ~4.2min/epoch, "
            "1.0 GiB host RSS); it also uses the least host memory.") in md.splitlines()
    assert (tmp_path / "out" / "results.png").stat().st_size > 5_000


def test_two_node_run_host_ram_per_node_and_node_dirs(tmp_path):
    """Ranks 0-1 on node a (1000 MiB RSS each) in the sweep folder, ranks 2-3 on node b (1500 MiB each) in a copy of
    node b's folder: host RAM is the largest node's sum, the report reads node b's folder when given it."""
    def where(rank):
        return {"node": "ab"[rank // 2], "node_rank": rank // 2, "num_nodes": 2, "local_world_size": 2}
    a, b = tmp_path / "a", tmp_path / "b"
    write_ok_run(a, "job", "pangu-350m", "z1", "bf16", 4, 0.5, 9000, 1000.0, meta_extra=where)
    write_ok_run(b, "job", "pangu-350m", "z1", "bf16", 4, 0.5, 9000, 1500.0, meta_extra=where)
    for r in (0, 1):
        (b / "job" / f"rank{r}.jsonl").unlink()
    for r in (2, 3):
        (a / "job" / f"rank{r}.jsonl").unlink()
    (row,), _, _ = report.collect(a)
    assert row.nodes == 2 and row.world == 4 and row.host_rss_mib == 2000.0  # node a only: its two ranks
    assert row.host_rss_all_mib == 4000.0  # the two missing ranks taken like the ones read
    (row,), _, _ = report.collect(a, [b])
    assert sorted(row.rank_summaries) == [0, 1, 2, 3]
    row.predicted = {**row.predicted, "host_mib_per_node": 2500.0}  # as train.py logs it on several nodes
    assert row.pred_host == 2500.0  # compared with the node's measured figure, not the whole job's
    assert row.host_rss_mib == 3000.0 and row.host_rss_all_mib == 5000.0
    out = tmp_path / "out"
    assert report.main([str(a), "--node-dir", str(b), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "`job`: 2 nodes; host RAM is the largest node's" in md and "logs of 2 of the 2 nodes read" in md
    assert "Each run: `deepspeed --hostfile H --num_nodes M --num_gpus N train.py " in md
    csv_row = next(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert (csv_row["num_nodes"], csv_row["host_rss_mib_max_over_nodes"]) == ("2", "3000.0")
    assert csv_row["host_rss_mib_sum_over_ranks"] == "5000.0"
    report.make_report(a, tmp_path / "out1")
    assert "logs of 1 of the 2 nodes read (the others: give their folders with --node-dir)" in \
        (tmp_path / "out1" / "results.md").read_text()
    assert report.main([str(a), "--node-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_helpers():
    assert report.fmt_e(500_000_000) == "5e8" and report.fmt_e(1e9) == "1e9" and report.fmt_e(150_000_000) == "1.5e8"
    assert report.fmt_duration(45) == "45s" and report.fmt_duration(738) == "12.3min"
    assert report.fmt_duration(5400) == "1.5h"
    pts = [(1, 5, "a"), (2, 4, "b"), (3, 6, "c"), (4, 1, "d")]
    assert [t for _, _, t in report.pareto(pts)] == ["a", "b", "d"]


def test_cli(sweep_dir, tmp_path, capsys):
    assert report.main([str(sweep_dir), "--out", str(tmp_path / "o")]) == 0
    assert "5 runs (2 failed)" in capsys.readouterr().out
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err


def test_an_empty_folder_is_an_error_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty holds no run directories" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert report.main([str(tmp_path / "file")]) == 2 and "is not a directory" in capsys.readouterr().err


def test_two_seq_lens_get_a_column_and_are_recommended_apart(tmp_path):
    """Runs of seq-len 512 and 128 in one folder: a seq len column, and a recommendation within each length (the
    128 runs are faster per step, so a recommendation across them would name a 128 run for 512 too)."""
    root = tmp_path / "mixed"
    write_ok_run(root, "z0_512", "pangu-350m", "z0", "bf16", 1, 0.52, 12000.0, 2000.0)
    write_ok_run(root, "z1_512", "pangu-350m", "z1", "bf16", 1, 0.60, 9000.0, 2000.0)
    write_ok_run(root, "z0_128", "pangu-350m", "z0", "bf16", 1, 0.20, 11000.0, 2000.0, seq_len=128)
    write_ok_run(root, "z2_128", "pangu-350m", "z2_offload_5e8", "bf16", 1, 0.90, 5000.0, 2000.0, seq_len=128)
    report.make_report(root, tmp_path / "res")
    md = (tmp_path / "res" / "results.md").read_text(encoding="utf-8")
    header = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| 模型")).strip("|").split("|")]
    assert header[16] == "seq len" and "micro batch" not in header and "grad accum" not in header
    rows = {ln.split("|")[-2].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in md.splitlines() if ln.startswith("| ") and ("_512 |" in ln or "_128 |" in ln)}
    assert rows["z0_512"][16] == "512" and rows["z2_128"][16] == "128"
    rec = md.split("## Recommendation")[1].strip().splitlines()
    rec = [x for x in rec if x.startswith("- ")]
    assert len(rec) == 2
    r512 = next(x for x in rec if "seq len 512" in x)
    r128 = next(x for x in rec if "seq len 128" in x)
    assert "fastest `z0` bf16 (0.52s/it" in r512 and "least GPU memory: `z1` bf16" in r512
    assert "fastest `z0` bf16 (0.20s/it" in r128 and "least GPU memory: `z2_offload_5e8` bf16" in r128
    # one length only: no column, no length in the recommendation
    report.make_report(root / "z0_512", tmp_path / "one")
    md1 = (tmp_path / "one" / "results.md").read_text(encoding="utf-8")
    assert "seq len" not in md1


def test_a_run_without_a_summary_is_dead_running_or_stalled(tmp_path):
    """No summary and no summary.json: its pids on this host decide (a finished process: dead, with its last
    record's time; a live one: running), as in the monitor."""
    import socket
    import subprocess
    import sys
    import time
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    root = tmp_path / "runs"
    try:
        for name, pid in (("killed_run", gone.pid), ("live_run", live.pid)):
            log = runlog.RunLog(root / name, 0)
            log.meta(run=name, time=time.time(), model="pangu-tiny", world_size=1, rank=0, host=socket.gethostname(),
                     pid=pid, device="cpu", precision="bf16", micro_batch=1, grad_accum=8, seq_len=128,
                     steps_per_epoch=29, max_steps=20, warmup_steps=3)
            log.step(step=1, time=time.time(), step_s=1.5, warmup=True, loss=10.0, host_rss_mib=600.0)
            log.close()
        write_ok_run(root, "ok_run", "pangu-tiny", "z0", "bf16", 1, 0.6, 0.0, 550.0, accel="cpu", seq_len=128)
        report.make_report(root, tmp_path / "res")
    finally:
        live.kill()
        live.wait()
    md = (tmp_path / "res" / "results.md").read_text(encoding="utf-8")
    fails = md.split("**Failures**")[1].split("**Not finished**")[0]
    assert "1. killed_run: Dead: no process of this run is left on this host and it wrote no summary; last " \
           "record" in fails
    assert "live_run" not in fails and "- `live_run`: Running: last record" in md.split("**Not finished**")[1]
    row = next(ln for ln in md.splitlines() if "| killed_run |" in ln)
    assert "| Dead [1] |" in row


def test_planned_runs_without_a_directory_are_named(sweep_dir, tmp_path):
    plan = json.loads((sweep_dir / "plan.json").read_text())
    plan["entries"].append(_entry("pangu-2.6b__z3__bf16__g1", "pangu-2.6b", "z3", "bf16", 1))
    (sweep_dir / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "r"
    report.make_report(sweep_dir, out)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "Planned but not run yet (1): `pangu-2.6b__z3__bf16__g1`." in md
    out2 = tmp_path / "r2"
    plan["entries"].pop()
    (sweep_dir / "plan.json").write_text(json.dumps(plan))
    report.make_report(sweep_dir, out2)
    assert "Planned but not run" not in (out2 / "results.md").read_text(encoding="utf-8")


def test_host_ram_is_the_in_step_peak_where_the_steps_logged_it(tmp_path):
    """Host RAM per run: every rank's high-water mark during its steps (host_rss_step_peak_mib) summed, where the
    log has it; logs written before it keep the largest step-end RSS."""
    root = tmp_path / "runs" / "cpu"
    write_ok_run(root, "pangu-tiny__z1__bf16__cpu2", "pangu-tiny", "z1", "bf16", 2, 0.3, 0.0, 500.0, accel="cpu",
                 summary_extra={"host_rss_step_peak_mib": 620.0})
    write_ok_run(root, "pangu-tiny__z0__bf16__cpu2", "pangu-tiny", "z0", "bf16", 2, 0.3, 0.0, 500.0, accel="cpu")
    out = tmp_path / "res"
    report.make_report(root, out)
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        host = {r["run"]: float(r["host_rss_mib_sum_over_ranks"]) for r in csv.DictReader(f)}
    assert host == {"pangu-tiny__z1__bf16__cpu2": 1240.0, "pangu-tiny__z0__bf16__cpu2": 1000.0}
