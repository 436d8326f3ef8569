"""sftbench.repredict: today's predictor over a results folder, rows outside ±15% marked and counted."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO
from sftbench import memory, repredict
from sftbench.presets import model_shape

SOURCE = REPO / "results" / "h100x1-eager" / "summaries.jsonl"
RUN = "pangu-350m__z3_offload_param__bf16__g1"
COLUMNS = ["run", "config", "status", "gpu_mem_used_mib_max_over_ranks", "host_rss_mib_sum_over_ranks",
           "predicted_gpu_mib", "predicted_host_mib"]


def _meta() -> dict:
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["type"] == "meta" and rec["run"] == RUN:
            return rec
    raise AssertionError(f"{RUN} not in {SOURCE}")


def _today(meta: dict) -> dict:
    return memory.predict(memory.ModelShape.of(model_shape(meta["model"])), repredict.run_shape(meta)).to_json()


def _folder(tmp_path):
    """Three rows of one committed run's meta: one measured at today's prediction, one measured 20% above it
    (GPU and host), one that ran out of memory (not counted)."""
    meta = _meta()
    pred = _today(meta)
    gpu, host = pred["gpu_mib"], pred["host_mib"]
    folder = tmp_path / "synthetic"
    folder.mkdir()
    rows = [("exact", "ok", gpu, host, gpu, host), ("over20", "ok", 1.2 * gpu, 1.2 * host, gpu, 0.5 * host),
            ("died", "oom", None, None, gpu, host)]
    with open(folder / "summaries.jsonl", "w", encoding="utf-8") as f:
        for name, *_ in rows:
            f.write(json.dumps({**meta, "run": name}) + "\n")
            f.write(json.dumps({"type": "summary", "status": "ok", "run": name, "rank": 0}) + "\n")
    with open(folder / "results.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for name, status, g, h, pg, ph in rows:
            w.writerow([name, "z3_offload_param", status, "" if g is None else g, "" if h is None else h, pg, ph])
    return folder, gpu, host


def test_cli_marks_and_counts_a_row_20_percent_over_its_prediction(tmp_path):
    folder, gpu, host = _folder(tmp_path)
    out_json = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "-m", "sftbench.repredict", str(folder), "--json", str(out_json)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    exact = next(ln for ln in lines if ln.startswith("| synthetic | exact |"))
    over = next(ln for ln in lines if ln.startswith("| synthetic | over20 |"))
    assert not any("| died |" in ln for ln in lines)  # not ok: not a row
    cells = [c.strip() for c in exact.strip("|").split("|")]
    assert cells[2] == f"{gpu:.0f}" and cells[5] == f"{gpu:.0f}" and cells[6] == "+0.0" and cells[-1] == ""
    cells = [c.strip() for c in over.strip("|").split("|")]
    # predicted / measured - 1 = 1/1.2 - 1 = -16.7 %
    assert cells[2] == f"{1.2 * gpu:.0f}" and cells[6] == "-16.7" and cells[11] == "-16.7"
    assert cells[9] == "-58.3"  # the stored host prediction was half today's
    assert "GPU under (largest: " in cells[-1] and "host under (largest: " in cells[-1]
    assert "| synthetic | 2 | 1/2 (50%) | 1/2 (50%) | 1/2 (50%) | 1/2 (50%) |" in lines
    assert "| overall | 2 | 1/2 (50%) | 1/2 (50%) | 1/2 (50%) | 1/2 (50%) |" in lines

    res = json.loads(out_json.read_text())
    assert res["overall"]["gpu"] == {"within": 1, "rows": 2, "share_pct": 50.0}
    over_row = next(r for r in res["rows"] if r["run"] == "over20")
    assert over_row["gpu_ok"] is False and over_row["host_ok"] is False and over_row["gpu_err_pct"] == -16.7
    bd = over_row["gpu_breakdown_mib"]
    assert over_row["gpu_miss_term"] == max(bd, key=bd.get)
    hb = over_row["host_breakdown_mib"]
    assert over_row["host_miss_term"] == max(hb, key=hb.get)


def test_run_shape_follows_the_meta(tmp_path):
    meta = _meta()
    rs = repredict.run_shape(meta)
    assert (rs.world_size, rs.precision, rs.seq_len, rs.micro_batch, rs.dataset_samples) == (1, "bf16", 512, 1, 10000)
    assert rs.cuda and rs.flash_attention and not rs.cuda_graphs
    meta["optimizations"] = {**meta["optimizations"], "pad_mask": True, "cuda_graphs": True}
    rs = repredict.run_shape(meta)
    assert not rs.flash_attention and rs.cuda_graphs
    # today's predictor on the committed inputs gives the tensor terms this run's stored prediction has (the terms
    # outside torch's pool, cuda_context and nccl, were re-measured on the NVML v2 rows since)
    today, stored = _today(_meta())["gpu_breakdown_mib"], _meta()["predicted"]["gpu_breakdown_mib"]
    outside = ("cuda_context", "nccl")
    assert {k: v for k, v in today.items() if k not in outside} == {k: v for k, v in stored.items() if k not in outside}
    assert today["cuda_context"] + today["nccl"] == 770 + 570 != stored["cuda_context"]


def test_a_folder_correction_moves_the_named_rows_and_says_why(tmp_path):
    """corrections.json: the named runs' GPU measurement is compared at the corrected value, marked, with the why
    under the table; other rows and the host column are untouched; a malformed file names itself and the key."""
    folder, gpu, host = _folder(tmp_path)
    why = "NVML v1 counted the driver reserve"
    (folder / "corrections.json").write_text(json.dumps(
        {"gpu_mem_used_mib": {"add_mib": -0.2 * gpu, "runs": ["over20"], "why": why}}))
    res = repredict.repredict([folder])
    by = {r["run"]: r for r in res["rows"]}
    assert by["over20"]["gpu_measured_mib"] == pytest.approx(gpu) and by["over20"]["gpu_ok"] is True
    assert by["over20"]["host_measured_mib"] == pytest.approx(1.2 * host) and by["over20"]["host_ok"] is False
    assert "gpu_corrected" not in by["exact"] and by["exact"]["gpu_measured_mib"] == pytest.approx(gpu)
    md = repredict.to_markdown(res)
    assert f"| synthetic | over20 | {gpu:.0f}* |" in md and "\\* synthetic: GPU measured corrected " in md
    assert why in md
    (folder / "corrections.json").write_text(json.dumps({"host_rss_mib": {"add_mib": 1, "runs": [], "why": "x"}}))
    with pytest.raises(SystemExit, match="corrections.json: 'host_rss_mib': only 'gpu_mem_used_mib'"):
        repredict.repredict([folder])
    (folder / "corrections.json").write_text(json.dumps({"gpu_mem_used_mib": {"add_mib": "-480", "runs": []}}))
    with pytest.raises(SystemExit, match="needs 'add_mib' \\(a number\\), 'runs' \\(a list\\) and 'why'"):
        repredict.repredict([folder])
