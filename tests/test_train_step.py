"""train.py's step, in-process: train_step drives the engine's three calls per micro-batch and returns the mean
loss without a host read; step_line is the console line of a step record."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO
from sftbench.pangu import PanguForCausalLM, preset_config
from sftbench.plain import PlainEngine


def _train_module():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_entry"] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)  # defines main(), runs nothing
    return mod


def test_train_step_is_one_optimizer_step_over_the_micro_batches():
    train = _train_module()
    torch.manual_seed(3)
    model = PanguForCausalLM._from_config(preset_config("pangu-tiny", attn_pdrop=0.0, resid_pdrop=0.0,
                                                        embd_pdrop=0.0))
    engine = PlainEngine(model, device=torch.device("cpu"), precision="fp32", grad_accum=2, micro_batch=1, lr=1e-3,
                         lr_warmup_steps=1, world_size=1)
    engine.train()
    ids = torch.randint(10, 3000, (2, 1, 32))
    labels = ids.clone()
    with torch.no_grad():
        want = sum(model(input_ids=ids[m], labels=labels[m]).loss for m in range(2)) / 2
    before = model.transformer.ln_f.bias.detach().clone()
    loss = train.train_step(engine, {"input_ids": ids, "labels": labels})
    assert loss.dim() == 0 and loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert engine.global_steps == 1 and engine.micro_steps == 2  # one update after the two micro-batches
    assert not torch.equal(before, model.transformer.ln_f.bias)


def test_step_line_says_what_the_record_says():
    train = _train_module()
    rec = {"step": 5, "warmup": False, "skipped": True, "loss": 2.5, "step_s": 0.25, "tokens_per_s": 16384.0,
           "real_tokens_per_s": 15000.0, "mfu_pct": 31.2, "gpu_mem_used_mib": 60000.0, "host_rss_mib": 5000.0}
    line = train.step_line(rec, 10, eta_s=1.25)
    assert line == ("step 5/10 (overflow: update skipped) | loss 2.5000 | 0.250 s/it | 16384 tok/s (15000 real) | "
                    "mfu 31.2% | gpu 60000 MiB | rss 5000 MiB | eta 1s")
    warm = train.step_line({**rec, "warmup": True, "skipped": False, "mfu_pct": None, "gpu_mem_used_mib": None},
                           10, 0.0, bar=True)
    assert warm.startswith("[##########..........] step 5/10 (warm-up) | loss") and "mfu" not in warm
