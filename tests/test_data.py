"""Tests of sftbench.data: reader, encoding/truncation, cache, sharding, benchmark generator (fast, CPU)."""
import itertools
import json
import logging
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import real_vocab
from sftbench import data as D
from sftbench.data import (DataError, ShardedOrder, encode_example, load_or_build_cache, read_sft_jsonl,
                           steps_per_epoch, truncate_pair)

REPO = Path(__file__).resolve().parent.parent


class FakeTok:
    """Same interface as sftbench.tokenizer.PanguTokenizer: one id per character (its code point), PanGu's
    special ids (unk 0, <s> 1, </s> 2, <sep> 5, <pad> 6, <eot> 9), which no printable character can take."""
    unk_id, bos_id, eos_id, sep_id, pad_id, eot_id = 0, 1, 2, 5, 6, 9
    vocab_size = 0x110000

    def __init__(self, fingerprint="fake-char-v1"):
        self.fingerprint = fingerprint

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_pair(self, prompt, answer):
        return [self.bos_id, *self.encode(prompt), self.sep_id, *self.encode(answer), self.eot_id]


def write_lines(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def rec(prompt, answer, score=1, prefix=""):
    return json.dumps({"prompt": prompt, "answers": [{"answer": answer, "score": score}], "prefix": prefix})


# ------------------------------------------------------------------------------------------------------- reader
BROKEN = [  # (line text, kind)
    ("{not json", "bad_json"),
    ("[1, 2]", "not_object"),
    ('{"answer": "x"}', "missing_prompt"),
    ('{"prompt": "p", "answers": []}', "no_answer"),
    ('{"prompt": "p"}', "no_answer"),
    ('{"prompt": "p", "answers": [{"score": 1}]}', "no_answer"),
    ('{"prompt": "p", "answers": [{"answer": "a", "score": "high"}]}', "bad_type"),
    ('{"prompt": "p", "answers": [{"answer": "a", "score": true}]}', "bad_type"),
    ('{"prompt": "p", "answers": [{"answer": "a"}]}', "bad_type"),
    ('{"prompt": "p", "answers": [{"answer": 3, "score": 1}]}', "bad_type"),
    ('{"prompt": "p", "answers": {"answer": "a"}}', "bad_type"),
    ('{"prompt": "p", "answer": 5}', "bad_type"),
    ('{"prompt": 1, "answer": "a"}', "bad_type"),
    ('{"prompt": "p", "answer": "a", "prefix": 7}', "bad_type"),
    (b'{"prompt": "\xff\xfe", "answer": "a"}', "bad_encoding"),
    ('{"prompt": "   ", "answer": "a"}', "empty_text"),
    ('{"prompt": "p", "answer": ""}', "empty_text"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}', "bad_messages"),
]


def test_each_broken_kind_counted_with_line_numbers(tmp_path, caplog):
    lines = [rec("q0", "a0"), ""]  # line 1 good, line 2 blank
    for text, _ in BROKEN:
        lines.append(text)
    lines += ["   ", json.dumps({"prompt": "q1", "answer": "a1"})]
    f = write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="sftbench.data"):
        examples, rep = read_sft_jsonl(f)
    assert examples == [("q0", "a0"), ("q1", "a1")]
    assert (rep.n_lines, rep.n_blank, rep.n_ok, rep.n_bad) == (len(lines), 2, 2, len(BROKEN))
    assert [ln for ln, _ in rep.bad] == list(range(3, 3 + len(BROKEN)))
    expected = {}
    for _, kind in BROKEN:
        expected[kind] = expected.get(kind, 0) + 1
    assert rep.by_kind == expected
    assert set(expected) == set(D.BAD_KINDS)
    # ONE warning naming the file and the first line numbers
    warns = [r for r in caplog.records if r.name == "sftbench.data" and r.levelno == logging.WARNING]
    assert len(warns) == 1
    msg = warns[0].getMessage()
    assert str(f) in msg and "line 3: bad JSON" in msg and "line 4: not a JSON object" in msg
    assert f"skipped {len(BROKEN)} broken" in msg


def test_no_warning_when_clean(tmp_path, caplog):
    f = write_lines(tmp_path / "ok.jsonl", [rec("q", "a"), "", rec("q2", "a2")])
    with caplog.at_level(logging.WARNING, logger="sftbench.data"):
        ex, rep = read_sft_jsonl(f)
    assert len(ex) == 2 and rep.n_bad == 0 and not caplog.records


