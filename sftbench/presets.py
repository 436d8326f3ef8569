"""Pangu-α model presets and shapes, torch-free: the one home of the preset table and the parameter count.

``sftbench/pangu.py`` builds its configs from ``PRESETS``; the sweep, the memory predictor and the plan read shapes
through ``model_shape`` without importing torch or transformers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftbench.paths import REPO


MODEL_TYPES = ("gpt_pangu", "pangu")  # the config.json model types of Pangu-α folders

PRESETS: dict[str, dict[str, Any]] = {
    # num_layers counts the query layer: 350M = 23 + 1, 2.6B = 31 + 1, 13B = 39 + 1 blocks.
    "pangu-350m": dict(vocab_size=40000, hidden_size=1024, num_layers=24, num_heads=16, max_position_embeddings=1024),
    "pangu-2.6b": dict(vocab_size=40000, hidden_size=2560, num_layers=32, num_heads=32, max_position_embeddings=1024),
    "pangu-13b": dict(vocab_size=40000, hidden_size=5120, num_layers=40, num_heads=40, max_position_embeddings=1024),
    # For tests and CPU demos: one ordinary block plus the query layer.
    "pangu-tiny": dict(vocab_size=40000, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=1024),
}


def param_count(hidden: int, n_layers: int, vocab: int, max_positions: int = 1024, intermediate: int | None = None,
                tied: bool = True) -> int:
    """Number of distinct trainable parameters, from the architecture alone.

    With H = hidden, I = intermediate (4H when unset), V = vocab, P = max_positions, L = n_layers (query layer
    included)::

        block   = 2H (ln_1) + 4(H*H + H) (q, k, v, c_proj) + 2H (ln_2) + (H*I + I) (c_fc) + (I*H + H) (c_proj)
                = 4H^2 + 2HI + 9H + I                        (= 12H^2 + 13H when I = 4H)
        total   = V*H (wte) + 2*P*H (wpe, wqe) + L*block + 2H (ln_f) + (0 if tied else V*H) (lm_head)
    """
    i = intermediate if intermediate is not None else 4 * hidden
    block = 4 * hidden * hidden + 2 * hidden * i + 9 * hidden + i
    total = vocab * hidden + 2 * max_positions * hidden + n_layers * block + 2 * hidden
    return int(total + (0 if tied else vocab * hidden))


def model_shape(model: str) -> dict:
    """hidden, n_layers, n_heads, vocab, intermediate, max_positions, n_params of a preset or checkpoint folder
    (a relative folder is taken from the repository root, where the tools run)."""
    p = Path(model) if os.path.isabs(model) else REPO / model
    if p.is_dir() and (p / "config.json").is_file():
        c = json.loads((p / "config.json").read_text(encoding="utf-8"))
        d = {"hidden_size": c.get("hidden_size", c.get("n_embd")), "num_layers": c.get("num_layers", c.get("n_layer")),
             "num_heads": c.get("num_heads", c.get("n_head")), "vocab_size": c.get("vocab_size"),
             # the position table's length under its transformers spellings (GPT-2 style configs: n_positions)
             "max_position_embeddings": c.get("max_position_embeddings", c.get("n_positions", 1024)),
             "intermediate_size": c.get("intermediate_size"),
             "tie_word_embeddings": c.get("tie_word_embeddings", True)}
    else:
        if model not in PRESETS:
            raise ValueError(f"unknown model {model!r} (presets: {', '.join(PRESETS)})")
        d = dict(PRESETS[model])
    shape = {"hidden": int(d["hidden_size"]), "n_layers": int(d["num_layers"]), "n_heads": int(d["num_heads"]),
             "vocab": int(d["vocab_size"]), "intermediate": d.get("intermediate_size"),
             "max_positions": int(d.get("max_position_embeddings") or 1024)}
    shape["n_params"] = param_count(shape["hidden"], shape["n_layers"], shape["vocab"], shape["max_positions"],
                                    shape["intermediate"], bool(d.get("tie_word_embeddings", True)))
    return shape
