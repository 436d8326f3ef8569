"""The plan (sftbench/plan.py): predictions against the reference's own out-of-memory rows, the margins, and step
times from the committed tables marked measured or estimated."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from sftbench import plan


def _rows(model, gpus, gpu_gb, host_gb, precision="bf16", name=None, configs=None):
    hw = plan.Hardware(gpus, 1, gpu_gb * plan.GB_MIB, host_gb * plan.GB_MIB, name)
    return {r.config: r for r in plan.plan(model, hw, precision, 512, configs, plan.measured_steps())}


def test_the_reference_v100_ooms_come_out_as_not_fitting():
    """The reference ran Pangu-2.6B on 3 x V100 16 GB in fp16: ZeRO 0, 1, 2 and 3 without offload were OOM, the
    offload rows ran. The plan says the same for a 16 GB card and 3 ranks."""
    rows = _rows("pangu-2.6b", 3, 16, 512, "fp16", "V100")
    for oom in ("none", "z0", "z1", "z2_5e8", "z3"):
        assert rows[oom].fits is False and rows[oom].gpu_margin_mib < 0, oom
    for ran in ("z2_offload_5e8", "z2_offload_2e8", "z3_offload", "z3_offload_param"):
        assert rows[ran].fits is True and rows[ran].gpu_margin_mib > 0, ran
    assert all(r.step_s is None for r in rows.values())  # no V100 table is committed


def test_host_ram_is_a_limit_too_and_tight_margins_are_marked():
    small_host = _rows("pangu-2.6b", 1, 80, 32, configs=["z1", "z2_offload_5e8"])
    assert small_host["z1"].fits is True
    assert small_host["z2_offload_5e8"].fits is False and small_host["z2_offload_5e8"].host_margin_mib < 0
    rows = _rows("pangu-2.6b", 1, 70, 512, name="H100", configs=["z0", "z1"])  # Hopper: the levers were measured there
    # ZeRO-0 fits a 70 GB card (66,757 MiB) only eager (~64,100 MiB predicted; ~69,100 with the graphs' buffers):
    # --cuda-graphs auto then runs it eager, and the plan predicts what runs
    assert rows["z0"].fits and rows["z0"].tight and rows["z0"].cuda_graphs is False
    assert rows["z1"].fits and rows["z1"].cuda_graphs is True  # ~60,300 MiB with the graphs
    assert rows["z1"].gpu_mib - _rows("pangu-2.6b", 1, 70, 512, configs=["z2_offload_5e8"])[
        "z2_offload_5e8"].gpu_mib > 40_000  # offload: eager, the states on the host


def test_step_times_are_measured_or_estimated_and_name_their_table():
    rows = _rows("pangu-2.6b", 1, 80, 512, name="H100", configs=["z0", "z1"])
    # the plan predicts the graphs on (train.py's default) where the H100 table ran eager, and says so
    assert rows["z0"].step_kind == "measured, eager" and rows["z0"].step_source == "results/h100x1-eager"
    assert rows["z0"].step_s == pytest.approx(0.443, abs=0.01)  # the README's 1 x H100 pick
    four = _rows("pangu-2.6b", 4, 80, 512, name="H100", configs=["z1"])
    assert four["z1"].step_kind.startswith("estimated from ") and four["z1"].step_s > 0


def test_cli_prints_the_table_and_refuses_what_it_cannot_plan():
    cmd = [sys.executable, "-m", "sftbench.plan", "--model", "pangu-13b", "--gpus", "8", "--gpu-mem", "80",
           "--host-mem", "512"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| z3_offload_param | 3 | optimizer+params |" in p.stdout and "configurations fit" in p.stdout
    bad = subprocess.run(cmd[:4] + ["pangu-99b"] + cmd[5:], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown model 'pangu-99b'" in bad.stderr
    cfg = subprocess.run(cmd + ["--configs", "z9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cfg.returncode != 0 and "unknown config 'z9'" in cfg.stderr


def test_a_fit_whose_figure_is_known_to_be_low_says_so():
    """ZeRO-3 with overlap_comm: the figure leaves out what its side streams allocate (the committed 2.6B rows
    measured 24-36% above it), so a fitting row is marked and the footnote says why; the same config without
    overlap_comm is not marked."""
    hw = plan.Hardware(8, 1, 80 * plan.GB_MIB, 512 * plan.GB_MIB, None)
    rows = plan.plan("pangu-13b", hw, "bf16", 512, ["z3_offload_param", "z3_offload_param_overlap"], [])
    by = {r.config: r for r in rows}
    assert by["z3_offload_param_overlap"].known_low and not by["z3_offload_param"].known_low
    text = plan.render(rows, "pangu-13b", hw, "bf16", 512)
    assert "| yes (low¹) |" in text and text.count("(low¹)") == 1
    assert "¹ The GPU figure is known to be low: ZeRO-3 `overlap_comm`" in text


# ---------------------------------------------------------------------------------------------- recommendation
def _h100_csv_fastest(fitting: set[str]) -> tuple[str, float]:
    """The H100 table's own fastest 2.6B bf16 one-GPU row among ``fitting``, read from the CSV directly."""
    import csv
    with open(REPO / "results" / "h100x1-eager" / "results.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "pangu-2.6b" and r["precision"] == "bf16"
                and r["num_gpus"] == "1" and r["status"] == "ok" and r["config"] in fitting]
    best = min(rows, key=lambda r: float(r["step_s_median"]))
    return best["config"], float(best["step_s_median"])