@pytest.mark.parametrize("text,kind", BROKEN)
def test_strict_raises_naming_file_line_reason(tmp_path, text, kind):
    f = write_lines(tmp_path / "s.jsonl", [rec("q", "a"), "", text, "{also bad"])
    with pytest.raises(DataError) as ei:
        read_sft_jsonl(f, strict=True)
    msg = str(ei.value)
    assert str(f) in msg and "line 3:" in msg
    ex, rep = read_sft_jsonl(f)  # non-strict: same line, counted under its kind
    assert rep.bad[0][0] == 3 and rep.by_kind.get(kind, 0) >= 1


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"{bad\n[1]\n"])
def test_empty_or_all_broken_file_is_an_error(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match="empty.jsonl"):
        read_sft_jsonl(f)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_sft_jsonl(tmp_path / "nope.jsonl")


def test_answer_choice_and_prefix(tmp_path):
    lines = [
        json.dumps({"prompt": "p1", "answers": [{"answer": "low", "score": 1}, {"answer": "high", "score": 5.5},
                                                {"answer": "mid", "score": 3}], "prefix": "A:"}),
        json.dumps({"prompt": "p2", "answers": [{"answer": "first", "score": 2}, {"answer": "second", "score": 2}]}),
        json.dumps({"prompt": "p3", "answers": [{"answer": "x", "score": -1}, {"answer": "y", "score": 0}],
                    "prefix": None}),
        json.dumps({"prompt": "p4", "answer": "plain", "prefix": "Re: "}),
        json.dumps({"prompt": "p5", "answer": "plain2", "prefix": ""}),
        json.dumps({"prompt": "p6", "answers": [{"answer": "", "score": 1}], "prefix": "only prefix"}),
    ]
    ex, rep = read_sft_jsonl(write_lines(tmp_path / "c.jsonl", lines))
    assert ex == [("p1", "A:high"), ("p2", "first"), ("p3", "y"), ("p4", "Re: plain"), ("p5", "plain2"),
                  ("p6", "only prefix")]
    assert rep.n_bad == 0


def test_crlf_and_bom_tolerated(tmp_path):
    f = tmp_path / "crlf.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + rec("q", "a").encode() + b"\r\n" + rec("q2", "a2").encode())  # no final newline
    ex, rep = read_sft_jsonl(f)
    assert ex == [("q", "a"), ("q2", "a2")] and rep.n_lines == 2


# ----------------------------------------------------------------------------------------------------- encoding
def test_encode_layout_and_labels_fake():
    tok = FakeTok()
    e = encode_example(tok, "ab", "cde", seq_len=10)
    assert e["input_ids"] == [1, 97, 98, 5, 99, 100, 101, 9, 6, 6]
    assert e["attention_mask"] == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert e["labels"] == [1, 97, 98, 5, 99, 100, 101, 9, -100, -100]
    m = encode_example(tok, "ab", "cde", seq_len=10, mask_prompt=True)
    assert m["input_ids"] == e["input_ids"] and m["attention_mask"] == e["attention_mask"]
    assert m["labels"] == [-100, -100, -100, -100, 99, 100, 101, 9, -100, -100]
    exact = encode_example(tok, "ab", "cde", seq_len=8)  # fits exactly: no padding
    assert exact["input_ids"] == tok.encode_pair("ab", "cde") and exact["attention_mask"] == [1] * 8
    with pytest.raises(ValueError):
        encode_example(tok, "a", "b", seq_len=2)


def hf_longest_first_loop(a, b, n_remove):
    """transformers 4.26 truncate_sequences, LONGEST_FIRST with a pair, right side (the reference's version)."""
    for _ in range(n_remove):
        if len(a) > len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return a, b


@pytest.mark.parametrize("la,lb,budget,expect", [
    (10, 6, 9, (5, 4)),    # 10,6 -> 9..6 from prompt, then answer 5, prompt 5, answer 4
    (5, 5, 7, (4, 3)),     # tie: the answer (second) loses first
    (5, 5, 9, (5, 4)),
    (3, 20, 10, (3, 7)),   # only the longer one is cut while it stays longer
    (20, 3, 10, (7, 3)),
    (4, 4, 8, (4, 4)),     # fits: untouched
    (7, 0, 3, (3, 0)),
    (2, 2, 0, (0, 0)),
])
def test_truncate_pair_hand_checked(la, lb, budget, expect):
    assert truncate_pair(la, lb, budget) == expect
    a, b = hf_longest_first_loop(list(range(la)), list(range(lb)), max(0, la + lb - budget))
    assert (len(a), len(b)) == expect


