"""One lever's decision at a time, through the one lever plan (sftbench.levers.decide), for the tests that check a
single lever's rules on real or stand-in engines: every other lever is left at ``auto``, the GPU (where ``on_cuda``)
is of the class the evidence was measured on (sm_90), and the engine's facts are read by sftbench.ds_patches as
train.py reads them."""
from __future__ import annotations

from dataclasses import replace

from sftbench import ds_patches
from sftbench.levers import Asked, EngineFacts, Situation, decide

GPU = "sm_90"


def _situation(ds_cfg=None, *, engine=None, on_cuda=True, world_size=1, precision="bf16", source=None,
               facts=None, **more) -> Situation:
    if engine is not None and ds_cfg is None and hasattr(engine, "zero_optimization_stage"):
        s = Situation(stage=int(engine.zero_optimization_stage()), offload_optimizer=bool(engine.zero_cpu_offload()),
                      world_size=world_size, cuda=on_cuda, gpu=GPU if on_cuda else None, precision=precision)
    else:
        s = Situation.of_config(ds_cfg, world_size=world_size, cuda=on_cuda, gpu=GPU, precision=precision,
                                source=source)
    return replace(s, engine=facts, **more)


def _facts(engine) -> EngineFacts:
    if not hasattr(engine, "zero_optimization"):
        return EngineFacts(plain=True, autocast=getattr(engine, "amp_dtype", None) is not None)
    return ds_patches.engine_facts(engine)


def _plain_situation(engine, on_cuda):
    return Situation(stage=None, cuda=on_cuda, gpu=GPU if on_cuda else None, engine=_facts(engine))


def compile_target(target, on_cpu, ds_cfg=None, source=None):
    """(target, why) as the plan decides ``--compile``."""
    d = decide(Asked(compile=target), _situation(ds_cfg, on_cuda=not on_cpu, source=source,
                                                  facts=EngineFacts(plain=ds_cfg is None)))["compile"]
    return d.value, d.why


def _engine_lever(lever, mode, engine, on_cuda, world_size=1):
    if not hasattr(engine, "zero_optimization"):
        s = _plain_situation(engine, on_cuda)
    else:
        s = _situation(engine=engine, on_cuda=on_cuda, world_size=world_size, facts=_facts(engine))
    d = decide(Asked(**{lever: mode}), s)[lever]
    return d.on, d.why


def grad_norm(mode, engine, on_cuda):
    return _engine_lever("grad_norm", mode, engine, on_cuda)


def overflow_check(mode, engine, on_cuda):
    return _engine_lever("overflow_check", mode, engine, on_cuda)


def coalesce(mode, engine, on_cuda, world_size, fits=None):
    """(on, why) of ``--coalesce-reduction`` on a (stand-in) engine; ``fits``: the predictor's answer with it."""
    if not hasattr(engine, "zero_optimization"):
        s = _plain_situation(engine, on_cuda)
    else:
        s = Situation(stage=int(engine.zero_optimization_stage()), offload_optimizer=bool(engine.zero_cpu_offload()),
                      world_size=world_size, cuda=on_cuda, gpu=GPU if on_cuda else None,
                      engine=EngineFacts(coalesce_unfit=ds_patches.coalesce_unfit(engine)))
        if fits is not None:
            s = replace(s, gpu_mib=lambda graphs, window: 2.0 if (window and not fits) else 1.0, gpu_total_mib=1.5)
    d = decide(Asked(coalesce_reduction=mode, cuda_graphs="off"), s)["coalesce_reduction"]
    return d.on, d.why


def coalesce_expected(mode, ds_cfg, world_size, on_cuda, precision):
    """Whether the plan made before the engine exists expects the window."""
    s = _situation(ds_cfg, on_cuda=on_cuda, world_size=world_size, precision=precision)
    try:
        return decide(Asked(coalesce_reduction=mode), s).on("coalesce_reduction")
    except ValueError:  # LeverError: refused by name (train.py stops there)
        return False


def cuda_graphs(mode, *, on_cuda, ds_cfg, world_size, compile_target, memory_mib=None, coalescing=False):
    """(on, why) of ``--cuda-graphs`` before the engine exists; ``memory_mib``: (with graphs, eager, the GPU's MiB);
    ``coalescing``: the coalesced window is asked for by name (on) rather than left to the plan (off)."""
    more = {}
    if memory_mib is not None:
        with_graphs, eager, total = memory_mib
        more = {"gpu_mib": lambda graphs, window: with_graphs if graphs else eager, "gpu_total_mib": total}
    asked = Asked(cuda_graphs=mode, compile=compile_target if compile_target != "off" else "off",
                  coalesce_reduction="on" if coalescing else "off")
    d = decide(asked, _situation(ds_cfg, on_cuda=on_cuda, world_size=world_size, **more))["cuda_graphs"]
    return d.on, d.why


def graph_accum(engine, mode="auto", coalescing=False):
    """(on, why) of ``--graph-accum`` with the graphs on."""
    if not hasattr(engine, "zero_optimization"):
        s = _plain_situation(engine, True)
    else:
        s = _situation(engine=engine, facts=EngineFacts(accum_unfit=ds_patches.accum_unfit(engine),
                                                        accum_per_micro=ds_patches.accum_per_micro(engine)))
    try:
        d = decide(Asked(cuda_graphs="on", graph_accum=mode, coalesce_reduction="on" if coalescing else "off"), s)
    except ValueError as e:  # LeverError: the window refused on this engine, so there is no accumulation inside it
        return None, str(e)
    return d["graph_accum"].on, d["graph_accum"].why
