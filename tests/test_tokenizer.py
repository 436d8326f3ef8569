"""Tokenizer tests (CPU, a few seconds): sftbench.tokenizer, the shipped model and data/sample_sft.jsonl."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sftbench.tokenizer import SHIPPED_MODEL, PanguTokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_sft.jsonl"


def _real_vocab_path():
    env = os.environ.get("PANGU_VOCAB")
    if env:
        p = Path(env)
        p = p / "vocab.model" if p.is_dir() else p
        return p if p.is_file() else None
    p = ROOT.parent / "shared" / "pangu-vocab" / "vocab.model"
    return p if p.is_file() else None


REAL_VOCAB = _real_vocab_path()
needs_real = pytest.mark.skipif(
    REAL_VOCAB is None,
    reason="real PanGu vocab not found: set PANGU_VOCAB to a vocab.model (or its folder), "
           "or put it at ../shared/pangu-vocab/vocab.model next to the repository")

PANGU_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "sep_id": 5, "pad_id": 6, "eot_id": 9}
SPECIALS = ["<s>", "</s>", "<unk>", "<sep>", "<pad>", "<eot>"]

# NFKC-stable text (ASCII punctuation, 。、 and common CJK), so decode(encode(x)) == x for both models.
ROUND_TRIP = [
    "今天天气很好, 我们去公园散步吧。",
    "Hello world! This is a test.",
    "混合 mixed 文本 with  two spaces and\nnewlines\n\n两个换行。",
    "  leading and trailing spaces  ",
    "\n开头是换行, 结尾也是\n",
    "数字 3.1415 和 2024年, 还有 email: test@example.com",
    "上联: 春风送暖千山绿\n下联: 细雨催耕万户忙",
    "def f(x):\n    return x * 2  # 缩进四个空格",
    "学而时习之, 不亦说乎?",
]


@pytest.fixture(scope="module")
def shipped():
    return PanguTokenizer.load(None)


@pytest.fixture(scope="module")
def real():
    return PanguTokenizer.load(REAL_VOCAB)


def _params():
    return [pytest.param("shipped", id="shipped"), pytest.param("real", id="real", marks=needs_real)]


@pytest.fixture(params=_params())
def tok(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text


def test_nfkc_normalization(tok):
    # inherited from the original: SentencePiece's nmt_nfkc normalizer runs, so full-width forms come back
    # as their ASCII forms, while 。 and CJK text are unchanged
    assert tok.decode(tok.encode("你好，世界！（ＡＢＣ）。")) == "你好,世界!(ABC)。"


def test_round_trip_unseen_characters_shipped(shipped):
    text = "罕见字: 𠀀, 饕餮, emoji 😀 and Ω"
    ids = shipped.encode(text)
    assert shipped.unk_id not in ids  # byte fallback
    assert shipped.decode(ids) == text


def test_space_and_newline_pieces(tok):
    assert tok.id_to_piece(4) == "\u2582" and tok.id_to_piece(3) == "\u2583"
    assert 4 in tok.encode("a b") and 3 in tok.encode("a\nb")


@pytest.mark.parametrize("special", SPECIALS)
def test_special_tokens_are_one_id(tok, special):
    sid = tok.special_ids[special]
    assert tok.encode(special) == [sid]
    left, right = "前面的文字 text", "后面的文字"
    ids = tok.encode(left + special + right)
    assert ids.count(sid) == 1
    assert ids == tok.encode(left) + [sid] + tok.encode(right)
    assert tok.decode(ids, skip_special=False) == left + special + right
    assert tok.decode(ids) == left + right


def test_adjacent_specials(tok):
    ids = tok.encode("<s><sep><eot>问<pad><pad>")
    assert ids[:3] == [tok.bos_id, tok.sep_id, tok.eot_id]
    assert ids[-2:] == [tok.pad_id, tok.pad_id]


def test_encode_pair_layout(tok):
    for prompt, answer in [("上联: 山高云作伴", "水远月为邻"), ("What is 2+2?", "4"), ("", ""),
                           ("多行\n问题", "answer with  spaces\n")]:
        ids = tok.encode_pair(prompt, answer)
        assert ids == [tok.bos_id] + tok.encode(prompt) + [tok.sep_id] + tok.encode(answer) + [tok.eot_id]
        assert tok.decode(ids) == prompt + answer


def test_decode_accepts_sequences(tok):
    ids = tok.encode("数组 array")
    assert tok.decode(tuple(ids)) == "数组 array"
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "数组 array"


def test_pickle_round_trip(shipped):
    clone = pickle.loads(pickle.dumps(shipped))
    text = "序列化 pickle <sep> 测试"
    assert clone.encode(text) == shipped.encode(text)
    assert clone.fingerprint == shipped.fingerprint


# ------------------------------------------------------------------------------------------- special ids
@needs_real
def test_real_vocab_ids(real):
    assert real.vocab_size == 40000
    assert {k: getattr(real, k) for k in PANGU_IDS} == PANGU_IDS


def test_shipped_model_ids(shipped):
    assert {k: getattr(shipped, k) for k in PANGU_IDS} == PANGU_IDS
    assert [shipped.id_to_piece(i) for i in range(10)] == [
        "<unk>", "<s>", "</s>", "\u2583", "\u2582", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>"]
    assert 1000 <= shipped.vocab_size <= 40000


@needs_real
def test_shipped_mirrors_real_layout(shipped, real):
    assert [shipped.id_to_piece(i) for i in range(10)] == [real.id_to_piece(i) for i in range(10)]
    assert shipped.special_ids == real.special_ids


def test_fingerprint_is_sha256_of_file(shipped):
    assert shipped.fingerprint == hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest()
    assert PanguTokenizer(SHIPPED_MODEL).fingerprint == shipped.fingerprint
    assert PanguTokenizer.load(SHIPPED_MODEL.parent).fingerprint == shipped.fingerprint


# -------------------------------------------------------------------------------------------- loading
def test_missing_folder_named(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PanguTokenizer.load(missing)


def test_folder_without_vocab_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*vocab.model"):
        PanguTokenizer.load(tmp_path)


def test_missing_file_named(tmp_path):
    missing = tmp_path / "vocab.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PanguTokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PanguTokenizer(missing)


def test_not_a_model(tmp_path):
    bad = tmp_path / "vocab.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="vocab.model"):
        PanguTokenizer.load(tmp_path)


def test_jieba_is_quiet(tmp_path):
    # fresh process, empty temp dir: jieba must build its dictionary cache without printing anything
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    code = "from sftbench.tokenizer import PanguTokenizer; print(PanguTokenizer.load(None).encode('结巴分词'))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


# ------------------------------------------------------------------------------------- shipped artefacts
@pytest.mark.slow  # retrains the tokenizer
def test_train_tokenizer_reproduces_shipped_model(tmp_path):
    out = tmp_path / "spm.model"
    res = subprocess.run([sys.executable, str(ROOT / "data" / "train_tokenizer.py"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_bytes() == SHIPPED_MODEL.read_bytes(), (
        "data/train_tokenizer.py no longer reproduces data/tokenizer/spm.model byte-for-byte "
        "(changed sample data, or other sentencepiece/jieba versions): retrain and commit the model")


def test_sample_file(shipped):
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 200
    zh = en = plain = multi = long_ = 0
    for n, line in enumerate(lines, 1):
        rec = json.loads(line)
        assert isinstance(rec.get("prompt"), str) and rec["prompt"].strip(), f"line {n}"
        if "answers" in rec:
            assert rec["answers"], f"line {n}"
            for a in rec["answers"]:
                assert isinstance(a["answer"], str) and a["answer"].strip(), f"line {n}"
                assert isinstance(a["score"], (int, float)), f"line {n}"
            assert isinstance(rec.get("prefix", ""), str), f"line {n}"
            multi += len(rec["answers"]) > 1
            answer = rec["answers"][0]["answer"]
        else:
            assert isinstance(rec.get("answer"), str), f"line {n}"
            plain += 1
            answer = rec["answer"]
        text = rec["prompt"] + answer
        if re.search(r"[\u4e00-\u9fff]", text):
            zh += 1
        else:
            en += 1
        long_ += len(shipped.encode_pair(rec["prompt"], answer)) > 512
    assert zh >= 100 and en >= 30
    assert plain >= 5 and multi >= 20 and long_ >= 3


def test_for_model_picks_the_checkpoint_vocab(tmp_path):
    import shutil
    from sftbench.tokenizer import PanguTokenizer
    shipped = PanguTokenizer.load(None)
    assert PanguTokenizer.for_model("pangu-350m").fingerprint == shipped.fingerprint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert PanguTokenizer.for_model(str(ckpt)).fingerprint == shipped.fingerprint  # folder without a vocab
    shutil.copy(shipped.vocab_file, ckpt / "vocab.model")
    assert PanguTokenizer.for_model(str(ckpt)).vocab_file == str(ckpt / "vocab.model")
    assert PanguTokenizer.for_model(str(ckpt), shipped.vocab_file).vocab_file == shipped.vocab_file