def test_truncate_pair_matches_loop_exhaustive():
    for la, lb in itertools.product(range(13), repeat=2):
        for budget in range(0, la + lb + 2):
            a, b = hf_longest_first_loop(list(range(la)), list(range(lb)), max(0, la + lb - budget))
            assert truncate_pair(la, lb, budget) == (len(a), len(b)), (la, lb, budget)


def test_truncate_pair_matches_installed_transformers():
    tp = pytest.importorskip("transformers.tokenization_python")
    fake_self = types.SimpleNamespace(truncation_side="right")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for la, lb, budget in [(10, 6, 9), (5, 5, 7), (3, 20, 10), (20, 3, 10), (9, 8, 4), (600, 40, 509)]:
        ids, pair, _ = tp.PreTrainedTokenizer.truncate_sequences(
            fake_self, list(range(la)), list(range(lb)), num_tokens_to_remove=la + lb - budget,
            truncation_strategy="longest_first")
        assert truncate_pair(la, lb, budget) == (len(ids), len(pair))


def test_encode_truncation_longest_first_fake():
    tok = FakeTok()
    e = encode_example(tok, "abcdefghij", "ABCDEF", seq_len=12)  # 10 + 6 > 12 - 3: keep 5 + 4
    assert e["input_ids"] == [1, *map(ord, "abcde"), 5, *map(ord, "ABCD"), 9]
    assert e["attention_mask"] == [1] * 12 and e["labels"] == e["input_ids"]
    m = encode_example(tok, "abcdefghij", "ABCDEF", seq_len=12, mask_prompt=True)
    assert m["labels"] == [-100] * 7 + [*map(ord, "ABCD"), 9]
    long_answer = encode_example(tok, "hi", "x" * 100, seq_len=16)  # short prompt kept whole
    assert long_answer["input_ids"] == [1, 104, 105, 5] + [120] * 11 + [9]


def _real_tokenizer(name: str):
    """The shipped small model (data/tokenizer), or the real PanGu vocab.model where it exists (else skip)."""
    from sftbench.tokenizer import PanguTokenizer
    if name == "shipped":
        return PanguTokenizer.load(None)
    vocab = real_vocab()
    if vocab is None:
        pytest.skip("real PanGu vocab.model not available (set PANGU_VOCAB)")
    return PanguTokenizer.load(vocab)


# Both cases are collected: the PanGu one reports its skip where its vocab is missing, instead of vanishing.
@pytest.mark.parametrize("name", ["shipped", "pangu"])
def test_encode_with_real_tokenizer(name):
    tok = _real_tokenizer(name)
    assert (tok.bos_id, tok.sep_id, tok.pad_id, tok.eot_id) == (1, 5, 6, 9)
    prompt, answer = "上联：春风得意马蹄疾", "下联：秋月扬辉雁字长"
    p, a = tok.encode(prompt), tok.encode(answer)
    e = encode_example(tok, prompt, answer, seq_len=64)
    n = len(p) + len(a) + 3
    assert e["input_ids"][:n] == tok.encode_pair(prompt, answer)
    assert e["input_ids"][:n] == [1, *p, 5, *a, 9] and e["input_ids"][n:] == [6] * (64 - n)
    assert e["attention_mask"] == [1] * n + [0] * (64 - n)
    assert e["labels"] == e["input_ids"][:n] + [-100] * (64 - n)
    m = encode_example(tok, prompt, answer, seq_len=64, mask_prompt=True)
    assert m["labels"][:len(p) + 2] == [-100] * (len(p) + 2) and m["labels"][len(p) + 2:n] == [*a, 9]
    # truncation: longest first, specials kept
    long_answer = "我们认为这个方法可以有效提高学习效率。" * 40
    la = tok.encode(long_answer)
    t = encode_example(tok, prompt, long_answer, seq_len=48)
    assert t["input_ids"] == [1, *p, 5, *la[:48 - 3 - len(p)], 9] and t["attention_mask"] == [1] * 48
    kp, ka = truncate_pair(len(la), len(la), 45)
    both = encode_example(tok, long_answer, long_answer, seq_len=48)
    assert both["input_ids"] == [1, *la[:kp], 5, *la[:ka], 9] and (kp, ka) == (23, 22)


