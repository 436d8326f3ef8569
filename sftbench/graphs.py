"""CUDA graphs for the micro-batch: the model's whole forward and backward replayed from two captured graphs.

At micro batch 1 x 512 the step is bound by the host launching kernels (about 28 us of host time per kernel on the
16-core H200 host, ~1,600 kernels per Pangu-350M micro-batch): a replayed graph launches them all at once.

What is captured, and what is not (so DeepSpeed computes exactly what it is told):

* ``graph_model`` captures the model's forward (embeddings, every block including the query layer, ``ln_f``, the
  tied head and the fp32 loss) into one graph, and its backward, from the loss down to the gradient of every
  parameter, into a second one. The parameter gradients land in static buffers.
* Everything DeepSpeed does per micro-batch stays outside the graphs and runs as usual: the engine's forward
  prologue, the loss scaling of ``engine.backward`` (1/GA, the fp16 scale) and then autograd's ``AccumulateGrad`` of
  each parameter, which adds the static gradient into ``param.grad`` and fires ZeRO's gradient hooks (bucketing,
  partitioning, offload copies). The boundary step (``engine.step()``) is untouched.
* The returned gradients are kept referenced here, so autograd never steals a static buffer as ``param.grad``
  (the next replay would overwrite an accumulated gradient); it copies or adds instead, as in eager mode.
* Dropout draws fresh masks at every replay: CUDA graph capture registers the RNG state and every replay advances
  its offset.

It applies where the parameters stay resident at fixed addresses between steps: ZeRO-0/1/2 (with or without
optimizer offload) and ``--ds none`` on one rank. ZeRO-3 and parameter offload gather and release parameters inside
the forward, so they run eager. A model with forward hooks on its submodules is refused (hooks would run at
capture only). The graph needs static shapes: the loop's micro-batches are all ``[micro_batch, seq_len]`` on the
device; a call of another shape or signature (generation, eval with logits) runs the eager forward.

Memory: the graphs keep a private pool (the activations of one micro-batch, as eager mode needs them too, but
reserved for the run) and one static gradient buffer per parameter (``P`` x the parameters' bytes); the meta record
logs both (``cuda_graphs_pool_mib``) and ``sftbench/memory.py`` counts them.

This module is torch-free at import (the argument checks import it).
"""
from __future__ import annotations

import contextlib
from typing import Any

GRAPH_MODES = ("auto", "on", "off")


class GraphError(RuntimeError):
    """The model cannot be captured as asked (hooks, moved parameters, a capture failure)."""


def check_mode(mode: str) -> None:
    if mode not in GRAPH_MODES:
        raise ValueError(f"--cuda-graphs must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")


def resolve(mode: str, *, on_cuda: bool, ds_cfg: dict | None, world_size: int,
            compile_target: str) -> tuple[bool, str]:
    """Whether to capture the micro-batch as CUDA graphs, and why (the meta record's ``cuda_graphs_why``).

    ``on`` applies wherever the parameters stay resident; where it cannot apply (ZeRO-3, parameter offload, a
    compiled model, several ranks without DeepSpeed) it is refused with the reason; without CUDA the run is eager and
    the reason says so. ``auto`` turns it on only where it was measured faster; nowhere yet (docs/performance.md)."""
    check_mode(mode)
    if mode == "off":
        return False, "off: asked for"
    asked = mode == "on"
    zero = (ds_cfg or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0) if ds_cfg is not None else None
    param_off = str((zero.get("offload_param") or {}).get("device", "none")).lower() not in ("none", "")

    def no(why: str) -> tuple[bool, str]:
        if asked:
            raise GraphError(f"--cuda-graphs on: {why}")
        return False, f"auto: {why}"

    if not on_cuda:  # the same command on a machine without a GPU runs eager, and says so
        return False, f"{mode}: no CUDA device, eager"
    if stage == 3 or param_off:
        return no("ZeRO-3 / parameter offload gathers and frees parameters inside the forward, so their addresses "
                  "are not fixed between replays")
    if compile_target != "off":
        return no(f"--compile {compile_target} is on (torch.compile and these graphs both take over the forward; "
                  "use --compile off)")
    if ds_cfg is None and world_size > 1:
        return no("--ds none on several ranks (DDP's reducer is not captured; use a DeepSpeed config)")
    if asked:
        return True, "on: asked for"
    # Default only where measured faster: this implementation has not been timed on a GPU yet (the per-block
    # experiment it grew from was, docs/performance.md), so auto stays eager until a same-call measurement says so.
    return False, "auto: not measured faster on a GPU yet (--cuda-graphs on applies it)"


def _submodule_hooks(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        if name and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None)):
            found.append(name)
    return found


