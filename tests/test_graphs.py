"""CUDA graphs of the micro-batch (sftbench/graphs.py): where they apply, how the flag degrades without CUDA, and on
a GPU that replays compute what eager mode computes (gradients accumulate, dropout draws fresh masks, the loss curve
under the real engine matches eager's)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import lever_calls
from conftest import REPO, cpu_env, read_jsonl, write_overfit_config
from sftbench import graphs, levers
from sftbench.levers import LeverError


resolve = lever_calls.cuda_graphs  # --cuda-graphs as the lever plan decides it before the engine exists


def _evidence(kind: str, lever: str = "cuda_graphs") -> str:
    return levers.evidence_text(levers.evidence_for(lever, kind, "sm_90", 1))

Z = {n: json.loads((REPO / "ds_configs" / f"{n}.json").read_text())
     for n in ("z0", "z1", "z2_5e8", "z2_offload_5e8", "z3", "z3_offload_param")}


def test_throughput_timer_goes_off_only_where_graphs_run_and_a_timers_block_is_kept():
    from sftbench import speed

    def timers(cfg, graphs_on):
        plan = levers.decide(levers.Asked(cuda_graphs="on" if graphs_on else "off"), lever_calls._situation(cfg))
        return speed.apply_timer(cfg, plan), plan.to_log()["ds_throughput_timer"]
    cfg = Z["z1"]
    off, why = timers(cfg, graphs_on=True)
    assert off["timers"] == {"throughput": {"enabled": False}} and "timers" not in cfg  # the input is not changed
    assert why.startswith("DeepSpeed's throughput timer off")
    assert timers(cfg, graphs_on=False) == (cfg, None)
    kept = {**cfg, "timers": {"throughput": {"enabled": True, "synchronized": True}}}
    assert timers(kept, graphs_on=True) == (kept, None)
    assert timers(None, graphs_on=True) == (None, None)  # --ds none


def test_auto_stays_eager_where_only_the_eager_run_fits():
    """--cuda-graphs auto on a measured configuration: on when the prediction with the graphs fits the GPU, eager with
    the figures in the reason when it does not (the eager run is smaller: where both are predicted over, it is the
    one with a chance); on forces them."""
    kw = dict(on_cuda=True, world_size=1, compile_target="off", ds_cfg=Z["z0"])
    assert resolve("auto", memory_mib=(69_102, 64_095, 81_559), **kw)[0] is True
    on, why = resolve("auto", memory_mib=(69_102, 64_095, 66_757), **kw)
    assert on is False and why.startswith("auto: eager, although ZeRO-0 was measured faster with graphs")
    assert "69,102 MiB per GPU, over the GPU's 66,757 MiB (eager 64,095 MiB" in why
    on, why = resolve("auto", memory_mib=(69_102, 64_095, 50_000), **kw)  # both predicted over
    assert on is False and "(eager 64,095 MiB, over too;" in why
    assert resolve("on", memory_mib=(69_102, 64_095, 66_757), **kw) == (True, "on: asked for")


def test_auto_is_on_only_where_measured_and_on_is_refused_where_it_cannot_apply(monkeypatch):
    kw = dict(on_cuda=True, world_size=1, compile_target="off")
    kinds = {"z0": "ZeRO-0", "z1": "ZeRO-1", "z2_5e8": "ZeRO-2", "z2_offload_5e8": "ZeRO-2 + optimizer offload"}
    one = levers.Evidence("cuda_graphs", "ZeRO-1", "2x", True, "results/x.md")
    monkeypatch.setattr(levers, "EVIDENCE", (one,))
    for name, kind in kinds.items():
        want = ((True, "auto: " + levers.evidence_text(one)) if kind == "ZeRO-1" else
                (False, f"auto: not measured here ({kind} on sm_90, world 1; --cuda-graphs on applies it)"))
        assert resolve("auto", ds_cfg=Z[name], **kw) == want, name
        assert resolve("on", ds_cfg=Z[name], **kw) == (True, "on: asked for"), name
    assert resolve("auto", ds_cfg=None, **kw)[1].endswith("(--ds none on sm_90, world 1; --cuda-graphs on applies "
                                                          "it)")
    assert resolve("on", ds_cfg=None, **kw) == (True, "on: asked for")  # --ds none on one GPU
    monkeypatch.undo()  # the shipped table: on where measured faster, eager for optimizer offload
    assert [resolve("auto", ds_cfg=Z[n], **kw)[0] for n in ("z0", "z1", "z2_5e8", "z2_offload_5e8")] == [
        True, True, True, False]
    # ... except inside the coalesced window (--coalesce-reduction), where optimizer offload was measured faster
    assert resolve("auto", ds_cfg=Z["z2_offload_5e8"], coalescing=True, **kw) == (
        True, "auto: " + _evidence("ZeRO-2 + optimizer offload + coalesced reduction"))
    assert resolve("auto", ds_cfg=Z["z1"], coalescing=True, **kw) == resolve("auto", ds_cfg=Z["z1"], **kw)
    assert resolve("auto", ds_cfg=None, **kw) == (True, f"auto: {_evidence('--ds none')}")
    assert resolve("auto", ds_cfg=None, **{**kw, "world_size": 2})[0] is False  # DDP's reducer
    for name in ("z3", "z3_offload_param"):
        assert resolve("auto", ds_cfg=Z[name], **kw) == (
            False, "auto: ZeRO-3 / parameter offload gathers and frees parameters inside the forward, so their "
                   "addresses are not fixed between replays")
        with pytest.raises(LeverError, match="--cuda-graphs on: ZeRO-3"):
            resolve("on", ds_cfg=Z[name], **kw)
    assert resolve("on", ds_cfg=Z["z1"], **{**kw, "world_size": 2}) == (True, "on: asked for")
    with pytest.raises(LeverError, match="--compile model"):
        resolve("on", ds_cfg=Z["z1"], **{**kw, "compile_target": "model"})
    assert resolve("auto", ds_cfg=Z["z1"], **{**kw, "compile_target": "blocks"})[1].startswith(
        "auto: --compile blocks is on")
    with pytest.raises(LeverError, match="DDP"):
        resolve("on", ds_cfg=None, **{**kw, "world_size": 2})
    assert resolve("off", ds_cfg=Z["z1"], **kw) == (False, "off: asked for")
    assert resolve("on", ds_cfg=Z["z1"], **{**kw, "on_cuda": False}) == (False, "on: no CUDA device, eager")
    assert resolve("auto", ds_cfg=Z["z1"], **{**kw, "on_cuda": False}) == (
        False, "auto: no CUDA device, eager")
    with pytest.raises(ValueError, match="--cuda-graphs must be one of auto, on, off"):
        levers.check_choice("cuda_graphs", "yes")


def _train(tmp_path, name: str, *extra: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "--run-dir", str(tmp_path / name), "--cache-dir",
           str(tmp_path / "cache"), "--data", str(REPO / "data" / "sample_sft.jsonl"), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_without_cuda_the_flag_runs_eager_and_says_so(tmp_path):
    """The same command on a machine with no GPU: --cuda-graphs on trains eagerly and the log and console say why;
    where graphs can never apply (ZeRO-3) the flag is refused before anything is built or written."""
    p = _train(tmp_path, "on", "--ds", str(REPO / "ds_configs" / "z1.json"), "--model", "pangu-tiny",
               "--seq-len", "64", "--max-steps", "2", "--warmup-steps", "1", "--cuda-graphs", "on")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta = read_jsonl(tmp_path / "on" / "rank0.jsonl")[0]
    assert meta["optimizations"]["cuda_graphs"] is False
    assert meta["optimizations"]["cuda_graphs_why"] == "on: no CUDA device, eager"
    assert meta["optimizations"]["cuda_graphs_pool_mib"] is None
    assert meta["optimizations"]["graph_accum"] is False
    assert meta["optimizations"]["graph_accum_why"] == "off: no CUDA graphs"
    assert meta["optimizations"]["graph_wgrad"] is False
    assert meta["optimizations"]["graph_wgrad_why"] == "off: no CUDA graphs"
    assert meta["optimizations"]["graph_qkv"] is False
    assert meta["optimizations"]["graph_fuse"] is False
    assert (meta["optimizations"]["fused_kernels"], meta["optimizations"]["fused_kernels_why"]) == (
        "off", "auto: not available for this model (Liger Kernel replaces transformers' modules, not Pangu-α's)")
    # the levers inside the graphs are off with them, and the table says why
    assert re.search(r"residual adds +apart +off: no CUDA graphs", p.stdout), p.stdout[-3000:]
    # DeepSpeed's throughput timer is left as the config has it where no graphs run.
    assert meta["optimizations"]["ds_throughput_timer"] is None and "timers" not in meta["ds_config"]
    assert "CUDA graphs                 off                       on: no CUDA device, eager" in p.stdout
    assert "cuda_graphs" not in meta["predicted"]["gpu_breakdown_mib"]
    # ZeRO-3 on a GPU would be refused; on CPU the flag degrades first, so the refusal is checked where it is made.
    with pytest.raises(LeverError):
        resolve("on", on_cuda=True, ds_cfg=Z["z3"], world_size=1, compile_target="off")


def _twin_tiny_models(torch, seed: int, num_layers: int, dropout: float, **overrides):
    """(config, model, an equal copy): two tiny Pangu models with the same weights, to run one as is and one
    patched."""
    from sftbench.pangu import PanguForCausalLM, preset_config
    cfg = preset_config("pangu-tiny", hidden_size=64, num_layers=num_layers, num_heads=2,
                        **{"attn_pdrop": dropout, "resid_pdrop": dropout, "embd_pdrop": dropout, **overrides})
    torch.manual_seed(seed)
    model = PanguForCausalLM._from_config(cfg)
    twin = PanguForCausalLM._from_config(cfg)
    twin.load_state_dict(model.state_dict())
    return cfg, model, twin


def test_fused_wgrad_adds_each_linear_gradient_into_grad_and_gives_autograd_none():
    """The graphs' linear layers under ``fused_wgrad`` (run here on CPU, fp32, outside any graph): over three
    micro-batches their weight and bias gradients add up in ``.grad`` to what autograd's own accumulation gives, the
    other parameters (embeddings, LayerNorms) still accumulate through autograd, the tied head adds into the
    embedding's buffer alongside the embedding's own gradient, and the patch is gone after the block."""
    torch = pytest.importorskip("torch")
    cfg, eager, fused = _twin_tiny_models(torch, 3, num_layers=2, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, cfg.vocab_size, (1, 32), generator=gen) for _ in range(3)]
    for ids in batches:
        eager(input_ids=ids, labels=ids).loss.backward()
    with graphs.fused_wgrad(fused):
        assert fused.lm_head.forward is not None and "forward" in vars(fused.lm_head)
        for ids in batches:
            loss = fused(input_ids=ids, labels=ids).loss
            loss.backward()
    assert not any("forward" in vars(m) for m in fused.modules())  # the class's forward again
    assert fused.lm_head.weight is fused.transformer.wte.weight
    want = dict(eager.named_parameters())
    for n, p in fused.named_parameters():
        assert p.grad is not None, n
        assert torch.allclose(p.grad, want[n].grad, rtol=1e-4, atol=1e-6), n
    # The function gives autograd no gradient for the layer's parameters: their AccumulateGrad nodes get none (a
    # hook sees None) and add nothing; the sum is in .grad all the same.
    fn = graphs._accum_linear()
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    seen = []
    w.register_hook(lambda g: seen.append(g))
    fn.apply(x, w, None).sum().backward()
    assert seen == [None] and torch.allclose(w.grad, torch.ones(4, 3).t() @ x.detach())
    assert torch.allclose(x.grad, torch.ones(4, 3) @ w.detach())


def _flatten_like_zero(torch, model):
    """Re-point the parameters into two flat buffers (matrices; vectors), in order, as DeepSpeed's ZeRO-0/1/2 do
    with train.py's two parameter groups."""
    from sftbench.plain import param_groups
    for group in param_groups(model):
        params = group["params"]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        at = 0
        for p in params:
            p.data = flat[at:at + p.numel()].view_as(p)
            at += p.numel()


