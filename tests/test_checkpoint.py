"""sftbench.checkpoint: save folders that transformers loads, checkpoints that resume exactly, clear resume errors.

The slow tests are real 2-rank CPU runs of the launcher on a dropout-free tiny model (so a resumed curve can be
compared number for number); the model folders are loaded in a fresh process, outside the repository, from an
installed copy of the package.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, launch_cmd, read_jsonl, run
from sftbench import checkpoint
from sftbench.checkpoint import STATE_FILE, ResumeError

SAMPLE = REPO / "data" / "sample_sft.jsonl"
COMMON = ["--seq-len", "64", "--warmup-steps", "1", "--precision", "fp32", "--seed", "5", "--eval-split", "0.05",
          "--lr", "3e-3", "--grad-accum", "2", "--lr-warmup-steps", "1", "--data", str(SAMPLE)]


# ---------------------------------------------------------------------------------------------- resolve (no engine)
def _fake_checkpoint(folder: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    files = {"engine/x.pt": b"abc"} if files is None else files
    for name, blob in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "files": {n: len(b) for n, b in files.items()}}))
    return folder


def test_resolve_takes_the_latest_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    _fake_checkpoint(tmp_path / "checkpoint-12", 12)
    (tmp_path / "checkpoint-16").mkdir()  # no state file: a save that never finished
    _fake_checkpoint(tmp_path / ".partial-checkpoint-20", 20)  # the folder a save is built in
    folder, state = checkpoint.resolve(tmp_path)
    assert folder == tmp_path / "checkpoint-12" and state["step"] == 12
    assert checkpoint.resolve(tmp_path / "checkpoint-4")[0] == tmp_path / "checkpoint-4"


def test_resolve_names_a_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(ResumeError, match=f"--resume: {tmp_path / 'nope'} does not exist"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / ".partial-checkpoint-3").mkdir()
    with pytest.raises(ResumeError, match=rf"{tmp_path} holds no complete checkpoint.*\.partial-checkpoint-3"):
        checkpoint.resolve(tmp_path)
    ck = _fake_checkpoint(tmp_path / "checkpoint-3", 3, {"engine/a.pt": b"1234", "engine/b.pt": b"12"})
    (ck / "engine" / "b.pt").write_bytes(b"1")  # truncated
    with pytest.raises(ResumeError, match=r"checkpoint-3 is incomplete: missing or truncated engine/b\.pt"):
        checkpoint.resolve(tmp_path)


def test_check_resumable_refuses_another_data_order(tmp_path):
    ident = {"world_size": 2, "micro_batch": 1, "grad_accum": 2, "seed": 5, "train_samples": 9, "seq_len": 64,
             "engine": "deepspeed", "eval_split": 0.0}
    state = {"step": 3, "identity": ident}
    checkpoint.check_resumable(tmp_path, state, dict(ident), max_steps=6)
    with pytest.raises(ResumeError, match="grad_accum = 2, this run has 4"):
        checkpoint.check_resumable(tmp_path, state, {**ident, "grad_accum": 4}, max_steps=6)
    with pytest.raises(ResumeError, match="is at step 3, and this run stops at step 3"):
        checkpoint.check_resumable(tmp_path, state, dict(ident), max_steps=3)


def test_a_resume_on_another_number_of_ranks_keeps_the_step_size(tmp_path):
    """Another world size resumes only through DeepSpeed (universal checkpoint), with as many samples a step."""
    ident = {"world_size": 2, "micro_batch": 1, "grad_accum": 2, "seed": 5, "train_samples": 9, "seq_len": 64,
             "engine": "deepspeed", "eval_split": 0.0}
    state = {"step": 3, "identity": ident}
    assert not checkpoint.reshards(state, 2) and checkpoint.reshards(state, 1)
    checkpoint.check_reshard(tmp_path, state, world_size=1, micro_batch=1, grad_accum=4)
    checkpoint.check_reshard(tmp_path, state, world_size=4, micro_batch=1, grad_accum=1)
    checkpoint.check_resumable(tmp_path, state, {**ident, "world_size": 1, "grad_accum": 4}, max_steps=6)
    with pytest.raises(ResumeError, match=r"took 4 samples per step \(2 ranks x micro batch 1 x accumulation 2\); "
                                          r"this run takes 2 \(1 x 1 x 2\).*pass --grad-accum 4"):
        checkpoint.check_reshard(tmp_path, state, world_size=1, micro_batch=1, grad_accum=2)
    with pytest.raises(ResumeError, match="no accumulation gives 4 with micro batch 1 on 3 ranks"):
        checkpoint.check_reshard(tmp_path, state, world_size=3, micro_batch=1, grad_accum=1)
    with pytest.raises(ResumeError, match="this run takes 2"):  # the engine's read-back values, after it is built
        checkpoint.check_resumable(tmp_path, state, {**ident, "world_size": 1}, max_steps=6)
    plain = {"step": 3, "identity": {**ident, "engine": "torch"}}
    with pytest.raises(ResumeError, match=r"plain loop \(--ds none\) on 2 rank\(s\); it resumes only on 2"):
        checkpoint.check_reshard(tmp_path, plain, world_size=1, micro_batch=1, grad_accum=4)


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A dropout-free tiny checkpoint (the model), and the package installed from a wheel into its own folder."""
    import torch
    from sftbench.pangu import PanguForCausalLM, preset_config

    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(5)
    PanguForCausalLM._from_config(preset_config("pangu-tiny", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
                                  ).save_pretrained(root / "tiny")
    src = root / "src"  # built from a copy: a build in the checkout would leave build/ and *.egg-info there
    shutil.copytree(REPO / "sftbench", src / "sftbench", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "wheel"), str(src)], check=True, capture_output=True)
    wheel = next((root / "wheel").glob("sftbench-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(root / "site"), str(wheel)], check=True, capture_output=True)
    return root


LOADER = r"""
import json, sys
import importlib.metadata
import sftbench  # registers the Pangu classes with the Auto classes
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from sftbench import data as sftdata
from sftbench.tokenizer import PanguTokenizer

folder, data, split, seed, seq_len = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
with open(folder + "/model.safetensors", "rb") as f:  # the file's own header: the dtype each tensor is stored in
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
stored = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
tok = AutoTokenizer.from_pretrained(folder)
model.eval()
# The eval loss the run logged, recomputed from this model's logits on the same held-out rows.
pangu = PanguTokenizer.load(folder)
es = sftdata.load_or_build_cache(data, pangu, seq_len, None)
_, rows = sftdata.holdout_split(es.n, split, seed)
b = es.batch(rows)
labels = b["labels"].masked_fill(b["labels"] == model.config.pad_token_id, -100)
with torch.no_grad():
    logits = model(input_ids=b["input_ids"]).logits
tgt = labels[:, 1:]
loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                       reduction="sum") / (tgt != -100).sum()
prompt, answer = sftdata.read_sft_jsonl(data)[0][rows[0]]
enc = tok(prompt, return_tensors="pt")
out = model.generate(**enc, max_new_tokens=5, do_sample=False)
print(json.dumps({
    "cls": [type(model).__name__, type(tok).__name__], "version": importlib.metadata.version("sftbench"),
    "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
    "eval_loss": loss.item(), "sftbench_file": sftbench.__file__, "dtype": str(model.dtype),
    "stored_dtypes": stored,
    "prompt_ids": enc["input_ids"][0].tolist(), "pair_ids": tok(prompt, answer)["input_ids"],
    "want_prompt_ids": [pangu.bos_id, *pangu.encode(prompt), pangu.sep_id],
    "want_pair_ids": pangu.encode_pair(prompt, answer), "generated": out[0].tolist(),
    "answer": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True),
    "eos": model.generation_config.eos_token_id, "eot": pangu.eot_id,
}))
"""


def load_outside_repo(work: Path, folder: Path) -> dict:
    """Load a saved folder in a fresh interpreter whose working directory and path hold no checkout."""
    env = cpu_env(PYTHONPATH=str(work / "site"))
    p = subprocess.run([sys.executable, "-c", LOADER, str(folder), str(SAMPLE), "0.05", "5", "64"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def records(run_dir: Path, rank: int = 0) -> tuple[dict, list[dict], list[dict], dict]:
    recs = read_jsonl(run_dir / f"rank{rank}.jsonl")
    return (recs[0], [r for r in recs if r["type"] == "step"], [r for r in recs if r["type"] == "eval"], recs[-1])


@pytest.mark.slow
# ZeRO-3 in fp32: tests/test_models.py (qwen2-z3-fp32) saves and reloads it to the logits.
@pytest.mark.parametrize("cfg,precision", [("z1", "fp32"), ("z1", "bf16"), ("z3", "bf16")])
def test_finetune_saves_a_folder_transformers_loads(cfg, precision, tmp_path, work):
    """Fine-tune on the shipped sample with a held-out eval split and flags that override the JSON; the saved
    folder loads outside the repo with no missing key, its weights are stored in the precision the run trained in
    (bf16: the 16-bit save users take on GPUs), its logits give the eval loss the engine logged, generate()
    answers a prompt of the data in the training layout. ZeRO-1 bf16 also saves every step with --save-keep 2:
    only the last two checkpoint folders are left."""
    save = tmp_path / "save"
    run_dir = tmp_path / "run"
    extra = ["--micro-batch", "2"] if cfg == "z3" else []
    keep = cfg == "z1" and precision == "bf16"
    if keep:
        extra += ["--save-every", "1", "--save-keep", "2"]
    common = [a if a != "fp32" else precision for a in COMMON]  # --precision's value
    p = run(launch_cmd(2, "--ds", str(REPO / "ds_configs" / f"{cfg}.json"), "--model", str(work / "tiny"),
                       "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "4",
                       "--save", str(save), *common, *extra), cpu_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta, steps, evals, summary = records(run_dir)
    # The flags are applied to the DeepSpeed config, read back from the engine and logged.
    assert meta["grad_accum"] == 2 and meta["harness"]["grad_accum"] == 2
    assert meta["micro_batch"] == (2 if cfg == "z3" else 1)
    assert meta["ds_config"]["optimizer"]["params"]["lr"] == 3e-3 and meta["lr"] == 3e-3
    assert meta["ds_config"]["scheduler"]["params"]["warmup_num_steps"] == 1
    assert "optimizer.params.lr: 1e-05 -> 0.003 (--lr)" in meta["overrides"]
    assert "override: gradient_accumulation_steps: 8 -> 2 (--grad-accum)" in p.stdout
    assert steps[-1]["lr"] == pytest.approx(3e-3)
    # Evaluation: at the end, the same on both ranks (reduced), not inside the step clock.
    assert [e["step"] for e in evals] == [4] and evals[0]["eval_samples"] == 12
    assert records(run_dir, 1)[2][0]["eval_loss"] == evals[0]["eval_loss"]
    assert summary["status"] == "ok" and summary["eval_loss"] == evals[0]["eval_loss"]
    assert summary["saved"] == {"path": str(save), "step": 4}
    assert (save / "model.safetensors").is_file() and (save / STATE_FILE).is_file()
    assert "model saved to" in p.stdout
    got = load_outside_repo(work, save)
    assert got["cls"] == ["PanguForCausalLM", "PanguHFTokenizer"] and got["version"]
    assert not got["sftbench_file"].startswith(str(REPO))
    assert got["missing"] == [] and got["unexpected"] == [] and got["tied"]
    assert meta["precision"] == precision
    stored, loaded = {"fp32": ("F32", "torch.float32"), "bf16": ("BF16", "torch.bfloat16")}[precision]
    assert got["stored_dtypes"] == [stored] and got["dtype"] == loaded  # from_pretrained keeps the stored dtype
    # The same weights in the same precision: bf16 logits on the CPU give the engine's eval loss to bf16 rounding.
    assert got["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-5 if precision == "fp32" else 2e-3)
    if keep:  # periodic saves after steps 1, 2, 3 (the last step is the final save into the folder itself)
        assert sorted(d.name for d in save.iterdir() if d.name.startswith("checkpoint-")) == [
            "checkpoint-2", "checkpoint-3"]
        assert checkpoint.resolve(save)[1]["step"] == 4 and checkpoint.resolve(save / "checkpoint-3")[1]["step"] == 3
    assert got["prompt_ids"] == got["want_prompt_ids"] and got["pair_ids"] == got["want_pair_ids"]
    assert got["eos"] == got["eot"]
    assert got["generated"][:len(got["prompt_ids"])] == got["prompt_ids"] and len(got["generated"]) > len(
        got["prompt_ids"])


def _until(ready, proc: subprocess.Popen, what: str, timeout: float = 400):
    """Poll ``ready()`` until it returns something truthy (returned), failing when ``proc`` ends first or after
    ``timeout`` s; ``what`` names the awaited event in the failure."""
    deadline = time.time() + timeout
    while not (got := ready()):
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"no {what} in {timeout} s")
        time.sleep(0.2)
    return got


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    _until(path.exists, proc, str(path))


@pytest.mark.slow
def test_a_zero1_run_resumes_on_the_same_curve_on_two_ranks_or_one(tmp_path, work):
    """An uninterrupted 6-step ZeRO-1 run that saved at step 3, resumed from that checkpoint: steps 4-6 give the same
    losses, learning rates and eval loss; the resumed run logs steps 4-6 only and says where it resumed. Then on one
    rank (DeepSpeed's universal checkpoint), and SIGTERM during a resumed run: one last checkpoint, status
    interrupted. (A checkpoint left by a SIGKILLed run: test_killed_recipe_resumes_on_the_recorded_curve.)"""
    base = ["--ds", str(REPO / "ds_configs" / "z1.json"), "--model", str(work / "tiny"),
            "--cache-dir", str(tmp_path / "cache"), *COMMON]
    full_save = tmp_path / "save_full"
    full = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "full"), "--max-steps", "6",
                          "--save", str(full_save), "--save-every", "3"), cpu_env())
    assert full.returncode == 0, full.stderr[-3000:]

    at3 = full_save / "checkpoint-3"
    resumed = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "resumed"), "--max-steps", "6",
                             "--resume", str(at3)), cpu_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from step 3 ({at3})" in resumed.stdout
    _, full_steps, full_evals, _ = records(tmp_path / "full")
    meta, steps, evals, summary = records(tmp_path / "resumed")
    assert meta["resumed_from"] == {"path": str(at3), "step": 3, "world_size": 2, "universal": None}
    assert [s["step"] for s in steps] == [4, 5, 6]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in full_steps[3:]], rel=1e-5)
    assert [s["lr"] for s in steps] == pytest.approx([s["lr"] for s in full_steps[3:]], rel=1e-6)
    assert full_steps[5]["loss"] < full_steps[0]["loss"] - 0.1  # the compared steps did train
    assert evals[-1]["eval_loss"] == pytest.approx(full_evals[-1]["eval_loss"], rel=1e-5)
    assert summary["status"] == "ok" and summary["steps"] == 3

    # The same checkpoint on ONE rank: refused while a step would take half the samples, then, with the
    # accumulation doubled, converted to DeepSpeed's universal checkpoint and continued: each step takes the two
    # ranks' samples, so its loss is the mean of theirs in the uninterrupted run.
    from sftbench.sweep import REFERENCE_LAYOUT  # the layout launch_cmd gives the 2-rank runs
    one = [sys.executable, str(REPO / "train.py"), *REFERENCE_LAYOUT, *base, "--max-steps", "6", "--resume",
           str(at3)]
    p = run([*one, "--run-dir", str(tmp_path / "one_refused")], cpu_env())
    assert p.returncode != 0 and "this run takes 2 (1 x 1 x 2)" in p.stderr and "pass --grad-accum 4" in p.stderr, \
        p.stderr[-2000:]
    p = run([*one, "--run-dir", str(tmp_path / "one"), "--grad-accum", "4"], cpu_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    universal = at3 / "engine" / checkpoint.UNIVERSAL_TAG
    assert f"written on 2 rank(s), on 1 through {universal}" in p.stdout
    meta, steps, _, _ = records(tmp_path / "one")
    assert meta["resumed_from"]["universal"] == str(universal) and meta["resumed_from"]["world_size"] == 2
    full_r1 = records(tmp_path / "full", rank=1)[1]
    assert [s["loss"] for s in steps] == pytest.approx(
        [(a["loss"] + b["loss"]) / 2 for a, b in zip(full_steps[3:], full_r1[3:])], rel=1e-5)
    assert [s["lr"] for s in steps] == pytest.approx([s["lr"] for s in full_steps[3:]], rel=1e-6)

    # SIGTERM to every process of the job (what a scheduler sends): the ranks agree on a step, save it, and stop.
    term_dir, term_save = tmp_path / "term", tmp_path / "save_term"
    proc = subprocess.Popen(launch_cmd(2, *base, "--run-dir", str(term_dir), "--max-steps", "100000",
                                       "--resume", str(at3), "--save", str(term_save), launcher="deepspeed"),
                            env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while not (term_dir / "rank1.jsonl").exists() or (term_dir / "rank1.jsonl").read_text().count(
                '"type": "step"') < 1:
            assert time.time() < deadline and proc.poll() is None, "the resumed run produced no step"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summ = read_jsonl(term_dir / "rank0.jsonl")[-1]
    assert summ["type"] == "summary" and summ["status"] == "interrupted", out[-3000:]
    k = summ["saved"]["step"]
    assert k > 3 and f"after step {k}" in summ["error"]
    folder, state = checkpoint.resolve(term_save)
    assert folder == term_save / f"checkpoint-{k}" and state["step"] == k


@pytest.mark.slow
def test_a_coalesced_run_trains_and_resumes_like_deepspeeds_reduction(tmp_path, work):
    """ZeRO-2 on two ranks, four steps of grad accumulation 2, with the coalesced reduction window
    (--coalesce-reduction on) and with DeepSpeed's reduction per micro-batch (off): the same losses on both ranks
    (rel 1e-5: the same gradients, summed before rather than after the reduction) and the same learning rates, and
    the log and console say which ran. The windowed run's step-2 checkpoint, resumed with the window and without
    it: steps 3-4 give its losses and learning rates (the window keeps no state of its own across steps: the engine
    steps once per step in both). (ZeRO-2 + offload and ZeRO-3: tests/test_speed.py.)"""
    base = ["--ds", str(REPO / "ds_configs" / "z2_5e8.json"), "--model", str(work / "tiny"),
            "--cache-dir", str(tmp_path / "cache"), *COMMON]
    full = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "full"), "--max-steps", "4", "--coalesce-reduction",
                          "on", "--save", str(tmp_path / "save"), "--save-every", "2"), cpu_env())
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-3000:]
    assert re.search(r"gradient reduction +once per step +on: asked for", full.stdout), full.stdout[-3000:]
    per_micro = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / "per_micro"), "--max-steps", "4",
                               "--coalesce-reduction", "off"), cpu_env())
    assert per_micro.returncode == 0, per_micro.stdout[-2000:] + per_micro.stderr[-3000:]
    for rank in (0, 1):
        (on_meta, on, _, _), (off_meta, off, _, _) = records(tmp_path / "full", rank), records(tmp_path / "per_micro",
                                                                                             rank)
        assert (on_meta["optimizations"]["coalesce_reduction"], on_meta["optimizations"]["coalesce_reduction_why"]) \
            == (True, "on: asked for")
        assert (off_meta["optimizations"]["coalesce_reduction"],
                off_meta["optimizations"]["coalesce_reduction_why"]) == (False, "off: asked for")
        assert [s["lr"] for s in on] == [s["lr"] for s in off]
        assert [s["loss"] for s in on] == pytest.approx([s["loss"] for s in off], rel=1e-5), rank
    _, full_steps, _, _ = records(tmp_path / "full")
    assert full_steps[3]["loss"] < full_steps[0]["loss"] - 0.1  # the compared steps did train
    for mode in ("on", "off"):
        resumed = run(launch_cmd(2, *base, "--run-dir", str(tmp_path / mode), "--max-steps", "4",
                                 "--coalesce-reduction", mode, "--resume", str(tmp_path / "save" / "checkpoint-2")),
                      cpu_env())
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        meta, steps, _, summary = records(tmp_path / mode)
        assert meta["optimizations"]["coalesce_reduction"] is (mode == "on")
        assert [s["step"] for s in steps] == [3, 4] and summary["status"] == "ok"
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in full_steps[2:]], rel=1e-5), mode
        assert [s["lr"] for s in steps] == pytest.approx([s["lr"] for s in full_steps[2:]], rel=1e-6), mode