class GraphedLoss:
    """The captured forward+backward of ``model(input_ids, labels[, attention_mask]) -> loss``.

    Installed as the model's ``forward`` (an instance attribute, so ``nn.Module.__call__``, DeepSpeed's engine and
    its hooks on the top module work as before). Calls that match the captured signature replay the graphs; any
    other call runs the model's own forward."""

    def __init__(self, model, sample: dict, *, warmup_iters: int = 3, amp_dtype=None):
        import torch

        self.model = model
        self.eager_forward = model.forward  # the bound class method, kept for calls the graph does not cover
        self.keys = tuple(k for k in ("input_ids", "labels", "attention_mask") if sample.get(k) is not None)
        if "input_ids" not in self.keys or "labels" not in self.keys:
            raise GraphError("the captured call needs input_ids and labels (the loss is what the graph returns)")
        hooked = _submodule_hooks(model)
        if hooked:
            raise GraphError(f"submodules carry forward/backward hooks ({', '.join(hooked[:3])}...), which would run "
                             "only at capture")
        self.params = tuple(p for p in model.parameters() if p.requires_grad)
        self.ptrs = [p.data_ptr() for p in self.params]
        self.static_in = {k: sample[k].detach().clone() for k in self.keys}
        self.shapes = {k: tuple(v.shape) for k, v in self.static_in.items()}
        self.amp_dtype = amp_dtype
        stream = torch.cuda.current_stream()
        if stream == torch.cuda.default_stream() and stream.cuda_stream == 0:
            # AccumulateGrad nodes that DeepSpeed keeps would make the legacy default stream wait on the capture
            # stream ("operation would make the legacy stream depend on a capturing blocking stream").
            raise GraphError("capture needs the whole run on a side stream (use_side_stream() before the model is "
                             "built)")

        def loss_fn():
            # The plain loop's autocast, without its weight-cast cache (a cache would be filled at capture only).
            ctx = (torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False) if amp_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                return self.eager_forward(**self.static_in).loss

        # Warm-up on the capture stream: cuBLAS/cuDNN handles, autotuned kernels and the allocator's segments exist
        # before capture. autograd.grad leaves param.grad and ZeRO's accumulate hooks alone.
        torch.cuda.synchronize()
        for _ in range(warmup_iters):
            loss = loss_fn()
            torch.autograd.grad(loss, self.params, allow_unused=True)
        del loss
        torch.cuda.synchronize()
        self.pool = torch.cuda.graph_pool_handle()
        mem0 = torch.cuda.memory_allocated()
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=self.pool, stream=stream):
            self.static_loss = loss_fn()
        self.static_grad_out = torch.empty_like(self.static_loss)
        self.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd, pool=self.pool, stream=stream):
            grads = torch.autograd.grad(self.static_loss, self.params, grad_outputs=self.static_grad_out,
                                        allow_unused=True)
        torch.cuda.synchronize()
        # Only the parameters the loss reaches become inputs of the replay node, as in eager mode: ZeRO counts the
        # parameters a backward reaches and waits for one gradient hook per parameter before its epilogue.
        self.used = tuple(p for p, g in zip(self.params, grads) if g is not None)
        self.static_grads = tuple(g.detach() for g in grads if g is not None)
        self.pool_mib = (torch.cuda.memory_allocated() - mem0) / 2**20
        self.replays = 0
        graphed = self

        class _Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *params):
                graphed.fwd.replay()
                return graphed.static_loss.detach()

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, grad):
                if grad.data_ptr() != graphed.static_grad_out.data_ptr():
                    graphed.static_grad_out.copy_(grad)
                graphed.bwd.replay()
                # Returned as the tensors held in static_grads (extra references), so AccumulateGrad copies or adds
                # them into param.grad and never adopts a buffer the next replay overwrites.
                return graphed.static_grads

        self._replay = _Replay

    def matches(self, kwargs: dict) -> bool:
        given = tuple(k for k, v in kwargs.items() if v is not None)
        if set(given) != set(self.keys) or not self.model.training:
            return False
        return all(tuple(kwargs[k].shape) == self.shapes[k] for k in self.keys)

    def __call__(self, *args: Any, **kwargs: Any):
        if args or not self.matches(kwargs):
            return self.eager_forward(*args, **kwargs)
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if [p.data_ptr() for p in self.params] != self.ptrs:
            raise GraphError("a parameter moved after capture (its storage was replaced), so the graph would read "
                             "stale weights; run with --cuda-graphs off")
        for k in self.keys:
            if kwargs[k].data_ptr() != self.static_in[k].data_ptr():
                self.static_in[k].copy_(kwargs[k])
        loss = self._replay.apply(*self.used) if torch.is_grad_enabled() else self._forward_only()
        self.replays += 1
        # No logits: the graph's buffer is overwritten by the next replay, and the loop reads only the loss.
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def _forward_only(self):
        self.fwd.replay()
        return self.static_loss.detach().clone()


def prepare(mode: str, device, *, ds_cfg: dict | None, world_size: int, compile_target: str) -> tuple[bool, str]:
    """``resolve`` for this run's device, then, when on, the side stream every later tensor and autograd node of the
    run is created on (so call it before the model and engine are built). Raises GraphError where ``on`` cannot
    apply, as ``resolve`` does."""
    on, why = resolve(mode, on_cuda=getattr(device, "type", str(device)) == "cuda", ds_cfg=ds_cfg,
                      world_size=world_size, compile_target=compile_target)
    if on:
        use_side_stream(device)
    return on, why


def use_side_stream(device) -> Any:
    """Make a new stream current for the rest of the run (before the model and engine are built): graph capture
    then happens on the stream every tensor and autograd node of the run already belongs to."""
    import torch

    s = torch.cuda.Stream(device=device)
    torch.cuda.set_stream(s)
    return s


def graph_model(model, sample: dict, amp_dtype=None) -> GraphedLoss:
    """Capture ``model``'s loss forward and backward for calls shaped like ``sample`` and install the replay as its
    forward. Returns the installed ``GraphedLoss`` (``pool_mib``: GPU memory the graphs hold)."""
    try:
        g = GraphedLoss(model, sample, amp_dtype=amp_dtype)
    except GraphError:
        raise
    except RuntimeError as e:  # torch's capture errors name the operation that cannot be captured
        raise GraphError(f"CUDA graph capture failed: {str(e).strip().splitlines()[0]}") from e
    model.forward = g
    return g
