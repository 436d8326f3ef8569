"""Recipe tests with recorded values: train.py for real on a committed tiny checkpoint, every step's loss compared
with the losses recorded in tests/fixtures/recipe_losses.json (rtol 1e-4), and the first step's loss recomputed
outside train.py (the model class's logits and a cross-entropy written here).

A bug that moves every run alike (the label shift, the loss reduction, the prompt mask, the data order, the LR
schedule) passes a test that compares two runs made inside it; it fails these. Every flag the loss depends on is on
the command line (no default is relied on: defaults change), the DeepSpeed configs are committed copies, and the
inputs are committed: tests/fixtures/make_recipe_fixtures.py rebuilds them. How and when to re-record:
tests/README.md.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from conftest import (DATA, GRAD_ACCUM, MICRO_BATCH, MODEL, RECIPES, REPO, SEED, SEQ_LEN, STEPS, TOKENIZER,
                      curve, recipe_args)

RECORDED = REPO / "tests" / "fixtures" / "recipe_losses.json"
RECORD_ENV = "SFTBENCH_RECORD_RECIPES"  # =1: write the values of the runs into RECORDED instead of comparing


def first_step_rows(name: str) -> dict[int, list[int]]:
    """Each rank's training rows in step 1 (sftbench's order: recorded with the losses, checked against them)."""
    from sftbench.data import ShardedOrder
    ranks = RECIPES[name][0]
    n = len(DATA.read_text(encoding="utf-8").splitlines())
    return {r: ShardedOrder(n, r, ranks, SEED).take(GRAD_ACCUM * MICRO_BATCH) for r in range(ranks)}


def independent_first_loss(rows: list[int], mask_prompt: bool) -> float:
    """Step 1's loss on one rank, without train.py: the model class loads the fixture, and the loss is written here
    from the logits: each micro-batch (one sample) the mean cross-entropy of token t+1 given tokens <= t over the
    counted targets (real tokens; with the prompt masked, only those after <sep>), then the mean over the
    micro-batches of the step (what a rank logs)."""
    import torch
    import torch.nn.functional as F

    from sftbench.data import load_or_build_cache
    from sftbench.pangu import PanguForCausalLM
    from sftbench.tokenizer import PanguTokenizer

    tok = PanguTokenizer.load(TOKENIZER)
    enc = load_or_build_cache(DATA, tok, SEQ_LEN, None)  # token ids only: the labels are built below
    model = PanguForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    losses = []
    for row in rows:
        ids = enc.input_ids[row].long()
        real = enc.attention_mask[row].bool()
        counted = real.clone()
        if mask_prompt:
            sep = int((ids == tok.sep_id).nonzero()[0])
            counted[:sep + 1] = False  # "<s> prompt <sep>" is not a target
        with torch.no_grad():
            logits = model(input_ids=ids[None], attention_mask=real.long()[None]).logits[0].double()
        targets = ids[1:]
        keep = counted[1:]
        losses.append(F.cross_entropy(logits[:-1][keep], targets[keep], reduction="mean").item())
    return sum(losses) / len(losses)


def _record(name: str, run_dir: Path) -> None:
    from sftbench.tokenizer import PanguTokenizer
    import deepspeed
    import torch
    import transformers
    data = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    ranks = RECIPES[name][0]
    argv = shlex.join(a.replace(str(REPO) + os.sep, "") for a in recipe_args(name))  # for the reader only
    data[name] = {"argv": argv, "steps": STEPS,
                  "loss": {str(r): curve(run_dir, r)[0] for r in range(ranks)},
                  "lr": curve(run_dir, 0)[1],
                  "first_step_rows": {str(r): rows for r, rows in first_step_rows(name).items()},
                  "tokenizer_fingerprint": PanguTokenizer.load(TOKENIZER).fingerprint,
                  "recorded_with": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                                    "transformers": transformers.__version__}}
    RECORDED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def recorded(name: str) -> dict:
    rec = json.loads(RECORDED.read_text()).get(name)
    assert rec is not None, f"{RECORDED} has no values for recipe {name}: record them (tests/README.md)"
    return rec


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_loss_curve_is_the_recorded_one(name, recipe_run):
    """Steps 1-8 of each rank and the learning rate of each step, as recorded (rtol 1e-4 on the loss)."""
    run_dir = recipe_run(name)
    if os.environ.get(RECORD_ENV) == "1":
        _record(name, run_dir)
        pytest.skip(f"recorded {name} into {RECORDED}")
    rec = recorded(name)
    from sftbench.tokenizer import PanguTokenizer
    assert PanguTokenizer.load(TOKENIZER).fingerprint == rec["tokenizer_fingerprint"], \
        f"{TOKENIZER} is not the tokenizer the values were recorded with"
    # The schedule first: a moved LR moves every later loss, and this line names the cause.
    lrs = curve(run_dir, 0)[1]
    assert lrs == pytest.approx(rec["lr"], rel=1e-6), (name, lrs)
    for r in range(RECIPES[name][0]):
        losses = curve(run_dir, r)[0]
        assert losses == pytest.approx(rec["loss"][str(r)], rel=1e-4), (name, r, losses)
    # The recorded curve trains: a test of eight copies of the initial loss would catch less.
    assert rec["loss"]["0"][-1] < rec["loss"]["0"][0] - 0.1, rec["loss"]["0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_first_loss_matches_an_independent_computation(name, recipe_run):
    """Step 1 runs on the fixture's weights: every rank's logged loss equals the mean token cross-entropy computed
    here from the model class's logits on that rank's rows (rtol 1e-5; fp32 against fp64 sums)."""
    run_dir = recipe_run(name)
    mask_prompt = RECIPES[name][2] == "--mask-prompt"
    rows = first_step_rows(name)
    if os.environ.get(RECORD_ENV) != "1":
        assert {str(r): v for r, v in rows.items()} == recorded(name)["first_step_rows"], \
            "the data order changed: step 1 reads other rows than recorded"
    for r, rank_rows in rows.items():
        logged = curve(run_dir, r)[0][0]
        assert logged == pytest.approx(independent_first_loss(rank_rows, mask_prompt), rel=1e-5), (name, r)
