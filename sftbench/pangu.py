"""Pangu-α causal language model, written for this project (no remote code).

The module reproduces the architecture, parameter names and loss of the public Hugging Face port of Pangu-α
(``model_type = "gpt_pangu"``, ``GPTPanguForCausalLM``), so checkpoint folders written by that port
(``config.json`` + ``pytorch_model.bin`` / ``model.safetensors``) load unchanged, and it adds what a fast
fine-tuning harness needs: scaled-dot-product attention, an fp32 loss without host syncs, and clear errors for
bad checkpoint folders. Importing the module registers the model with ``AutoConfig`` and
``AutoModelForCausalLM`` for the model types ``gpt_pangu`` and ``pangu``.

Architecture (``L = config.num_layers`` counts *all* blocks, the query layer included)::

    x = wte(input_ids) + wpe(position_ids) [+ wte(token_type_ids)]      -> dropout(embd_pdrop)
    for block in h[0 : L-1]:                      # ordinary pre-LayerNorm GPT-2 blocks
        x = x + attn(ln_1(x))                     # causal self-attention, q/k/v from ln_1(x)
        x = x + mlp(ln_2(x))                      # c_fc (H -> 4H), exact erf GELU, c_proj (4H -> H)
    x = ln_f(x)                                   # the "final" LayerNorm sits *before* the query layer
    x = x + attn_top(ln_1(x), query = wqe(position_ids))   # query layer h[L-1]: q = q_proj(wqe(pos)), raw
    x = x + mlp(ln_2(x))                          #   embedding (no LayerNorm), k/v from ln_1(x)
    logits = x @ wte.weight.T                     # lm_head, no bias, tied to wte; no LayerNorm after h[L-1]

Parameter names (identical to the port's checkpoints): ``transformer.wte.weight [V, H]``,
``transformer.wpe.weight [P, H]``, ``transformer.wqe.weight [P, H]``,
``transformer.h.N.ln_1.{weight,bias} [H]``, ``transformer.h.N.attn.{q,k,v,c}_proj.{weight [H, H], bias [H]}``,
``transformer.h.N.ln_2.{weight,bias} [H]``, ``transformer.h.N.mlp.c_fc.{weight [I, H], bias [I]}``,
``transformer.h.N.mlp.c_proj.{weight [H, I], bias [H]}``, ``transformer.ln_f.{weight,bias} [H]``,
``lm_head.weight [V, H]`` (tied to ``transformer.wte.weight``; the port's ``.bin`` files store both keys).
The port's files also carry the buffers ``transformer.h.N.attn.bias`` (a 1024x1024 causal table) and
``transformer.h.N.attn.masked_bias`` (-1e4); they are ignored on load. This model keeps no such buffers.

Attention and masks:

* ``attention_mask=None`` means "no padding": pure causal attention through
  ``scaled_dot_product_attention(is_causal=True)`` (flash / memory-efficient kernels on GPU).
* With an ``attention_mask`` of shape ``[batch, seq]`` (bool, integer or float 0/1; nonzero = real token) a
  boolean mask "causal AND key is real" is built once per forward and shared by all layers. Every query may
  also attend to itself, so rows of padded queries are never empty and nothing becomes NaN.
* Real tokens give the same result as the original port (which added ``-1e4`` for masked keys, a weight that
  underflows to exactly zero after softmax). Outputs at *padded* positions may differ from the original: they
  are meaningless in both implementations and must not be used.
* For right-padded batches (real tokens first, padding after) a real token never sees a pad key under the
  causal rule alone, so its logits are identical with ``attention_mask=None``. The training loop may rely on
  this and skip the mask for speed, provided padded targets are excluded from the loss.
* ``position_ids`` default to ``0 .. seq-1`` for every row (as in the original ``forward``);
  ``prepare_inputs_for_generation`` derives them from the attention mask (cumsum - 1) like the original. Given as
  ``[batch, seq]`` they index both the position embeddings and the query layer's query embeddings per row.
* Packed rows (``--pack``, ``sftbench/pack.py``): a boolean ``[batch, 1, seq, seq]`` ``attention_mask`` (True =
  may attend; block-diagonal causal) is used as the SDPA mask as it is, with per-sample ``position_ids``.

Loss: the original's shifted cross-entropy (logits[:, :-1] predict labels[:, 1:]) that ignores every target
equal to ``config.pad_token_id`` (6 for Pangu-α); targets equal to -100 are ignored as well. It is computed in
fp32 (logits are upcast) and averaged over the counted targets without host synchronisation; when no target
is counted the loss is 0 instead of NaN.

Other port facts worth knowing: the config field names are ``num_layers`` / ``num_heads`` / ``hidden_size`` /
``max_position_embeddings`` / ``intermediate_size`` (``None`` means 4 * hidden) / ``activation_function``
(``"gelu"``, exact erf) / ``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop`` (0.1 by default: dropout is active in
``train()`` mode) / ``layer_norm_epsilon`` (1e-5) / ``scale_attn_weights`` / ``initializer_range`` (0.02).
``token_type_ids``, when given, are embedded with ``wte`` and added to the input, as in the original. There is
no KV cache: generation recomputes the full sequence every step (good enough for sanity checks).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from sftbench import presets

__all__ = [
    "CheckpointError",
    "PanguConfig",
    "PanguModel",
    "PanguForCausalLM",
    "PanguAliasConfig",
    "PanguAliasForCausalLM",
    "PRESETS",
    "preset_config",
    "build_model",
    "count_params",
    "pangu_lm_loss",
    "register",
]

MODEL_TYPES = presets.MODEL_TYPES
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A model name or checkpoint folder that cannot be turned into a Pangu-α model."""