@pytest.mark.slow
def test_missing_resume_folder_fails_before_training(tmp_path):
    """(An incomplete folder takes the same path: test_resolve_names_a_missing_or_incomplete_folder.)"""
    message = f"--resume: {tmp_path / 'nope'} does not exist"
    run_dir = tmp_path / "run"
    p = run([sys.executable, str(REPO / "train.py"), "--ds", str(REPO / "ds_configs" / "z1.json"),
             "--model", "pangu-tiny", "--seq-len", "64", "--max-steps", "2", "--run-dir", str(run_dir),
             "--cache-dir", str(tmp_path / "cache"), "--resume", str(tmp_path / "nope")], cpu_env(), timeout=300)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    recs = read_jsonl(run_dir / "rank0.jsonl")
    assert [r["type"] for r in recs] == ["summary"] and recs[0]["status"] == "error"  # no meta: nothing was built
    assert message in recs[0]["error"]


def _pids_of_ranks(run_dir: Path, ranks: int, proc: subprocess.Popen) -> list[int]:
    """The ranks' process ids from their meta records, once every rank has logged a step."""
    files = [run_dir / f"rank{r}.jsonl" for r in range(ranks)]

    def pids():
        if all(f.exists() and f.read_text().count('"type": "step"') >= 1 for f in files):
            return [read_jsonl(f)[0]["pid"] for f in files]
        return None
    return _until(pids, proc, "step logged by every rank")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2_offload", "z3", "none"])
