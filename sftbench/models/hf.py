"""Any transformers causal LM behind the model seam: ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer``,
with SDPA attention.

* **Presets** (``sftbench/models/presets/*.json``: the published ``config.json`` values of Llama-3.2-1B,
  Llama-3.1-8B, Qwen2.5-0.5B/1.5B/7B, Mistral-7B-v0.3, and the tiny ``llama-tiny``, ``qwen2-tiny``, ``gpt2-tiny``)
  build random weights (``from_config``) and use the small shipped tokenizer (``presets/tokenizer/``, built by
  ``data/train_hf_tokenizer.py``: 512 ids, inside every preset's vocabulary, with a chat template); the config's
  ``bos``/``eos``/``pad`` ids are set to that tokenizer's. For benchmarking and planning offline, never for a model
  to keep: a run says so (``model_weights: "random"``) and ``--save`` warns.
* **A folder** (``config.json`` of a ``model_type`` transformers knows, the weights, the tokenizer files) and **a
  Hub name** load with ``from_pretrained`` (the Hub through transformers' own download and cache).

Sample layout (``sftbench.data.SampleLayout``): with a chat template, the template rendered around one user turn
(the prompt: the reference form's prompt, Alpaca's instruction and input, the chat form's turns before the last
answer, as ``sftbench.data`` reads them) and one assistant turn (the answer), so ``head`` is what comes before the
prompt, ``mid`` what lies between prompt and answer (the end of the user turn and the assistant header) and
``tail`` what follows the answer (the end of the turn); ``--mask-prompt`` leaves everything up to and including
``mid`` out of the loss. Without a chat template: the tokenizer's BOS where it adds one, the prompt, the answer,
its EOS. The layout goes into the log (``sample_layout``) and into the save folder (``sample_layout.json``).

Saving: ``save_pretrained`` of the model (the state dict the saver gathered: ZeRO-3 partitions included, 16-bit
when the run trained in 16 bits) and of the tokenizer, plus a generation config that stops at the end of an answer;
the folder loads with plain transformers, without sftbench.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sftbench.models.shape import hf_shape
from sftbench.models.spec import ModelError, ModelSpec

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_TOKENIZER = PRESET_DIR / "tokenizer"
LAYOUT_FILE = "sample_layout.json"
# Stand-ins for the prompt and the answer, rendered through the chat template and cut out again.
_PROMPT, _ANSWER = "\u2045PROMPT\u2046", "\u2045ANSWER\u2046"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_config(name: str) -> dict:
    """The preset's config.json values (keys starting with ``_`` are notes, left out)."""
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ tokenizer
def chat_layout(hf):
    """The ``SampleLayout`` of a transformers tokenizer (see the module doc)."""
    from sftbench.data import SampleLayout

    def ids(text: str) -> tuple[int, ...]:
        return tuple(hf(text, add_special_tokens=False)["input_ids"]) if text else ()

    if getattr(hf, "chat_template", None):
        text = hf.apply_chat_template([{"role": "user", "content": _PROMPT}, {"role": "assistant", "content": _ANSWER}],
                                      tokenize=False)
        if text.count(_PROMPT) != 1 or text.count(_ANSWER) != 1 or text.index(_PROMPT) > text.index(_ANSWER):
            raise ModelError(f"{hf.name_or_path}: the chat template does not render one user turn and then one "
                             "assistant turn with their contents as given; give a --tokenizer whose template does")
        head, rest = text.split(_PROMPT)
        mid, tail = rest.split(_ANSWER)
        return SampleLayout("chat_template", ids(head), ids(mid), ids(tail), (head, mid, tail))
    if hf.eos_token_id is None:
        raise ModelError(f"{hf.name_or_path}: the tokenizer has neither a chat template nor an EOS token, so an "
                         "answer could not end")
    bos = hf.bos_token_id
    adds_bos = bos is not None and hf("a")["input_ids"][:1] == [bos]
    return SampleLayout("plain", (bos,) if adds_bos else (), (), (hf.eos_token_id,),
                        (hf.bos_token if adds_bos else "", "", hf.eos_token))


