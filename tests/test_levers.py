"""sftbench/levers.py: one function decides every lever. Its decisions are compared with those of the resolvers it
replaced (recorded at 8de9e02 on real CPU engines of every shipped config, tests/fixtures/lever_decisions_8de9e02.json):
identical on the GPU class and world size the evidence was measured at (sm_90, one GPU), and different elsewhere only
where those resolvers turned a lever on without evidence."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from conftest import REPO
from sftbench import levers
from sftbench.dsconfig import apply_precision, load_ds_config, resolve_config_path
from sftbench.levers import Asked, EngineFacts, LeverError, Situation, decide

RECORDED = json.loads((REPO / "tests" / "fixtures" / "lever_decisions_8de9e02.json").read_text())


def _asked(variant: str) -> Asked:
    if variant == "auto":
        return Asked()
    lever, mode = variant.split("=")
    return Asked(**{lever: mode})


def _code(asked: Asked, s: Situation) -> str:
    """A plan in the recording's code: 'R' refused, else compile's first letter and 1/0 per lever."""
    try:
        plan = decide(asked, s)
    except LeverError:
        return "R"
    out = plan["compile"].value[0]
    for lever in RECORDED["levers"][1:]:
        out += "1" if plan.on(lever) else "0"
    return out


def _situation(key: str, world: int, device: str, gpu: str | None) -> Situation:
    name, precision = key.split("/")
    cfg = None if name == "none" else apply_precision(load_ds_config(resolve_config_path(name)), precision)
    facts = EngineFacts(**RECORDED["configs"][key]["facts"])
    return Situation.of_config(cfg, world_size=world, cuda=device == "cuda", gpu=gpu, precision=precision,
                               engine=facts)


def _cases():
    for key, rec in RECORDED["configs"].items():
        for where, codes in rec["cases"].items():
            world, device = where.split("/")
            yield key, int(world), device, dict(zip(RECORDED["variants"], codes))


def test_the_recording_covers_every_shipped_config_and_flag():
    names = {p.stem for p in (REPO / "ds_configs").glob("*.json")} | {"none"}
    assert {k.split("/")[0] for k in RECORDED["configs"]} == names
    assert len(RECORDED["variants"]) == 17 and RECORDED["variants"][0] == "auto"


def test_decisions_on_one_hopper_gpu_and_on_cpu_are_todays():
    """sm_90 (H100, H200) on one GPU, where every piece of evidence was measured, and every CPU run: the plan decides
    exactly as the replaced resolvers did, for all-auto and for each lever asked for by name."""
    checked = 0
    for key, world, device, codes in _cases():
        if device == "cuda" and world != 1:
            continue
        s = _situation(key, world, device, "sm_90")
        for variant, want in codes.items():
            assert _code(_asked(variant), s) == want, (key, world, device, variant)
            checked += 1
    assert checked == 38 * 3 * 17  # 18 configs and --ds none, bf16 and fp32


# What the plan does differently from the replaced resolvers on two ranks of a Hopper GPU: there the resolvers turned
# levers on with one-GPU evidence (the graphs, the timer, the GEMM's gradient adds, both one-pass levers); the levers
# inside the graphs are off with them (graph_accum, graph_qkv and graph_fuse where asked for by name).
NOT_MEASURED_ON_TWO_RANKS = {"cuda_graphs", "ds_throughput_timer", "graph_wgrad", "grad_norm", "overflow_check",
                             "graph_accum", "graph_qkv", "graph_fuse"}


def test_on_two_ranks_only_levers_without_evidence_change_and_only_to_off():
    diffs = set()
    for key, world, device, codes in _cases():
        if device != "cuda" or world != 2:
            continue
        s = _situation(key, world, device, "sm_90")
        for variant, want in codes.items():
            got = _code(_asked(variant), s)
            if got == want:
                continue
            assert "R" not in (got, want), (key, variant, got, want)
            for lever, g, w in zip(RECORDED["levers"][1:], got[1:], want[1:]):
                if g != w:
                    assert (g, w) == ("0", "1"), (key, variant, lever)  # only ever turned off
                    diffs.add(lever)
                    plan = decide(_asked(variant), s)
                    follows_graphs = lever in ("ds_throughput_timer", "graph_accum", "graph_wgrad", "graph_qkv",
                                               "graph_fuse") and \
                        not plan.on("cuda_graphs")
                    assert "not measured here" in plan.why(lever) or follows_graphs, (lever, plan.why(lever))
    assert diffs == NOT_MEASURED_ON_TWO_RANKS


def test_another_gpu_class_turns_no_lever_on_under_auto_and_keeps_levers_asked_for():
    s = _situation("z1/bf16", 1, "cuda", "sm_80")
    plan = decide(Asked(), s)
    assert [n for n, d in plan.decisions if d.on] == []
    assert plan.why("cuda_graphs") == ("auto: not measured here (ZeRO-1 on sm_80, world 1; --cuda-graphs on applies "
                                       "it)")
    asked = Asked(cuda_graphs="on", grad_norm="foreach")
    plan = decide(asked, s)
    assert plan.on("cuda_graphs") and plan.on("grad_norm") and plan.on("graph_accum")
    assert not plan.on("graph_wgrad")  # auto, and measured on sm_90 only


def test_auto_cites_the_evidence_row_it_rests_on():
    plan = decide(Asked(), _situation("z2_5e8/bf16", 1, "cuda", "sm_90"))
    assert plan.on("coalesce_reduction") and plan.on("cuda_graphs") and plan.on("graph_accum")
    assert plan.why("coalesce_reduction") == (
        "auto: measured faster on ZeRO-2, sm_90 (1 x H200), world 1: Pangu-2.6B 2.43x, Pangu-350M 6.08x (with the "
        "graphs) (results/perf_h200/levers_coalesce_z2_2.6b.md)")
    for e in levers.EVIDENCE:
        assert (REPO / e.results.split(" ")[0]).exists(), e.results


def test_memory_oracle_keeps_the_graphs_and_the_window_off_where_they_do_not_fit():
    s = _situation("z1/bf16", 1, "cuda", "sm_90")
    fits = {(True, False): 69_102, (False, False): 64_095}
    plan = decide(Asked(), replace(s, gpu_mib=lambda g, c: fits[g, c], gpu_total_mib=81_559))
    assert plan.on("cuda_graphs")
    plan = decide(Asked(), replace(s, gpu_mib=lambda g, c: fits[g, c], gpu_total_mib=66_757))
    assert not plan.on("cuda_graphs") and plan.why("cuda_graphs").startswith(
        "auto: eager, although ZeRO-1 was measured faster with graphs: with them this run is predicted at 69,102 MiB")
    assert decide(Asked(cuda_graphs="on"), replace(s, gpu_mib=lambda g, c: fits[g, c],
                                                   gpu_total_mib=66_757)).on("cuda_graphs")
    z2 = _situation("z2_5e8/bf16", 1, "cuda", "sm_90")
    need = {(True, True): 90_000, (True, False): 60_000, (False, True): 85_000, (False, False): 55_000}
    plan = decide(Asked(), replace(z2, gpu_mib=lambda g, c: need[g, c], gpu_total_mib=81_559))
    # the graphs are weighed with the window the config expects (90,000 MiB), the window then with the eager run
    assert not plan.on("cuda_graphs") and "predicted at 90,000 MiB per GPU" in plan.why("cuda_graphs")
    assert not plan.on("coalesce_reduction")
    assert "predicted not to fit this GPU (85,000 of 81,559 MiB)" in plan.why("coalesce_reduction")


def test_offload_graphs_follow_the_window_the_engine_grants():
    """The graphs' offload evidence was measured inside the coalesced window: where the engine refuses the window,
    the graphs are decided again without it (off), not left on as the config's expectation had them."""
    s = _situation("z2_offload_5e8/bf16", 1, "cuda", "sm_90")
    assert decide(Asked(), s).on("cuda_graphs") and decide(Asked(), s).on("coalesce_reduction")
    refused = replace(s, engine=replace(s.engine, coalesce_unfit="pipeline parallelism (DeepSpeed does not coalesce "
                                                                  "it)"))
    plan = decide(Asked(), refused)
    assert not plan.on("coalesce_reduction") and not plan.on("cuda_graphs")
    assert plan.why("cuda_graphs").startswith("auto: not measured here (ZeRO-2 + optimizer offload on sm_90")


