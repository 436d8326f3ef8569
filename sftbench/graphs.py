"""CUDA graphs for the micro-batch: the model's whole forward and backward replayed from two captured graphs.

At micro batch 1 x 512 the step is bound by the host launching kernels (about 28 us of host time per kernel on the
16-core H200 host, ~1,600 kernels per Pangu-350M micro-batch): a replayed graph launches them all at once.

What is captured, and what is not (so DeepSpeed computes exactly what it is told):

* ``graph_model`` captures the model's forward (embeddings, every block including the query layer, ``ln_f``, the
  tied head and the fp32 loss) into one graph, and its backward, from the loss down to the gradient of every
  parameter, into a second one. The graphs run on shadow leaves that share the parameters' storage, so their
  backward adds into static gradient buffers and never touches the real parameters' autograd nodes.
* Everything DeepSpeed does per micro-batch stays outside the graphs and runs as usual: the engine's forward
  prologue, the loss scaling of ``engine.backward`` (1/GA, the fp16 scale) and then autograd's ``AccumulateGrad`` of
  each parameter, which adds the handed-over gradient into ``param.grad`` and fires ZeRO's gradient hooks
  (bucketing, partitioning, offload copies). The boundary step (``engine.step()``) is untouched.
* Where the engine would only add each micro-batch into ``param.grad`` before the boundary (ZeRO-0/1 without
  offload, the plain loop, any stage inside DeepSpeed's ``coalesce_grad_reduction()``: the lever plan's
  ``graph_accum``, from ``ds_patches.accum_unfit`` and ``accum_per_micro``),
  the graphs do those additions themselves and hand the sum over
  at the boundary micro-batch, so the ~400 per-parameter adds and hooks run once per step instead of once per
  micro-batch (same additions, same order). Before the boundary the replay's only autograd input is one anchor
  leaf, so autograd visits none of the parameters' nodes (on Pangu-350M those ~390 visits and ZeRO hooks were most
  of a micro-batch's host time). Elsewhere every micro-batch's gradients are handed over.
* Inside the backward graph each linear layer's weight gradient is added into its static buffer by the
  weight-gradient GEMM itself (cuBLAS with beta = 1) and its bias gradient by one matrix-vector product
  (``fused_wgrad``; ``--graph-wgrad``), instead of a GEMM or reduction into a new tensor and then an add kernel per
  parameter per micro-batch (on Pangu-2.6B those adds read and write the 5 GB of bf16 gradients three times over per
  micro-batch). The sum is rounded to the weights' dtype once per micro-batch, as the add was; the GEMM adds before
  that rounding, so the sums differ from eager's within that dtype's rounding.
* With ``--graph-qkv on`` each attention's k, v (and q, except in the query layer) projections run as one GEMM
  over a view of their weights, where DeepSpeed's flat parameter buffer puts these side by side; that GEMM's gradient
  buffer holds the projections' own buffers as row blocks. Off under ``auto``: not decided by the steps.
* With ``--graph-fuse on`` each block's residual additions run fused with the dropout before them, and the first
  with the LayerNorm after it (``fused_pointwise``: two small functions compiled by torch.compile, captured like
  every other kernel), instead of separate dropout, add and LayerNorm kernels forward and backward. Off under
  ``auto``: not decided by the steps.
* The handed-over buffers stay referenced here, so autograd never steals one as ``param.grad`` (the next replay
  would overwrite it); it copies or adds instead, as in eager mode.
* Dropout draws fresh masks at every replay: CUDA graph capture registers the RNG state and every replay advances
  its offset.

It applies where the parameters stay resident at fixed addresses between steps: ZeRO-0/1/2 (with or without
optimizer offload) and ``--ds none`` on one rank. ZeRO-3 and parameter offload gather and release parameters inside
the forward, so they run eager. A model with forward hooks on its submodules is refused (hooks would run at
capture only). The graph needs static shapes: the loop's micro-batches are all ``[micro_batch, seq_len]`` on the
device; a call of another shape or signature (generation, eval with logits) runs the eager forward.

Memory: the graphs keep a private pool (the activations of one micro-batch, as eager mode needs them too, but
reserved for the run) and one static gradient buffer per parameter (``P`` x the parameters' bytes); the meta record
logs their sum (``cuda_graphs_pool_mib``) and ``sftbench/memory.py`` counts the buffers (measured on the H200,
Pangu-2.6B ZeRO-1: torch's peak allocation +4,971 MiB, the predictor's b*P 5,007 MiB).

This module is torch-free at import (the argument checks import it).
"""
from __future__ import annotations

