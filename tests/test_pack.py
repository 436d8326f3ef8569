"""Packed batches (sftbench/pack.py): which samples share a row, the row layout, the block-diagonal causal mask, and
the numerics: on dropout-free fp32 models (a tiny Pangu-α and tiny transformers models built here), every token's
loss in a packed row equals its loss with the sample alone, and no label crosses a sample boundary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftbench.data import IGNORE_INDEX, EncodedSet, ReadReport
from sftbench.pack import Packing, PackedSet, block_causal_mask, model_inputs, pack, unpacked_log

PAD = 6


def encoded(lengths, seq_len, prompt_lens=None, mask_prompt=False, seed=0):
    """An encoded set of random ids with the given real lengths (padded with PAD), as the cache hands it out."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.full((n, seq_len), PAD, dtype=torch.int32)
    for i, ln in enumerate(lengths):
        ids[i, :ln] = torch.randint(10, 400, (ln,), generator=g, dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    plens = torch.tensor(prompt_lens or [1] * n, dtype=torch.int32)
    return EncodedSet(ids, lens, plens, lens.clone(), seq_len=seq_len, mask_prompt=mask_prompt,
                      read_report=ReadReport(path="mem", n_ok=n))


# ---------------------------------------------------------------------------------------------------- packing
def test_best_fit_decreasing_by_hand():
    # longest first: 7 opens row 0 (room 3), 6 opens row 1 (room 4), 4 fits row 1 exactly, 3 fits row 0 exactly,
    # 2 opens row 2, 1 joins it
    p = pack([3, 7, 1, 6, 4, 2], range(6), 10)
    assert p.rows == ((1, 0), (3, 4), (5, 2))
    assert p.real_tokens == 23 and p.n == 3 and p.n_samples == 6
    assert p.real_share == pytest.approx(23 / 30) and p.unpacked_share == pytest.approx(23 / 60)


def test_packing_only_the_given_samples_and_every_one_once():
    lengths = [(i * 37) % 60 + 1 for i in range(200)]
    train = [i for i in range(200) if i % 5]  # 160 samples, the rest held out
    p = pack(lengths, train, 64)
    placed = [i for row in p.rows for i in row]
    assert sorted(placed) == train
    assert all(sum(lengths[i] for i in row) <= 64 for row in p.rows)
    assert p.real_tokens == sum(lengths[i] for i in train)
    # best fit leaves little room: 160 samples of mean ~30 tokens in rows of 64
    assert p.real_share > 0.95, p.real_share
    assert pack(lengths, train, 64) == p  # a function of the lengths alone: every rank and a resume rebuild it


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens; a packed row holds 1 to 8"):
        pack([3, 9], [0, 1], 8)


# ------------------------------------------------------------------------------------------------- row layout
def test_row_layout_labels_positions_segments():
    ds = encoded([3, 2, 4], seq_len=8, prompt_lens=[2, 1, 3], mask_prompt=True)
    ps = PackedSet(ds, Packing(((0, 1), (2,)), 8, 9), pad_id=PAD)
    ids = ds.input_ids
    assert ps.input_ids[0].tolist() == [*ids[0, :3].tolist(), *ids[1, :2].tolist(), PAD, PAD, PAD]
    # each sample's own labels (prompt masked) with its first position -100; the padding tail -100
    lab0, lab1 = ds.labels[0].tolist(), ds.labels[1].tolist()
    assert ps.labels[0].tolist() == [IGNORE_INDEX, lab0[1], lab0[2], IGNORE_INDEX, lab1[1]] + [IGNORE_INDEX] * 3
    assert lab0[1] == IGNORE_INDEX and lab0[2] == ids[0, 2].item()  # --mask-prompt kept: prompt_lens[0] == 2
    assert ps.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert ps.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert ps.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ps.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ps.real_tokens == 9 and ps.pad_tokens == 7 and ps.n == 2


def test_block_causal_mask_by_hand():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_model_inputs_turns_segments_into_the_mask():
    seg = torch.tensor([[0, 0, 1]])
    micro = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 0]]), "segment_ids": seg}
    out = model_inputs(micro)
    assert sorted(out) == ["attention_mask", "input_ids", "labels", "position_ids"]
    assert torch.equal(out["attention_mask"], block_causal_mask(seg))
    unpacked = {"input_ids": micro["input_ids"], "labels": micro["labels"]}
    assert model_inputs(unpacked) is unpacked


