"""The Pangu tokenizer as a transformers tokenizer, so a saved model folder loads with ``AutoTokenizer``.

``PanguHFTokenizer`` wraps ``sftbench.tokenizer.PanguTokenizer`` (jieba + SentencePiece; every piece and id is the
wrapped tokenizer's, so ``tok(text)`` gives the ids training used) behind transformers' ``PreTrainedTokenizer``
API. Importing this module (``import sftbench`` does) registers it with ``AutoTokenizer`` for the ``gpt_pangu`` and
``pangu`` model types, and a
folder written by ``save_pretrained`` names it in ``tokenizer_config.json``.

The prompt layout of the training data, ``<s> prompt <sep> answer <eot>`` (``sftbench/data.py``), is built in:

* ``tok(prompt)`` gives ``<s> prompt <sep>``: exactly what the model saw before an answer, so
  ``model.generate(**tok(prompt, return_tensors="pt"))`` continues with an answer and stops at ``<eot>`` (the
  ``eos_token``, and the ``eos_token_id`` of the generation config ``sftbench.checkpoint`` writes);
* ``tok(prompt, answer)`` gives the whole training sequence ``<s> prompt <sep> answer <eot>``;
* the chat template renders ``messages`` with the rule of ``sftbench.data.messages_to_pair``: the turns before the
  last assistant message, joined by newlines, are the prompt; that last assistant message is the answer.
  ``apply_chat_template(messages, add_generation_prompt=True)`` on messages ending with a user turn gives
  ``<s> prompt <sep>``.

This module imports transformers (not torch directly).
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizer

from sftbench.tokenizer import VOCAB_FILENAME, PanguTokenizer

# The rule of sftbench.data.messages_to_pair as a Jinja template (a test renders both and compares).
CHAT_TEMPLATE = (
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}"
    "{%- set turns = messages[:-1] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "<s>{%- for m in turns -%}{{ m['content'] }}{%- if not loop.last -%}{{ '\n' }}{%- endif -%}{%- endfor -%}<sep>"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ messages[-1]['content'] }}<eot>{%- endif -%}"
)


class PanguHFTokenizer(PreTrainedTokenizer):
    """transformers' view of ``PanguTokenizer`` (see the module doc for the prompt layout)."""

    vocab_files_names = {"vocab_file": VOCAB_FILENAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.pangu = PanguTokenizer(vocab_file)  # before super().__init__, which asks for the vocabulary
        p = self.pangu
        kwargs.setdefault("bos_token", p.id_to_piece(p.bos_id))
        kwargs.setdefault("eos_token", p.id_to_piece(p.eot_id))  # an answer ends with <eot>: generation stops there
        kwargs.setdefault("sep_token", p.id_to_piece(p.sep_id))
        kwargs.setdefault("pad_token", p.id_to_piece(p.pad_id))
        kwargs.setdefault("unk_token", p.id_to_piece(p.unk_id))
        named = {kwargs[k] for k in ("bos_token", "eos_token", "sep_token", "pad_token", "unk_token")}
        # Every special piece of the model is one token in text, as in PanguTokenizer.encode.
        kwargs.setdefault("extra_special_tokens", [s for s in p.special_ids if s not in named])
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)
        self.vocab_file = vocab_file

    @property
    def vocab_size(self) -> int:
        return self.pangu.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.pangu.id_to_piece(i): i for i in range(self.pangu.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.pangu.tokens(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.pangu.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.pangu.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.pangu.decode([self.pangu.piece_to_id(t) for t in tokens], skip_special=False)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        # The wrapped decoder undoes jieba's joining spaces and the ▂/▃ whitespace pieces; a piece-by-piece join
        # (the base class) would not.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # Ids past the vocabulary (a 40,000-row embedding with a smaller tokenizer, e.g. the shipped one) decode to
        # nothing, where SentencePiece would raise: a model may generate them (the saved generation config does
        # not list them all as suppress_tokens, which made it hundreds of KB).
        token_ids = [int(i) for i in token_ids if int(i) < self.pangu.vocab_size]
        return self.pangu.decode(token_ids, skip_special=skip_special_tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        p = self.pangu
        if token_ids_1 is None:
            return [p.bos_id, *token_ids_0, p.sep_id]  # the generation prompt: what precedes an answer
        return [p.bos_id, *token_ids_0, p.sep_id, *token_ids_1, p.eot_id]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        if token_ids_1 is None:
            return [1] + [0] * len(token_ids_0) + [1]
        return [1] + [0] * len(token_ids_0) + [1] + [0] * len(token_ids_1) + [1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILENAME
        out = Path(save_directory) / name
        if not (out.exists() and os.path.samefile(out, self.pangu.vocab_file)):
            self.pangu.save_model(out)
        return (str(out),)


def register() -> None:
    """Register ``PanguHFTokenizer`` with ``AutoTokenizer`` for both Pangu model types (done on import)."""
    from transformers import AutoTokenizer

    from sftbench.pangu import PanguAliasConfig, PanguConfig

    for config_cls in (PanguConfig, PanguAliasConfig):
        AutoTokenizer.register(config_cls, tokenizer_class=PanguHFTokenizer, exist_ok=True)


register()