# --------------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------------


class PanguConfig(PretrainedConfig):
    """Configuration of Pangu-α, field for field the one of the public ``gpt_pangu`` port.

    ``num_layers`` counts every transformer block including the top query layer (the 2.6B model has 31
    ordinary blocks plus the query layer, ``num_layers = 32``).
    """

    model_type = "gpt_pangu"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    vocab_size: int = 40000
    max_position_embeddings: int = 1024
    hidden_size: int = 2560
    intermediate_size: int | None = None
    num_layers: int = 32
    num_heads: int = 32
    activation_function: str = "gelu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    use_cache: bool = True
    bos_token_id: int | None = 9
    eos_token_id: int | list[int] | None = 9
    pad_token_id: int | None = 6
    tie_word_embeddings: bool = True

    @property
    def inner_size(self) -> int:
        """Width of the MLP (``intermediate_size`` or 4 * hidden_size)."""
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size


class PanguAliasConfig(PanguConfig):
    """The same configuration under ``model_type = "pangu"`` (folders that name the model that way)."""

    model_type = "pangu"


# --------------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------------


class PanguAttention(nn.Module):
    """Multi-head attention with separate q/k/v/c projections (checkpoint names), computed by SDPA."""

    def __init__(self, config: PanguConfig):
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_heads != 0:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {config.num_heads}")
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.scale = None if config.scale_attn_weights else 1.0  # None: SDPA's 1/sqrt(head_dim)
        self.attn_pdrop = float(config.attn_pdrop)
        self.k_proj = nn.Linear(hidden, hidden, bias=True)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.c_proj = nn.Linear(hidden, hidden, bias=True)
        self.c_proj.pangu_residual_proj = True  # scaled init, see PanguPreTrainedModel._init_weights
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # Set only while sftbench.graphs captures: x -> (k, v[, q]) from one GEMM over the projections' weights where
        # they lie side by side in memory (the same products, one launch instead of two or three).
        self.fused_proj = None
        self.takes_query = False  # the query layer's q comes from the query embeddings (PanguModel sets it)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seq, width = hidden_states.shape
        if self.fused_proj is not None:
            k, v, *fused_q = self.fused_proj(hidden_states)
        else:
            k, v, fused_q = self.k_proj(hidden_states), self.v_proj(hidden_states), ()
        q = fused_q[0] if fused_q else self.q_proj(hidden_states if query_states is None else query_states)
        if q.shape[0] != bsz:  # query embeddings shared by the batch ([1, seq, H])
            q = q.expand(bsz, seq, width)
        shape = (bsz, seq, self.num_heads, self.head_dim)
        q = q.reshape(shape).transpose(1, 2)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=attn_mask is None,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(bsz, seq, width)
        return self.resid_dropout(self.c_proj(out))


class PanguMLP(nn.Module):
    def __init__(self, config: PanguConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.hidden_size)
        self.c_proj.pangu_residual_proj = True
        act = config.activation_function
        self._act_name = act
        self.act = None if act in ("gelu", "gelu_new", "gelu_pytorch_tanh") else ACT2FN[act]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        if self.act is None:
            x = F.gelu(x, approximate="none" if self._act_name == "gelu" else "tanh")
        else:
            x = self.act(x)
        return self.dropout(self.c_proj(x))


class PanguBlock(nn.Module):
    def __init__(self, config: PanguConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = PanguAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = PanguMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attn_mask, query_states)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


