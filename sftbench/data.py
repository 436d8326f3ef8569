"""SFT data: JSONL reader, example encoding, pre-tokenisation cache, per-rank sample order (the synthetic
benchmark set is written by ``sftbench/benchset.py``).

Reading (``read_sft_jsonl``)
----------------------------
One JSON object per line, in either form::

    {"prompt": str, "answers": [{"answer": str, "score": number}, ...], "prefix": str}   # reference form
    {"prompt": str, "answer": str, "prefix": str}                                        # plain form

    {"instruction": str, "input": str, "output": str}                                    # Alpaca
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}            # chat

A line with ``messages`` is chat, one with ``instruction`` (and no ``prompt``) Alpaca; each line is read by its own
form, so a file may mix them. Alpaca: prompt = instruction, plus a newline and the input when it is not empty;
answer = output (``alpaca_to_pair``). Chat: the last message must be the assistant's and is the answer; the turns
before it (a user turn among them), joined by newlines, are the prompt (``messages_to_pair``); so with
``--mask-prompt`` only that answer is in the loss.

``prefix`` is optional (absent, null or ``""`` mean no prefix). The answer text used is ``prefix + answer``. In the
reference form the answer with the highest ``score`` is taken; on a tie the first of the tied answers wins. (The
reference SFT dataset simply took ``answers[0]``; the benchmark file written here lists answers best-first, so both
rules pick the same answer on it.) Texts are used as they are: the reference also deleted ``\\r``/``\\n`` from prompt
and answer, which makes no difference on the benchmark file (it has none).

Blank (whitespace-only) lines are ignored. A broken line is skipped and counted under one *kind*:

=================  ==========================================================================================
``bad_encoding``   the line is not valid UTF-8
``bad_json``       the line is not valid JSON
``not_object``     the JSON value is not an object
``missing_prompt`` no ``prompt`` key (or ``prompt`` is null); Alpaca: no ``instruction``
``no_answer``      neither ``answers`` nor ``answer``, an empty ``answers`` list, or an ``answers`` item lacking
                   ``answer``; Alpaca: no ``output``; chat: the last message is not the assistant's
``bad_type``       a field of the wrong type: prompt/answer/prefix not a string, ``answers`` not a list, an item not
                   an object, a score that is missing or not a finite number (booleans are not numbers)
``empty_text``     the prompt, or ``prefix + answer``, is empty or whitespace only (the reference discarded these too)
``bad_messages``   chat: ``messages`` not a non-empty list, an item not an object, a role other than system / user /
                   assistant, a content that is not a string, or no user turn before the answer
=================  ==========================================================================================

Skipped lines are reported ONCE per file through the ``logging`` logger ``sftbench.data`` (level WARNING): the file,
the counts by kind, and the first five line numbers (1-based) with their reasons. ``strict=True`` instead raises
``DataError`` (a ``ValueError``) naming the file, the line number and the reason of the first broken line. A file
with no usable line (empty, only blank lines, or every line broken) always raises ``DataError`` naming the file; a
missing file raises ``FileNotFoundError`` naming it. ``load_or_build_cache`` behaves the same on a cache hit (the
report is stored in the cache): local rank 0 logs the warning (or raises in strict mode), other local ranks stay
quiet but raise the same ``DataError`` for an unusable file.

Encoding (``encode_example``)
-----------------------------
As the reference (a HF tokenizer call ``tokenizer(prompt, prefix + answer, max_length=L,
truncation="longest_first", padding="max_length")`` on PanGu's tokenizer, whose ``build_inputs_with_special_tokens``
makes ``<s> A <sep> B <eot>``)::

    input_ids      = <s> prompt_ids <sep> answer_ids <eot> <pad> ... <pad>      (exactly seq_len ids)
    attention_mask = 1 for every real token (specials included), 0 for padding
    labels         = input_ids with the padding positions set to -100
                     (mask_prompt=True also sets the "<s> prompt <sep>" positions to -100; off by default, as in
                     the reference, where the loss saw the prompt too)

The prompt and the answer are tokenised separately (``tok.encode``), then truncated by HF's ``longest_first`` rule
with the 3 special tokens reserved: while ``len(prompt_ids) + len(answer_ids) > seq_len - 3``, drop the LAST token of
the longer of the two; when they are equally long, drop it from the answer (the second sequence). This is
transformers' ``truncate_sequences`` (the one-at-a-time loop of 4.26, which the reference used, and the closed form of
5.x give the same result), with right-side truncation. The specials are never cut, so ``<eot>`` is always present. A
truncated example therefore has no padding. Example: prompt 10 tokens, answer 6, seq_len 12 (budget 9, remove 7):
prompt -> 9, 8, 7, 6 (now equal), answer -> 5, prompt -> 5, answer -> 4; kept 5 + 4.
``encode_example`` returns python lists of ints.

Cache (``load_or_build_cache``)
-------------------------------
The encoded set is stored as one ``torch.save`` file in ``cache_dir`` holding the key, a sha256 checksum of the
arrays, and compact arrays: ``input_ids`` int32 [N, seq_len], ``lengths`` (real tokens per row), ``prompt_lens``
(length of ``<s> prompt <sep>`` after truncation), ``raw_lengths`` (length before truncation). Key = sha256 over the
data file's bytes, ``tok.fingerprint``, ``seq_len``, ``mask_prompt`` and ``CACHE_FORMAT``. The file name is
``<data stem>.<hash of the data path and tokenizer>.L<seq_len>[.mp].sftcache.pt``; it is written to a temporary file
and moved into place with ``os.replace``. Only local rank 0 (argument ``local_rank``, default env ``LOCAL_RANK`` or
0) builds and writes; other local ranks read the data file themselves (so a data error is raised on every rank) and
then poll until a cache file with the right key and checksum appears, raising ``TimeoutError`` naming the cache path
after ``timeout_s``. A cache that cannot be read, fails its checksum, has wrong shapes (corrupt) or a different key
(stale) is reported in one log line and rebuilt. ``cache_dir=None`` builds in memory on every rank and writes nothing.

``EncodedSet`` keeps the compact arrays (about 20 MB for 10,000 x 512) and hands out int64 tensors:
``batch(indices)`` -> ``{"input_ids", "attention_mask", "labels"}`` each int64 [B, seq_len] (for a loop that builds
its micro-batches as it goes; train.py indexes the full tensors once, before its clock starts); the properties
``input_ids``, ``attention_mask``, ``labels`` give the full int64 [N, seq_len] tensors (built on first use and kept).
``real_tokens``/``pad_tokens`` are totals over the set; ``token_stats()`` gives those plus length percentiles and the
truncated count.

Order and sharding (``ShardedOrder``)
-------------------------------------
``ShardedOrder(n, rank, world_size, seed).indices(epoch)``: a permutation of ``range(n)`` that depends only on
(seed, epoch) (``random.Random`` seeded from a hash of both; never the global RNG), extended by wrapping around to
its first ``ceil(n / world_size) * world_size - n`` entries (fewer than ``world_size`` samples are seen twice per
epoch; for n < world_size the permutation is repeated), then split round-robin: rank r takes positions
r, r + world, r + 2*world, ... Every rank gets exactly ``num_samples = ceil(n / world_size)`` indices, the shards
cover every sample, and they are disjoint when ``world_size`` divides ``n`` (this is torch's ``DistributedSampler``
with ``drop_last=False``). An epoch walked in micro-batches of ``micro_batch`` consecutive indices
(``micro_batches(epoch, micro_batch)``; the last one is short when ``micro_batch`` does not divide ``num_samples``),
with an optimizer step every ``grad_accum`` micro-batches and once more for a partial final accumulation (as the HF
Trainer behind the reference table did), has the same number of optimizer steps on every rank, namely
``steps_per_epoch(n, micro_batch, world_size, grad_accum) = ceil(n / (micro_batch * world_size * grad_accum))``
(equal to ``ceil(ceil(num_samples / micro_batch) / grad_accum)``). Reference: 10,000 samples, micro batch 1,
accumulation 8: 1,250 steps on 1 GPU, 417 on 3 GPUs. train.py runs a fixed number of full steps instead:
``take(max_steps * grad_accum * micro_batch)`` runs epochs back to back, so every step has ``grad_accum`` full
micro-batches, and ``steps_per_epoch`` gives the epoch estimate (and the step at which ``epoch_s_measured`` is
read).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

logger = logging.getLogger("sftbench.data")

CACHE_FORMAT = 2  # 2: Alpaca and chat lines are read (a file cached before skipped them)
IGNORE_INDEX = -100
N_SPECIAL = 3  # <s> <sep> <eot>: the Pangu layout's own tokens (SampleLayout.n_special for any layout)
BAD_KINDS = ("bad_encoding", "bad_json", "not_object", "missing_prompt", "no_answer", "bad_type", "empty_text",
             "bad_messages")
_N_SHOWN = 5  # line numbers named in the one warning

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data file that cannot be used (names the file, and the line where one is at fault)."""