# -------------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 7, 12, 100])
def test_shards_cover_and_are_disjoint(n, world):
    shards = [ShardedOrder(n, r, world, seed=3).indices(epoch=2) for r in range(world)]
    per = -(-n // world)
    assert all(len(s) == per for s in shards)
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))                       # every sample used
    assert 0 <= len(flat) - n < world                       # fewer than world_size repeats per epoch
    if n % world == 0:
        assert len(set(flat)) == len(flat)                   # disjoint
    else:                                                     # only the wrap-around repeats
        perm = ShardedOrder(n, 0, world, seed=3).permutation(2)
        dup = sorted(i for i in set(flat) if flat.count(i) > 1)
        assert set(dup) <= set(perm[:per * world - n])


def test_order_deterministic_and_depends_on_seed_and_epoch():
    a = ShardedOrder(50, 1, 2, seed=0)
    assert a.indices(0) == ShardedOrder(50, 1, 2, seed=0).indices(0) == a.indices(0)
    assert a.indices(0) != a.indices(1)
    assert a.indices(0) != ShardedOrder(50, 1, 2, seed=1).indices(0)
    assert sorted(a.permutation(5)) == list(range(50))
    # no global RNG involved
    import random
    random.seed(123)
    x = a.indices(3)
    random.seed(456)
    assert a.indices(3) == x


def test_take_runs_epochs_back_to_back():
    o = ShardedOrder(7, 1, 2, seed=4)  # 4 samples per rank and epoch
    assert o.take(0) == []
    assert o.take(3) == o.indices(0)[:3]
    assert o.take(10) == o.indices(0) + o.indices(1) + o.indices(2)[:2]


def test_take_from_a_stream_position_continues_the_job_on_any_number_of_ranks():
    """k steps of p samples a rank leave a job of w ranks at stream position k*p*w; the ranks of any world size
    taking from there get, between them, the next samples of the same epoch's permutation."""
    n, seed = 7, 4
    two = [ShardedOrder(n, r, 2, seed) for r in (0, 1)]  # 8 positions an epoch: sample 0 of the permutation twice
    assert two[1].take(3, start=2 * 2) == two[1].take(5)[2:]  # same world: the rank's own order, 2 in
    perm0, perm1 = two[0].permutation(0), two[0].permutation(1)
    # 3 samples a rank after one step on 2 ranks: 6 of epoch 0 done; one rank goes on with the 7th, then epoch 1
    one = ShardedOrder(n, 0, 1, seed)
    at = one.continue_from(6, world_size=2)
    assert at == 6 and one.take(4, start=at) == [perm0[6], *perm1[:3]]
    # position 7 of the 2-rank stream is its wrap-around (perm0[0] again): a single rank starts epoch 1 instead
    assert one.continue_from(7, world_size=2) == 7 and one.take(2, start=7) == perm1[:2]
    # the other way: 1 rank stopped at 5; two ranks split the rest of epoch 0 and its wrap-around round-robin
    at = two[0].continue_from(5, world_size=1)
    assert at == 5
    assert [o.take(2, start=at) for o in two] == [[perm0[5], perm0[0]], [perm0[6], perm1[0]]]
    # epoch 2 of a 3-rank job (9 positions an epoch) maps to epoch 2 of a 2-rank one (8)
    assert two[0].continue_from(2 * 9 + 4, world_size=3) == 2 * 8 + 4


def test_steps_per_epoch_and_micro_batches():
    assert steps_per_epoch(10000, 1, 1, 8) == 1250
    assert steps_per_epoch(10000, 1, 3, 8) == 417
    assert steps_per_epoch(10000, 2, 8, 8) == 79
    for n, mb, world, ga in itertools.product([1, 5, 17, 100], [1, 2, 3], [1, 2, 3], [1, 4]):
        for r in range(world):
            mbs = ShardedOrder(n, r, world, 0).micro_batches(0, mb)
            assert -(-len(mbs) // ga) == steps_per_epoch(n, mb, world, ga)
            assert all(len(b) == mb for b in mbs[:-1]) and 1 <= len(mbs[-1]) <= mb
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0, 1, 1)
    with pytest.raises(ValueError):
        ShardedOrder(10, 2, 2, 0)


# ------------------------------------------------------------------------------------------------------ cache
def _sample_file(path, n=6):
    lines = [rec(f"prompt {i} " + "p" * (i % 4), f"answer {i} " + "x" * (3 * i), score=i) for i in range(n)]
    lines.insert(2, "{broken")
    return write_lines(path, lines)


