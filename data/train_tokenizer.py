"""Train the small SentencePiece model shipped with sftbench (``data/tokenizer/spm.model``).

Command (from the repository root; a few seconds, single thread, same bytes every time):

    python data/train_tokenizer.py
    python data/train_tokenizer.py --input data/sample_sft.jsonl --out data/tokenizer/spm.model

The model is a stand-in for the PanGu-alpha vocab, for tests and CPU runs. It keeps the PanGu id layout so
that ``<pad>`` is id 6 everywhere (the model's loss ignores target id 6):

    0 <unk>   1 <s>   2 </s>   3 ▃ (newline)   4 ▂ (space)   5 <sep>   6 <pad>   7 <mask>   8 <eod>   9 <eot>

``<s>``/``</s>`` are control pieces and ids 3-9 user-defined pieces, as in the PanGu vocab. Like the PanGu
vocab it is a unigram model with ``nmt_nfkc`` normalisation; unlike it, it has byte fallback (256 ``<0xNN>``
pieces), so characters never seen in training still encode losslessly instead of becoming ``<unk>``.

Training text: every prompt, non-empty prefix and answer of the input JSONL, in file order, each segmented
exactly as ``PanguTokenizer.encode`` does (jieba words, space -> ▂, newline -> ▃, joined by spaces), one
text per line. The trainer gets the text through an iterator and returns the model bytes, so no file path
ends up inside the model and the output depends only on the input file and the versions of sentencepiece
and jieba.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sftbench.tokenizer import NEWLINE_CHAR, SPACE_CHAR, segment  # noqa: E402

DEFAULT_INPUT = ROOT / "data" / "sample_sft.jsonl"
DEFAULT_OUT = ROOT / "data" / "tokenizer" / "spm.model"
DEFAULT_VOCAB = 6000
USER_SYMBOLS = [NEWLINE_CHAR, SPACE_CHAR, "<sep>", "<pad>", "<mask>", "<eod>", "<eot>"]  # ids 3..9
SPECIAL_TEXT = ("<unk>", "<s>", "</s>") + tuple(USER_SYMBOLS[2:])
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in sorted(SPECIAL_TEXT, key=len, reverse=True)) + ")")


def texts_of(path: Path) -> list[str]:
    """Prompt, prefix and answer strings of a reference-format SFT JSONL file, in file order."""
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not JSON ({exc})")
            fields = [rec.get("prompt"), rec.get("prefix"), rec.get("answer")]
            fields += [a.get("answer") for a in rec.get("answers") or [] if isinstance(a, dict)]
            out.extend(s for s in fields if isinstance(s, str) and s.strip())
    return out


def training_lines(texts: list[str]) -> list[str]:
    lines = []
    for text in texts:
        # encode() takes special tokens out before jieba runs and segments the text between them apart
        parts = _SPECIAL_RE.split(text)
        seg = " ".join(segment(p) for p in parts if p and p not in SPECIAL_TEXT)
        if seg.strip():
            lines.append(seg)
    return lines


def train(input_path: Path, vocab_size: int = DEFAULT_VOCAB) -> bytes:
    import sentencepiece as spm

    lines = training_lines(texts_of(input_path))
    if not lines:
        raise SystemExit(f"{input_path}: no text to train on")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,          # the sample corpus may support fewer pieces
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        split_digits=False,
        max_sentence_length=1 << 16,     # long answers stay in one piece of text
        input_sentence_size=0,           # use every line, no sampling
        shuffle_input_sentence=False,
        num_threads=1,                   # deterministic
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=USER_SYMBOLS,
        minloglevel=2,
    )
    return writer.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="SFT JSONL file (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model file to write (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                    help="target vocab size; the trainer may stop lower (default: %(default)s)")
    args = ap.parse_args(argv)

    blob = train(args.input, args.vocab_size)

    from sftbench.tokenizer import PanguTokenizer

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(blob)
    tok = PanguTokenizer(tmp)  # checks that the special pieces are there
    expected = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "sep_id": 5, "pad_id": 6, "eot_id": 9}
    got = {k: getattr(tok, k) for k in expected}
    if got != expected:
        tmp.unlink()
        raise SystemExit(f"special ids {got} differ from the PanGu layout {expected}")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(blob)} bytes, {tok.vocab_size} pieces, sha256 {tok.fingerprint[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
