"""Packed batches (``--pack``): several samples concatenated into each ``seq_len`` row instead of one padded sample per
row, each sample attending only to itself.

Which samples share a row (``pack``): best-fit decreasing over the encoded lengths (the samples longest first, ties
in index order; each goes into the open row with the least room that still holds it, else opens a row). The result
depends on the lengths alone, so it is rebuilt identically on every rank and on resume; the rows then take the place
of the samples in ``sftbench.data.ShardedOrder`` (a seeded permutation of the rows per epoch), so the order of a
packed run is a function of the seed and the data, and an epoch is one pass over the rows: fewer steps than
unpacked. Every epoch sees the same rows (as TRL's and LLaMA-Factory's pre-packed datasets do), in a new order.

A packed row (``PackedSet``), for samples ``a`` (length 3) and ``b`` (length 2) in a row of 7::

    input_ids     a0 a1 a2 b0 b1 <pad> <pad>
    labels        -100 a1 a2 -100 b1 -100 -100     each sample's own labels (--mask-prompt applied), its first
                                                   position -100: never predicted from the sample before it
    position_ids  0  1  2  0  1  0  1              restart per sample (the tail of padding counts on as its own run)
    segment_ids   0  0  0  1  1  2  2              which sample a token belongs to (the tail of padding: one more)
    attention_mask 1 1  1  1  1  0  0              real tokens (what the log counts as real), not the model's mask

The model's mask is ``block_causal_mask(segment_ids)``: boolean ``[batch, 1, seq, seq]``, True where query i may
attend key j: same segment and j <= i, i.e. block-diagonal causal. Built per micro-batch on the device from the
segment ids (``model_inputs``), so only ``[steps, GA, micro, seq]`` integers wait on the device, never the
``seq x seq`` masks of every step. transformers models (SDPA) take a 4D mask as it is; Pangu-α
(``sftbench/pangu.py``) takes it as its own boolean SDPA mask, and per-row ``position_ids`` for both its position
and query-layer embeddings. Every row has exactly ``seq_len`` tokens: shapes stay static (the CUDA graphs capture
the mask and the positions as inputs).

The loss of a micro-batch is the mean over its counted targets, so a packed step weighs every answer token alike,
where an unpacked micro batch of 1 weighs every sample alike; per token the losses are the same (tests/test_pack.py).

Torch-free at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sftbench.data import IGNORE_INDEX

# The keys a packed micro-batch holds on the device, besides input_ids and labels.
PACKED_KEYS = ("position_ids", "segment_ids")


@dataclass(frozen=True)
class Packing:
    """Which samples (indices into the encoded set) share each row, in row order and, within a row, in place order."""

    rows: tuple[tuple[int, ...], ...]
    seq_len: int
    real_tokens: int

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def n_samples(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def real_share(self) -> float:
        """Real tokens over the rows' tokens (1.0: no padding left)."""
        return self.real_tokens / (self.n * self.seq_len) if self.rows else 0.0

    @property
    def unpacked_share(self) -> float:
        """The same samples' real-token share at one sample per row."""
        return self.real_tokens / (self.n_samples * self.seq_len) if self.rows else 0.0


