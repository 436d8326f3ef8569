"""Evaluation loss during training: every rank scores its shard of the evaluation set, the sums are all-reduced.

The loss is the training loss's own definition (shifted next-token cross-entropy in fp32, targets that are padding
or ``-100`` left out; with ``--mask-prompt`` only answer tokens count) summed over every counted target of the
whole evaluation set and divided by their number: a token-weighted mean, the same on every rank and independent of
the world size. Rank r takes samples r, r + world, r + 2*world, ...; shards are padded to the same number of
micro-batches with rows that count no target, because under ZeRO-3 every forward is a collective that all ranks
must join. It runs in eval mode (no dropout) under ``torch.no_grad``, between optimizer steps, outside the step
clock: ``step_s`` and the step statistics never include it.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from sftbench.data import IGNORE_INDEX


def rank_rows(rows: list[int], rank: int, world_size: int) -> list[int | None]:
    """This rank's rows of ``rows`` (round-robin), padded with None to ceil(len / world_size)."""
    mine: list[int | None] = list(rows[rank::world_size])
    return mine + [None] * (-(-len(rows) // world_size) - len(mine))


class Evaluator:
    """The evaluation batches of one rank, on the device, and the loop that scores them."""

    def __init__(self, eset, rows: list[int], *, rank: int, world_size: int, micro_batch: int, device,
                 pad_token_id: int | None, use_pad_mask: bool):
        self.n_samples = len(rows)
        mine = rank_rows(rows, rank, world_size)
        real = [r for r in mine if r is not None]
        fill = real[0] if real else rows[0]  # a padding row: any sample, with no target counted
        batch = eset.batch([fill if r is None else r for r in mine])
        labels = batch["labels"].clone()
        for i, r in enumerate(mine):
            if r is None:
                labels[i] = IGNORE_INDEX
        if pad_token_id is not None:  # the training loss ignores targets equal to the pad id as well
            labels[labels == pad_token_id] = IGNORE_INDEX
        self.batches = []
        for s in range(0, len(mine), micro_batch):
            sl = slice(s, s + micro_batch)
            self.batches.append((batch["input_ids"][sl].to(device), labels[sl].to(device),
                                 batch["attention_mask"][sl].to(device) if use_pad_mask else None))
        self.device = device

    @torch.no_grad()
    def run(self, engine, *, is_deepspeed: bool) -> dict:
        """``{"eval_loss", "eval_tokens", "eval_samples", "eval_s"}``, the same on every rank."""
        t0 = time.perf_counter()
        module = engine.module
        if is_deepspeed:
            engine.eval()
            forward, ctx = engine, contextlib.nullcontext()
        else:  # the plain engine's __call__ enters DDP's no_sync for a backward that never comes: call the module
            module.eval()
            amp = getattr(engine, "amp_dtype", None)
            forward = module
            ctx = torch.autocast(self.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of target losses, counted targets]
        try:
            for ids, labels, mask in self.batches:
                with ctx:
                    logits = forward(input_ids=ids, attention_mask=mask).logits
                target = labels[:, 1:]
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                acc[0] += loss.double()
                acc[1] += (target != IGNORE_INDEX).sum()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(acc)
        finally:
            engine.train()
        total, count = acc.tolist()
        return {"eval_loss": total / count if count else None, "eval_tokens": int(count),
                "eval_samples": self.n_samples, "eval_s": time.perf_counter() - t0}
