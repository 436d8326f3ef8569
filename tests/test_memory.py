"""sftbench.memory: DeepSpeed's ZeRO estimator formulas re-implemented exactly, and the prediction built on them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from sftbench import memory
from sftbench.presets import model_shape, param_count

SHAPE_350M = model_shape("pangu-350m")
SHAPE_26B = model_shape("pangu-2.6b")
P_350M = SHAPE_350M["n_params"]
P_26B = SHAPE_26B["n_params"]
LL_26B = memory.largest_layer_params(SHAPE_26B["hidden"], SHAPE_26B["vocab"])


def _cfg(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def _predict(shape: dict, cfg, world: int, precision: str = "bf16", gpu_total_mib=None, host_total_mib=None,
             **kw) -> dict:
    consts = {k: kw.pop(k) for k in list(kw) if k in memory.Constants.__dataclass_fields__}
    return memory.predict(memory.ModelShape.of(shape), memory.RunShape(cfg, world, precision, **kw),
                          memory.Limits(gpu_total_mib, host_total_mib), memory.Constants(**consts)).to_json()


@pytest.fixture(scope="module")
def ds_estimators():
    """DeepSpeed's own functions (imported only here: memory.py itself never imports deepspeed)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def test_param_counts_match_the_model_code():
    """The sweep counts parameters without torch; the count must be the model's (pangu.count_params)."""
    from sftbench.pangu import PRESETS, count_params, preset_config
    for name in PRESETS:
        s = model_shape(name)
        assert s["n_params"] == count_params(preset_config(name)), name
    assert param_count(1024, 24, 40000) == P_350M
    assert 340e6 < P_350M < 370e6 and 2.5e9 < P_26B < 2.7e9


@pytest.mark.parametrize("params", [P_350M, P_26B, 1_000_003])
@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
@pytest.mark.parametrize("offload", [True, False])
def test_zero2_formula_equals_deepspeed(ds_estimators, params, gpus, offload):
    z2, _ = ds_estimators
    assert memory.zero2_model_states(params, gpus, 1, cpu_offload=offload) == z2(params, gpus, 1, cpu_offload=offload)


