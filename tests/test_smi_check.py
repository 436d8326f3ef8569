"""scripts/smi_check.py: nvidia-smi samples matched by time to the step in flight, step 1 left out, a differing
sample fails the check."""
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def _setup(tmp_path: Path, smi_values: list[tuple[float, float]]) -> tuple[Path, Path]:
    run = tmp_path / "runs" / "m__z1__bf16__g1"
    run.mkdir(parents=True)
    t0 = 1_800_000_000.0
    steps = [{"type": "meta", "time": t0}]
    for n, mem in enumerate([500.0, 900.0, 900.0], 1):  # step n spans [t0+10n-10, t0+10n]
        steps.append({"type": "step", "step": n, "time": t0 + 10 * n, "step_s": 10.0, "gpu_mem_used_mib": mem})
    (run / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"type": "st')  # torn line
    smi = tmp_path / "smi.csv"
    smi.write_text("".join(f"{_stamp(t0 + off)}, {mib:.0f} MiB\n" for off, mib in smi_values))
    return tmp_path / "runs", smi


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "smi_check.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_matching_samples_pass_and_step_one_is_left_out(tmp_path):
    # 5 s falls in step 1 (still growing: 300 against the 500 read at its end) and must not count.
    runs, smi = _setup(tmp_path, [(5, 300), (15, 900), (25, 900), (40, 0)])
    p = _run(runs, smi)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 of 2 samples equal to the MiB" in p.stdout


def test_a_differing_sample_fails_and_is_named(tmp_path):
    runs, smi = _setup(tmp_path, [(15, 900), (25, 650)])
    p = _run(runs, smi)
    assert p.returncode == 1
    assert "m__z1__bf16__g1: 2 samples, 1 equal to the MiB, largest difference -250 MiB" in p.stdout
    assert _run(runs, smi, "--first-step", "3").returncode == 1
    runs2, smi2 = _setup(tmp_path / "b", [(15, 650), (25, 900)])
    assert _run(runs2, smi2, "--first-step", "3").returncode == 0  # only step 3 compared


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    runs, smi = _setup(tmp_path, [(15, 900)])
    smi.write_text(smi.read_text() + "not a sample\n")
    p = _run(runs, smi)
    assert p.returncode != 0 and f"{smi}:2:" in p.stderr


def test_the_header_of_plain_csv_output_is_skipped(tmp_path):
    # `--format=csv` without noheader starts with this line; the samples after it are checked as usual.
    runs, smi = _setup(tmp_path, [(15, 900), (25, 650)])
    smi.write_text("timestamp, memory.used [MiB]\n" + smi.read_text())
    p = _run(runs, smi)
    assert p.returncode == 1 and "2 samples, 1 equal to the MiB" in p.stdout, p.stdout + p.stderr