def test_zenflow_is_its_own_kind_so_no_offload_evidence_turns_a_lever_on_for_it():
    """ds_configs/engines/z2_offload_zenflow.json is ZeRO-2 + offload plus ZenFlow's block: on the GPU and world size
    where ZeRO-2 + offload turns the window, the graphs and the one-pass check on, ZenFlow (another optimizer) gets
    none of them under auto, each saying it was not measured on that kind; the engine's facts refuse the patched
    check and the window by name (ZenFlow replaces DeepSpeed's reduction and step)."""
    from sftbench import ds_patches

    base = _situation("z2_offload_5e8/bf16", 1, "cuda", "sm_90")
    cfg = apply_precision(load_ds_config(resolve_config_path("engines/z2_offload_zenflow")), "bf16")
    s = Situation.of_config(cfg, world_size=1, cuda=True, gpu="sm_90", precision="bf16", engine=base.engine)
    assert s.zenflow and not base.zenflow and (s.stage, s.offload_optimizer) == (2, True)
    assert [n for n, d in decide(Asked(), base).decisions if d.on and n in ("cuda_graphs", "coalesce_reduction",
                                                                             "overflow_check")] == [
        "cuda_graphs", "coalesce_reduction", "overflow_check"]
    plan = decide(Asked(), s)
    for lever in ("cuda_graphs", "coalesce_reduction", "overflow_check", "grad_norm"):
        assert not plan.on(lever), lever
    assert plan.why("coalesce_reduction").startswith(
        "auto: not measured here (ZeRO-2 + optimizer offload + ZenFlow on sm_90, world 1")
    zenflow_facts = replace(base.engine, overflow_unfit=ds_patches.ZENFLOW_UNCHECKED,
                            coalesce_unfit=ds_patches.ZENFLOW_UNCHECKED)
    for flag, lever in (("overflow_check", "overflow-check"), ("coalesce_reduction", "coalesce-reduction")):
        mode = "foreach" if flag == "overflow_check" else "on"
        with pytest.raises(LeverError, match=f"--{lever} {mode} does not apply: ZenFlow's optimizer replaces"):
            decide(Asked(**{flag: mode}), replace(s, engine=zenflow_facts))