def pack(lengths: Sequence[int], samples: Sequence[int], seq_len: int) -> Packing:
    """Best-fit decreasing of ``samples`` (indices) whose token counts are ``lengths[i]`` into rows of ``seq_len``
    (module doc). A sample longer than ``seq_len`` is a ValueError (the encoder truncates to ``seq_len``)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    order = sorted(samples, key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    # open rows by the room they have left: room -> row numbers (the last opened first); a row with no room left
    # is closed. Finding the best fit is a scan up from the sample's length: at most seq_len steps.
    by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    room_of: list[int] = []
    for i in order:
        n = int(lengths[i])
        if not 1 <= n <= seq_len:
            raise ValueError(f"sample {i} has {n} tokens; a packed row holds 1 to {seq_len}")
        room = next((r for r in range(n, seq_len + 1) if by_room[r]), None)
        if room is None:
            rows.append([])
            room_of.append(seq_len)
            row = len(rows) - 1
        else:
            row = by_room[room].pop()
        rows[row].append(i)
        room_of[row] -= n
        if room_of[row]:
            by_room[room_of[row]].append(row)
    return Packing(tuple(tuple(r) for r in rows), int(seq_len), sum(int(lengths[i]) for i in samples))


class PackedSet:
    """The packed rows of an encoded set (``sftbench.data.EncodedSet``) as int64 tensors ``[rows, seq_len]``:
    ``input_ids``, ``labels``, ``position_ids``, ``segment_ids`` and ``attention_mask`` (real tokens), laid out as
    the module doc shows. ``n``, ``real_tokens``, ``pad_tokens`` as the encoded set has them, over the rows."""

    def __init__(self, ds, packing: Packing, pad_id: int):
        import torch

        rows, s = packing.rows, packing.seq_len
        self.packing, self.n, self.seq_len = packing, packing.n, s
        self.real_tokens = packing.real_tokens
        self.pad_tokens = self.n * s - self.real_tokens
        self.input_ids = torch.full((self.n, s), int(pad_id), dtype=torch.long)
        self.labels = torch.full((self.n, s), IGNORE_INDEX, dtype=torch.long)
        self.position_ids = torch.zeros((self.n, s), dtype=torch.long)
        self.segment_ids = torch.zeros((self.n, s), dtype=torch.long)
        self.attention_mask = torch.zeros((self.n, s), dtype=torch.long)
        src = ds.batch([i for row in rows for i in row])  # every packed sample's own row, in packing order
        k = 0
        for r, row in enumerate(rows):
            at = 0
            for seg, _ in enumerate(row):
                n = int(src["attention_mask"][k].sum())
                self.input_ids[r, at:at + n] = src["input_ids"][k, :n]
                self.labels[r, at + 1:at + n] = src["labels"][k, 1:n]  # at: the sample's first token, never a target
                self.position_ids[r, at:at + n] = torch.arange(n)
                self.segment_ids[r, at:at + n] = seg
                self.attention_mask[r, at:at + n] = 1
                at, k = at + n, k + 1
            self.position_ids[r, at:] = torch.arange(s - at)  # the padding tail: its own run, its own segment
            self.segment_ids[r, at:] = len(row)

    def to_log(self, unpacked_steps_per_epoch: int) -> dict:
        """The meta record's ``packing`` of a packed run (docs/log_schema.md)."""
        return {"packed": True, "rows": self.n, "samples": self.packing.n_samples,
                "real_share": round(self.packing.real_share, 6), "steps_per_epoch_unpacked": unpacked_steps_per_epoch}


def unpacked_log(ds, rows: Sequence[int], steps_per_epoch: int) -> dict:
    """The meta record's ``packing`` of an unpacked run: one sample per row, and that layout's real-token share."""
    real = int(ds.lengths[list(rows)].sum()) if len(rows) else 0
    return {"packed": False, "rows": len(rows), "samples": len(rows),
            "real_share": round(real / (len(rows) * ds.seq_len), 6) if len(rows) else 0.0,
            "steps_per_epoch_unpacked": steps_per_epoch}


def block_causal_mask(segment_ids):
    """Boolean ``[batch, 1, seq, seq]`` from ``segment_ids [batch, seq]``: True where query i may attend key j (same
    segment and j <= i). Never an empty row (a token always sees itself). Pure tensor ops on the ids' device."""
    import torch

    seq = segment_ids.shape[-1]
    idx = torch.arange(seq, device=segment_ids.device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [q, k]: k <= q
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)  # [batch, q, k]
    return (same & causal).unsqueeze(1)


def model_inputs(micro: dict) -> dict:
    """The model's keyword arguments for one micro-batch as the loop holds it (``input_ids``, ``labels`` and either
    ``attention_mask`` (unpacked, where the padding mask is passed) or ``position_ids`` and ``segment_ids``
    (packed): the segments become ``block_causal_mask``)."""
    if "segment_ids" not in micro:
        return micro
    out = {k: v for k, v in micro.items() if k != "segment_ids"}
    out["attention_mask"] = block_causal_mask(micro["segment_ids"])
    return out
