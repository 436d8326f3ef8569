"""The model seam: what every part of the harness asks of a model, in one interface (``ModelSpec``), with two
implementations: ``sftbench.models.pangu.PanguSpec`` (Pangu-α: presets, checkpoint folders, the jieba +
SentencePiece tokenizer, ``<s> prompt <sep> answer <eot>``) and ``sftbench.models.hf.HFSpec`` (any transformers causal
LM: ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer``, SDPA attention, the tokenizer's chat template).
``sftbench.models.resolve.resolve`` decides which one a ``--model`` names.

Torch-free at import, and so is every method marked so below (the plan, the sweep and the memory predictor use
them); the others import torch and transformers inside.

========================  =========================================================================================
``name``                  the model as given (a preset, a folder, a Hub name): runs and rows are named by it
``family``                ``pangu`` or ``hf``
``source``                ``preset`` (random weights), ``folder`` or ``hub``
``random_weights``        True for presets: a run says so on the console and in the log (``model_weights``)
``capabilities``          levers that only this model's modules allow: ``pangu_qkv`` (``--graph-qkv``),
                          ``pangu_fuse`` (``--graph-fuse``); ``grad_checkpointing`` where the model has it
``shape()``               torch-free: the dict ``memory.ModelShape.of`` reads, from config.json / the preset alone
``model_type``            torch-free: config.json's ``model_type`` (None for Pangu-α's own code)
``max_positions``         torch-free: the longest sequence the model's positions allow
``check_seq_len(n)``      torch-free: ``ModelError`` naming both numbers when ``n`` is over ``max_positions``
``tokenizer()``           what ``sftbench.data`` encodes with: ``encode``, ``pad_id``, ``fingerprint``, ``layout``
``build()``               the model (random weights for a preset, else the folder's / Hub's); ZeRO-3 partitions it
``count_params(model)``   distinct trainable parameters of the built model (ZeRO-3 partitions counted whole)
``shape_of(config, n)``   ``shape()`` of a built model's config, with ``n`` parameters
``flops_per_token``       training FLOPs per token of a built model's config (``sftbench.metrics``)
``blocks(model)``         the repeated decoder layers (``torch.compile`` per block, the graphs' per-block levers)
``loss_pad_id(config)``   a target id the model's loss ignores besides -100 (Pangu's pad id), for the eval loss
``enable_grad_checkpointing(model)``  activation checkpointing (``--grad-checkpointing``), or ``ModelError``
``write_folder(...)``     a save folder's model and tokenizer files (``sftbench.checkpoint.Saver``)
``describe()``            torch-free: what the log's meta record keeps about the model
========================  =========================================================================================
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class ModelError(ValueError):
    """A ``--model`` (or ``--tokenizer``) that cannot be used: names the model, the file or key, and why."""


@dataclass(frozen=True)
class ModelSpec(ABC):
    """The interface (see the module doc); the implementations fill in the methods."""

    name: str
    source: str  # preset | folder | hub
    location: str | None = None  # the folder, or the Hub id; None for a preset
    tokenizer_arg: str | None = None
    trust_remote_code: bool = False
    family: str = field(default="", init=False)
    capabilities: frozenset = field(default=frozenset(), init=False)

    @property
    def random_weights(self) -> bool:
        return self.source == "preset"

    @property
    def model_type(self) -> str | None:
        """torch-free: config.json's ``model_type`` (None where the model has no transformers config)."""
        return None

    @property
    def max_positions(self) -> int:
        return int(self.shape()["max_positions"])

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len > self.max_positions:
            raise ModelError(f"--seq-len {seq_len} is longer than {self.name}'s {self.max_positions} positions "
                             "(max_position_embeddings)")

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "source": self.source, "location": self.location,
                "weights": "random" if self.random_weights else "pretrained",
                "capabilities": sorted(self.capabilities)}

    # the rest is the implementations' own
    @abstractmethod
    def shape(self) -> dict:
        """See the module doc."""

    @abstractmethod
    def tokenizer(self):
        """See the module doc."""

    @abstractmethod
    def build(self):
        """See the module doc."""

    @abstractmethod
    def count_params(self, model) -> int:
        """See the module doc."""

    @abstractmethod
    def shape_of(self, config, n_params: int) -> dict:
        """See the module doc."""

    @abstractmethod
    def flops_per_token(self, config, seq_len: int) -> float:
        """See the module doc."""

    @abstractmethod
    def blocks(self, model) -> list:
        """See the module doc."""

    @abstractmethod
    def loss_pad_id(self, config) -> int | None:
        """See the module doc."""

    @abstractmethod
    def enable_grad_checkpointing(self, model) -> None:
        """See the module doc."""

    @abstractmethod
    def write_folder(self, folder, state_dict: dict, module, tok) -> None:
        """See the module doc."""