# --------------------------------------------------------------------------------------------------------- reading
@dataclass
class ReadReport:
    path: str
    n_lines: int = 0       # physical lines (a final line without newline counts; nothing after a final newline)
    n_blank: int = 0       # whitespace-only lines (ignored)
    n_ok: int = 0          # examples returned
    n_bad: int = 0         # broken lines skipped
    bad: list = field(default_factory=list)          # [(lineno, reason)], 1-based, every broken line
    by_kind: dict = field(default_factory=dict)      # kind -> count (only kinds that occurred)

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in self.by_kind.items())
        s = f"{self.path}: {self.n_ok} examples, {self.n_bad} broken line(s) of {self.n_lines}"
        return s + (f" ({kinds})" if kinds else "")

    def to_dict(self) -> dict:
        return {"path": self.path, "n_lines": self.n_lines, "n_blank": self.n_blank, "n_ok": self.n_ok,
                "n_bad": self.n_bad, "bad": [[int(a), str(b)] for a, b in self.bad], "by_kind": dict(self.by_kind)}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadReport":
        return cls(path=d["path"], n_lines=d["n_lines"], n_blank=d["n_blank"], n_ok=d["n_ok"], n_bad=d["n_bad"],
                   bad=[(int(a), str(b)) for a, b in d["bad"]], by_kind=dict(d["by_kind"]))


