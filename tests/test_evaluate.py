"""sftbench.evaluate: the token-weighted eval loss over padded per-rank shards is the training loss's own."""
from __future__ import annotations

import pytest
import torch

from sftbench.data import load_or_build_cache
from sftbench.evaluate import Evaluator, rank_rows
from sftbench.pangu import build_model
from sftbench.tokenizer import PanguTokenizer

from conftest import REPO


def test_rank_rows_are_round_robin_and_padded_to_equal_length():
    assert [rank_rows(list(range(5)), r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3, None]]
    assert rank_rows([7], 1, 3) == [None]


class _Engine:
    """The three calls Evaluator makes of a DeepSpeed engine."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_eval_loss_is_the_model_loss_over_every_counted_target(micro_batch):
    torch.manual_seed(0)
    model = build_model("pangu-tiny")
    es = load_or_build_cache(REPO / "data" / "sample_sft.jsonl", PanguTokenizer.load(None), 32, None)
    rows = [3, 8, 13, 21, 34]
    ev = Evaluator(es, rows, rank=0, world_size=1, micro_batch=micro_batch, device=torch.device("cpu"),
                   pad_token_id=model.config.pad_token_id, use_pad_mask=False)
    got = ev.run(_Engine(model), is_deepspeed=True)
    assert model.training  # back in training mode
    b = es.batch(rows)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], labels=b["labels"]).loss.item()  # mean over counted targets
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert got["eval_tokens"] == int((b["labels"][:, 1:] != -100).sum()) and got["eval_samples"] == 5
