"""Build the small fast tokenizer shipped with the transformers presets (``sftbench/models/presets/tokenizer/``).

Command (from the repository root; a second, the same files every time for the same input and library versions):

    python data/train_hf_tokenizer.py
    python data/train_hf_tokenizer.py --input data/sample_sft.jsonl --out sftbench/models/presets/tokenizer

A byte-level BPE (the ``tokenizers`` library; GPT-2's byte alphabet, so any text encodes losslessly) of 512 ids in
all, trained on every prompt and answer of the input JSONL, so its ids lie inside every preset's vocabulary (the
tiny presets have exactly 512 rows). Special tokens, ids 0-6::

    <s>  </s>  <pad>  <|system|>  <|user|>  <|assistant|>  <|end|>

and a chat template that renders each turn as ``<|role|>\\n content <|end|>\\n`` after ``<s>``; with
``add_generation_prompt`` it ends with ``<|assistant|>\\n``. Saved with transformers' ``save_pretrained``
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), so ``AutoTokenizer.from_pretrained`` loads
it. It is a stand-in for a real model's tokenizer: a preset trains random weights, for benchmarking.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sftbench.paths import REPO  # noqa: E402

DEFAULT_INPUT = REPO / "data" / "sample_sft.jsonl"
DEFAULT_OUT = REPO / "sftbench" / "models" / "presets" / "tokenizer"
VOCAB = 512
SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def texts(path: Path):
    """Every prompt, prefix and answer of a JSONL file in any of the training formats, in file order."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        for key in ("prompt", "prefix", "answer", "instruction", "input", "output"):
            if isinstance(obj.get(key), str) and obj[key]:
                yield obj[key]
        for a in obj.get("answers") or []:
            yield a.get("answer", "")
        for m in obj.get("messages") or []:
            yield m.get("content", "")


def build(inp: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(inp), trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE,
                                   model_max_length=131072, clean_up_tokenization_spaces=False)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    build(a.input, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
