"""sftbench.hf_tokenizer: the transformers tokenizer gives the training ids, and its chat template the layout
sftbench.data builds from chat lines."""
from __future__ import annotations

import pytest

from sftbench import data as D
from sftbench.hf_tokenizer import PanguHFTokenizer
from sftbench.tokenizer import SHIPPED_MODEL, PanguTokenizer

TEXTS = ["床前明月光，疑是地上霜。", "What is the capital of France?\nParis.", "a <sep> b  c", "上联：春风得意"]


@pytest.fixture(scope="module")
def toks():
    return PanguHFTokenizer(str(SHIPPED_MODEL)), PanguTokenizer.load(None)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_the_training_ids(toks, text):
    hf, p = toks
    assert hf(text)["input_ids"] == [p.bos_id, *p.encode(text), p.sep_id]  # the prompt, ready for an answer
    assert hf(text, "答案")["input_ids"] == p.encode_pair(text, "答案")
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == p.decode(p.encode(text))
    assert hf.eos_token_id == p.eot_id and hf.pad_token_id == p.pad_id and len(hf) == p.vocab_size


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "答案"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
])
def test_chat_template_renders_what_training_encodes(toks, messages):
    hf, p = toks
    prompt, answer = D.messages_to_pair(messages)
    assert hf.apply_chat_template(messages, tokenize=True)["input_ids"] == p.encode_pair(prompt, answer)
    ask = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ask == [p.bos_id, *p.encode(prompt), p.sep_id]


def test_save_and_load_with_auto_tokenizer(tmp_path, toks):
    import sftbench  # noqa: F401  (registers the tokenizer)
    from transformers import AutoTokenizer
    hf, _ = toks
    hf.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert type(back) is PanguHFTokenizer and (tmp_path / "vocab.model").read_bytes() == SHIPPED_MODEL.read_bytes()
    assert [back(t)["input_ids"] for t in TEXTS] == [hf(t)["input_ids"] for t in TEXTS]


def test_ids_past_the_vocabulary_decode_to_nothing(toks):
    """A 40,000-row model with the shipped smaller tokenizer can generate such ids; decoding skips them."""
    hf = toks[0]
    ids = hf("床前明月光", add_special_tokens=False)["input_ids"]
    assert hf.decode(ids + [hf.vocab_size, 39_999]) == hf.decode(ids) != ""