def test_log_fields_of_both_layouts():
    ds = encoded([3, 2, 4, 8], seq_len=8)
    ps = PackedSet(ds, pack(ds.lengths.tolist(), range(4), 8), pad_id=PAD)
    assert ps.to_log(4) == {"packed": True, "rows": 3, "samples": 4, "real_share": round(17 / 24, 6),
                            "steps_per_epoch_unpacked": 4}
    assert unpacked_log(ds, [0, 1, 3], 3) == {"packed": False, "rows": 3, "samples": 3,
                                              "real_share": round(13 / 24, 6), "steps_per_epoch_unpacked": 3}


# --------------------------------------------------------------------------------------------------- numerics
def _pangu():
    from sftbench.pangu import PanguForCausalLM, preset_config

    return PanguForCausalLM._from_config(preset_config("pangu-tiny", attn_pdrop=0.0, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, vocab_size=512))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_dropout=0.0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def _preset(name):
    def build():
        from sftbench.models.resolve import resolve

        return resolve(name).build()
    return build


def _token_losses(logits, labels):
    """Per-position loss of predicting labels[t + 1] from logits[t] (0 where the target is not counted)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


@pytest.mark.parametrize("build", [_pangu, _llama, _preset("qwen2-tiny"), _preset("gpt2-tiny")],
                         ids=["pangu-tiny", "llama", "qwen2-tiny", "gpt2-tiny"])
def test_packed_token_losses_equal_each_sample_alone(build):
    torch.manual_seed(0)
    model = build().float()
    model.train()  # the training path; every dropout is 0 here or in these configs' training forward
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if hasattr(model.config, "attn_pdrop"):
        model.config.attn_pdrop = 0.0
    ds = encoded([9, 17, 5, 30, 12, 3, 21], seq_len=32, prompt_lens=[3, 5, 2, 7, 4, 2, 6], mask_prompt=True, seed=1)
    p = pack(ds.lengths.tolist(), range(ds.n), 32)
    assert p.n < ds.n  # samples really share rows
    ps = PackedSet(ds, p, pad_id=PAD)
    with torch.no_grad():
        out = model(**model_inputs({"input_ids": ps.input_ids, "labels": ps.labels,
                                    "position_ids": ps.position_ids, "segment_ids": ps.segment_ids}))
        packed = _token_losses(out.logits, ps.labels)
        alone_sum, alone_count = 0.0, 0
        for r, row in enumerate(p.rows):
            at = 0
            for i in row:
                n = int(ds.lengths[i])
                ids, labels = ds.input_ids[i:i + 1, :n], ds.labels[i:i + 1, :n]
                alone = _token_losses(model(input_ids=ids).logits, labels)[0]
                # packed position at + t predicts the sample's token t + 1, as position t does alone
                assert torch.allclose(packed[r, at:at + n - 1], alone, atol=1e-5, rtol=0), (r, i)
                # the sample's last token predicts nothing in the row (the next sample's first label is -100)
                if at + n < 32:
                    assert packed[r, at + n - 1].item() == 0.0 and ps.labels[r, at + n].item() == IGNORE_INDEX
                alone_sum += alone.sum().item()
                alone_count += int((labels[0, 1:] != IGNORE_INDEX).sum())
                at += n
    # the model's own loss of the packed batch: the mean over the same counted targets
    assert out.loss.item() == pytest.approx(alone_sum / alone_count, abs=1e-5)


def test_pangu_takes_the_4d_mask_only_boolean_and_square():
    model = _pangu()
    ids = torch.randint(10, 400, (1, 8))
    with pytest.raises(ValueError, match=r"a 4D attention_mask must be boolean \[batch, 1, 8, 8\]"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 8, 8))