def test_projections_fuse_only_where_their_weights_lie_side_by_side():
    """k, v and q of every ordinary block, k and v of the query layer (its q reads the query embeddings), and only
    once the parameters are in flat buffers as ZeRO places them."""
    torch = pytest.importorskip("torch")
    from sftbench.pangu import PanguForCausalLM, preset_config
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=64, num_layers=3, num_heads=2))
    assert graphs.fusable_projections(model) == []  # separately allocated: nothing to view as one matrix
    _flatten_like_zero(torch, model)
    found = graphs.fusable_projections(model)
    assert [names for _, names in found] == [("k_proj", "v_proj", "q_proj")] * 2 + [("k_proj", "v_proj")]
    assert [attn for attn, _ in found] == [b.attn for b in model.transformer.h]
    # A neighbour out of order (q moved elsewhere) leaves that attention unfused.
    attn0 = model.transformer.h[0].attn
    attn0.q_proj.weight.data = attn0.q_proj.weight.data.clone()
    assert [attn for attn, _ in graphs.fusable_projections(model)] == [b.attn for b in model.transformer.h[1:]]
    with pytest.raises(ValueError, match="--graph-qkv must be one of auto, on, off"):
        levers.check_choice("graph_qkv", "yes")
    # What the log says: auto leaves it off with the evidence, on says how many attentions fused or that none could.
    assert _graph_lever("graph_qkv", "auto")[1].startswith("auto: off, not decided by the steps (Pangu-2.6B ~1.06x")
    assert graphs.qkv_why(3, 3).startswith("on: 3 of 3 attentions' k/v(/q) weights lie side by side")
    assert graphs.qkv_why(0, 3).startswith("on: no attention's k/v/q weights lie side by side")
    assert _graph_lever("graph_qkv", "off") == (False, "off: asked for")