def test_on_one_h100_it_recommends_what_the_h100_table_measured_fastest_among_the_fitting():
    """Pangu-2.6B on 1 x H100 80GB (its real 81,559 MiB, from the name) and 120 GiB of RAM: the recommendation is the
    H100 table's fastest configuration among those that fit with margin (ZeRO-0, 0.443 s/step, measured eager)."""
    args = plan.build_parser().parse_args(["--model", "pangu-2.6b", "--gpus", "1", "--gpu-name", "H100-80GB",
                                           "--host-mem", "120"])
    hw = plan.resolve_hardware(args)
    assert hw.gpu_mib == 81_559.0 and hw.host_mib == 120 * 1024
    results = plan.measured_steps()
    rows = plan.plan("pangu-2.6b", hw, "bf16", 512, None, results)
    rec = plan.recommend(rows, "pangu-2.6b", hw, "bf16", 512, results)
    want, want_s = _h100_csv_fastest({r.config for r in rows if r.fits and not r.tight})
    assert (want, round(want_s, 3)) == ("z0", 0.443)
    assert rec.fastest.config == want
    assert rec.fastest_basis == "fastest by measured, eager s/step in results/h100x1-eager (0.44 s/step)"
    assert rec.would_fit == []
    # the least GPU memory among figures not known to be low (the overlap_comm rows' are)
    assert rec.least_memory.config == "z3_offload_param" and not rec.least_memory.known_low


def test_a_24_gib_gpu_with_64_gib_of_ram_is_told_what_would_fit():
    """1 x 24 GiB with 64 GiB of RAM: only optimizer-offload rows fit, all with under 15% host margin, so the plan
    recommends one (by the heuristic order: no table for this GPU) and says what would give a margin: more RAM
    (how much), more GPUs (how many), the closest configuration; with 48 GiB of RAM nothing fits at all."""
    cmd = [sys.executable, "-m", "sftbench.plan", "--model", "pangu-2.6b", "--gpus", "1", "--gpu-mem", "24",
           "--host-mem", "64"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "GPU 24,576 MiB = 24.0 GiB each, host 65,536 MiB = 64.0 GiB per node" in out
    assert "recommended (fastest that fits): z2_offload_1e9: no table measured on this GPU" in out
    assert "nothing fits with a margin; what would:" in out
    assert ("  - more host RAM: z2_offload_1e9 has a 15% margin on this GPU and needs 60.6 GiB of host RAM per node "
            "(predicted), 71.3 GiB for a 15% margin; this machine has 64.0 GiB") in out
    assert "  - more GPUs: 4 GPUs of 24.0 GiB on this node fit 2 configuration(s) with margin, e.g. z3 " in out
    assert "  - closest to fitting: z3_offload_param, over host RAM by 3.9 GiB (6% of the limit)" in out
    small = subprocess.run(cmd[:-1] + ["48"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "0 of 19 configurations fit." in small.stdout and "\nnothing fits; what would:" in small.stdout
    assert "recommended" not in small.stdout


def test_an_unknown_gpu_name_without_memory_is_refused():
    args = plan.build_parser().parse_args(["--model", "pangu-2.6b", "--gpus", "1", "--gpu-name", "T4"])
    with pytest.raises(SystemExit, match="--gpu-name T4: its capacity is not known here .*--gpu-mem in GiB"):
        plan.resolve_hardware(args)
