"""The shape of a transformers causal LM from its ``config.json`` alone, torch-free: what the memory predictor and the
FLOPs count need, and the parameter count by config arithmetic.

``hf_shape(cfg)`` takes the config as a dict (``config.json``'s values, or ``PretrainedConfig.to_dict()``) and returns
the dict ``presets.model_shape`` returns for Pangu (``hidden``, ``n_layers``, ``n_heads``, ``vocab``,
``intermediate``, ``max_positions``, ``n_params``) plus what a Pangu block does not have: ``n_kv_heads``
(grouped-query attention), ``head_dim``, ``gated_mlp`` (three matrices: gate, up, down), ``dropout`` (whether the
blocks keep dropout masks), ``norm`` (``rmsnorm`` / ``layernorm``), ``tied`` (the LM head shares the embedding),
``positions`` (``rotary`` / ``learned``), ``model_type`` and ``rule`` (how the parameter count was made).

The parameter count, with H hidden, I intermediate, V vocabulary, L layers, q = heads x head_dim,
kv = key/value heads x head_dim::

    llama, mistral, qwen2, qwen3 (rotary, RMSNorm, gated MLP):
        V*H (embedding) + [V*H if untied] + H (final norm)
        + L * (H*q + 2*H*kv + q*H (attention) + biases + 3*H*I (gate, up, down) + 2H (two RMSNorms)
               [+ 2*head_dim: qwen3's q/k norms])
        biases: qwen2 q, k, v (q + 2kv); llama ``attention_bias`` q, k, v, o; ``mlp_bias`` 2I + H
    gpt2 (learned positions, LayerNorm, biases everywhere, two-matrix MLP):
        V*H + P*H (positions) + 2H (ln_f) + L * (3H*H + 3H (c_attn) + H*H + H (c_proj) + 4H (two LayerNorms)
                                                  + H*I + I + I*H + H (MLP))

A ``model_type`` outside this table is counted by the same rotary/gated rule when its config has
``intermediate_size`` and a SiLU activation, else by the GPT-2 rule, and ``rule`` says so (``generic: ...``);
train.py counts the built model's own tensors instead. The tests check every preset and the tiny configs against
the count of the model transformers builds on the meta device.

Mixture-of-experts configs are refused (``MoEError``): one expert's FLOPs per token and every expert's memory need
a rule of their own.
"""
from __future__ import annotations

from typing import Any

GATED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_TYPES = ("gpt2",)
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
            "moe_intermediate_size")


class MoEError(ValueError):
    """A mixture-of-experts configuration (not measured correctly by this harness)."""


def moe_key(cfg: dict) -> str | None:
    """The first key that marks ``cfg`` as a mixture of experts (a positive expert count), else None."""
    for k in MOE_KEYS:
        v = cfg.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return k
    return None


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _need(cfg: dict, *names: str) -> int:
    v = _get(cfg, *names)
    if v is None:
        raise ValueError(f"config.json has none of {', '.join(names)} (model_type {cfg.get('model_type')!r})")
    return int(v)


def hf_shape(cfg: dict) -> dict:
    """The shape dict of a transformers causal LM config (see the module doc)."""
    mt = str(cfg.get("model_type") or "")
    key = moe_key(cfg)
    if key is not None:
        raise MoEError(f"model_type {mt!r} is a mixture of experts ({key} = {cfg[key]}): its FLOPs per token and "
                       "memory are not modelled here, so it is refused rather than mis-measured")
    hidden = _need(cfg, "hidden_size", "n_embd", "d_model")
    layers = _need(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _need(cfg, "num_attention_heads", "n_head", "num_heads")
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
    vocab = _need(cfg, "vocab_size")
    max_pos = int(_get(cfg, "max_position_embeddings", "n_positions", "n_ctx", default=2048))
    act = str(_get(cfg, "hidden_act", "activation_function", default="")).lower()
    if mt in GATED_TYPES:
        gated, rule = True, mt
    elif mt in GPT2_TYPES:
        gated, rule = False, mt
    else:
        gated = cfg.get("intermediate_size") is not None and act in ("silu", "swish", "swiglu")
        rule = f"generic: model_type {mt!r} counted by the {'llama' if gated else 'gpt2'} rule"
    inter = int(_get(cfg, "intermediate_size", "n_inner", default=4 * hidden))
    tied = bool(cfg.get("tie_word_embeddings", True))
    q, kv = heads * head_dim, kv_heads * head_dim
    if gated:
        bias_qkv = mt == "qwen2" or bool(cfg.get("attention_bias"))
        attn = hidden * q + 2 * hidden * kv + q * hidden + ((q + 2 * kv) if bias_qkv else 0)
        attn += hidden if cfg.get("attention_bias") else 0  # o_proj bias (llama's attention_bias)
        mlp = 3 * hidden * inter + ((2 * inter + hidden) if cfg.get("mlp_bias") else 0)
        block = attn + mlp + 2 * hidden + (2 * head_dim if mt == "qwen3" else 0)
        total = vocab * hidden + hidden + layers * block
        norm, positions, dropout = "rmsnorm", "rotary", float(cfg.get("attention_dropout") or 0) > 0
    else:
        block = 3 * hidden * hidden + 3 * hidden + hidden * hidden + hidden + 4 * hidden + 2 * hidden * inter + inter \
            + hidden
        total = vocab * hidden + max_pos * hidden + 2 * hidden + layers * block
        norm, positions = "layernorm", "learned"
        dropout = any(float(cfg.get(k, 0.1) or 0) > 0 for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop"))
    if not tied:
        total += vocab * hidden
    return {"hidden": hidden, "n_layers": layers, "n_heads": heads, "vocab": vocab, "intermediate": inter,
            "max_positions": max_pos, "n_params": int(total), "n_kv_heads": kv_heads, "head_dim": head_dim,
            "gated_mlp": gated, "dropout": dropout, "norm": norm, "tied": tied, "positions": positions,
            "model_type": mt, "rule": rule}