def _graph_lever(lever: str, mode: str, autocast: bool = False) -> tuple[bool, str]:
    """A graph lever's decision with the graphs on (ZeRO-1; the plain loop's autocast where asked)."""
    s = lever_calls._situation(None if autocast else Z["z1"],
                               facts=levers.EngineFacts(plain=autocast, autocast=autocast))
    d = levers.decide(levers.Asked(cuda_graphs="on", **{lever: mode}), s)[lever]
    return d.on, d.why


def test_wgrad_mode_resolves_and_refuses_unknown_values():
    assert _graph_lever("graph_wgrad", "off") == (False, "off: asked for")
    on, why = _graph_lever("graph_wgrad", "auto")
    assert on is True and why == f"auto: {_evidence('ZeRO-1', 'graph_wgrad')}"
    on, why = _graph_lever("graph_wgrad", "auto", autocast=True)
    assert on is False and "autocast" in why
    with pytest.raises(ValueError, match="--graph-wgrad must be one of auto, on, off"):
        _graph_lever("graph_wgrad", "yes")
    assert _graph_lever("graph_wgrad", "on") == (True, "on: asked for")
    with pytest.raises(LeverError, match="--graph-wgrad on: the plain loop's autocast"):
        _graph_lever("graph_wgrad", "on", autocast=True)