def build_attention_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean SDPA mask ``[batch, 1, seq, seq]``: True where query i may attend key j.

    Allowed = (j <= i and key j is real) or j == i. The diagonal keeps padded query rows non-empty (no NaN);
    for real queries it changes nothing because a real query's own key is real. Pure tensor ops, no sync.

    A boolean ``[batch, 1, seq, seq]`` mask is already that (packed rows' block-diagonal causal mask,
    ``sftbench.pack.block_causal_mask``) and is returned as it is.
    """
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape[1:]) != (1, seq_len, seq_len):
            raise ValueError(f"a 4D attention_mask must be boolean [batch, 1, {seq_len}, {seq_len}], got "
                             f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        return attention_mask
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != seq_len:
        raise ValueError(
            f"attention_mask must have shape [batch, {seq_len}], got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    idx = torch.arange(seq_len, device=attention_mask.device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [q, k]: k <= q
    diag = idx.unsqueeze(0) == idx.unsqueeze(1)
    allowed = (causal.unsqueeze(0) & keep.unsqueeze(1)) | diag.unsqueeze(0)
    return allowed.unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------
# pretrained-model classes
# --------------------------------------------------------------------------------------------------------------


class PanguPreTrainedModel(PreTrainedModel):
    config: PanguConfig
    config_class = PanguConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["PanguBlock"]
    # Buffers stored by the original port's files (causal table and -1e4 constant); not used here.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Original scheme: Linear/Embedding ~ N(0, initializer_range), biases 0, LayerNorm 1/0, and the
        residual output projections (``attn.c_proj`` and ``mlp.c_proj`` weights) ~ N(0, range / sqrt(2 L)).

        Decided per leaf module (the c_proj Linears carry a marker), because transformers initialises custom
        models leaf by leaf and skips container modules that own no parameters (also under ZeRO-3)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "pangu_residual_proj", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)


class PanguModel(PanguPreTrainedModel):
    """Embeddings, ``num_layers - 1`` ordinary blocks, ``ln_f``, and the query layer (last block)."""

    def __init__(self, config: PanguConfig):
        super().__init__(config)
        if config.num_layers < 1:
            raise ValueError("num_layers must be >= 1 (the last block is the query layer)")
        hidden = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.wpe = nn.Embedding(config.max_position_embeddings, hidden)
        self.wqe = nn.Embedding(config.max_position_embeddings, hidden)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([PanguBlock(config) for _ in range(config.num_layers)])
        self.h[-1].attn.takes_query = True
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        seq_len = inputs_embeds.shape[1]
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)

        hidden = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden = hidden + self.wte(token_type_ids)
        hidden = self.drop(hidden)

        mask = None if attention_mask is None else build_attention_mask(attention_mask, seq_len)
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            if i == last:
                hidden = self.ln_f(hidden)
                hidden = block(hidden, mask, self.wqe(position_ids))
            else:
                hidden = block(hidden, mask)
        return BaseModelOutput(last_hidden_state=hidden)


def pangu_lm_loss(logits: torch.Tensor, labels: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Shifted causal-LM cross-entropy in fp32: targets equal to ``pad_token_id`` or -100 are ignored.

    Equals the original port's ``CrossEntropyLoss(ignore_index=pad_token_id)`` on labels without -100.
    Mean over counted targets; 0 (not NaN) when none is counted. No host synchronisation.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(shift_logits.device)
    if pad_token_id is not None:
        targets = targets.masked_fill(targets == pad_token_id, -100)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    count = (targets != -100).sum()
    return total / count.clamp(min=1).to(total.dtype)


class PanguForCausalLM(PanguPreTrainedModel, GenerationMixin):
    """Pangu-α with the tied language-model head (``lm_head.weight`` is ``transformer.wte.weight``)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    # forward() takes **kwargs but returns the plain mean loss: tell the Trainer it must still divide by the
    # accumulation steps (otherwise it assumes the model normalises and gradients come out GA times too large).
    accepts_loss_kwargs = False

    def __init__(self, config: PanguConfig):
        super().__init__(config)
        self.transformer = PanguModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # No KV cache: generate() must not build one; every step recomputes the full sequence.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed the whole sequence each step (no cache). Positions come from the attention mask, as in the
        original port, so left-padded prompts get positions starting at 0 at their first real token."""
        if position_ids is not None and position_ids.shape[-1] != input_ids.shape[-1]:
            position_ids = None  # given for the prompt only: derive them again for the grown sequence
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids}
        if token_type_ids is not None and token_type_ids.shape[-1] == input_ids.shape[-1]:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """``attention_mask=None`` means no padding (pure causal). Extra keyword arguments that Trainer-style
        loops pass (``num_items_in_batch``, ``use_cache``, ``past_key_values``, ``output_attentions``, ...)
        are accepted and ignored; the loss is always the mean over counted targets."""
        hidden = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None if labels is None else pangu_lm_loss(logits, labels, self.config.pad_token_id)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class PanguAliasForCausalLM(PanguForCausalLM):
    """``PanguForCausalLM`` bound to the ``model_type = "pangu"`` configuration (for the auto classes)."""

    config: PanguAliasConfig
    config_class = PanguAliasConfig


def register() -> None:
    """Register both model types with the auto classes. Safe to call any number of times."""
    for config_cls, model_cls in ((PanguConfig, PanguForCausalLM), (PanguAliasConfig, PanguAliasForCausalLM)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register()


# --------------------------------------------------------------------------------------------------------------
# presets, parameter count, model construction
# --------------------------------------------------------------------------------------------------------------

PRESETS = presets.PRESETS  # the table itself lives in the torch-free sftbench/presets.py


def preset_config(name: str, **overrides: Any) -> PanguConfig:
    """The ``PanguConfig`` of a preset (keyword overrides are applied on top)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Pangu-α preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PanguConfig(**{**PRESETS[name], **overrides})