def test_a_deepspeed_outside_the_tested_range_turns_every_patch_off_and_refuses_them_by_name():
    from sftbench import ds_patches

    why = ds_patches.patches_why("0.20.0")
    assert why == "DeepSpeed 0.20.0 is not a version these patches were tested with (0.19.8); its own code runs"
    assert ds_patches.patches_why("0.19.8") is None
    s = replace(_situation("z2_5e8/bf16", 1, "cuda", "sm_90"), patches_why=why)
    plan = decide(Asked(), s)
    for lever in levers.PATCH_LEVERS:
        assert not plan.on(lever) and plan.why(lever) == f"auto: {why}", lever
    assert plan.on("cuda_graphs") and plan.on("graph_wgrad")  # the graphs rewrite the model, not DeepSpeed
    for flag, value in (("grad_norm", "foreach"), ("overflow_check", "foreach"), ("coalesce_reduction", "on")):
        with pytest.raises(LeverError, match=re.escape(f"does not apply: {why}; use auto or")):
            decide(Asked(**{flag: value}), s)


def test_the_installed_deepspeed_is_pinned_where_the_patches_were_tested():
    import deepspeed

    from sftbench import ds_patches

    assert deepspeed.__version__ in ds_patches.TESTED
    req = (REPO / "requirements.txt").read_text()
    assert f"deepspeed=={deepspeed.__version__}" in req.split()
    assert f'"deepspeed=={deepspeed.__version__}"' in (REPO / "pyproject.toml").read_text()


def test_gpu_class_from_capability_and_names():
    assert levers.gpu_class_of(compute_cap="9.0") == "sm_90"
    assert levers.gpu_class_of("NVIDIA H100 80GB HBM3") == "sm_90"
    assert levers.gpu_class_of("NVIDIA H200") == "sm_90"
    assert levers.gpu_class_of("NVIDIA A10G") == "sm_86"
    assert levers.gpu_class_of("NVIDIA A100-SXM4-80GB") == "sm_80"
    assert levers.gpu_class_of("mystery") is None


def test_pangu_only_levers_are_capabilities():
    s = replace(_situation("z1/bf16", 1, "cuda", "sm_90"), capabilities=frozenset())
    plan = decide(Asked(), s)
    assert plan.why("graph_qkv") == "auto: not available for this model"
    with pytest.raises(LeverError, match="--graph-fuse on: not available for this model"):
        decide(Asked(graph_fuse="on"), s)