def test_fused_pointwise_blocks_compute_the_blocks_own_operations_in_their_order(monkeypatch):
    """``fused_pointwise`` uncompiled (CPU, fp32, dropout on): each block's residual adds, dropouts and second
    LayerNorm run in the two fused functions, and with the same seed the loss and every gradient are exactly the
    block's own (the same operations in the same order draw the same dropout masks). The blocks' own dropout
    modules and forward come back after the block."""
    torch = pytest.importorskip("torch")
    cfg, eager, fused = _twin_tiny_models(torch, 5, num_layers=3, dropout=0.1, resid_pdrop=0.2)
    ids = torch.randint(5, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(9)
    want = eager(input_ids=ids, labels=ids).loss
    want.backward()
    drops = [(b.attn.resid_dropout, b.mlp.dropout) for b in fused.transformer.h]
    calls = {"ln_add": 0, "add": 0}
    ln_add, add = graphs._pointwise_fns(compiled=False)

    def counting(name, fn):
        def run(*a):
            calls[name] += 1
            return fn(*a)
        return run
    monkeypatch.setattr(graphs, "_pointwise_fns", lambda compiled: (counting("ln_add", ln_add), counting("add", add)))
    with graphs.fused_pointwise(fused) as n:
        assert n == 3 and all(isinstance(b.attn.resid_dropout, torch.nn.Identity) for b in fused.transformer.h)
        torch.manual_seed(9)
        got = fused(input_ids=ids, labels=ids).loss
        got.backward()
    assert calls == {"ln_add": 3, "add": 3}
    assert got.item() == want.item()
    grads = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    assert [(b.attn.resid_dropout, b.mlp.dropout) for b in fused.transformer.h] == drops
    assert not any("forward" in vars(b) for b in fused.transformer.h)


@pytest.mark.slow  # an inductor compile: ~1 min on 2 CPU cores
def test_fused_pointwise_compiled_traces_in_one_graph_and_matches_eager():
    """The compiled functions (torch.compile, full graph: a graph break would fail here, not slow a GPU run down
    unseen), run here by inductor's CPU backend on a dropout-free model: loss and gradients equal eager's within
    fp32 rounding."""
    torch = pytest.importorskip("torch")
    from sftbench.pangu import PanguForCausalLM, preset_config
    cfg = preset_config("pangu-tiny", hidden_size=64, num_layers=2, num_heads=2, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0)
    torch.manual_seed(0)
    model = PanguForCausalLM._from_config(cfg)
    ids = torch.randint(5, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    want = model(input_ids=ids, labels=ids).loss
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with graphs.fused_pointwise(model):
        got = model(input_ids=ids, labels=ids).loss
        got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-6), n


def test_fuse_mode_resolves_and_refuses_where_it_cannot_apply():
    assert _graph_lever("graph_fuse", "off") == (False, "off: asked for")
    on, why = _graph_lever("graph_fuse", "auto")
    assert on is False and why.startswith("auto: off, not decided by the steps (Pangu-2.6B ~1.02x twice")
    assert _graph_lever("graph_fuse", "on") == (True, "on: asked for")
    on, why = _graph_lever("graph_fuse", "auto", autocast=True)
    assert on is False and "autocast" in why
    with pytest.raises(LeverError, match="--graph-fuse on: the plain loop's autocast"):
        _graph_lever("graph_fuse", "on", autocast=True)
    with pytest.raises(ValueError, match="--graph-fuse must be one of auto, on, off"):
        levers.check_choice("graph_fuse", "yes")


# ---------------------------------------------------------------------------------------------------- on a GPU
def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


def _small_model(torch, dropout: float, resid_only: bool = False):
    from sftbench.pangu import PanguForCausalLM, preset_config
    torch.manual_seed(11)
    other = 0.0 if resid_only else dropout  # resid_only: only the residual dropouts (the ones --graph-fuse moves)
    cfg = preset_config("pangu-tiny", hidden_size=256, num_layers=4, num_heads=4, attn_pdrop=other,
                        resid_pdrop=dropout, embd_pdrop=other)
    return PanguForCausalLM._from_config(cfg).cuda()


def _batch(torch, seed: int, seq: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40000, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt left out of the loss, as the SFT data has
    return {"input_ids": ids.cuda(), "labels": labels.cuda()}


def _graphed_micro_batches(torch, stream, batches, wgrad=False, qkv=False, fuse=False):
    """A dropout-free small model captured on ``batches[0]`` (on ``stream``, as the run's side stream), then every
    batch replayed and its loss backpropagated: (model, GraphedLoss, losses). With ``qkv`` its parameters first go
    into flat buffers as ZeRO's, so the projections fuse."""
    with torch.cuda.stream(stream):
        graphed = _small_model(torch, 0.0)
        if qkv:
            _flatten_like_zero(torch, graphed)
        g = graphs.graph_model(graphed, batches[0], wgrad=wgrad, qkv=qkv, fuse=fuse)
        assert g.fused_qkv == (len(graphed.transformer.h) if qkv else 0)
        assert g.fused_blocks == (len(graphed.transformer.h) if fuse else 0)
        losses = []
        for b in batches:
            out = graphed(**b)
            losses.append(out.loss.detach().clone())
            out.loss.backward()
        torch.cuda.synchronize()
    return graphed, g, losses


@pytest.mark.parametrize("wgrad,qkv,fuse", [(False, False, False), (True, False, False), (True, True, False),
                                            (False, True, False), (True, False, True)])
def test_gpu_replays_accumulate_gradients_like_eager(wgrad, qkv, fuse):
    """Two micro-batches accumulated into param.grad through the replayed graphs equal eager's (fp32, no dropout):
    a stolen static buffer would overwrite the first micro-batch's gradient with the second's. With ``wgrad`` the
    linear layers add into the buffers inside their GEMMs; with ``qkv`` each attention's projections are one GEMM
    whose gradient buffer holds theirs; with ``fuse`` the blocks' residual kernels are compiled and captured."""
    torch = _cuda()
    batches = [_batch(torch, 1), _batch(torch, 2)]
    eager = _small_model(torch, 0.0)
    for b in batches:
        eager(**b).loss.backward()
    want = {n: p.grad.clone() for n, p in eager.named_parameters()}

    s = torch.cuda.Stream()
    graphed, g, losses = _graphed_micro_batches(torch, s, batches, wgrad, qkv, fuse)
    assert g.replays == 2
    assert torch.stack(losses).tolist() == pytest.approx([eager(**b).loss.item() for b in batches], rel=1e-5)
    for n, p in graphed.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n
    # A call the graph does not cover (no labels: generation, logits) runs the eager forward.
    with torch.cuda.stream(s):
        assert graphed(input_ids=batches[0]["input_ids"]).logits is not None


@pytest.mark.parametrize("wgrad,qkv", [(False, False), (True, True)])
def test_gpu_accumulation_in_the_graphs_hands_the_sum_over_at_the_boundary(wgrad, qkv):
    """With a boundary callable, the micro-batches before the boundary leave param.grad untouched (no gradient reaches
    autograd, so no engine hook fires) and the boundary hands over their sum: equal to eager's param.grad after the
    same micro-batches (the same additions in the same order). The next window starts from zero again."""
    torch = _cuda()
    batches = [_batch(torch, i) for i in (5, 6, 7)]
    eager = _small_model(torch, 0.0)
    for b in batches:
        eager(**b).loss.backward()
    want = {n: p.grad.clone() for n, p in eager.named_parameters()}

    s = torch.cuda.Stream()
    micro = {"i": 0}
    with torch.cuda.stream(s):
        graphed = _small_model(torch, 0.0)
        if qkv:
            _flatten_like_zero(torch, graphed)
        g = graphs.graph_model(graphed, batches[0], boundary=lambda: micro["i"] % 3 == 2, wgrad=wgrad, qkv=qkv)
        assert g.fused_qkv == (len(graphed.transformer.h) if qkv else 0)
        for window in range(2):
            for k, b in enumerate(batches):
                loss = graphed(**b).loss
                # before the boundary the replay's only autograd input is the anchor leaf: no parameter's node runs
                assert (loss.grad_fn.next_functions[0][0].variable is g.anchor) is (k < 2), (window, k)
                loss.backward()
                micro["i"] += 1
                got = [p.grad for p in graphed.parameters()]
                if k < 2:
                    assert all(g is None for g in got), (window, k)
            torch.cuda.synchronize()
            for n, p in graphed.named_parameters():
                assert torch.allclose(p.grad, want[n], rtol=1e-5, atol=1e-7), (window, n)
            graphed.zero_grad(set_to_none=True)


def test_gpu_padding_mask_path_replays_like_eager():
    """--pad-mask always: the captured call takes the attention mask as a static input too; replays with new masks
    (different padding per micro-batch) give eager's losses and accumulated gradients."""
    torch = _cuda()
    batches = []
    for seed, pad in ((8, 16), (9, 40)):
        b = _batch(torch, seed)
        mask = torch.ones_like(b["input_ids"])
        mask[:, -pad:] = 0
        b["labels"][:, -pad:] = -100
        batches.append({**b, "attention_mask": mask})
    eager = _small_model(torch, 0.0)
    want_loss = []
    for b in batches:
        out = eager(**b)
        want_loss.append(out.loss.item())
        out.loss.backward()
    want = {n: p.grad.clone() for n, p in eager.named_parameters()}
    graphed, g, losses = _graphed_micro_batches(torch, torch.cuda.Stream(), batches)
    assert g.keys == ("input_ids", "labels", "attention_mask")
    assert torch.stack(losses).tolist() == pytest.approx(want_loss, rel=1e-5)
    for n, p in graphed.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("fuse,resid_only", [(False, False), (False, True), (True, True)])
def test_gpu_dropout_draws_fresh_masks_at_every_replay(fuse, resid_only):
    """Every dropout, and (``resid_only``) the residual dropouts alone, also where they run inside the compiled
    functions (``fuse``), whose random seeds come from a captured random kernel: two replays of one batch give two
    losses; without dropout, one."""
    torch = _cuda()
    b = _batch(torch, 3)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for dropout, differ in ((0.1, True), (0.0, False)):
            m = _small_model(torch, dropout, resid_only)
            graphs.graph_model(m, b, fuse=fuse)
            a = m(**b).loss.detach().clone()
            c = m(**b).loss.detach().clone()
            torch.cuda.synchronize()
            assert (a.item() != c.item()) is differ, (dropout, a.item(), c.item())


def test_gpu_moved_parameter_is_an_error_not_stale_weights():
    torch = _cuda()
    b = _batch(torch, 4)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        m = _small_model(torch, 0.0)
        graphs.graph_model(m, b)
        m.transformer.ln_f.weight.data = m.transformer.ln_f.weight.data.clone()
        with pytest.raises(graphs.GraphError, match="moved after capture"):
            m(**b)


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["z1.json", "z2_5e8.json", "z0.json", "none", "z1.json+fuse", "z2_5e8.json+coalesce"])
def test_gpu_graphed_loss_curve_equals_eager_under_the_engine(tmp_path, ds):
    """train.py on one GPU, bf16, a dropout-free checkpoint, grad accumulation 2, 6 steps: the graphed run's loss
    curve equals eager's within 2e-3 relative (bf16 rounding; the same kernels run, the gradient sums may be
    ordered differently), the curve moves, and the log records what ran."""
    torch = _cuda()
    from sftbench.pangu import PanguForCausalLM, preset_config
    ckpt = tmp_path / "nodropout"
    torch.manual_seed(7)
    PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=256, num_layers=4, num_heads=4,
                                                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).save_pretrained(ckpt)
    ds, _, lever = ds.partition("+")
    fuse, coalesce = lever == "fuse", lever == "coalesce"
    cfg = "none" if ds == "none" else str(write_overfit_config(ds, tmp_path / "cfg.json"))
    extra = ["--grad-accum", "2", "--lr", "3e-3", "--lr-warmup-steps", "1"] if ds == "none" else []
    env = {k: v for k, v in cpu_env().items() if k != "DS_ACCELERATOR"}
    curves, metas = {}, {}
    for mode in ("off", "on"):
        p = _train(tmp_path, mode, "--ds", cfg, "--model", str(ckpt), "--seq-len", "128", "--max-steps", "6",
                   "--warmup-steps", "1", "--precision", "bf16", "--seed", "7", "--cuda-graphs", mode, *extra,
                   *(["--graph-qkv", "on"] if mode == "on" else []),
                   *(["--graph-fuse", "on"] if mode == "on" and fuse else []),
                   "--coalesce-reduction", "on" if mode == "on" and coalesce else "off", env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        recs = read_jsonl(tmp_path / mode / "rank0.jsonl")
        metas[mode] = recs[0]
        curves[mode] = [r["loss"] for r in recs if r["type"] == "step"]
        assert recs[-1]["status"] == "ok"
    assert metas["on"]["optimizations"]["cuda_graphs"] is True
    assert metas["on"]["optimizations"]["cuda_graphs_pool_mib"] > 0
    # ZeRO's flat buffers put the projections side by side; the plain loop's autocast keeps autograd's adds.
    opt = metas["on"]["optimizations"]
    if ds in ("z1.json", "z2_5e8.json"):
        assert opt["graph_qkv"] is True and opt["graph_qkv_why"].startswith("on: 4 of 4 attentions"), opt
    assert opt["graph_wgrad"] is (ds != "none"), opt
    assert opt["graph_fuse"] is bool(fuse), opt
    if fuse:
        assert opt["graph_fuse_why"] == "on: asked for: 4 blocks", opt
    # Inside the coalesced window ZeRO-2 leaves the accumulation to the graphs and reduces once per step.
    assert opt["coalesce_reduction"] is coalesce and opt["graph_accum"] is (ds != "z2_5e8.json" or coalesce), opt
    assert metas["off"]["optimizations"]["cuda_graphs"] is False
    assert curves["off"][-1] < curves["off"][0] - 0.1, curves["off"]
    assert curves["on"] == pytest.approx(curves["off"], rel=2e-3), (curves["on"], curves["off"])


_VERDICTS = r'''
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
import lever_calls
from sftbench import ds_patches
from sftbench.pangu import PanguForCausalLM, preset_config
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for name, cfg in json.loads(sys.argv[2]).items():
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", hidden_size=64, num_layers=2, num_heads=2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    out[name] = [*lever_calls.graph_accum(engine), type(engine.optimizer).__name__,
                 *lever_calls.graph_accum(engine, coalescing=True), ds_patches.coalesce_unfit(engine)]
print("VERDICTS " + json.dumps(out))
'''


@pytest.mark.slow
def test_accumulation_in_the_graphs_only_where_the_engine_just_adds_into_param_grad(tmp_path):
    """Real DeepSpeed engines (CPU, one rank): ZeRO-0/1 hand the graphs the accumulation; ZeRO-2, DeepSpeed's BF16
    optimizer (ZeRO-1 with fp32 accumulation) and a grad_accum_dtype other than the weights' keep it per micro-batch;
    'off' is obeyed."""
    from sftbench.buildenv import free_port

    def cfg(stage, **extra):
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                "zero_optimization": {"stage": stage}, **extra}
    configs = {"z0": cfg(0), "z1": cfg(1), "z2": cfg(2),
               "z1_acc32": cfg(1, data_types={"grad_accum_dtype": "fp32"}),
               "z2_acc32": cfg(2, data_types={"grad_accum_dtype": "fp32"}),
               "z2_offload": {**cfg(2), "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
               "z0_fp32": {**cfg(0), "bf16": {"enabled": False}}}
    env = {**cpu_env(), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}  # lever_calls, beside this test
    p = subprocess.run([sys.executable, "-c", _VERDICTS, str(free_port()), json.dumps(configs)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    got = json.loads(p.stdout.split("VERDICTS ", 1)[1])
    assert got["z0"][:2] == [True, "auto: ZeRO-0 adds each micro-batch into param.grad and reduces at the boundary"]
    assert got["z0_fp32"][0] is True
    assert got["z1"][:2] == [True, "auto: ZeRO-1 adds each micro-batch into param.grad and reduces at the boundary"]
    assert got["z2"][:2] == [False, "auto: ZeRO-2/3 reduce and partition the gradients at every micro-batch"]
    assert got["z1_acc32"][0] is False and got["z1_acc32"][2] == "BF16_Optimizer", got["z1_acc32"]
    assert got["z2_offload"][:2] == [False, "auto: ZeRO-2/3 reduce and partition the gradients at every micro-batch"]
    # Inside DeepSpeed's coalesce_grad_reduction() window the hooks return until its one reduction: ZeRO-1/2 and
    # offload leave the accumulation to the graphs; an fp32 grad_accum_dtype still moves each micro-batch (DeepSpeed
    # fills grad_accum after every backward), and ZeRO-0 and the BF16 optimizer have no window.
    for name in ("z1", "z2", "z2_offload"):
        stage = 1 if name == "z1" else 2
        assert got[name][3:] == [True, f"auto: ZeRO-{stage} inside coalesce_grad_reduction() adds each micro-batch "
                                       "into param.grad and reduces once, at the window's exit", None], name
    assert got["z2_acc32"][2] == "DeepSpeedZeroOptimizer" and got["z2_acc32"][5] == (
        "data_types.grad_accum_dtype is float32 while the weights are bfloat16: ZeRO-2 adds each micro-batch into a "
        "buffer of that dtype, and inside the window the micro-batches would be summed in the weights' dtype first")
    assert got["z0"][5] == "ZeRO-0 reduces once per step already (at the boundary)"
    assert got["z1_acc32"][5] == "the engine's optimizer is BF16_Optimizer, which DeepSpeed does not coalesce"

    class Plain:  # the --ds none loop has no ZeRO methods
        pass
    assert lever_calls.graph_accum(Plain()) == (True, "auto: the plain loop adds each micro-batch into param.grad")
    assert lever_calls.graph_accum(Plain(), "off") == (False, "off: asked for")
    with pytest.raises(ValueError, match="--graph-accum must be one of auto, off"):
        levers.check_choice("graph_accum", "on")
