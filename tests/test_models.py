"""The model seam (sftbench/models): resolution of --model, presets and their published parameter counts, the shape
from config.json alone, the sample layout with and without a chat template, and (slow) 2-rank fine-tunes of tiny
Llama, Qwen2 and GPT-2 folders built here, saved and loaded back with plain transformers outside the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, launch_cmd, read_jsonl, run
from sftbench.models import hf as hfspec
from sftbench.models.resolve import model_shape, resolve
from sftbench.models.spec import ModelError

# Published parameter counts (the models' cards / safetensors totals).
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
             "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_248_023_552}

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 512, "n_positions": 256,
             "bos_token_id": 0, "eos_token_id": 1},
}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '[end]' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")


def make_tokenizer(folder: Path, chat_template: bool = True):
    """A small byte-level BPE fast tokenizer (the tokenizers library), saved with transformers into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "[user]", "[assistant]", "[end]"]
    tok.train_from_iterator(["hello world, the answer is four.", "what is two plus two?"] * 20,
                            trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=TEMPLATE if chat_template else None)
    fast.save_pretrained(folder)
    return fast


def make_folder(tmp: Path, family: str, chat_template: bool = True) -> Path:
    """A random-weight model folder of ``family`` (config, weights, tokenizer), as ``save_pretrained`` writes one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp / f"tiny-{family}"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**TINY[family])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    make_tokenizer(folder, chat_template)
    return folder


# ------------------------------------------------------------------------------------------------ resolution
def test_presets_have_their_published_parameter_counts():
    for name, n in PUBLISHED.items():
        assert model_shape(name)["n_params"] == n, name


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "gpt2-tiny", "qwen2.5-0.5b", "llama-3.2-1b"])
def test_config_arithmetic_matches_the_meta_device_count(name):
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(spec.hf_config())
    assert spec.shape()["n_params"] == spec.count_params(model)


def test_pangu_names_and_folders_stay_pangu(tmp_path):
    assert resolve("pangu-350m").family == "pangu" and resolve("pangu-350m").capabilities == {"pangu_qkv",
                                                                                               "pangu_fuse"}
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"model_type": "gpt_pangu", "hidden_size": 64,
                                                            "num_layers": 2, "num_heads": 4, "vocab_size": 40000}))
    spec = resolve(str(tmp_path / "p"))
    assert (spec.family, spec.source) == ("pangu", "folder")
    assert model_shape("pangu-350m")["n_params"] == 345_368_576  # presets.param_count, unchanged


def test_a_folder_of_any_model_type_resolves_to_the_transformers_spec(tmp_path):
    folder = make_folder(tmp_path, "qwen2")
    spec = resolve(str(folder))
    assert (spec.family, spec.source, spec.random_weights) == ("hf", "folder", False)
    assert spec.shape()["n_params"] == spec.count_params(spec.build())
    assert spec.shape()["n_kv_heads"] == 1 and spec.shape()["gated_mlp"] is True


def test_refusals_name_the_model_and_the_reason(tmp_path):
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({**TINY["llama"], "model_type": "mixtral", "num_local_experts": 8}))
    with pytest.raises(ModelError, match="mixture of experts \\(num_local_experts = 8\\)"):
        resolve(str(moe))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({**TINY["llama"], "model_type": "mymodel",
                                                    "auto_map": {"AutoConfig": "x.MyConfig"}}))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        resolve(str(remote))
    assert resolve(str(remote), trust_remote_code=True).trust_remote_code is True
    with pytest.raises(ModelError, match="longer than llama-tiny's 2048 positions"):
        resolve("llama-tiny").check_seq_len(4096)


def test_a_hub_name_offline_with_nothing_cached_is_a_clear_error(tmp_path):
    code = ("from sftbench.models.resolve import resolve\n"
            "try:\n    resolve('meta-llama/Llama-3.2-1B')\nexcept ValueError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "--model meta-llama/Llama-3.2-1B: not a preset, not a folder, not in the Hub cache" in p.stdout
    assert str(tmp_path / "hf") in p.stdout and "HF_HUB_OFFLINE is set" in p.stdout


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_the_plan_reads_config_json_alone(tmp_path, family):
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY[family]))  # no weights, no tokenizer
    cmd = [sys.executable, "-m", "sftbench.plan", "--model", str(folder), "--gpus", "1", "--gpu-mem", "80",
           "--host-mem", "128", "--configs", "z1,z3", "--micro-batch", "2", "--grad-checkpointing",
           "--seq-len", "128"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"model: {family}, " in p.stdout and "| z3 | 3 |" in p.stdout and "micro batch 2" in p.stdout
    assert "activation checkpointing" in p.stdout


def test_the_8b_plan_on_one_and_eight_gpus():
    from sftbench.plan import Hardware, plan

    one = {r.config: r for r in plan("llama-3.1-8b", Hardware(1, 1, 80e9 / 2**20, 512e9 / 2**20, None))}
    eight = {r.config: r for r in plan("llama-3.1-8b", Hardware(8, 1, 80e9 / 2**20, 512e9 / 2**20, None))}
    assert one["z1"].fits is False and one["z3_offload_param"].fits is True
    assert eight["z1"].fits is True and eight["z3"].gpu_mib < one["z3"].gpu_mib


# ------------------------------------------------------------------------------------------------ memory, FLOPs
def test_gqa_and_the_gated_mlp_change_activations_and_flops():
    from sftbench import memory, metrics

    llama = model_shape("llama-3.2-1b")
    mha = {**llama, "n_kv_heads": llama["n_heads"]}
    run = memory.RunShape("ds_configs/z1.json", 1, "bf16", seq_len=512)
    a_gqa = memory.predict(memory.ModelShape.of(llama), run).gpu["activations"]
    a_mha = memory.predict(memory.ModelShape.of(mha), run).gpu["activations"]
    # 2 (k, v) x (32 - 8) heads x 64 x 2 bytes x 512 tokens x 16 layers fewer saved
    assert a_mha - a_gqa == 2 * 24 * 64 * 2 * 512 * 16
    ckpt = memory.predict(memory.ModelShape.of(llama), memory.RunShape("ds_configs/z1.json", 1, "bf16", seq_len=512,
                                                                     grad_checkpointing=True)).gpu["activations"]
    assert ckpt < a_gqa / 4
    # 6 x (linear weights, the untied-or-tied head counted once) + 12 L q S
    h, i, v, L = 2048, 8192, 128256, 16
    linear = L * (2 * h * h + 2 * h * 512 + 3 * h * i) + v * h
    assert metrics.linear_flops_per_token(llama, 512) == 6 * linear + 12 * L * h * 512


# ------------------------------------------------------------------------------------------------ sample layout
def _pair_ids(tmp_path, chat_template: bool, mask_prompt: bool):
    from sftbench.data import encode_example
    from sftbench.models.hf import HFText

    hf = make_tokenizer(tmp_path / "tok", chat_template)
    tok = HFText(hf)
    ex = encode_example(tok, "what is two plus two?", "four.", seq_len=48, mask_prompt=mask_prompt)
    return hf, tok, ex


def test_the_chat_template_layout_and_mask_prompt(tmp_path):
    hf, tok, ex = _pair_ids(tmp_path, True, mask_prompt=True)
    n = sum(ex["attention_mask"])
    text = hf.decode(ex["input_ids"][:n])
    assert text == "<s>[user]what is two plus two?[end][assistant]four.[end]"
    assert tok.layout.name == "chat_template" and tok.layout.text == ("<s>[user]", "[end][assistant]", "[end]")
    kept = [t for t in ex["labels"] if t != -100]
    assert hf.decode(kept) == "four.[end]"  # only the assistant's answer and its end of turn are in the loss


def test_the_plain_layout_without_a_chat_template(tmp_path):
    hf, tok, ex = _pair_ids(tmp_path, False, mask_prompt=False)
    n = sum(ex["attention_mask"])
    assert tok.layout.name == "plain" and hf.decode(ex["input_ids"][:n]) == "what is two plus two?four.</s>"
    assert [t for t in ex["labels"] if t != -100] == ex["input_ids"][:n]


def test_a_truncated_sample_keeps_the_template_tokens(tmp_path):
    from sftbench.data import encode_example
    from sftbench.models.hf import HFText

    tok = HFText(make_tokenizer(tmp_path / "tok"))
    ex = encode_example(tok, "hello world " * 30, "the answer is four. " * 30, seq_len=32)
    assert sum(ex["attention_mask"]) == 32 and tok.hf.decode(ex["input_ids"][-1:]) == "[end]"
    assert ex["input_ids"][:len(tok.layout.head)] == list(tok.layout.head)


def test_the_shipped_preset_tokenizer_fits_every_preset():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hfspec.PRESET_TOKENIZER)
    smallest = min(model_shape(n)["vocab"] for n in hfspec.preset_names())
    assert len(hf) == 512 <= smallest and hf.chat_template


# ------------------------------------------------------------------------------------------------ 2-rank runs
CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, batch = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
target = batch["labels"][:, 1:]
loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                       reduction="sum") / (target != -100).sum()
ask = tok.apply_chat_template([{"role": "user", "content": "what is two plus two?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ask, max_new_tokens=4, do_sample=False)
print(json.dumps({"loss": loss.item(), "dtype": str(model.dtype), "new": out.shape[1] - ask["input_ids"].shape[1],
                  "sftbench": "sftbench" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family,config,precision", [("llama", "z1", "bf16"), ("qwen2", "z3", "fp32"),
                                                     ("gpt2", "z1", "fp32")])
def test_two_rank_fine_tune_saves_a_plain_transformers_folder(tmp_path, family, config, precision):
    import torch

    from sftbench.data import load_or_build_cache

    folder = make_folder(tmp_path, family)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"what is {i} plus two?", "answer": f"{i + 2}, the answer is."} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                      {"role": "assistant", "content": f"{w} world"}]}) + "\n"
                             for w in ("hello", "the", "four")))
    out, run_dir = tmp_path / "out", tmp_path / "run"
    cmd = launch_cmd(2, "--model", str(folder), "--ds", f"ds_configs/{config}.json", "--precision", precision,
                     "--data", str(data), "--eval-data", str(evals), "--max-steps", "3", "--grad-accum", "1",
                     "--seq-len", "48", "--mask-prompt", "--save", str(out), "--run-dir", str(run_dir),
                     "--cache-dir", str(tmp_path / "cache"), "--lr", "1e-2")
    p = run(cmd, cpu_env(), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta = read_jsonl(run_dir / "rank0.jsonl")[0]
    assert meta["model_weights"] == "pretrained" and meta["model_info"]["family"] == "hf"
    assert meta["sample_layout"]["name"] == "chat_template" and meta["sample_layout"]["mid"] == "[end][assistant]"
    assert meta["optimizations"]["fused_kernels_why"] == ("auto: Liger Kernel's kernels are Triton GPU kernels "
                                                          "(CUDA only)")
    eval_loss = [r for r in read_jsonl(run_dir / "rank0.jsonl") if r["type"] == "eval"][-1]["eval_loss"]

    spec = resolve(str(folder))
    eset = load_or_build_cache(evals, spec.tokenizer(), 48, None, mask_prompt=True)
    torch.save(eset.batch(range(eset.n)), tmp_path / "eval.pt")
    (tmp_path / "elsewhere").mkdir()
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "eval.pt")],
                           cwd=tmp_path / "elsewhere", env={**os.environ, "PYTHONPATH": ""}, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["sftbench"] is False and got["new"] >= 1
    assert got["dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    # the trained engine's eval loss (logged after the last step) from the saved folder with plain transformers
    assert got["loss"] == pytest.approx(eval_loss, rel=1e-2 if precision == "bf16" else 1e-5)


def test_seq_len_within_the_positions_passes_and_beyond_is_refused_naming_both(tmp_path):
    from sftbench.models.resolve import resolve
    from sftbench.models.spec import ModelError

    resolve("pangu-2.6b").check_seq_len(1024)
    with pytest.raises(ModelError, match="--seq-len 4096 is longer than pangu-2.6b's 1024 positions"):
        resolve("pangu-2.6b").check_seq_len(4096)
    folder = tmp_path / "gpt2-like"  # a config that spells the table n_positions
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                    "vocab_size": 100, "n_positions": 256}))
    with pytest.raises(ModelError, match="--seq-len 512 is longer than .*'s 256 positions"):
        resolve(str(folder)).check_seq_len(512)


def test_train_and_plan_refuse_a_seq_len_beyond_the_positions_before_any_work(tmp_path):
    p = run([sys.executable, str(REPO / "train.py"), "--ds", "none", "--model", "pangu-tiny", "--seq-len", "4096",
             "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")], cpu_env())
    assert p.returncode != 0
    assert "error: --seq-len 4096 is longer than pangu-tiny's 1024 positions" in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # before the data is tokenised
    q = subprocess.run([sys.executable, "-m", "sftbench.plan", "--model", "pangu-2.6b", "--gpus", "1", "--gpu-mem",
                        "80", "--host-mem", "64", "--seq-len", "4096"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert q.returncode != 0
    assert "plan: --seq-len 4096 is longer than pangu-2.6b's 1024 positions" in q.stderr