import contextlib
from typing import Any


class GraphError(RuntimeError):
    """The model cannot be captured as asked (hooks, moved parameters, a capture failure)."""


def _submodule_hooks(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        if name and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None)):
            found.append(name)
    return found


def _accum_linear():
    """The autograd Function of a linear layer whose backward adds into the parameters' ``.grad`` itself (built on
    first use: this module is torch-free at import)."""
    global _ACCUM_LINEAR
    if _ACCUM_LINEAR is not None:
        return _ACCUM_LINEAR
    import torch
    import torch.nn.functional as F

    ones: dict = {}  # a ones vector per (rows, dtype, device), allocated at warm-up, read by the captured graphs

    class AccumLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.leaves = (weight, bias)  # the shadow leaves themselves: their .grad are the static buffers
            return F.linear(x, weight, bias)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            w_leaf, b_leaf = ctx.leaves
            g = grad.reshape(-1, grad.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gx = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
            if w_leaf.grad is None:  # the first warm-up backward (never during capture: the buffers exist by then)
                w_leaf.grad = torch.zeros_like(w_leaf)
            w_leaf.grad.addmm_(g.t(), x2)  # dW += g^T x inside the GEMM (beta = 1): no gradient tensor, no add
            if b_leaf is not None:
                if b_leaf.grad is None:
                    b_leaf.grad = torch.zeros_like(b_leaf)
                key = (g.shape[0], g.dtype, g.device)
                if key not in ones:
                    ones[key] = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
                b_leaf.grad.addmv_(g.t(), ones[key])  # db += g^T 1: one kernel for the reduction and the add
            # None for the parameters: autograd runs no AccumulateGrad for them (it would add a second time).
            return gx, None, None

    _ACCUM_LINEAR = AccumLinear
    return AccumLinear


_ACCUM_LINEAR = None


@contextlib.contextmanager
def fused_wgrad(model):
    """Within the block, every ``nn.Linear`` of ``model`` (weight and input of one dtype) runs ``AccumLinear``: its
    backward adds the weight gradient into ``weight.grad`` in the GEMM and the bias gradient by a matrix-vector
    product. Only for leaves nothing else hooks (the graphs' shadows): autograd is handed no gradient for them."""
    import torch.nn as nn

    fn = _accum_linear()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def make(m):
        def forward(x):
            if x.dtype != m.weight.dtype or not m.weight.requires_grad:
                return nn.Linear.forward(m, x)
            return fn.apply(x, m.weight, m.bias)
        return forward

    for m in linears:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # back to the class's forward


def _side_by_side(tensors) -> bool:
    """Whether ``tensors`` (contiguous, one dtype and storage) lie one after another in memory, in this order."""
    first = tensors[0]
    if any(t is None or not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return False
    off = first.storage_offset()
    for t in tensors:
        if t.storage_offset() != off:
            return False
        off += t.numel()
    return True


def fusable_projections(model) -> list:
    """``(attention, names)`` for every attention module of ``model`` (one with ``fused_proj``) whose k, v (and q,
    except in the query layer) projections' weights, and biases, lie side by side in memory, as DeepSpeed's flat
    parameter buffers of ZeRO-0/1/2 place them (separately allocated parameters, as in the plain loop, do not)."""
    found = []
    for m in model.modules():
        if not hasattr(m, "fused_proj"):
            continue
        names = ("k_proj", "v_proj") + (() if m.takes_query else ("q_proj",))
        lins = [getattr(m, n) for n in names]
        if _side_by_side([lin.weight for lin in lins]) and _side_by_side([lin.bias for lin in lins]):
            found.append((m, names))
    return found


def _pointwise_fns(compiled: bool):
    """``(dropout_add_ln, dropout_add)``: a block's residual additions with the dropout before them, the first with
    the LayerNorm after it. Compiled (torch.compile, static shapes, one graph each), each is one kernel forward and
    one or two backward where eager runs dropout, add and LayerNorm apart; uncompiled they are exactly the block's
    own operations in its order (the CPU tests compare the two)."""
    global _POINTWISE
    if compiled and _POINTWISE is not None:
        return _POINTWISE
    import torch
    import torch.nn.functional as F

    def dropout_add_ln(y, resid, weight, bias, p: float, eps: float, training: bool):
        h = resid + F.dropout(y, p, training)
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    def dropout_add(y, resid, p: float, training: bool):
        return resid + F.dropout(y, p, training)

    if not compiled:
        return dropout_add_ln, dropout_add
    _POINTWISE = (torch.compile(dropout_add_ln, fullgraph=True, dynamic=False),
                  torch.compile(dropout_add, fullgraph=True, dynamic=False))
    return _POINTWISE


_POINTWISE = None


def fusable_blocks(model) -> list:
    """The model's transformer blocks (``sftbench.pangu.PanguBlock``), whose residual kernels ``fused_pointwise``
    fuses."""
    from sftbench.pangu import PanguBlock
    return [m for m in model.modules() if isinstance(m, PanguBlock)]


@contextlib.contextmanager
def fused_pointwise(model, compiled: bool = True):
    """Within the block, every Pangu block of ``model`` computes ``h + dropout(attn(ln_1(h)))`` and ``ln_2`` of it in
    one function, and ``h + dropout(mlp(..))`` in another (``_pointwise_fns``): the attention's and the MLP's own
    output dropouts are set aside for it. The same operations in the same order, so the same random draws."""
    import torch.nn as nn

    ln_add, add = _pointwise_fns(compiled)
    blocks = fusable_blocks(model)

    def make(block, p_attn: float, p_mlp: float):
        def forward(hidden_states, attn_mask, query_states=None):
            y = block.attn(block.ln_1(hidden_states), attn_mask, query_states)  # c_proj's output, before dropout
            h, x = ln_add(y, hidden_states, block.ln_2.weight, block.ln_2.bias, p_attn, block.ln_2.eps,
                          block.training)
            return add(block.mlp(x), h, p_mlp, block.training)
        return forward

    kept = []
    for b in blocks:
        kept.append((b.attn.resid_dropout, b.mlp.dropout))
        b.forward = make(b, b.attn.resid_dropout.p, b.mlp.dropout.p)
        b.attn.resid_dropout, b.mlp.dropout = nn.Identity(), nn.Identity()
    try:
        yield len(blocks)
    finally:
        for b, (attn_drop, mlp_drop) in zip(blocks, kept):
            del b.forward  # back to the class's forward
            b.attn.resid_dropout, b.mlp.dropout = attn_drop, mlp_drop


class GraphedLoss:
    """The captured forward+backward of ``model(input_ids, labels[, attention_mask][, position_ids]) -> loss``.

    Installed as the model's ``forward`` (an instance attribute, so ``nn.Module.__call__``, DeepSpeed's engine and
    its hooks on the top module work as before). Calls that match the captured signature replay the graphs; any
    other call runs the model's own forward.

    ``boundary`` (``engine.is_gradient_accumulation_boundary``) turns on accumulation inside the graphs: the
    micro-batches before the boundary add their gradients into the static buffers and hand nothing to autograd, and
    the boundary micro-batch hands over the sum. Pass it only where the engine itself would just add each micro-batch
    into ``param.grad`` (the lever plan's ``graph_accum``): the sums are then the same additions in the same order (with
    ``wgrad``, added inside the GEMMs before the rounding to the weights' dtype), while the
    per-parameter work (an add kernel and DeepSpeed's hook for each of ~400 parameters) runs once per step instead
    of once per micro-batch. Without it every micro-batch hands its gradients over."""

    def __init__(self, model, sample: dict, *, warmup_iters: int = 3, amp_dtype=None, boundary=None,
                 wgrad: bool = False, qkv: bool = False, fuse: bool = False):
        """Capture the forward and the backward. One long function on purpose (~150 lines): the steps are one
        sequence whose order is the correctness argument (checks, shadow leaves sharing the parameters' storage,
        warm-up on the side stream, the static gradient buffers, the forward capture, the backward capture into
        those buffers, the handed-over references), read top to bottom; split into methods, that order would be
        spread over the class."""
        import torch

        self.model = model
        self.eager_forward = model.forward  # the bound class method, kept for calls the graph does not cover
        # position_ids: packed rows (--pack, sftbench/pack.py), whose attention_mask is their [micro, 1, seq, seq] one
        self.keys = tuple(k for k in ("input_ids", "labels", "attention_mask", "position_ids")
                          if sample.get(k) is not None)
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
        self.boundary = boundary
        self.pending = False  # gradients added into the static buffers and not yet handed over
        stream = torch.cuda.current_stream()
        if stream == torch.cuda.default_stream() and stream.cuda_stream == 0:
            # AccumulateGrad nodes that DeepSpeed keeps would make the legacy default stream wait on the capture
            # stream ("operation would make the legacy stream depend on a capturing blocking stream").
            raise GraphError("capture needs the whole run on a side stream (use_side_stream() before the model is "
                             "built)")
        # The graphs run on shadow leaves: detached tensors sharing each parameter's storage (so a replay reads the
        # current weights) with no hooks of their own. Their backward accumulates into shadow.grad, the static
        # gradient buffers, and never reaches the real parameters' AccumulateGrad nodes, which ZeRO hooks.
        shadow = {id(p): p.detach().requires_grad_(True) for p in self.params}
        slots = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
                 if p is not None and id(p) in shadow]
        # One GEMM for the k, v (and q) projections where their weights lie side by side: a leaf viewing the
        # neighbours as one [n*H, H] matrix (and [n*H] bias), whose gradient buffer holds the projections' own
        # buffers as row blocks (so the hand-over returns each parameter's gradient as before).
        wgrad = wgrad and amp_dtype is None  # under autocast the GEMM's dtype is not the gradient buffers'
        self.fused_leaves, fused_bufs, fused_fns = [], [], []
        linear = _accum_linear().apply if wgrad else None
        for attn, names in (fusable_projections(model) if qkv else []):
            lins = [getattr(attn, n) for n in names]
            leaves = []
            for part in ("weight", "bias"):
                first = getattr(lins[0], part)
                rows = sum(getattr(lin, part).shape[0] for lin in lins)
                leaf = first.detach().as_strided((rows, *first.shape[1:]), first.stride()).requires_grad_(True)
                leaf.grad = torch.zeros_like(leaf)
                fused_bufs.append(leaf.grad)
                at = 0
                for lin in lins:
                    own = getattr(lin, part)
                    shadow[id(own)].grad = leaf.grad[at:at + own.shape[0]]
                    at += own.shape[0]
                leaves.append(leaf)
            self.fused_leaves += leaves
            width = lins[0].weight.shape[0]

            def fused(x, w=leaves[0], b=leaves[1], width=width):
                y = linear(x, w, b) if linear is not None else torch.nn.functional.linear(x, w, b)
                return y.split(width, dim=-1)
            fused_fns.append((attn, fused))
        self.fused_qkv = len(fused_fns)
        self.fused_blocks = len(fusable_blocks(model)) if fuse else 0

        @contextlib.contextmanager
        def shadowed():
            for m, name, p in slots:
                m._parameters[name] = shadow[id(p)]
            for attn, fn in fused_fns:
                attn.fused_proj = fn
            try:
                yield
            finally:
                for m, name, p in slots:
                    m._parameters[name] = p
                for attn, _ in fused_fns:
                    attn.fused_proj = None

        def loss_fn():
            # The plain loop's autocast, without its weight-cast cache (a cache would be filled at capture only).
            ctx = (torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False) if amp_dtype is not None
                   else contextlib.nullcontext())
            in_gemm = fused_wgrad(model) if wgrad else contextlib.nullcontext()
            residual = fused_pointwise(model) if fuse else contextlib.nullcontext()
            with ctx, shadowed(), in_gemm, residual:
                return self.eager_forward(**self.static_in).loss

        # Warm-up on the capture stream: cuBLAS/cuDNN handles, autotuned kernels and the allocator's segments exist
        # before capture. The first backward also tells which parameters the loss reaches (their shadow has a grad).
        torch.cuda.synchronize()
        for _ in range(warmup_iters):
            loss_fn().backward()
        torch.cuda.synchronize()
        # Only the parameters the loss reaches become inputs of the replay node, as in eager mode: ZeRO counts the
        # parameters a backward reaches and waits for one gradient hook per parameter before its epilogue.
        reached = [(p, shadow[id(p)]) for p in self.params if shadow[id(p)].grad is not None]
        self.used = tuple(p for p, _ in reached)
        self.static_grads = tuple(s.grad for _, s in reached)
        self.pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph() empties the allocator's cache on entry; doing it first keeps those released segments
        # out of the pool's measured size (they were the warm-up's, not the graphs').
        torch.cuda.empty_cache()
        mem0 = torch.cuda.memory_reserved()
        self.zero = torch.cuda.CUDAGraph()  # clears the buffers at the first micro-batch of each hand-over
        with torch.cuda.graph(self.zero, pool=self.pool, stream=stream):
            torch._foreach_zero_(list(self.static_grads))
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=self.pool, stream=stream):
            self.static_loss = loss_fn()
        self.static_grad_out = torch.empty_like(self.static_loss)
        self.bwd = torch.cuda.CUDAGraph()  # adds this micro-batch's gradients into the static buffers
        with torch.cuda.graph(self.bwd, pool=self.pool, stream=stream):
            self.static_loss.backward(self.static_grad_out)
        torch.cuda.synchronize()
        if any(s.grad is not g for (_, s), g in zip(reached, self.static_grads)) or any(
                leaf.grad is not buf for leaf, buf in zip(self.fused_leaves, fused_bufs)):
            raise GraphError("autograd replaced a gradient buffer during capture (the graph would write elsewhere)")
        # What the graphs hold for the run: the pool's own segments (no other allocation can use them) and the
        # static gradient buffers (one per reached parameter, allocated at warm-up).
        self.grad_buffer_mib = sum(g.numel() * g.element_size() for g in self.static_grads) / 2**20
        self.pool_mib = (torch.cuda.memory_reserved() - mem0) / 2**20 + self.grad_buffer_mib
        self.replays = 0
        # Before the boundary (accumulating inside the graphs) the replay's only autograd input is this leaf, not
        # the parameters: autograd then visits no parameter's AccumulateGrad node and fires none of ZeRO's ~400
        # gradient hooks, which would have nothing to do (the gradients stay in the static buffers).
        self.anchor = torch.zeros((), device=self.static_grads[0].device, requires_grad=True)
        graphed = self

        class _Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *params):
                ctx.hand_over = not (len(params) == 1 and params[0] is graphed.anchor)  # the anchor: keep the sum
                graphed.fwd.replay()
                return graphed.static_loss.detach()

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, grad):
                if grad.data_ptr() != graphed.static_grad_out.data_ptr():
                    graphed.static_grad_out.copy_(grad)
                if not graphed.pending:
                    graphed.zero.replay()
                graphed.bwd.replay()
                if not ctx.hand_over:
                    graphed.pending = True  # kept in the buffers; the boundary micro-batch hands the sum over
                    return None
                graphed.pending = False
                # Returned as the buffers themselves (still referenced by the shadows), so AccumulateGrad copies or
                # adds them into param.grad and never adopts a buffer the next replay overwrites.
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
        if not torch.is_grad_enabled():
            loss = self._forward_only()
        elif self.boundary is not None and not self.boundary():  # the engine's count, or the loop's flag
            loss = self._replay.apply(self.anchor)
        else:
            loss = self._replay.apply(*self.used)
        self.replays += 1
        # No logits: the graph's buffer is overwritten by the next replay, and the loop reads only the loss.
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def _forward_only(self):
        self.fwd.replay()
        return self.static_loss.detach().clone()