class HFText:
    """A transformers tokenizer as ``sftbench.data`` encodes with it: ``encode`` (no special tokens added),
    ``layout``, ``pad_id``, ``vocab_size``, ``fingerprint`` (the data cache's key); ``hf`` is the tokenizer."""

    def __init__(self, hf):
        self.hf = hf
        self.layout = chat_layout(hf)
        pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        # Padding positions are -100 in the labels and out of the attention: any id in the vocabulary will do.
        self.pad_id = int(pad if pad is not None else self.layout.tail[-1])
        self.vocab_size = len(hf)
        backend = getattr(hf, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
        self.fingerprint = hashlib.sha256(json.dumps([vocab, self.layout.to_json(), self.pad_id]).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class HFSpec(ModelSpec):
    config: dict = field(default_factory=dict)  # config.json's values (torch-free)
    family: str = field(default="hf", init=False)
    capabilities: frozenset = field(default=frozenset({"grad_checkpointing"}), init=False)

    def shape(self) -> dict:
        return hf_shape(self.config)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def _source(self) -> str:
        return str(PRESET_TOKENIZER) if self.source == "preset" else str(self.location)

    def tokenizer(self) -> HFText:
        from transformers import AutoTokenizer

        where = self.tokenizer_arg or self._source()
        try:
            hf = AutoTokenizer.from_pretrained(where, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"{where}: no usable tokenizer ({e})") from e
        tok = HFText(hf)
        vocab = int(self.shape()["vocab"])
        if tok.vocab_size > vocab:
            raise ModelError(f"{where}: the tokenizer has {tok.vocab_size} ids, more than {self.name}'s {vocab} "
                             "embedding rows")
        return tok

    def hf_config(self):
        """The ``PretrainedConfig`` (a preset's: its JSON values, with the shipped tokenizer's special ids)."""
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        mt = self.config.get("model_type")
        if mt not in CONFIG_MAPPING and not self.trust_remote_code:
            import transformers
            raise ModelError(f"{self.name}: model_type {mt!r} is not one transformers {transformers.__version__} "
                             "knows; a model that needs its own code runs only with --trust-remote-code")
        if self.source == "preset":
            tok = json.loads((PRESET_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
            special = {t["content"]: t["id"] for t in tok["added_tokens"]}
            cfg = AutoConfig.for_model(**{**self.config, "bos_token_id": special["<s>"],
                                          "eos_token_id": special["</s>"], "pad_token_id": special["<pad>"]})
        else:
            cfg = AutoConfig.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)
        cfg._attn_implementation = "sdpa"  # torch's scaled_dot_product_attention (flash kernels on GPU)
        return cfg

    def build(self):
        import torch
        from transformers import AutoModelForCausalLM

        cfg = self.hf_config()
        kw = {"attn_implementation": "sdpa", "trust_remote_code": self.trust_remote_code}
        try:
            if self.source == "preset":
                return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **kw)
            return AutoModelForCausalLM.from_pretrained(self.location, config=cfg, dtype=torch.float32, **kw)
        except (OSError, ValueError) as e:
            raise ModelError(f"{self.location or self.name}: cannot load the model ({e})") from e

    def count_params(self, model) -> int:
        """Distinct trainable parameters of the built model (a tied weight once); a ZeRO-3 partition counts its
        whole tensor (DeepSpeed's ``ds_numel``). The torch-free ``shape()`` gives the same number from config.json
        (tests/test_models.py checks it against the model built on the meta device)."""
        seen = {id(p): int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()}
        return sum(seen.values())

    def shape_of(self, config, n_params: int) -> dict:
        return {**hf_shape(config.to_dict()), "n_params": int(n_params)}

    def flops_per_token(self, config, seq_len: int) -> float:
        from sftbench.metrics import linear_flops_per_token

        return linear_flops_per_token(hf_shape(config.to_dict()), seq_len)

    def blocks(self, model) -> list:
        from torch import nn

        core = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        for attr in ("layers", "h", "blocks"):
            if isinstance(getattr(core, attr, None), nn.ModuleList):
                return list(getattr(core, attr))
        raise ModelError(f"{type(model).__name__}: no list of decoder layers found (.layers, .h or .blocks)")

    def loss_pad_id(self, config) -> int | None:
        return None  # transformers' causal-LM loss ignores -100 only

    def enable_grad_checkpointing(self, model) -> None:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
        # Reentrant checkpointing needs inputs that require grad and breaks with ZeRO-3's hooks: the non-reentrant form
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def write_folder(self, folder, state_dict: dict, module, tok) -> None:
        """``save_pretrained`` of the model (with ``state_dict``, the gathered weights) and of the tokenizer, the
        sample layout, and a generation config that ends an answer where the layout's tail starts."""
        from transformers import GenerationConfig

        folder = Path(folder)
        # The saver's dict holds every buffer; a submodule's non-persistent ones (rotary tables) are not the model's
        keep = set(module.state_dict())
        state_dict = {k: v for k, v in state_dict.items() if k in keep}
        dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        cfg = module.config
        if len(dtypes) == 1:
            cfg.dtype = next(iter(dtypes))  # what the weights are stored in; from_pretrained keeps it by default
        module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tok.hf.save_pretrained(folder)
        stops = [i for i in dict.fromkeys([*tok.layout.tail[:1], tok.hf.eos_token_id]) if i is not None]
        GenerationConfig(bos_token_id=tok.hf.bos_token_id, eos_token_id=stops, pad_token_id=tok.pad_id,
                         max_new_tokens=128).save_pretrained(folder)
        (folder / LAYOUT_FILE).write_text(json.dumps(tok.layout.to_json(), indent=1) + "\n", encoding="utf-8")
