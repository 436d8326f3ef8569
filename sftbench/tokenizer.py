"""PanGu-alpha tokenizer: jieba word segmentation in front of a SentencePiece model.

Encoding a piece of text (the same steps as the PanGu-alpha release):

1. the text is cut into words with jieba (``cut(text, cut_all=False)``, HMM on);
2. inside every word a space becomes U+2582 (``▂``) and a newline becomes U+2583 (``▃``), so real
   whitespace survives as ordinary pieces (ids 4 and 3 in the PanGu vocab);
3. the words are joined with single spaces, which SentencePiece sees as word boundaries;
4. SentencePiece turns that string into ids (no BOS/EOS added).

Decoding reverses it: SentencePiece decode, drop every space (those are the joining spaces), then map
``▂`` -> space and ``▃`` -> newline.

Special tokens ``<unk> <s> </s> <sep> <pad> <mask> <eod> <eot>`` (those the model has) are always ONE id when
they appear in text: the text is split on them before jieba runs and each one is looked up with
``piece_to_id``. This is the one known difference from the original PanGu tokenizer, where jieba cuts
``<sep>`` into ``<``, ``sep``, ``>`` (several ids) unless jieba is patched, and ``<s>``/``</s>`` (control
pieces) are never recognised in text.

Inherited from the original, so also true here:

* the SentencePiece normalizer runs (``nmt_nfkc`` for the PanGu vocab and for the shipped model), so e.g.
  a full-width comma ``，`` comes back as ``,`` and a tab as nothing; ``。`` and CJK text are unchanged;
* literal ``▂``/``▃`` in the input come back as space/newline, and a literal ``▁`` (U+2581) is lost;
* every SentencePiece call starts a new word, so a chunk that starts with whitespace may cost one extra
  ``▁`` piece.
* the PanGu vocab has no byte fallback: characters it does not know become ``<unk>`` (id 0), which
  ``decode(skip_special=True)`` drops. The shipped model has byte fallback and never produces ``<unk>``.

Special ids come from the model's pieces, never hard-coded. For the PanGu vocab (40,000 pieces) and the
shipped small model they are ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<sep>``=5, ``<pad>``=6, ``<eot>``=9
(ids 3/4 are ``▃``/``▂``, 7/8 are ``<mask>``/``<eod>``).

The shipped small model lives at ``data/tokenizer/spm.model`` in the repository (built by
``data/train_tokenizer.py``); ``PanguTokenizer.load(None)`` loads it.

This module does not import torch.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Iterable, Optional, Union

import sentencepiece as spm

from sftbench.paths import REPO

SHIPPED_MODEL = REPO / "data" / "tokenizer" / "spm.model"
VOCAB_FILENAME = "vocab.model"

SPACE_CHAR = "\u2582"    # "▂" stands for " "
NEWLINE_CHAR = "\u2583"  # "▃" stands for "\n"
_ENCODE_TABLE = str.maketrans(" \n", SPACE_CHAR + NEWLINE_CHAR)

# Pieces kept whole when they appear in text (those absent from a model are ignored, except the required ones).
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>")
REQUIRED_PIECES = {"unk_id": "<unk>", "bos_id": "<s>", "eos_id": "</s>", "sep_id": "<sep>",
                   "pad_id": "<pad>", "eot_id": "<eot>"}

_jieba_lock = threading.Lock()
_jieba_tok = None


def _jieba():
    """One private, lazily initialised jieba tokenizer (its start-up log lines are silenced)."""
    global _jieba_tok
    if _jieba_tok is None:
        with _jieba_lock:
            if _jieba_tok is None:
                import jieba

                log = logging.getLogger("jieba")
                old_level = log.level
                log.setLevel(logging.WARNING)
                try:
                    tok = jieba.Tokenizer()
                    tok.initialize()
                finally:
                    log.setLevel(old_level)
                _jieba_tok = tok
    return _jieba_tok


def segment(text: str) -> str:
    """The string SentencePiece sees for ``text`` (which must hold no special token): jieba words with
    space/newline mapped to ``▂``/``▃``, joined by single spaces. Also used to prepare tokenizer training text."""
    if not text:
        return ""
    return " ".join(w.translate(_ENCODE_TABLE) for w in _jieba().cut(text, cut_all=False))


def _resolve(path: Union[str, Path, None]) -> Path:
    if path is None:
        p = SHIPPED_MODEL
        if not p.is_file():
            raise FileNotFoundError(
                f"shipped tokenizer model not found: {p} (rebuild it with: python data/train_tokenizer.py)")
        return p
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (VOCAB_FILENAME, "spm.model"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"tokenizer folder {p} has no {VOCAB_FILENAME} (nor spm.model)")
    if not p.exists():
        raise FileNotFoundError(f"tokenizer model file or folder not found: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer path is not a file or folder: {p}")
    return p


class PanguTokenizer:
    """PanGu-alpha tokenization (jieba + SentencePiece) of one SentencePiece model file."""

    def __init__(self, vocab_file: Union[str, Path]):
        path = Path(vocab_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        self._init(path, path.read_bytes())

    def _init(self, path: Path, blob: bytes) -> None:
        self.vocab_file = str(path)
        self._blob = blob
        self.fingerprint = hashlib.sha256(blob).hexdigest()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(blob)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with little context
            raise ValueError(f"not a SentencePiece model: {path} ({exc})") from exc
        self._sp = sp
        self.vocab_size = sp.get_piece_size()

        unk = sp.unk_id()
        def pid(piece: str) -> Optional[int]:
            i = sp.piece_to_id(piece)
            return i if (i != unk or piece == "<unk>") and sp.id_to_piece(i) == piece else None

        missing = [piece for piece in REQUIRED_PIECES.values() if pid(piece) is None]
        if missing:
            raise ValueError(f"tokenizer model {path} lacks the special piece(s) {', '.join(missing)}")
        for attr, piece in REQUIRED_PIECES.items():
            setattr(self, attr, pid(piece))
        self.special_ids = {piece: pid(piece) for piece in SPECIAL_PIECES if pid(piece) is not None}
        self._special_set = frozenset(self.special_ids.values())
        self._id_to_special = {i: p for p, i in self.special_ids.items()}
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(p) for p in alternatives) + ")")

    @classmethod
    def for_model(cls, model: str, tokenizer: Union[str, Path, None] = None) -> "PanguTokenizer":
        """The tokenizer a run uses: ``tokenizer`` if given, else the checkpoint folder's ``vocab.model``, else
        the shipped small model (a preset has no vocabulary of its own)."""
        if tokenizer is None and Path(model).is_dir() and (Path(model) / "vocab.model").exists():
            tokenizer = model
        return cls.load(tokenizer)

    @classmethod
    def load(cls, path_or_dir: Union[str, Path, None] = None) -> "PanguTokenizer":
        """Load a model file, a folder holding ``vocab.model`` (or ``spm.model``), or with None the shipped
        small model ``data/tokenizer/spm.model``. Raises FileNotFoundError naming what is missing."""
        return cls(_resolve(path_or_dir))

    # pickling (DataLoader workers, multiprocessing): carry the model bytes, rebuild the processor
    def __getstate__(self):
        return {"vocab_file": self.vocab_file, "blob": self._blob}

    def __setstate__(self, state):
        self._init(Path(state["vocab_file"]), state["blob"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"PanguTokenizer({self.vocab_file!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint[:12]})")

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no BOS/EOS added. Special tokens in the text are one id each."""
        ids: list[int] = []
        sp_encode = self._sp.encode
        for part in self._split_re.split(text):
            if not part:
                continue
            special = self.special_ids.get(part)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(sp_encode(segment(part)))
        return ids

    def encode_pair(self, prompt: str, answer: str) -> list[int]:
        """``<s> prompt <sep> answer <eot>`` as ids."""
        return [self.bos_id, *self.encode(prompt), self.sep_id, *self.encode(answer), self.eot_id]

    def tokens(self, text: str) -> list[str]:
        """The pieces ``encode`` produces (for inspection)."""
        return [self._sp.id_to_piece(i) for i in self.encode(text)]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (``unk_id`` for a piece the model does not have)."""
        return int(self._sp.piece_to_id(piece))

    def save_model(self, path: Union[str, Path]) -> Path:
        """Write the SentencePiece model bytes this tokenizer was loaded from to ``path`` (a file)."""
        path = Path(path)
        path.write_bytes(self._blob)
        return path

    def _decode_plain(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._sp.decode(ids)
        return text.replace(" ", "").replace(SPACE_CHAR, " ").replace(NEWLINE_CHAR, "\n")

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (list, tuple, numpy array or tensor). With ``skip_special`` the special ids
        (including ``<unk>`` and ``<pad>``) are dropped; otherwise they are written as their piece text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special:
            return self._decode_plain([i for i in ids if i not in self._special_set])
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            piece = self._id_to_special.get(i)
            if piece is None:
                run.append(i)
                continue
            out.append(self._decode_plain(run))
            run = []
            out.append(piece)
        out.append(self._decode_plain(run))
        return "".join(out)