def test_console_table_has_one_line_per_lever_and_the_log_keeps_every_reason():
    plan = decide(Asked(), _situation("z1/bf16", 1, "cuda", "sm_90"))
    lines = plan.table()
    assert len(lines) == len(levers.LEVERS)
    assert lines[3].split()[:3] == ["CUDA", "graphs", "on"]
    assert lines[2].split()[:4] == ["norm/rotary/MLP", "kernels", "the", "model's"]
    log = plan.to_log()
    assert log["cuda_graphs"] is True and log["grad_norm"] == "foreach" and log["compile"] == "off"
    assert log["ds_throughput_timer"].startswith("DeepSpeed's throughput timer off")
    assert log["fused_kernels"] == "off" and log["fused_kernels_why"] == "auto: not available for this model"
    assert set(log) == {"pad_mask", "pad_mask_why", "compile", "compile_why", "fused_kernels", "fused_kernels_why",
                        "cuda_graphs", "cuda_graphs_why",
                        "ds_throughput_timer", "coalesce_reduction", "coalesce_reduction_why", "graph_accum",
                        "graph_accum_why", "graph_wgrad", "graph_wgrad_why", "graph_qkv", "graph_qkv_why",
                        "graph_fuse", "graph_fuse_why", "grad_norm", "grad_norm_why", "overflow_check",
                        "overflow_check_why"}


def test_packed_rows_always_pass_their_mask_and_keep_the_other_levers():
    """--pack: the block-diagonal mask is what keeps each sample to itself, so it is passed under auto too (the rows
    are right-padded at most at their end, which would otherwise drop it); every other lever decides as unpacked."""
    s = _situation("z1/bf16", 1, "cuda", "sm_90")
    padded, packed = decide(Asked(), s), decide(Asked(), replace(s, packed=True))
    assert not padded.on("pad_mask")
    assert packed.on("pad_mask") and packed.why("pad_mask") == ("packed rows (--pack): each sample's block-diagonal "
                                                                "causal mask is passed")
    assert [(n, d.on) for n, d in packed.decisions if n != "pad_mask"] == [
        (n, d.on) for n, d in padded.decisions if n != "pad_mask"]
    assert packed.on("cuda_graphs")


def test_before_the_engine_its_levers_are_pending():
    s = replace(_situation("z1/bf16", 1, "cuda", "sm_90"), engine=None)
    plan = decide(Asked(), s)
    assert plan.pending == ("graph_accum", "graph_wgrad", "graph_qkv", "graph_fuse", "grad_norm", "overflow_check")
    assert plan.on("cuda_graphs")


def test_evidence_holds_for_the_model_family_it_was_measured_on():
    """The evidence rows were measured on Pangu-α: a transformers model (family hf) gets no lever under auto until a
    row for its family exists, and levers asked for by name still apply."""
    s = replace(_situation("z2_5e8/bf16", 1, "cuda", "sm_90"), family="hf", capabilities=frozenset())
    plan = decide(Asked(), s)
    assert [n for n, d in plan.decisions if d.on] == []
    assert plan.why("cuda_graphs") == ("auto: not measured here (ZeRO-2 on sm_90, world 1, hf models; --cuda-graphs "
                                       "on applies it)")
    assert decide(Asked(cuda_graphs="on", grad_norm="foreach"), s).on("grad_norm")
    # ZeRO-1 was measured on the family (1 x H100): the graphs, the GEMMs' adds and the norm, not the timer
    z1 = replace(_situation("z1/bf16", 1, "cuda", "sm_90"), family="hf", capabilities=frozenset())
    plan = decide(Asked(), z1)
    assert [n for n, d in plan.decisions if d.on] == ["cuda_graphs", "graph_accum", "graph_wgrad", "grad_norm"]
    assert "sm_90 (1 x H100 80GB), world 1, hf models: Llama-3.2-1B 3.85x" in plan.why("cuda_graphs")


def test_the_performance_page_carries_the_evidence_table_as_the_plan_holds_it():
    page = (REPO / "docs" / "performance.md").read_text()
    table = page.split("<!-- evidence:start -->\n", 1)[1].split("<!-- evidence:end -->", 1)[0]
    assert table == levers.evidence_markdown()