def prepare(plan, device) -> None:
    """Where the lever plan turned the graphs on, make the side stream every later tensor and autograd node of the
    run is created on (so call it before the model and engine are built)."""
    if plan.on("cuda_graphs"):
        use_side_stream(device)


def use_side_stream(device) -> Any:
    """Make a new stream current for the rest of the run (before the model and engine are built): graph capture
    then happens on the stream every tensor and autograd node of the run already belongs to."""
    import torch

    s = torch.cuda.Stream(device=device)
    torch.cuda.set_stream(s)
    return s


def graph_model(model, sample: dict, amp_dtype=None, boundary=None, wgrad: bool = False,
                qkv: bool = False, fuse: bool = False) -> GraphedLoss:
    """Capture ``model``'s loss forward and backward for calls shaped like ``sample`` and install the replay as its
    forward (``boundary``: see ``GraphedLoss``; ``wgrad``: ``fused_wgrad`` in the captured backward; ``qkv``: one
    GEMM for each attention's side-by-side projections, ``fusable_projections``; ``fuse``: ``fused_pointwise`` in
    the captured forward and backward). Returns the installed ``GraphedLoss`` (``pool_mib``: GPU memory the graphs
    hold; ``fused_qkv``: how many attentions got one GEMM; ``fused_blocks``: how many blocks run fused)."""
    try:
        g = GraphedLoss(model, sample, amp_dtype=amp_dtype, boundary=boundary, wgrad=wgrad, qkv=qkv, fuse=fuse)
    except GraphError:
        raise
    except RuntimeError as e:  # torch's capture errors name the operation that cannot be captured
        raise GraphError(f"CUDA graph capture failed: {str(e).strip().splitlines()[0]}") from e
    model.forward = g
    return g