class _Bad(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text_field(obj: dict, key: str, kind_missing: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Bad(kind_missing, f"no '{key}'")
        return ""
    if not isinstance(value, str):
        raise _Bad("bad_type", f"'{key}' is a {type(value).__name__}, not a string")
    return value


def _checked_pair(prompt: str, text: str) -> tuple[str, str]:
    if not prompt.strip():
        raise _Bad("empty_text", "empty prompt")
    if not text.strip():
        raise _Bad("empty_text", "empty answer (prefix + answer)")
    return prompt, text


def alpaca_to_pair(obj: dict) -> tuple[str, str]:
    """Alpaca ``{"instruction", "input", "output"}``: the prompt is the instruction, then a newline and the input
    when there is one; the answer is the output."""
    instruction = _text_field(obj, "instruction", "missing_prompt")
    extra = _text_field(obj, "input", "missing_prompt", required=False)
    output = _text_field(obj, "output", "no_answer")
    return instruction + ("\n" + extra if extra.strip() else ""), output


CHAT_ROLES = ("system", "user", "assistant")


def messages_to_pair(messages) -> tuple[str, str]:
    """Chat ``messages`` onto the Pangu layout: the last message must be the assistant's, and it is the answer; the
    turns before it (system, user and earlier assistant turns, in order) joined by newlines are the prompt. With
    ``--mask-prompt`` only the last answer is in the loss. (The saved tokenizer's chat template renders the same.)"""
    if not isinstance(messages, list):
        raise _Bad("bad_messages", f"'messages' is a {type(messages).__name__}, not a list")
    if not messages:
        raise _Bad("bad_messages", "'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad("bad_messages", f"messages[{i}] is a {type(m).__name__}, not an object")
        if m.get("role") not in CHAT_ROLES:
            raise _Bad("bad_messages", f"messages[{i}].role is {json.dumps(m.get('role'))[:40]}, not one of "
                                       f"{', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            what = "missing" if m.get("content") is None else f"a {type(m['content']).__name__}, not a string"
            raise _Bad("bad_messages", f"messages[{i}].content is {what}")
    if messages[-1]["role"] != "assistant":
        raise _Bad("no_answer", f"the last message is the {messages[-1]['role']}'s, not the assistant's")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise _Bad("bad_messages", "no user message before the assistant's answer")
    return "\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]


def _parse_record(line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise _Bad("bad_json", f"bad JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _Bad("not_object", f"not a JSON object (a {type(obj).__name__})")
    if "messages" in obj:
        return _checked_pair(*messages_to_pair(obj["messages"]))
    if "instruction" in obj and "prompt" not in obj:
        return _checked_pair(*alpaca_to_pair(obj))
    prompt = obj.get("prompt")
    if prompt is None:
        raise _Bad("missing_prompt", "no 'prompt'")
    if not isinstance(prompt, str):
        raise _Bad("bad_type", f"'prompt' is a {type(prompt).__name__}, not a string")
    prefix = obj.get("prefix")
    if prefix is None:
        prefix = ""
    elif not isinstance(prefix, str):
        raise _Bad("bad_type", f"'prefix' is a {type(prefix).__name__}, not a string")

    if "answers" in obj and obj["answers"] is not None:
        answers = obj["answers"]
        if not isinstance(answers, list):
            raise _Bad("bad_type", f"'answers' is a {type(answers).__name__}, not a list")
        if not answers:
            raise _Bad("no_answer", "'answers' is empty")
        best, best_score = None, None
        for i, item in enumerate(answers):
            if not isinstance(item, dict):
                raise _Bad("bad_type", f"answers[{i}] is a {type(item).__name__}, not an object")
            if item.get("answer") is None:
                raise _Bad("no_answer", f"answers[{i}] has no 'answer'")
            if not isinstance(item["answer"], str):
                raise _Bad("bad_type", f"answers[{i}].answer is a {type(item['answer']).__name__}, not a string")
            score = item.get("score")
            if not _is_number(score):
                what = "missing" if score is None else f"not a finite number ({json.dumps(score)[:40]})"
                raise _Bad("bad_type", f"answers[{i}].score is {what}")
            if best_score is None or score > best_score:  # strict '>': ties keep the first
                best, best_score = item["answer"], score
        answer = best
    elif obj.get("answer") is not None:
        answer = obj["answer"]
        if not isinstance(answer, str):
            raise _Bad("bad_type", f"'answer' is a {type(answer).__name__}, not a string")
    else:
        raise _Bad("no_answer", "no 'answers' and no 'answer'")

    return _checked_pair(prompt, prefix + answer)


def _parse_bytes(blob: bytes, path: str, strict: bool) -> tuple[list[tuple[str, str]], ReadReport]:
    rep = ReadReport(path=path)
    examples: list[tuple[str, str]] = []
    lines = blob.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rep.n_lines = len(lines)
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            err: Optional[_Bad] = _Bad("bad_encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})")
            line = None
        else:
            err = None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]  # tolerate a byte-order mark
            if not line.strip():
                rep.n_blank += 1
                continue
            try:
                examples.append(_parse_record(line))
                continue
            except _Bad as bad:
                err = bad
        if strict:
            raise DataError(f"{path}: line {lineno}: {err.reason}")
        rep.n_bad += 1
        rep.bad.append((lineno, err.reason))
        rep.by_kind[err.kind] = rep.by_kind.get(err.kind, 0) + 1
    rep.n_ok = len(examples)

    if not examples:
        if rep.n_bad:
            first = "; ".join(f"line {ln}: {why}" for ln, why in rep.bad[:_N_SHOWN])
            raise DataError(f"{path}: no usable example: all {rep.n_bad} non-blank line(s) are broken ({first})")
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    _warn_bad(rep)
    return examples, rep


def _warn_bad(rep: ReadReport) -> None:
    """The one warning about the skipped lines of a file (nothing when there are none)."""
    if rep.n_bad:
        first = "; ".join(f"line {ln}: {why}" for ln, why in rep.bad[:_N_SHOWN])
        more = f" (+{rep.n_bad - _N_SHOWN} more)" if rep.n_bad > _N_SHOWN else ""
        kinds = ", ".join(f"{k}={v}" for k, v in rep.by_kind.items())
        logger.warning("%s: skipped %d broken line(s) of %d [%s]; first: %s%s",
                       rep.path, rep.n_bad, rep.n_lines, kinds, first, more)


def _read_bytes(path: PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    return p.read_bytes()


def read_sft_jsonl(path: PathLike, strict: bool = False) -> tuple[list[tuple[str, str]], ReadReport]:
    """Read an SFT JSONL file into ``[(prompt, prefix + best answer)]`` and a ``ReadReport`` (see module doc)."""
    return _parse_bytes(_read_bytes(path), str(path), strict)


# -------------------------------------------------------------------------------------------------------- encoding
def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept of two sequences under HF ``longest_first`` (right side) so that their sum is <= ``budget``:
    one token at a time from the longer one, from the second one on a tie (closed form of that loop)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    remove = len_a + len_b - budget
    if remove <= 0:
        return len_a, len_b
    first = min(abs(len_a - len_b), remove)   # brings the longer one down to the shorter one
    second = remove - first                  # then alternately, the second sequence first
    if len_a > len_b:
        ra, rb = first + second // 2, second - second // 2
    else:
        ra, rb = second // 2, first + second - second // 2
    return len_a - ra, len_b - rb


@dataclass(frozen=True)
class SampleLayout:
    """How one sample becomes ids: ``head + prompt + mid + answer + tail``. The prompt and the answer are truncated
    (``truncate_pair``); head, mid and tail never are. Pangu: ``<s>``, ``<sep>``, ``<eot>``; a transformers
    tokenizer with a chat template: the template's text around one user turn and one assistant turn; without one:
    its BOS (when it adds one), nothing, its EOS (``sftbench/models/hf.py`` builds these)."""

    name: str
    head: tuple[int, ...]
    mid: tuple[int, ...]
    tail: tuple[int, ...]
    text: tuple[str, str, str] = ("", "", "")  # head, mid and tail as text, for the log and the saved model

    @property
    def n_special(self) -> int:
        return len(self.head) + len(self.mid) + len(self.tail)

    def to_json(self) -> dict:
        return {"name": self.name, "head": self.text[0], "mid": self.text[1], "tail": self.text[2],
                "head_ids": list(self.head), "mid_ids": list(self.mid), "tail_ids": list(self.tail)}


def sample_layout(tok) -> SampleLayout:
    """``tok.layout`` where the tokenizer carries one (the transformers models' adapter), else the Pangu layout
    ``<s> prompt <sep> answer <eot>`` from its ``bos_id``, ``sep_id`` and ``eot_id``."""
    own = getattr(tok, "layout", None)
    if own is not None:
        return own
    return SampleLayout("pangu", (tok.bos_id,), (tok.sep_id,), (tok.eot_id,), ("<s>", "<sep>", "<eot>"))


def _encode_ids(tok, prompt: str, answer: str, seq_len: int) -> tuple[list[int], int, int]:
    """(unpadded ids head p mid a tail, prompt part length incl. head and mid, length before truncation)."""
    lay = sample_layout(tok)
    n_special = lay.n_special
    if seq_len < n_special:
        raise ValueError(f"seq_len must be >= {n_special} (the {lay.name} layout's own tokens), got {seq_len}")
    p = tok.encode(prompt)
    a = tok.encode(answer)
    kp, ka = truncate_pair(len(p), len(a), seq_len - n_special)
    ids = [*lay.head, *p[:kp], *lay.mid, *a[:ka], *lay.tail]
    return ids, len(lay.head) + kp + len(lay.mid), len(p) + len(a) + n_special


def encode_example(tok, prompt: str, answer: str, seq_len: int = 512, mask_prompt: bool = False) -> dict:
    """``{"input_ids", "attention_mask", "labels"}`` as python lists of ``seq_len`` ints (see module doc)."""
    ids, plen, _ = _encode_ids(tok, prompt, answer, seq_len)
    n = len(ids)
    pad = seq_len - n
    labels = list(ids)
    if mask_prompt:
        labels[:plen] = [IGNORE_INDEX] * plen
    return {"input_ids": ids + [tok.pad_id] * pad,
            "attention_mask": [1] * n + [0] * pad,
            "labels": labels + [IGNORE_INDEX] * pad}


# ----------------------------------------------------------------------------------------------------------- cache
class EncodedSet:
    """An encoded data set (compact storage; int64 tensors on request). See module doc."""

    def __init__(self, input_ids, lengths, prompt_lens, raw_lengths, *, seq_len: int, mask_prompt: bool,
                 read_report: ReadReport, cache_hit: bool = False, cache_path: Optional[str] = None,
                 seconds: float = 0.0):
        self._ids = input_ids            # int32 [N, seq_len], padded with the tokenizer's pad id
        self.lengths = lengths           # int32 [N]: real tokens per row
        self.prompt_lens = prompt_lens   # int32 [N]: len(<s> prompt <sep>) after truncation
        self.raw_lengths = raw_lengths   # int32 [N]: len(<s> prompt <sep> answer <eot>) before truncation
        self.seq_len = int(seq_len)
        self.mask_prompt = bool(mask_prompt)
        self.read_report = read_report
        self.cache_hit = bool(cache_hit)
        self.cache_path = cache_path
        self.seconds = float(seconds)    # time spent building (miss) or loading (hit)
        self.n = int(input_ids.shape[0])
        self.real_tokens = int(lengths.sum().item())
        self.pad_tokens = self.n * self.seq_len - self.real_tokens
        self.n_truncated = int((raw_lengths > self.seq_len).sum().item())
        self._full: dict = {}

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int]) -> dict:
        """int64 ``input_ids``, ``attention_mask``, ``labels`` of shape [len(indices), seq_len]."""
        import torch

        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
        ids = self._ids.index_select(0, idx).long()
        pos = torch.arange(self.seq_len).unsqueeze(0)
        real = pos < self.lengths.index_select(0, idx).long().unsqueeze(1)
        labels = ids.masked_fill(~real, IGNORE_INDEX)
        if self.mask_prompt:
            labels.masked_fill_(pos < self.prompt_lens.index_select(0, idx).long().unsqueeze(1), IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.batch([int(i)]).items()}

    def _all(self, key: str):
        if key not in self._full:
            self._full.update(self.batch(range(self.n)))
        return self._full[key]

    @property
    def input_ids(self):
        return self._all("input_ids")

    @property
    def attention_mask(self):
        return self._all("attention_mask")

    @property
    def labels(self):
        return self._all("labels")

    def token_stats(self) -> dict:
        import torch

        raw = self.raw_lengths.double()
        q = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
        p10, p50, p90, p99 = (float(x) for x in torch.quantile(raw, q))
        return {"n": self.n, "seq_len": self.seq_len, "real_tokens": self.real_tokens, "pad_tokens": self.pad_tokens,
                "real_fraction": self.real_tokens / max(1, self.n * self.seq_len), "n_truncated": self.n_truncated,
                "len_p10": p10, "len_p50": p50, "len_p90": p90, "len_p99": p99,
                "len_max": int(self.raw_lengths.max().item()) if self.n else 0,
                "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3)}


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def cache_key(data_sha256: str, tok_fingerprint: str, seq_len: int, mask_prompt: bool) -> str:
    meta = json.dumps({"format": CACHE_FORMAT, "data": data_sha256, "tok": str(tok_fingerprint),
                       "seq_len": int(seq_len), "mask_prompt": bool(mask_prompt)}, sort_keys=True)
    return _sha256(meta.encode())


def cache_file(path: PathLike, tok, seq_len: int, cache_dir: PathLike, mask_prompt: bool = False) -> Path:
    """Where ``load_or_build_cache`` keeps the cache of ``path`` (the content key is checked inside the file)."""
    tag = _sha256(f"{os.path.abspath(path)}|{tok.fingerprint}".encode())[:12]
    return Path(cache_dir) / f"{Path(path).stem}.{tag}.L{int(seq_len)}{'.mp' if mask_prompt else ''}.sftcache.pt"


def _arrays_checksum(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in ("input_ids", "lengths", "prompt_lens", "raw_lengths"):
        t = arrays[k].contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _build_arrays(examples, tok, seq_len: int) -> dict:
    import torch

    n = len(examples)
    ids = torch.full((n, seq_len), int(tok.pad_id), dtype=torch.int32)
    lengths = torch.empty(n, dtype=torch.int32)
    prompt_lens = torch.empty(n, dtype=torch.int32)
    raw_lengths = torch.empty(n, dtype=torch.int32)
    for i, (prompt, answer) in enumerate(examples):
        row, plen, raw = _encode_ids(tok, prompt, answer, seq_len)
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        lengths[i], prompt_lens[i], raw_lengths[i] = len(row), plen, raw
    return {"input_ids": ids, "lengths": lengths, "prompt_lens": prompt_lens, "raw_lengths": raw_lengths}


def _load_cache(cpath: Path, key: str, seq_len: int) -> tuple[Optional[dict], str]:
    """(payload, "") when the file is valid for ``key``; (None, why) otherwise."""
    import torch

    try:
        obj = torch.load(cpath, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/garbled files raise many different errors
        return None, f"corrupt (unreadable: {type(exc).__name__}: {str(exc)[:120]})"
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
        return None, "stale (other format version)" if isinstance(obj, dict) else "corrupt (not a cache dict)"
    if obj.get("key") != key:
        return None, "stale (key mismatch: data, tokenizer, seq_len or mask_prompt changed)"
    try:
        arrays = {k: obj[k] for k in ("input_ids", "lengths", "prompt_lens", "raw_lengths")}
        n = arrays["input_ids"].shape[0]
        ok = (arrays["input_ids"].dim() == 2 and arrays["input_ids"].shape[1] == seq_len
              and all(arrays[k].shape == (n,) for k in ("lengths", "prompt_lens", "raw_lengths"))
              and n == obj["read_report"]["n_ok"] and n > 0)
    except Exception as exc:
        return None, f"corrupt (bad contents: {type(exc).__name__}: {exc})"
    if not ok:
        return None, "corrupt (wrong shapes)"
    if _arrays_checksum(arrays) != obj.get("checksum"):
        return None, "corrupt (checksum mismatch)"
    return obj, ""


def _atomic_save(obj: dict, cpath: Path) -> None:
    import torch

    cpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = cpath.with_name(f".{cpath.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cpath)
    finally:
        if tmp.exists():
            tmp.unlink()


def _to_set(obj: dict, *, seq_len: int, mask_prompt: bool, hit: bool, cpath: Optional[Path], t0: float) -> EncodedSet:
    return EncodedSet(obj["input_ids"], obj["lengths"], obj["prompt_lens"], obj["raw_lengths"], seq_len=seq_len,
                      mask_prompt=mask_prompt, read_report=ReadReport.from_dict(obj["read_report"]),
                      cache_hit=hit, cache_path=str(cpath) if cpath else None, seconds=time.perf_counter() - t0)


def load_or_build_cache(path: PathLike, tok, seq_len: int, cache_dir: Optional[PathLike], *,
                        mask_prompt: bool = False, strict: bool = False, local_rank: Optional[int] = None,
                        timeout_s: float = 1800.0, poll_s: float = 0.5) -> EncodedSet:
    """Encoded set of the SFT file ``path``, from the cache in ``cache_dir`` when valid (see module doc)."""
    t0 = time.perf_counter()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    blob = _read_bytes(path)
    key = cache_key(_sha256(blob), tok.fingerprint, seq_len, mask_prompt)

    def build() -> dict:
        examples, rep = _parse_bytes(blob, str(path), strict)
        arrays = _build_arrays(examples, tok, seq_len)
        return {"format": CACHE_FORMAT, "key": key, "checksum": _arrays_checksum(arrays), "seq_len": int(seq_len),
                "mask_prompt": bool(mask_prompt), "read_report": rep.to_dict(), **arrays}

    if cache_dir is None:
        return _to_set(build(), seq_len=seq_len, mask_prompt=mask_prompt, hit=False, cpath=None, t0=t0)

    cpath = cache_file(path, tok, seq_len, cache_dir, mask_prompt)
    if local_rank == 0:
        if cpath.exists():
            obj, why = _load_cache(cpath, key, seq_len)
            if obj is not None:
                hit = _to_set(obj, seq_len=seq_len, mask_prompt=mask_prompt, hit=True, cpath=cpath, t0=t0)
                rep = hit.read_report
                if strict and rep.n_bad:
                    raise DataError(f"{path}: line {rep.bad[0][0]}: {rep.bad[0][1]}")
                _warn_bad(rep)  # the same warning as when the file was read
                return hit
            logger.warning("data cache %s is %s; rebuilding", cpath, why)
        obj = build()
        _atomic_save(obj, cpath)
        logger.info("data cache %s written (%d examples, %.1f s)", cpath, obj["input_ids"].shape[0],
                    time.perf_counter() - t0)
        return _to_set(obj, seq_len=seq_len, mask_prompt=mask_prompt, hit=False, cpath=cpath, t0=t0)

    # other local ranks: fail fast on bad data like rank 0 will, then wait for rank 0's file
    if strict:
        _parse_bytes(blob, str(path), True)
    else:
        _quiet_check(blob, str(path))
    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        try:
            st = cpath.stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig is not None and sig != seen:
            seen = sig
            obj, _ = _load_cache(cpath, key, seq_len)
            if obj is not None:
                return _to_set(obj, seq_len=seq_len, mask_prompt=mask_prompt, hit=True, cpath=cpath, t0=t0)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"local rank {local_rank}: no valid data cache at {cpath} after {timeout_s:.0f} s "
                               f"(local rank 0 builds it; did it fail?)")
        time.sleep(poll_s)


def _quiet_check(blob: bytes, path: str) -> None:
    """Raise the DataError rank 0 would raise, without repeating its warning about skipped lines."""
    prev = logger.disabled
    logger.disabled = True
    try:
        _parse_bytes(blob, path, False)
    finally:
        logger.disabled = prev


# --------------------------------------------------------------------------------------------------------- order
def steps_per_epoch(n: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: ceil(n / (micro_batch * world_size * grad_accum))."""
    for name, v in (("micro_batch", micro_batch), ("world_size", world_size), ("grad_accum", grad_accum)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return -(-int(n) // (micro_batch * world_size * grad_accum))


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, evaluation rows) of ``n`` samples: ``ceil(fraction * n)`` rows drawn with ``seed`` (at
    least one, and at least one left for training), both lists in file order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DataError(f"--eval-split needs at least 2 samples, the file has {n}")
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    digest = hashlib.sha256(f"sftbench-eval-split:{seed}".encode()).digest()
    held = set(random.Random(int.from_bytes(digest[:8], "big")).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def training_and_eval_rows(ds: "EncodedSet", eval_data: Optional[PathLike], eval_split: float, seed: int,
                           load) -> tuple[list[int], Optional["EncodedSet"], list[int]]:
    """(training rows of ``ds``, the evaluation set, its rows): ``eval_split`` holds rows of ``ds`` out, ``eval_data``
    is loaded with ``load(path)``; neither gives every row for training and no evaluation."""
    if eval_split:
        train, held = holdout_split(ds.n, eval_split, seed)
        return train, ds, held
    if eval_data:
        es = load(eval_data)
        return list(range(ds.n)), es, list(range(es.n))
    return list(range(ds.n)), None, []


def epoch_end_steps(n: int, world_size: int, samples_per_step: int, max_steps: int) -> list[int]:
    """The optimizer steps (1-based, at most ``max_steps``) in which each rank's pass over an epoch ends, when
    epochs run back to back in full steps of ``samples_per_step`` (micro batch x accumulation) per rank: step
    ``ceil(e * ceil(n / world_size) / samples_per_step)`` for e = 1, 2, ..."""
    per_rank = -(-n // world_size)
    out, e = [], 1
    while (s := -(-e * per_rank // samples_per_step)) <= max_steps:
        out.append(s)
        e += 1
    return out


def steps_for_epochs(epochs: float, n: int, world_size: int, samples_per_step: int) -> int:
    """Full optimizer steps that cover ``epochs`` passes over ``n`` samples (the last step may reach into the next
    epoch to stay full)."""
    return max(1, math.ceil(epochs * -(-n // world_size) / samples_per_step))


class ShardedOrder:
    """Per-rank sample order: a (seed, epoch)-determined permutation, padded by wrap-around, split round-robin.
    See the module doc for the exact rule and how the training loop uses it."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.n, self.rank, self.world_size, self.seed = int(n), int(rank), int(world_size), int(seed)
        self.num_samples = -(-self.n // self.world_size)
        self.total = self.num_samples * self.world_size

    def permutation(self, epoch: int) -> list[int]:
        digest = hashlib.sha256(f"sftbench-order:{self.seed}:{int(epoch)}".encode()).digest()
        order = list(range(self.n))
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
        return order

    def stream(self, epoch: int) -> list[int]:
        """The epoch's permutation extended by wrapping around to ``total`` positions (every rank's, round-robin)."""
        perm = self.permutation(epoch)
        return (perm * (-(-self.total // self.n)))[:self.total] if self.total > self.n else perm

    def indices(self, epoch: int) -> list[int]:
        return self.stream(epoch)[self.rank::self.world_size]

    def take(self, count: int, start: int = 0) -> list[int]:
        """``count`` indices of this rank's order over epochs 0, 1, 2, ... back to back (how train.py and the bench
        scripts fill a fixed number of steps with full micro-batches), from the job's stream position ``start``:
        the stream is the epochs' wrapped permutations back to back, rank r takes positions start + r,
        start + r + world, ... (``start`` 0: the rank's order from its beginning; k steps of ``per_rank`` samples
        leave the job at ``k * per_rank * world``)."""
        out, pos = [], start + self.rank
        while len(out) < count:
            epoch, at = divmod(pos, self.total)
            out += self.stream(epoch)[at::self.world_size][:count - len(out)]
            pos = (epoch + 1) * self.total + at % self.world_size  # total is a multiple of world: same offset
        return out

    def continue_from(self, position: int, world_size: int) -> int:
        """This order's stream position that continues a job of ``world_size`` ranks stopped at ``position`` of its
        own stream: the same epoch and the same offset in its permutation (the stream of another world size pads
        its epochs differently); a position inside an epoch's wrap-around padding moves to the next epoch."""
        total = -(-self.n // world_size) * world_size
        epoch, at = divmod(position, total)
        return (epoch + 1) * self.total if at >= self.n else epoch * self.total + at

    def micro_batches(self, epoch: int, micro_batch: int) -> list[list[int]]:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        idx = self.indices(epoch)
        return [idx[i:i + micro_batch] for i in range(0, len(idx), micro_batch)]

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------------------------------------- CLI
def _cmd_stats(args) -> int:
    import tempfile

    from sftbench.tokenizer import PanguTokenizer

    tok = PanguTokenizer.load(args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        cold = load_or_build_cache(args.file, tok, args.seq_len, cache_dir, mask_prompt=args.mask_prompt,
                                   local_rank=0)
        warm = load_or_build_cache(args.file, tok, args.seq_len, cache_dir, mask_prompt=args.mask_prompt,
                                   local_rank=0)
    st = cold.token_stats()
    rep = cold.read_report
    print(f"file            {args.file}")
    print(f"tokenizer       {tok.vocab_file} (vocab {tok.vocab_size}, {tok.fingerprint[:12]})")
    print(f"examples        {st['n']}  (lines {rep.n_lines}, blank {rep.n_blank}, broken {rep.n_bad}"
          + (f": {rep.by_kind}" if rep.by_kind else "") + ")")
    print(f"seq_len         {st['seq_len']}")
    print(f"real tokens     {st['real_tokens']}  ({100 * st['real_fraction']:.1f}%)")
    print(f"pad tokens      {st['pad_tokens']}")
    print(f"length p10/p50/p90/p99/max (before truncation, with specials)  "
          f"{st['len_p10']:.0f} / {st['len_p50']:.0f} / {st['len_p90']:.0f} / {st['len_p99']:.0f} / {st['len_max']}")
    print(f"truncated       {st['n_truncated']}  ({100 * st['n_truncated'] / max(1, st['n']):.1f}%)")
    print(f"tokenise        cold {cold.seconds:.2f} s (cache_hit={cold.cache_hit}), "
          f"warm {warm.seconds:.3f} s (cache_hit={warm.cache_hit})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="read, tokenise (cold, then warm cache) and print length/token statistics")
    s.add_argument("file")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--vocab", default=None, help="tokenizer model file or folder (default: the shipped model)")
    s.add_argument("--cache-dir", default=None, help="cache folder (default: a temporary one, removed after)")
    s.add_argument("--mask-prompt", action="store_true")
    b = sub.add_parser("make-bench", help="write the synthetic benchmark file")
    b.add_argument("--out", default="data/bench_10k.jsonl")
    b.add_argument("--n", type=int, default=10000)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "stats":
            return _cmd_stats(args)
        from sftbench.benchset import write_bench_file
        print(write_bench_file(args.out, args.n, args.seed))
        return 0
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