def count_params(config: PanguConfig) -> int:
    """Number of distinct trainable parameters, from the architecture alone (``presets.param_count``)."""
    return presets.param_count(config.hidden_size, config.num_layers, config.vocab_size,
                               config.max_position_embeddings, config.intermediate_size,
                               bool(getattr(config, "tie_word_embeddings", True)))


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def _checkpoint_shapes(folder: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(weights file or index name, {key: shape}) of a checkpoint folder, reading headers only."""
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not present:
        raise CheckpointError(
            f"checkpoint folder {folder!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}"
        )
    name = present[0]
    path = os.path.join(folder, name)
    if name.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: unreadable shard index ({err})") from err
        files = sorted(set(weight_map.values()))
    else:
        files = [name]
    shapes: dict[str, tuple[int, ...]] = {}
    for fname in files:
        fpath = os.path.join(folder, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{path} names the shard {fname!r}, which is missing from {folder!r}")
        try:
            if fname.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(fpath, framework="pt") as fh:
                    for key in fh.keys():
                        shapes[key] = tuple(fh.get_slice(key).get_shape())
            else:
                state = torch.load(fpath, map_location="meta", weights_only=True, mmap=True)
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        shapes[key] = tuple(value.shape)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear message
            raise CheckpointError(f"cannot read weights file {fpath!r}: {err}") from err
    return name, shapes


def _load_folder(folder: str, dtype: torch.dtype | None) -> PanguForCausalLM:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"checkpoint folder {folder!r} has no config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_path}: model_type {model_type!r} is not a Pangu-α model (expected one of {', '.join(MODEL_TYPES)})"
        )
    config_cls = PanguConfig if model_type == "gpt_pangu" else PanguAliasConfig
    model_cls = PanguForCausalLM if model_type == "gpt_pangu" else PanguAliasForCausalLM
    try:
        config = config_cls.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{cfg_path}: invalid Pangu-α configuration ({err})") from err

    weights_name, found = _checkpoint_shapes(folder)
    with torch.device("meta"):
        reference = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    tied = set(reference.all_tied_weights_keys) if config.tie_word_embeddings else set()
    del reference
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise CheckpointError(
                f"{os.path.join(folder, weights_name)}: tensor {key!r} has shape {list(found[key])}, "
                f"but config.json implies {list(shape)}"
            )
    missing = sorted(k for k in expected if k not in found and k not in tied)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{os.path.join(folder, weights_name)} lacks weights for {', '.join(missing[:5])}{more}"
        )

    kwargs: dict[str, Any] = {"config": config, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = model_cls.from_pretrained(folder, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"failed to load checkpoint folder {folder!r}: {err}") from err
    left = sorted(info.get("missing_keys") or [])
    if left:
        raise CheckpointError(f"checkpoint folder {folder!r}: weights missing after load: {', '.join(left[:5])}")
    return model


def build_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PanguForCausalLM:
    """A preset name -> a randomly initialised model (original init); a folder -> ``from_pretrained``.

    ``dtype`` None means float32 for presets and the checkpoint's stored dtype for folders. ``device`` None
    leaves the model on the CPU. Under an active ZeRO-3 ``HfDeepSpeedConfig`` the construction is partitioned
    by transformers (``deepspeed.zero.Init``) and ``device`` is ignored. Errors raise ``CheckpointError``
    naming the folder, file or key at fault.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = os.fspath(name_or_path)
    zero3 = _zero3_enabled()
    if name in PRESETS:
        config = preset_config(name)
        if device is not None and not zero3:
            with torch.device(device):
                return PanguForCausalLM._from_config(config, dtype=dtype)
        return PanguForCausalLM._from_config(config, dtype=dtype)
    if not os.path.isdir(name):
        if os.path.exists(name):
            raise CheckpointError(f"{name!r} is a file, not a checkpoint folder")
        raise CheckpointError(
            f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint folder"
        )
    model = _load_folder(name, dtype)
    if device is not None and not zero3:
        model = model.to(device)
    return model