@pytest.mark.parametrize("params,largest", [(P_350M, 40000 * 1024), (P_26B, LL_26B), (1_000_003, 12_345)])
@pytest.mark.parametrize("gpus", [1, 3, 8])
@pytest.mark.parametrize("offload,offload_params", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero3_formula_equals_deepspeed(ds_estimators, params, largest, gpus, offload, offload_params, zero_init):
    _, z3 = ds_estimators
    ours = memory.zero3_model_states(params, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params,
                                     zero_init=zero_init)
    theirs = z3(params, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params, zero_init=zero_init)
    assert ours == tuple(theirs)


@pytest.mark.parametrize("cfg_name", ["z2_5e8", "z2_offload_5e8", "z3", "z3_offload", "z3_offload_param"])
@pytest.mark.parametrize("gpus", [1, 3])
@pytest.mark.parametrize("shape", [SHAPE_350M, SHAPE_26B], ids=["350m", "2.6b"])
def test_prediction_model_states_equal_deepspeed(ds_estimators, cfg_name, gpus, shape):
    """For 16-bit training the params+grads+optimizer terms sum to DeepSpeed's GPU estimate, and the offloaded
    host terms to its CPU estimate (stage 3: with zero.Init, as train.py builds stage-3 models)."""
    z2, z3 = ds_estimators
    cfg = _cfg(cfg_name)
    zo = cfg["zero_optimization"]
    off = zo.get("offload_optimizer", {}).get("device") == "cpu"
    offp = zo.get("offload_param", {}).get("device") == "cpu"
    pred = _predict(shape, cfg, gpus, "bf16")
    ms = pred["model_states"]
    P = shape["n_params"]
    if zo["stage"] == 2:
        cpu, gpu = z2(P, gpus, 1, cpu_offload=off)
    else:
        cpu, gpu, _ = z3(P, ms["largest_layer_params"], gpus, 1, cpu_offload=off, cpu_offload_params=offp,
                         zero_init=True)
    assert abs(ms["gpu_bytes"] - gpu) <= 2  # DeepSpeed truncates 18*P/W to an integer
    assert ms["ds_cpu_bytes"] == cpu
    if off:
        assert abs(ms["host_bytes"] - cpu) <= 2
    bd = pred["gpu_breakdown_mib"]
    assert abs(bd["params"] + bd["grads"] + bd["optimizer"] - gpu / 2 ** 20) < 0.5


def test_cuda_graphs_add_one_static_gradient_per_parameter():
    """The captured backward writes every gradient into a static buffer of the weights' dtype: bf16 ZeRO-1 adds
    2*P, --ds none (fp32 weights under autocast) 4*P; outside torch's pool the instantiated graphs add their
    80 MiB to the context; nothing else moves."""
    base = _predict(SHAPE_350M, _cfg("z1"), 1, "bf16")
    graphed = _predict(SHAPE_350M, _cfg("z1"), 1, "bf16", cuda_graphs=True)
    P = base["inputs"]["n_params"]
    assert "cuda_graphs" not in base["gpu_breakdown_mib"]
    assert graphed["gpu_breakdown_mib"]["cuda_graphs"] == pytest.approx(2 * P / 2 ** 20, abs=0.06)
    assert graphed["gpu_mib"] - base["gpu_mib"] == pytest.approx(2 * P / 2 ** 20 + 80, abs=0.1)
    plain = _predict(SHAPE_350M, None, 1, "bf16", cuda_graphs=True)
    assert plain["gpu_breakdown_mib"]["cuda_graphs"] == pytest.approx(4 * P / 2 ** 20, abs=0.06)
    assert "``cuda_graphs``" in memory.__doc__


def test_breakdown_sums_and_documented_terms():
    pred = _predict(SHAPE_350M, _cfg("z2_offload_5e8"), 3, "fp16", dataset_samples=10000)
    assert set(pred["gpu_breakdown_mib"]) == {"params", "grads", "optimizer", "buffers", "activations", "logits",
                                              "allocator", "cuda_context", "nccl"}
    assert abs(sum(pred["gpu_breakdown_mib"].values()) - pred["gpu_mib"]) < 1
    assert abs(sum(pred["host_breakdown_mib"].values()) - pred["host_mib"]) < 1
    for term in list(pred["gpu_breakdown_mib"]) + list(pred["host_breakdown_mib"]):
        assert f"``{term}``" in memory.__doc__, f"term {term} is not documented"
    # the ipg bucket: reduce_bucket_size 5e8 x 2 bytes, once (overlap_comm false)
    assert pred["gpu_breakdown_mib"]["buffers"] == pytest.approx(5e8 * 2 / 2 ** 20, abs=0.1)
    overlap = _predict(SHAPE_350M, _cfg("z2_offload_overlap_5e8"), 3, "fp16")
    assert overlap["gpu_breakdown_mib"]["buffers"] == pytest.approx(2 * 5e8 * 2 / 2 ** 20, abs=0.1)
    # outside torch's pool: the context everywhere; NCCL by the groups the run has (one rank, peers, DeepSpeed's)
    outside = {(ds, w): (lambda b: (b["cuda_context"], b["nccl"]))(
        _predict(SHAPE_350M, _cfg(ds) if ds else None, w)["gpu_breakdown_mib"]) for ds in (None, "z1") for w in (1, 2)}
    assert outside[(None, 1)] == (770, 0)  # no process group at all
    assert outside[("z1", 1)] == (770, 570)  # DeepSpeed makes a group even for one GPU
    assert outside[(None, 2)] == (770, 855)  # DDP
    assert outside[("z1", 2)] == (770, 855 + 200)
    assert pred["gpu_breakdown_mib"]["nccl"] == 855 + 200
    graphed = _predict(SHAPE_350M, _cfg("z1"), 1, cuda_graphs=True)["gpu_breakdown_mib"]
    assert graphed["cuda_context"] == 770 + 80
    assert pred["host_breakdown_mib"]["dataset"] == pytest.approx(3 * 8 * 10000 * 512 * 3 / 2 ** 20, abs=0.1)


def test_zero1_and_2_predictions_warn_about_allocator_caching():
    """Measured: NVML reads 10-15 GB above the allocated peak for 2.6B ZeRO-1; the prediction says so in its notes
    (GPU runs of ZeRO-1/2 without offload only)."""
    shape = model_shape("pangu-2.6b")
    for name in ("z1", "z2_5e8"):
        notes = _predict(shape, _cfg(name), 2)["notes"]
        assert any("caching allocator" in n for n in notes), (name, notes)
        assert "(NVML may read more: allocator caching)" in memory.summarize(_predict(shape, _cfg(name), 2))
    for name, kw in (("z0", {}), ("z2_offload_5e8", {}), ("z3", {}), ("z1", {"cuda": False})):
        assert not any("caching allocator" in n for n in _predict(shape, _cfg(name), 2, **kw)["notes"]), name


def test_orderings_that_must_hold():
    for shape in (SHAPE_350M, SHAPE_26B):
        g = {name: _predict(shape, None if name == "none" else _cfg(name), 3, "bf16")["gpu_mib"]
             for name in ("none", "z0", "z1", "z2_5e8", "z2_offload_5e8", "z3", "z3_offload", "z3_offload_param")}
        assert g["z1"] < g["z0"] and g["z2_5e8"] < g["z1"]
        assert g["z2_offload_5e8"] < g["z2_5e8"]
        assert g["z3_offload_param"] < g["z3_offload"] < g["z3"]
    # more ranks, less per rank under partitioning; the same under plain data parallelism
    assert _predict(SHAPE_26B, _cfg("z3"), 4)["gpu_mib"] < _predict(SHAPE_26B, _cfg("z3"), 2)["gpu_mib"]
    # fp32 weights cost more than 16-bit ones in DeepSpeed stage 0
    assert _predict(SHAPE_350M, _cfg("z0"), 1, "fp32")["gpu_breakdown_mib"]["params"] > \
        _predict(SHAPE_350M, _cfg("z0"), 1, "bf16")["gpu_breakdown_mib"]["params"]
    # stage 3 live parameters follow stage3_max_live_parameters
    assert _predict(SHAPE_26B, _cfg("z3_offload_param_overlap_live2e8"), 1)["gpu_mib"] < \
        _predict(SHAPE_26B, _cfg("z3_offload_param_overlap_live5e8"), 1)["gpu_mib"] < \
        _predict(SHAPE_26B, _cfg("z3_offload_param_overlap"), 1)["gpu_mib"]


def test_fits_against_the_reference_outcomes():
    """The reference's V100 16 GB rows: 2.6B without partitioned states went OOM, offloaded stage 2/3 ran."""
    v100 = 16 * 1024
    for name in ("none", "z0", "z1", "z2_5e8", "z3"):
        pred = _predict(SHAPE_26B, None if name == "none" else _cfg(name), 3 if name != "none" else 1, "fp16",
                        gpu_total_mib=v100)
        assert pred["fits"] is False, name
    for name in ("z2_offload_5e8", "z3_offload", "z3_offload_param"):
        assert _predict(SHAPE_26B, _cfg(name), 3, "fp16", gpu_total_mib=v100)["fits"] is True, name
    for name in ("none", "z0", "z2_5e8", "z3", "z3_offload_param"):
        assert _predict(SHAPE_350M, None if name == "none" else _cfg(name), 3, "fp16",
                        gpu_total_mib=v100)["fits"] is True, name
    assert _predict(SHAPE_350M, None, 1, "fp16")["fits"] is None  # no limit given


def test_cpu_prediction_puts_everything_on_the_host():
    shape = model_shape("pangu-tiny")
    pred = _predict(shape, _cfg("z0"), 2, "bf16", cuda=False, seq_len=128)
    assert pred["gpu_mib"] == 0
    assert pred["host_breakdown_mib"]["device_tensors"] > 0
    assert pred["host_mib"] == pytest.approx(pred["host_mib_per_rank"] * 2, abs=0.2)


def test_config_path_and_bad_input():
    path = REPO / "ds_configs" / "z3.json"
    a = _predict(SHAPE_350M, str(path), 1)
    b = _predict(SHAPE_350M, _cfg("z3"), 1)
    assert a["gpu_mib"] == b["gpu_mib"]
    with pytest.raises(ValueError):
        _predict(SHAPE_350M, None, 1, "int8")
    json.dumps(a)  # JSON-ready
    assert memory.summarize(a).startswith("GPU ~")


def test_no_torch_or_deepspeed_import():
    code = ("import sys, sftbench.memory, sftbench.sweep, sftbench.report; "
            "bad = [m for m in ('torch', 'deepspeed', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# Measured by the sweep on one H200 (results/h200x1: torch 2.11, CUDA 13, DeepSpeed 0.19.8, NVML v2 = nvidia-smi):
# pangu-350m, bf16, 1 GPU, seq 512, micro batch 1, the defaults of that commit (CUDA graphs on the resident rows):
# config -> (NVML used peak MiB, torch peak allocated MiB, CUDA graphs).
MEASURED_H200 = {"none": (9389, 6654, True), "z0": (10909, 8629, True), "z1": (11221, 7970, True),
                 "z2_offload_5e8": (4317, 2294, False), "z3": (10277, 8305, False),
                 "z3_offload_param": (4427, 2365, False)}


@pytest.mark.parametrize("name", sorted(MEASURED_H200))
def test_prediction_against_measured_h200_runs(name):
    nvml, alloc, graphs = MEASURED_H200[name]
    pred = _predict(SHAPE_350M, None if name == "none" else _cfg(name), 1, "bf16", cuda_graphs=graphs)
    tensors = sum(v for k, v in pred["gpu_breakdown_mib"].items() if k not in ("allocator", "cuda_context", "nccl"))
    if not graphs:  # a graphed run's private pool keeps its blocks reserved: torch's allocated peak is not comparable
        assert abs(tensors / alloc - 1) < 0.10, (tensors, alloc)
    assert abs(pred["gpu_mib"] / nvml - 1) < 0.10, (pred["gpu_mib"], nvml)


# Measured by the sweeps on H100 (torch 2.11, CUDA 13, DeepSpeed 0.19.8, NVML v2): pangu-2.6b, bf16,
# z2_offload_5e8_acc32, NVML used peak MiB per GPU on 1, 2 and 3 GPUs (results/h100x1-eager, h100x2, h100x3).
MEASURED_ACC32_26B = {1: 21436, 2: 16876, 3: 15189}


@pytest.mark.parametrize("gpus", sorted(MEASURED_ACC32_26B))
def test_fp32_gradient_accumulation_with_offload_keeps_a_gradient_partition_on_the_gpu(gpus):
    acc = _predict(SHAPE_26B, _cfg("z2_offload_5e8_acc32"), gpus, "bf16")
    plain = _predict(SHAPE_26B, _cfg("z2_offload_5e8"), gpus, "bf16")
    extra = acc["gpu_breakdown_mib"]["grads"] - plain["gpu_breakdown_mib"]["grads"]
    assert abs(extra - 4 * SHAPE_26B["n_params"] / gpus / 2 ** 20) < 1
    assert abs(acc["gpu_mib"] / MEASURED_ACC32_26B[gpus] - 1) < 0.15, (acc["gpu_mib"], MEASURED_ACC32_26B[gpus])
    assert acc["host_mib"] == plain["host_mib"]  # the optimizer states stay offloaded


# Measured host RSS per rank, MiB, without offload (results/h100x1-eager, h100x2, h200x1: torch 2.11, CUDA 13,
# DeepSpeed 0.19.8), 10,000-sample set: (model, config or None, ranks) -> RSS per rank.
MEASURED_RSS = {("pangu-350m", None, 1): 1774, ("pangu-2.6b", None, 1): 1712, ("pangu-350m", None, 2): 2053,
                ("pangu-2.6b", None, 2): 1998, ("pangu-350m", "z0", 1): 2106, ("pangu-2.6b", "z1", 1): 2251,
                ("pangu-350m", "z3", 2): 2195, ("pangu-2.6b", "z2_5e8", 2): 2253}


@pytest.mark.parametrize("key", sorted(MEASURED_RSS, key=str))
def test_host_rss_counts_nccl_and_deepspeed_where_they_run(key):
    """The host figure has NCCL's share wherever a NCCL group exists (every DeepSpeed run, the plain loop on
    several GPUs) and DeepSpeed's own only for DeepSpeed runs; neither on CPU. Against measured RSS per rank."""
    model, cfg_name, world = key
    shape = SHAPE_350M if model == "pangu-350m" else SHAPE_26B
    pred = _predict(shape, cfg_name and _cfg(cfg_name), world, "bf16", dataset_samples=10_000)
    host = pred["host_breakdown_mib"]
    assert host["nccl"] == (pytest.approx(290 * world) if cfg_name or world > 1 else 0)
    assert host["deepspeed"] == (pytest.approx(150 * world) if cfg_name else 0)
    assert abs(pred["host_mib_per_rank"] / MEASURED_RSS[key] - 1) < 0.10, (pred["host_mib_per_rank"], key)
    cpu = _predict(shape, cfg_name and _cfg(cfg_name), world, "bf16", cuda=False)["host_breakdown_mib"]
    assert cpu.get("nccl", 0) == 0 and cpu.get("deepspeed", 0) == 0


def test_graphs_memory_mib_is_the_prediction_with_and_without_the_graphs_buffers(tmp_path):
    """What train.py's --cuda-graphs auto weighs before the model exists: the GPU figure with the graphs is the eager
    one plus one static gradient per parameter (b*P) and the graphs' own 80 MiB; a folder without a readable config
    gives None, not an error."""
    cfg = json.loads((REPO / "ds_configs" / "z0.json").read_text())
    with_g, eager = memory.graphs_memory_mib("pangu-2.6b", cfg, 1, "bf16", 512, 1)
    # 0.1 MiB; plus the instantiated graphs outside torch's pool
    assert with_g - eager == pytest.approx(2 * model_shape("pangu-2.6b")["n_params"] / 2**20 + 80, abs=0.1)
    assert memory.graphs_memory_mib(str(tmp_path), cfg, 1, "bf16", 512, 1) is None


# Measured today's way on one H200 (bench/levers.py, bf16, seq 512, micro batch 1, nvidia-smi's peak, MiB):
# (model, config, CUDA graphs) -> (without the coalesced window, with it) (results/perf_h200/levers_coalesce_*).
MEASURED_COALESCE_H200 = {("pangu-2.6b", "z2_offload_5e8", False): (10847, 15553),
                          ("pangu-350m", "z2_offload_5e8", False): (4317, 4891),
                          ("pangu-2.6b", "z3", False): (61427, 66191),
                          ("pangu-2.6b", "z2_5e8", True): (68303, 69505)}


def test_coalesced_window_holds_the_full_16_bit_gradients_where_the_stage_would_not():
    """With coalesce_reduction every rank holds b*P of gradients over the window: ZeRO-1 already does (nothing
    moves), ZeRO-2 holds them in place of its b*P/W partition (nothing moves on one GPU, b*P/2 more on two),
    ZeRO-3 and optimizer offload hold them on top; the host is untouched."""
    P = P_26B

    def grads(cfg, world, co):
        return _predict(SHAPE_26B, _cfg(cfg), world, coalesce_reduction=co)

    for cfg, world, extra in (("z1", 2, 0), ("z2_5e8", 1, 0), ("z2_5e8", 2, P), ("z3", 1, 2 * P), ("z3", 2, 2 * P),
                              ("z2_offload_5e8", 1, 2 * P), ("z2_offload_5e8", 3, 2 * P)):
        off, on = grads(cfg, world, False), grads(cfg, world, True)
        got = on["gpu_breakdown_mib"]["grads"] - off["gpu_breakdown_mib"]["grads"]
        assert got == pytest.approx(extra / 2 ** 20, abs=0.1), (cfg, world)
        assert on["host_mib"] == off["host_mib"], cfg
        assert on["inputs"]["coalesce_reduction"] is True and off["inputs"]["coalesce_reduction"] is False
        assert ("coalesced window" in on["model_states"]["formula"]) is (extra > 0 or cfg == "z2_5e8"), cfg
    assert "coalesce_reduction" in memory.__doc__


@pytest.mark.parametrize("key", sorted(MEASURED_COALESCE_H200, key=str))
def test_coalesced_window_memory_against_measured_h200_runs(key):
    """What the window adds, as measured, within 10% of what the predictor adds (the whole run within its usual
    15%)."""
    model, cfg, graphs = key
    shape = SHAPE_26B if model == "pangu-2.6b" else SHAPE_350M
    off_mib, on_mib = MEASURED_COALESCE_H200[key]
    off, on = (_predict(shape, _cfg(cfg), 1, cuda_graphs=graphs, coalesce_reduction=co)["gpu_mib"]
               for co in (False, True))
    if on_mib - off_mib > 2000:  # a window that holds b*P more: within 10% of it
        assert (on - off) / (on_mib - off_mib) == pytest.approx(1, abs=0.10), (on - off, on_mib - off_mib)
    assert abs(on / on_mib - 1) < 0.15, (on, on_mib)