def graph_engine(engine, sample: dict, plan) -> tuple[GraphedLoss, dict]:
    """Capture an engine's model as train.py and the bare loop do, after ``deepspeed.initialize`` (ZeRO re-points
    the weights into its flat buffers) and any resume, with the graph levers the plan decided (``graph_accum``:
    accumulate inside the graphs and hand the sum over at the boundary; ``graph_wgrad``: ``fused_wgrad``;
    ``graph_qkv``: one GEMM per attention's side-by-side projections; ``graph_fuse``: ``fused_pointwise``). Returns
    the installed ``GraphedLoss`` and what the capture found, as meta-record keys that refine the plan's:
    ``graph_qkv`` (how many attentions got one GEMM) and ``graph_fuse_why`` (how many blocks run fused)."""
    amp_dtype = getattr(engine, "amp_dtype", None)  # the plain loop's autocast dtype
    accum = plan.on("graph_accum")
    g = graph_model(engine.module, sample, amp_dtype,
                    boundary=engine.is_gradient_accumulation_boundary if accum else None,
                    wgrad=plan.on("graph_wgrad"), qkv=plan.on("graph_qkv"), fuse=plan.on("graph_fuse"))
    found: dict = {}
    if plan.on("graph_qkv"):
        n_attn = sum(1 for m in engine.module.modules() if hasattr(m, "fused_proj"))
        found["graph_qkv"], found["graph_qkv_why"] = g.fused_qkv > 0, qkv_why(g.fused_qkv, n_attn)
    if plan.on("graph_fuse"):
        found["graph_fuse_why"] = f"{plan.why('graph_fuse')}: {g.fused_blocks} blocks"
    return g, found


def qkv_why(fused: int, attentions: int) -> str:
    """The meta record's ``graph_qkv_why`` under ``--graph-qkv on``: ``fused`` of the model's ``attentions`` got one
    GEMM."""
    if fused:
        return (f"on: {fused} of {attentions} attentions' k/v(/q) weights lie side by side in the engine's flat "
                "buffer: one GEMM each")
    # applied where it can be, which is nowhere here: said, not hidden
    return ("on: no attention's k/v/q weights lie side by side (separately allocated parameters), so each projection "
            "is its own GEMM as without the flag")
