"""--fused-kernels liger (sftbench/fused.py): where Liger Kernel's kernels may run, and what the lever plan does with
that. The kernels themselves are Triton GPU kernels: their speed and numerics against eager are measured on the GPU
(bench/levers.py), never here."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sftbench import fused, speed
from sftbench.dsconfig import load_ds_config, resolve_config_path
from sftbench.levers import Asked, LeverError, decide
from sftbench.models.resolve import resolve

def LLAMA_ONLY():  # what liger_model_types() returns where Liger is installed, cut down to two families
    return frozenset({"llama", "qwen2"})


def test_the_first_reason_against_liger_is_named():
    assert fused.liger_unfit("pangu", None, True, LLAMA_ONLY) == (
        "not available for this model (Liger Kernel replaces transformers' modules, not Pangu-α's)")
    assert fused.liger_unfit("hf", "llama", False, LLAMA_ONLY) == (
        "Liger Kernel's kernels are Triton GPU kernels (CUDA only)")
    assert fused.liger_unfit("hf", "llama", True, lambda: None) == (
        "liger-kernel is not installed (pip install liger-kernel)")
    assert fused.liger_unfit("hf", "gpt2", True, LLAMA_ONLY) == "Liger Kernel has no kernels for model_type 'gpt2'"
    assert fused.liger_unfit("hf", "llama", True, LLAMA_ONLY) is None


def test_a_library_that_does_not_import_is_a_reason_not_a_crash():
    def broken():
        raise ImportError("cannot import name 'libdevice' from 'triton.language.math'")
    assert fused.liger_unfit("hf", "llama", True, broken) == (
        "liger-kernel does not import (ImportError: cannot import name 'libdevice' from 'triton.language.math')")


def test_liger_is_never_imported_to_refuse_a_pangu_or_a_cpu_run():
    def must_not_be_asked():
        raise AssertionError("the library was asked")
    assert fused.liger_unfit("pangu", None, True, must_not_be_asked).startswith("not available")
    assert fused.liger_unfit("hf", "llama", False, must_not_be_asked).endswith("(CUDA only)")


def _situation(model: str):
    cfg = load_ds_config(resolve_config_path("z1"))
    return speed.situation(cfg, precision="bf16", world_size=1, device=torch.device("cpu"), seq_len=512,
                           micro_batch=1, spec=resolve(model))


def test_the_run_asks_the_model_seam_and_refuses_liger_by_name_where_it_cannot_run():
    llama, pangu = _situation("llama-3.2-1b"), _situation("pangu-tiny")
    assert llama.fused_unfit == "Liger Kernel's kernels are Triton GPU kernels (CUDA only)"
    assert pangu.fused_unfit.startswith("not available for this model")
    plan = decide(Asked(), llama)
    assert (plan["fused_kernels"].on, plan.why("fused_kernels")) == (
        False, "auto: Liger Kernel's kernels are Triton GPU kernels (CUDA only)")
    assert plan.to_log()["fused_kernels"] == "off"
    with pytest.raises(LeverError, match=r"--fused-kernels liger does not apply: Liger Kernel's kernels are Triton "
                                         r"GPU kernels \(CUDA only\); use auto or off"):
        decide(Asked(fused_kernels="liger"), llama)


def test_on_a_gpu_auto_waits_for_evidence_and_the_flag_turns_it_on():
    gpu = replace(_situation("llama-3.2-1b"), cuda=True, gpu="sm_90", fused_unfit=None)
    auto = decide(Asked(), gpu)
    assert not auto.on("fused_kernels")
    assert auto.why("fused_kernels") == ("auto: not measured here (ZeRO-1 on sm_90, world 1, hf models; "
                                         "--fused-kernels liger applies it)")
    asked = decide(Asked(fused_kernels="liger"), gpu)
    assert asked.on("fused_kernels") and asked.to_log()["fused_kernels"] == "liger"
    assert asked.to_log()["fused_kernels_why"] == "asked for"
    off = decide(Asked(fused_kernels="off"), gpu)
    assert (off.on("fused_kernels"), off.why("fused_kernels")) == (False, "asked for")