def test_cache_build_hit_and_contents(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    tok = FakeTok()
    f = _sample_file(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    s1 = load_or_build_cache(f, tok, 24, cache, local_rank=0)
    assert not s1.cache_hit and s1.n == 6 and s1.read_report.n_bad == 1
    files = list(cache.glob("*.sftcache.pt"))
    assert len(files) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    s2 = load_or_build_cache(f, tok, 24, cache, local_rank=0)
    assert s2.cache_hit and s2.read_report.bad == [(3, s1.read_report.bad[0][1])]
    ex, _ = read_sft_jsonl(f)
    for s in (s1, s2):
        assert s.input_ids.dtype == torch.int64 and s.input_ids.shape == (6, 24)
        for i, (p, a) in enumerate(ex):
            e = encode_example(tok, p, a, 24)
            assert s.input_ids[i].tolist() == e["input_ids"]
            assert s.attention_mask[i].tolist() == e["attention_mask"]
            assert s.labels[i].tolist() == e["labels"]
        assert s.real_tokens == int(s.attention_mask.sum()) and s.pad_tokens == 6 * 24 - s.real_tokens
        b = s.batch([4, 0])
        assert all(v.dtype == torch.int64 and v.shape == (2, 24) for v in b.values())
        assert b["input_ids"][1].tolist() == encode_example(tok, *ex[0], 24)["input_ids"]
    st = s2.token_stats()
    assert st["n_truncated"] == sum(len(p) + len(a) + 3 > 24 for p, a in ex) > 0
    assert st["real_tokens"] + st["pad_tokens"] == 6 * 24
    # mask_prompt is part of the key (another file) and changes the labels
    m = load_or_build_cache(f, tok, 24, cache, mask_prompt=True, local_rank=0)
    assert not m.cache_hit
    assert m.labels[0].tolist() == encode_example(tok, *ex[0], 24, mask_prompt=True)["labels"]
    with pytest.raises(DataError, match="line 3"):  # strict holds on a cache hit too
        load_or_build_cache(f, tok, 24, cache, strict=True, local_rank=0)
    # in-memory mode
    mem = load_or_build_cache(f, tok, 24, None)
    assert mem.cache_path is None and torch.equal(mem.input_ids, s1.input_ids)


def test_cache_rebuilt_on_data_change_tokenizer_change_and_corruption(tmp_path, caplog):
    pytest.importorskip("torch")
    tok = FakeTok()
    f = _sample_file(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    load_or_build_cache(f, tok, 16, cache, local_rank=0)
    (cpath,) = cache.glob("*.sftcache.pt")

    def reload(expect_why, t=tok):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sftbench.data"):
            s = load_or_build_cache(f, t, 16, cache, local_rank=0)
        assert not s.cache_hit
        msgs = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
        assert len(msgs) == 1 and str(cpath) in msgs[0] and expect_why in msgs[0], msgs
        assert load_or_build_cache(f, t, 16, cache, local_rank=0).cache_hit
        return s

    with open(f, "ab") as fh:  # data changed in place -> stale
        fh.write((rec("new", "line") + "\n").encode())
    assert reload("stale").n == 7
    blob = cpath.read_bytes()
    cpath.write_bytes(blob[: len(blob) // 2])  # truncated
    reload("corrupt")
    blob = bytearray(cpath.read_bytes())
    blob[100:400] = bytes(300)  # garbled
    cpath.write_bytes(bytes(blob))
    reload("corrupt")
    import torch  # checksum mismatch: readable, right key and shapes, altered ids
    obj = torch.load(cpath, weights_only=True)
    obj["input_ids"][0, 0] += 1
    torch.save(obj, cpath)
    reload("checksum")
    cpath.write_bytes(b"")
    reload("corrupt")


def test_nonzero_rank_waits_for_rank0(tmp_path):
    pytest.importorskip("torch")
    tok = FakeTok()
    f = _sample_file(tmp_path / "d.jsonl", n=4)
    cache = tmp_path / "cache"
    load_or_build_cache(f, tok, 16, cache, local_rank=0)
    _sample_file(f, n=6)  # the data changes: the cache file now there is stale and rank 1 must not take it
    result = {}

    def rank1():
        result["set"] = load_or_build_cache(f, tok, 16, cache, local_rank=1, timeout_s=30, poll_s=0.02)

    th = threading.Thread(target=rank1)
    th.start()
    time.sleep(0.3)
    assert th.is_alive()
    s0 = load_or_build_cache(f, tok, 16, cache, local_rank=0)
    th.join(10)
    assert not th.is_alive() and result["set"].cache_hit and not s0.cache_hit
    assert result["set"].n == s0.n == 6 and result["set"].read_report.n_bad == 1


def test_nonzero_rank_ignores_stale_file_and_times_out(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    tok = FakeTok()
    f = _sample_file(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    load_or_build_cache(f, tok, 16, cache, local_rank=0)
    with open(f, "ab") as fh:
        fh.write((rec("new", "line") + "\n").encode())
    monkeypatch.setenv("LOCAL_RANK", "2")  # default local_rank comes from the environment
    with pytest.raises(TimeoutError) as ei:
        load_or_build_cache(f, tok, 16, cache, timeout_s=0.3, poll_s=0.05)
    assert str(D.cache_file(f, tok, 16, cache)) in str(ei.value)
    # a broken data file fails at once on every rank
    bad = write_lines(tmp_path / "bad.jsonl", ["{x", "[]"])
    with pytest.raises(DataError, match="bad.jsonl"):
        load_or_build_cache(bad, tok, 16, cache, local_rank=1, timeout_s=30)


# ------------------------------------------------------------------------------------- Alpaca and chat formats
def test_alpaca_and_chat_lines_map_onto_the_pangu_layout(tmp_path):
    p = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"instruction": "Translate", "input": "学而时习之", "output": "To learn"}, ensure_ascii=False),
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                                 {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                                 {"role": "assistant", "content": "A2"}]}),
        json.dumps({"prompt": "p", "answer": "a"}),
    ])
    examples, rep = read_sft_jsonl(p)
    assert examples == [("Translate\n学而时习之", "To learn"), ("Say hi", "hi"), ("Be brief.\nQ1\nA1\nQ2", "A2"),
                        ("p", "a")]
    assert rep.n_bad == 0


@pytest.mark.parametrize("line, kind, reason", [
    ({"instruction": "x", "input": "y"}, "no_answer", "no 'output'"),
    ({"instruction": 3, "output": "y"}, "bad_type", "'instruction' is a int, not a string"),
    ({"instruction": "x", "input": ["y"], "output": "z"}, "bad_type", "'input' is a list, not a string"),
    ({"instruction": " ", "output": "z"}, "empty_text", "empty prompt"),
    ({"messages": "hi"}, "bad_messages", "'messages' is a str, not a list"),
    ({"messages": []}, "bad_messages", "'messages' is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_answer", "the last message is the user's"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "bad_messages",
     'messages[0].role is "bot", not one of system, user, assistant'),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "bad_messages",
     "messages[0].content is missing"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "bad_messages",
     "no user message before the assistant's answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty_text",
     "empty answer"),
])
def test_broken_alpaca_and_chat_lines_are_reported_by_line(tmp_path, caplog, line, kind, reason):
    good = json.dumps({"instruction": "fine", "output": "ok"})
    p = write_lines(tmp_path / "d.jsonl", [good, json.dumps(line), good])
    with caplog.at_level(logging.WARNING, logger="sftbench.data"):
        examples, rep = read_sft_jsonl(p)
    assert len(examples) == 2 and rep.by_kind == {kind: 1} and rep.bad[0][0] == 2 and reason in rep.bad[0][1]
    assert f"{p}: skipped 1 broken line(s) of 3" in caplog.text and "line 2: " in caplog.text
    with pytest.raises(DataError, match=rf"d\.jsonl: line 2: .*{reason[:20]}".replace("[", r"\[")):
        read_sft_jsonl(p, strict=True)


def test_mask_prompt_keeps_only_the_last_answer_of_a_chat(tmp_path):
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
            {"role": "user", "content": "e"}, {"role": "assistant", "content": "fg"}]
    p = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    es = load_or_build_cache(p, FakeTok(), 16, None, mask_prompt=True)
    labels = es.labels[0].tolist()
    assert [t for t in labels if t != D.IGNORE_INDEX] == [ord("f"), ord("g"), FakeTok.eot_id]


def test_holdout_split_and_epoch_end_steps():
    train, held = D.holdout_split(100, 0.05, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert D.holdout_split(100, 0.05, seed=3) == (train, held) and D.holdout_split(100, 0.05, seed=4)[1] != held
    assert D.holdout_split(3, 0.01, seed=0)[1].__len__() == 1
    # 9 samples on 2 ranks: 5 per rank; 2 samples per step per rank -> epochs end in steps 3, 5, 8, 10.
    assert D.epoch_end_steps(9, 2, 2, 10) == [3, 5, 8, 10]
    assert D.steps_for_epochs(2, 9, 2, 2) == 5 and D.steps_for_epochs(0.5, 9, 2, 2) == 2
