"""Tests of the Pangu-α model (CPU, fp32, small)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModelForCausalLM

import sftbench.pangu as P

PAD = 6


def make_model(seed: int = 0, **overrides) -> P.PanguForCausalLM:
    """A tiny model in eval mode; a larger init range makes attention patterns far from uniform."""
    torch.manual_seed(seed)
    cfg = P.preset_config("pangu-tiny", **{"initializer_range": 0.2, **overrides})
    return P.PanguForCausalLM(cfg).eval()


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (batch, seq), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------------------------
# reference implementation of the original port's math (explicit softmax attention, -1e4 masking)
# ----------------------------------------------------------------------------------------------------------------


def reference_logits(model: P.PanguForCausalLM, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    sd = model.state_dict()
    cfg = model.config
    H, nh, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
    hd = H // nh
    bsz, seq = input_ids.shape
    pos = torch.arange(seq)

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_epsilon) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def heads(t):
        return t.reshape(bsz, seq, nh, hd).permute(0, 2, 1, 3)

    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    if attention_mask is None:
        additive = torch.zeros(bsz, 1, 1, seq)
    else:
        additive = (1.0 - attention_mask.float())[:, None, None, :] * -10000.0

    def attention(x, q_in, name):
        q, k, v = heads(lin(q_in, name + ".q_proj")), heads(lin(x, name + ".k_proj")), heads(lin(x, name + ".v_proj"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = torch.where(causal, scores, torch.tensor(-10000.0))
        probs = torch.softmax(scores + additive, dim=-1)
        out = (probs @ v).permute(0, 2, 1, 3).reshape(bsz, seq, H)
        return lin(out, name + ".c_proj")

    def mlp(x, name):
        h = lin(x, name + ".c_fc")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return lin(h, name + ".c_proj")

    x = sd["transformer.wte.weight"][input_ids] + sd["transformer.wpe.weight"][pos][None]
    for i in range(L):
        name = f"transformer.h.{i}"
        if i == L - 1:
            x = ln(x, "transformer.ln_f")
            q_src = sd["transformer.wqe.weight"][pos][None].expand(bsz, seq, H)
        h = ln(x, name + ".ln_1")
        x = x + attention(h, h if i < L - 1 else q_src, name + ".attn")
        x = x + mlp(ln(x, name + ".ln_2"), name + ".mlp")
    return x @ sd["transformer.wte.weight"].T


# ----------------------------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------------------------


def hand_count(V: int, H: int, L: int, P_: int) -> int:
    per_block = (2 * H) + 4 * (H * H + H) + (2 * H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
    return V * H + 2 * P_ * H + L * per_block + 2 * H


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_param_counts_on_meta(name):
    cfg = P.preset_config(name)
    with torch.device("meta"):
        model = P.PanguForCausalLM(cfg)
    actual = sum(p.numel() for p in model.parameters())  # tied matrix counted once
    expected = hand_count(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.max_position_embeddings)
    assert actual == P.count_params(cfg) == expected
    assert model.lm_head.weight is model.transformer.wte.weight
    assert list(model.buffers()) == []  # no causal tables or other big buffers


def test_known_param_counts():
    assert P.count_params(P.preset_config("pangu-350m")) == 345_368_576
    assert P.count_params(P.preset_config("pangu-2.6b")) == 2_625_295_360
    untied = P.preset_config("pangu-tiny", tie_word_embeddings=False)
    assert P.count_params(untied) == P.count_params(P.preset_config("pangu-tiny")) + 40000 * 64


def test_preset_shapes_and_names():
    cfg = P.preset_config("pangu-2.6b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (2560, 32, 32, 40000)
    assert cfg.num_hidden_layers == 32 and cfg.num_attention_heads == 32
    assert cfg.pad_token_id == PAD and cfg.model_type == "gpt_pangu"
    with torch.device("meta"):
        model = P.PanguForCausalLM(P.preset_config("pangu-tiny"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.wte.weight"] == (40000, 64)
    assert shapes["transformer.wpe.weight"] == (1024, 64)
    assert shapes["transformer.wqe.weight"] == (1024, 64)
    assert shapes["transformer.h.1.attn.q_proj.weight"] == (64, 64)
    assert shapes["transformer.h.1.attn.c_proj.bias"] == (64,)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (256, 64)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (64, 256)
    assert shapes["transformer.ln_f.weight"] == (64,)
    assert shapes["lm_head.weight"] == (40000, 64)


def test_init_scheme():
    torch.manual_seed(0)
    model = P.build_model("pangu-tiny").requires_grad_(False)
    block = model.transformer.h[0]
    assert abs(float(block.attn.q_proj.weight.std()) - 0.02) < 0.002
    assert abs(float(model.transformer.wte.weight.std()) - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * model.config.num_layers)
    assert abs(float(block.attn.c_proj.weight.std()) - scaled) < 0.002
    assert abs(float(block.mlp.c_proj.weight.std()) - scaled) < 0.001
    assert torch.all(block.attn.q_proj.bias == 0) and torch.all(block.ln_1.weight == 1)


def test_registration_idempotent():
    P.register()
    P.register()
    assert isinstance(AutoConfig.for_model("gpt_pangu"), P.PanguConfig)
    assert isinstance(AutoConfig.for_model("pangu"), P.PanguConfig)


# ----------------------------------------------------------------------------------------------------------------
# forward math
# ----------------------------------------------------------------------------------------------------------------


def test_forward_matches_reference_without_mask():
    model = make_model()
    ids = random_ids(2, 24)
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference_logits(model, ids)
    assert rel_err(ours, ref) < 1e-5


def test_forward_matches_reference_with_padding():
    model = make_model()
    seq = 20
    ids = random_ids(3, seq, seed=3)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, :5] = 0  # left padded
    mask[1, 13:] = 0  # right padded
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        ref = reference_logits(model, ids, mask)
        for m in (mask, mask.bool(), mask.float(), mask.int()):
            ours = model(ids, attention_mask=m).logits
            assert not torch.isnan(ours).any()
            real = m.bool()
            assert rel_err(ours[real], ref[real]) < 1e-5


def test_right_padding_mask_equals_no_mask():
    model = make_model()
    seq = 16
    ids = random_ids(2, seq, seed=5)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, 14:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        with_mask = model(ids, attention_mask=mask).logits
        without = model(ids).logits
    real = mask.bool()
    torch.testing.assert_close(with_mask[real], without[real], rtol=1e-6, atol=1e-6)


def test_position_ids_are_used():
    model = make_model()
    ids = random_ids(1, 8)
    with torch.no_grad():
        default = model(ids).logits
        explicit = model(ids, position_ids=torch.arange(8)[None]).logits
        shifted = model(ids, position_ids=torch.arange(3, 11)[None]).logits
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, shifted)


# ----------------------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------------------


def test_loss_ignores_pad_and_minus_100():
    model = make_model()
    ids = random_ids(2, 12, seed=7)
    labels = ids.clone()
    labels[0, 3] = PAD
    labels[0, 10:] = PAD
    labels[1, 0:4] = -100
    labels[1, 7] = -100
    out = model(ids, labels=labels, num_items_in_batch=123, use_cache=False, return_dict=True)
    logits = out.logits.detach().double()

    total, count = 0.0, 0
    for b in range(2):
        for t in range(11):
            target = int(labels[b, t + 1])
            if target in (PAD, -100):
                continue
            total -= float(torch.log_softmax(logits[b, t], -1)[target])
            count += 1
    assert count == 22 - 3 - 4  # row 0: targets 3, 10, 11; row 1: targets 1, 2, 3, 7
    assert abs(out.loss.item() - total / count) < 1e-5
    assert out.loss.dtype == torch.float32

    # the original port's formula (ignore_index = pad id) on labels without -100 gives the same value
    labels_orig = labels.masked_fill(labels == -100, PAD)
    orig = F.cross_entropy(out.logits[:, :-1].reshape(-1, 40000), labels_orig[:, 1:].reshape(-1), ignore_index=PAD)
    torch.testing.assert_close(model(ids, labels=labels_orig).loss, orig, rtol=1e-6, atol=1e-6)

    out.loss.backward()
    assert model.transformer.wqe.weight.grad is not None

    all_ignored = torch.full_like(ids, PAD)
    loss = model(ids, labels=all_ignored).loss.detach()
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_tuple_output():
    model = make_model()
    ids = random_ids(1, 6)
    loss, logits = model(ids, labels=ids, return_dict=False)
    assert logits.shape == (1, 6, 40000) and loss.ndim == 0


# ----------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded, info = P.PanguForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)
    built = P.build_model(str(tmp_path))
    assert isinstance(built, P.PanguForCausalLM)


def write_original_folder(folder, model: P.PanguForCausalLM, model_type: str = "gpt_pangu", **state_changes):
    """A folder laid out like the public port's: torch.save'd state dict with buffers, port-style config."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # includes lm_head.weight, like the port
    for i in range(model.config.num_layers):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)).view(
            1, 1, 1024, 1024
        )
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    for key, value in state_changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    cfg = {
        "activation_function": "gelu",
        "architectures": ["GPTPanguForCausalLM"],
        "attn_pdrop": 0.1,
        "auto_map": {
            "AutoConfig": "configuration_gptpangu.GPTPanguConfig",
            "AutoModelForCausalLM": "modeling_gptpangu.GPTPanguForCausalLM",
        },
        "embd_pdrop": 0.1,
        "hidden_size": model.config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": None,
        "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 1024,
        "model_type": model_type,
        "num_heads": model.config.num_heads,
        "num_layers": model.config.num_layers,
        "resid_pdrop": 0.1,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "torch_dtype": "float32",
        "transformers_version": "4.12.5",
        "use_cache": True,
        "vocab_size": 40000,
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    return folder


@pytest.mark.parametrize("model_type", ["gpt_pangu", "pangu"])
def test_original_style_folder_loads_cleanly(tmp_path, model_type):
    model = make_model()
    folder = write_original_folder(tmp_path / "orig", model, model_type=model_type)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert isinstance(loaded, P.PanguForCausalLM)
    assert loaded.config.model_type == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.pad_token_id == PAD  # absent from the file -> Pangu default
    ids = random_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert isinstance(P.build_model(folder), P.PanguForCausalLM)


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(ValueError, match="pangu-350m.*pangu-2.6b.*pangu-13b.*pangu-tiny"):
        P.preset_config("pangu-7b")
    with pytest.raises(P.CheckpointError, match="pangu-7b.*pangu-350m"):
        P.build_model("pangu-7b")


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(P.CheckpointError, match="nowhere"):
        P.build_model(missing)


def test_missing_config(tmp_path):
    folder = write_original_folder(tmp_path / "ckpt", make_model())
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(P.CheckpointError, match="ckpt.*config.json"):
        P.build_model(folder)


def test_missing_weights(tmp_path):
    folder = write_original_folder(tmp_path / "ckpt", make_model())
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(P.CheckpointError, match="ckpt.*pytorch_model.bin"):
        P.build_model(folder)


def test_wrong_model_type(tmp_path):
    folder = write_original_folder(tmp_path / "ckpt", make_model(), model_type="gpt2")
    with pytest.raises(P.CheckpointError, match="config.json.*'gpt2'"):
        P.build_model(folder)


def test_wrong_shape(tmp_path):
    folder = write_original_folder(tmp_path / "ckpt", make_model(), **{"transformer.wqe.weight": torch.zeros(512, 64)})
    with pytest.raises(P.CheckpointError, match=r"transformer\.wqe\.weight.*\[512, 64\].*\[1024, 64\]"):
        P.build_model(folder)


def test_missing_key(tmp_path):
    folder = write_original_folder(tmp_path / "ckpt", make_model(), **{"transformer.h.1.mlp.c_fc.bias": None})
    with pytest.raises(P.CheckpointError, match=r"pytorch_model\.bin.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        P.build_model(folder)


# ----------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------


def test_generate_three_tokens_greedy():
    model = make_model()
    ids = random_ids(2, 7)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 10)
    assert torch.equal(out[:, :7], ids)
    # same as a hand-written greedy loop over full sequences
    seq = ids
    with torch.no_grad():
        for _ in range(3):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
