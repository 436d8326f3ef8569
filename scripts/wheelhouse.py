#!/usr/bin/env python
"""Build a wheelhouse for installing sftbench on an offline GPU machine.

    # on the offline machine (once): list what it already has
    python -m pip freeze > target-freeze.txt
    # here, with internet:
    python scripts/wheelhouse.py --out wheelhouse --python 3.12 --target-freeze target-freeze.txt
    # carry wheelhouse/ over, then on the offline machine:
    python -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt

DeepSpeed's PyPI release is a source archive: its wheel is built here (`pip wheel --no-deps`, pure Python; the CUDA
ops are JIT-compiled on first use on the target). Everything else is downloaded as binary wheels for the target's
Python and platform, with their dependencies, minus what the target already has (torch always comes from the
target: it must match its CUDA driver). jieba ships only as a source archive too, so its wheel is built here as well.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

DEEPSPEED = "deepspeed==0.19.8"
# What train.py and the monitor need on a GPU machine beyond torch (the report runs anywhere, from the logs).
NEEDS = ["jieba", "sentencepiece", "transformers==5.17.0", "safetensors", "psutil", "nvidia-ml-py", "textual",
         "liger-kernel==0.8.5"]  # liger: --fused-kernels liger (pure Python over the target's Triton)
SOURCE_ONLY = ["jieba"]
NEVER = {"torch", "triton"}  # must match the target's CUDA: never shipped
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="wheelhouse")
    ap.add_argument("--python", default="3.12", help="the target's Python version")
    ap.add_argument("--target-freeze", help="`pip freeze` of the target: packages it has are left out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    have = set(NEVER)
    if a.target_freeze:
        for ln in Path(a.target_freeze).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)", ln.strip())
            if m:
                have.add(norm(m.group(1)))
    pip("wheel", "--no-deps", "-w", str(out), DEEPSPEED, *SOURCE_ONLY)
    ds_wheel = next(out.glob("deepspeed-*.whl"))
    ds_reqs = [r for r in requires(ds_wheel) if norm(re.split(r"[<>=!~; \[]", r)[0]) not in NEVER]
    wanted = [r for r in ds_reqs + NEEDS
              if norm(re.split(r"[<>=!~; \[]", r)[0]) not in have | {norm(s) for s in SOURCE_ONLY}]
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    pyver = a.python.replace(".", "")
    # Dependencies the target already has are still resolved here (pip can't skip them), then dropped below.
    pip("download", "--only-binary=:all:", "--python-version", a.python, "--implementation", "cp",
        "--abi", f"cp{pyver}", "--abi", "abi3", "--abi", "none", *plat, "-d", str(out), *wanted,
        "--progress-bar=off")
    dropped = []
    for w in out.glob("*.whl"):
        name = norm(w.name.split("-")[0])
        if name in have and name not in {"deepspeed", *SOURCE_ONLY}:
            w.unlink()
            dropped.append(name)
    # SOURCE_ONLY wheels are always built here, so they are always listed, once.
    reqs = [DEEPSPEED, *SOURCE_ONLY, *[r for r in NEEDS if norm(re.split(r"[<>=!~; \[]", r)[0])
                                       not in have | {norm(s) for s in SOURCE_ONLY}]]
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    total = sum(w.stat().st_size for w in out.glob("*.whl")) / 2**20
    print(f"{len(list(out.glob('*.whl')))} wheels, {total:.1f} MiB in {out}; left out (target has them): "
          f"{', '.join(sorted(set(dropped))) or 'none'}")


if __name__ == "__main__":
    main()
