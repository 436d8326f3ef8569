"""Pangu-α behind the model seam: today's behaviour exactly, by calling the modules that own it.

Presets and the parameter count: ``sftbench/presets.py``; the model, checkpoint folders and their errors:
``sftbench/pangu.py``; the tokenizer (jieba + SentencePiece, the checkpoint folder's ``vocab.model`` or the shipped
small one): ``sftbench/tokenizer.py``; the sample layout ``<s> prompt <sep> answer <eot>``: ``sftbench/data.py``;
FLOPs: ``sftbench.metrics.flops_per_token``; the save folder: ``sftbench.checkpoint.write_model_folder`` (loads with
``AutoModelForCausalLM`` after ``import sftbench``). Torch-free at import.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sftbench import presets
from sftbench.models.spec import ModelError, ModelSpec


@dataclass(frozen=True)
class PanguSpec(ModelSpec):
    family: str = field(default="pangu", init=False)
    # --graph-qkv and --graph-fuse replace Pangu's own attention and block modules (sftbench/graphs.py)
    capabilities: frozenset = field(default=frozenset({"pangu_qkv", "pangu_fuse"}), init=False)

    def shape(self) -> dict:
        return presets.model_shape(self.location or self.name)

    def tokenizer(self):
        from sftbench.tokenizer import PanguTokenizer

        try:
            return PanguTokenizer.for_model(self.location or self.name, self.tokenizer_arg)
        except ValueError as e:  # not a SentencePiece model, or one without Pangu's special pieces
            raise ModelError(str(e)) from e

    def build(self):
        from sftbench.pangu import CheckpointError, build_model

        try:
            return build_model(self.location or self.name)
        except CheckpointError as e:
            raise ModelError(str(e)) from e

    def count_params(self, model) -> int:
        from sftbench.pangu import count_params

        return count_params(model.config)  # from the architecture: a ZeRO-3 model's tensors are partitioned

    def shape_of(self, config, n_params: int) -> dict:
        return {"n_params": n_params, "hidden": config.hidden_size, "n_layers": config.num_layers,
                "n_heads": config.num_heads, "vocab": config.vocab_size, "intermediate": config.intermediate_size,
                "max_positions": config.max_position_embeddings}

    def flops_per_token(self, config, seq_len: int) -> float:
        from sftbench.metrics import flops_per_token

        return flops_per_token(config, seq_len)

    def blocks(self, model) -> list:
        return list(model.transformer.h)  # the last one is the query layer

    def loss_pad_id(self, config) -> int | None:
        return config.pad_token_id  # Pangu's loss ignores targets equal to the pad id (sftbench/pangu.py)

    def enable_grad_checkpointing(self, model) -> None:
        raise ModelError(f"--grad-checkpointing: {self.name} is a Pangu-α model, which has no activation "
                         "checkpointing (supports_gradient_checkpointing = False in sftbench/pangu.py)")

    def write_folder(self, folder, state_dict: dict, module, tok) -> None:
        from sftbench.checkpoint import write_model_folder

        write_model_folder(folder, state_dict, module.config, tok)