def test_killed_recipe_resumes_on_the_recorded_curve(name, tmp_path, recipe_run):
    """The recipe (tests/test_recipes.py, the same flags) SIGKILLed after its step-3 checkpoint, then resumed from
    it: steps 4-8 of every rank give the uninterrupted run's losses (rtol 1e-5) and learning rates. Losing the
    optimizer state (Adam's moments, ZeRO-2's offloaded partitions, ZeRO-3's shards), the LR schedule's position or
    the data position would move them. (ZeRO-1, from a checkpoint of a run that went on:
    test_a_zero1_run_resumes_on_the_same_curve_on_two_ranks_or_one.)"""
    from conftest import RECIPES, STEPS, curve, recipe_cmd

    full = recipe_run(name)
    save = tmp_path / "save"
    # --save-keep 0: checkpoint-3 stays whatever the run reached before the kill
    proc = subprocess.Popen(recipe_cmd(name, "--max-steps", str(STEPS), "--run-dir", str(tmp_path / "killed"),
                                       "--cache-dir", str(tmp_path / "cache"), "--save", str(save), "--save-every",
                                       "3", "--save-keep", "0", launcher="deepspeed"),
                            env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(save / "checkpoint-3" / STATE_FILE, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = run(recipe_cmd(name, "--max-steps", str(STEPS), "--run-dir", str(tmp_path / "resumed"),
                             "--cache-dir", str(tmp_path / "cache"), "--resume", str(save / "checkpoint-3")),
                  cpu_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from step 3 ({save / 'checkpoint-3'})" in resumed.stdout
    for rank in range(RECIPES[name][0]):
        full_loss, full_lr = curve(full, rank)
        loss, lr = curve(tmp_path / "resumed", rank)
        assert [s["step"] for s in records(tmp_path / "resumed", rank)[1]] == [4, 5, 6, 7, 8]
        assert loss == pytest.approx(full_loss[3:], rel=1e-5), (name, rank)
        assert lr == pytest.approx(full_lr[3:], rel=1e-6), (name, rank)
    assert full_loss[-1] < full_loss[3] - 0.1  # the compared steps train


@pytest.mark.slow
def test_a_double_sigint_saves_once_and_stops(tmp_path):
    """Ctrl-C pressed twice in quick succession on a 2-rank run that saves (the ranks get SIGINT twice, 0.05 s
    apart: a rank that saved the tiny model may be gone 0.3 s later): the second is the same request, so each rank
    says once that it will save, the ranks agree on a step k, save checkpoint-k once, and stop with status
    interrupted naming the step and how to resume."""
    from conftest import recipe_cmd

    save, run_dir = tmp_path / "save", tmp_path / "run"
    proc = subprocess.Popen(recipe_cmd("z1", "--max-steps", "100000", "--run-dir", str(run_dir), "--cache-dir",
                                       str(tmp_path / "cache"), "--save", str(save), launcher="deepspeed"),
                            env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        pids = _pids_of_ranks(run_dir, 2, proc)
        for _ in range(2):
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert out.count("signal 2: saving a checkpoint after this step, then stopping (again to stop at once)") == 2
    summaries = [read_jsonl(run_dir / f"rank{r}.jsonl")[-1] for r in (0, 1)]
    k = summaries[0]["saved"]["step"]
    for summ in summaries:
        assert summ["type"] == "summary" and summ["status"] == "interrupted", out[-3000:]
        assert summ["saved"] == {"path": str(save), "step": k}
        assert summ["error"] == f"terminated by signal 2 after step {k}; resume with --resume {save}"
    assert sorted(d.name for d in save.iterdir()) == [f"checkpoint-{k}"]  # one save, no .partial- left
    folder, state = checkpoint.resolve(save)
    assert folder == save / f"checkpoint-{k}" and state["step"] == k


# ---------------------------------------------------------------------------------------------- --save's folder
def test_a_save_folder_holding_a_model_is_refused_unless_resumed_or_overwritten(tmp_path):
    from sftbench.checkpoint import SaveTargetError, check_save_target
    save = tmp_path / "out"
    check_save_target(str(save), None, False)  # missing: a fresh folder
    save.mkdir()
    (save / "notes.txt").write_text("mine")
    check_save_target(str(save), None, False)  # holds no model or checkpoint
    _fake_checkpoint(save / "checkpoint-4", 4)
    with pytest.raises(SaveTargetError, match=f"--save: {save} already holds a saved model or checkpoints "
                                              r"\(checkpoint-4\)"):
        check_save_target(str(save), None, False)
    _fake_checkpoint(save, 8)
    with pytest.raises(SaveTargetError, match=r"\(sftbench_state.json, engine, checkpoint-4\)"):
        check_save_target(str(save), None, False)
    check_save_target(str(save), str(save), False)  # continuing its own run
    check_save_target(str(save), str(save / "checkpoint-4"), False)
    check_save_target(str(save), None, True)  # --overwrite
    other = _fake_checkpoint(tmp_path / "other", 2)
    with pytest.raises(SaveTargetError, match="--overwrite"):  # resuming another run's folder into this one
        check_save_target(str(save), str(other), False)


def _plain_run(tmp_path, save: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """One process, --ds none (the cheapest engine): the save-folder rules do not depend on the engine."""
    return run([sys.executable, str(REPO / "train.py"), "--ds", "none", "--model", "pangu-tiny", "--seq-len", "32",
                "--precision", "fp32", "--data", str(SAMPLE), "--cache-dir", str(tmp_path / "cache"),
                "--max-steps", str(steps), "--grad-accum", "1", "--run-dir", str(tmp_path / f"run{steps}{len(extra)}"),
                "--save", str(save), *extra], cpu_env())


def test_a_rerun_into_a_saved_folder_stops_before_training_and_overwrite_replaces_it(tmp_path):
    """The same command twice must not replace an 8-step model with a fresh one: the second run stops before it
    builds anything (no run folder), naming the folder; --overwrite replaces the model and drops the old
    checkpoints, so a later --resume never takes one of them."""
    save = tmp_path / "out"
    first = _plain_run(tmp_path, save, 3, "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.read_state(save)["step"] == 3 and (save / "checkpoint-2").is_dir()
    again = _plain_run(tmp_path, save, 1)
    assert again.returncode != 0
    assert f"error: --save: {save} already holds a saved model or checkpoints" in again.stderr
    assert not (tmp_path / "run10").exists()  # stopped before the run folder, the data and the model
    assert checkpoint.read_state(save)["step"] == 3
    over = _plain_run(tmp_path, save, 1, "--overwrite")
    assert over.returncode == 0, over.stderr[-3000:]
    assert checkpoint.read_state(save)["step"] == 1 and not (save / "checkpoint-2").exists()
    assert f"--overwrite: removed sftbench_state.json, model.safetensors, config.json, engine, checkpoint-2 from " \
           f"{save}" in over.stdout


def test_the_saved_folder_has_a_small_generation_config_with_the_tokenizers_ids(tmp_path):
    """config.json and generation_config.json name the same special ids, the tokenizer's (<s>, <eot>, <pad>), and
    the generation config is a few hundred bytes, not a list of every id past the small tokenizer's vocabulary."""
    import torch
    from sftbench.pangu import build_model
    from sftbench.tokenizer import PanguTokenizer

    torch.manual_seed(0)
    model = build_model("pangu-tiny")
    tok = PanguTokenizer.for_model("pangu-tiny", None)
    sd = checkpoint.full_state_dict(model, None, 0)
    checkpoint.write_model_folder(tmp_path, sd, model.config, tok)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "generation_config.json").stat().st_size < 1024
    assert "suppress_tokens" not in gen and gen["max_new_tokens"] == 128
    ids = (tok.bos_id, tok.eot_id, tok.pad_id)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == ids
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == ids
