"""Saving a model the user can keep, periodic checkpoints, and resuming a run exactly where it stopped.

A save folder (``--save DIR`` at the end of the run, ``DIR/checkpoint-<step>/`` every ``--save-every`` steps) is
both a transformers model folder and a resumable training state::

    config.json, generation_config.json, model.safetensors    the weights (tied embedding stored once, 16-bit when
                                                              the run trained in 16 bits; ZeRO-3: gathered)
    tokenizer_config.json, chat_template.jinja, vocab.model   PanguHFTokenizer (prompt layout: sftbench/hf_tokenizer)
    engine/                                                   the engine's own state: DeepSpeed's checkpoint (tag
                                                              "state": weights, optimizer, LR schedule, loss scale),
                                                              or plain.pt for --ds none; rng_state_rank<k>.pt
    sftbench_state.json                                       step, data position, run identity: written LAST

``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)`` load it after
``import sftbench``. A folder is complete only when ``sftbench_state.json`` is there, and it is written after every
rank has written its files: a checkpoint is first built in ``DIR/.partial-<name>/`` and renamed into place, so a run
killed while saving leaves a ``.partial-*`` folder that resume never takes (the next save removes it). The final
save replaces ``DIR``'s own files the same way: its old ``sftbench_state.json`` goes first, the new one last.
Rank 0 writes the transformers files and renames; every rank writes its own engine files: the folder must be on a
filesystem all ranks share.

Resume (``--resume PATH``): PATH is a save folder or a ``checkpoint-<step>``; of a folder holding both (its own
state and ``checkpoint-*`` children), the complete one with the highest step is taken. ``resolve`` fails before
anything is built when PATH is missing or holds no complete checkpoint, and names it; ``check_resumable`` refuses a
run whose data order cannot continue the checkpoint's (other world size, batch, accumulation, seed or data).

Signals: with saving on, the first SIGTERM or Ctrl-C only sets a flag; ranks agree on it after each optimizer step
(one tiny all-reduce, outside the timed region), save one last checkpoint and stop; a second signal more than
3 s later stops at once. Without saving, a signal stops the run at once, as before. The signal must reach the ranks:
Ctrl-C and a scheduler's SIGTERM to the job's processes do; a SIGTERM to the ``deepspeed`` runner process alone does
not (on one node it forwards nothing). DeepSpeed's launcher kills ranks 30 s after it forwarded a signal: a save
that takes longer (large models) is cut off and leaves only a ``.partial-*`` folder, never taken for a checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

STATE_FILE = "sftbench_state.json"
ENGINE_DIR = "engine"
DS_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # engine/<this>: DS_TAG's state converted for another number of ranks
UNIVERSAL_DONE = "sftbench_universal.json"  # written last into a finished conversion
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FORMAT = 1
# What must match for the data order of a resumed run to continue the checkpoint's (harness keys).
# Signals this close to the first are the same request: Ctrl-C reaches every process of the terminal's group, and
# DeepSpeed's launcher then sends each rank a SIGTERM of its own.
REPEAT_WINDOW_S = 3.0
# packed_rows: --pack's row count (absent unpacked, so checkpoints written before --pack existed still resume)
ORDER_KEYS = ("world_size", "micro_batch", "grad_accum", "seed", "train_samples", "seq_len", "engine",
              "eval_split", "packed_rows")


class ResumeError(ValueError):
    """A --resume path that cannot be resumed from (names the folder and what is wrong)."""


class SaveTargetError(ValueError):
    """A --save folder that already holds a model or checkpoints this run would replace (names the folder)."""


class Interrupted(Exception):
    """The run was stopped by a signal."""


# ------------------------------------------------------------------------------------------------ finding checkpoints
def read_state(folder: str | os.PathLike) -> dict | None:
    """The folder's ``sftbench_state.json``, or None when the folder is not a complete checkpoint."""
    p = Path(folder) / STATE_FILE
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def resolve(path: str | os.PathLike) -> tuple[Path, dict]:
    """(checkpoint folder, its state) for ``--resume path``: the folder itself or its latest ``checkpoint-<step>``."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"--resume: {p} does not exist")
    if not p.is_dir():
        raise ResumeError(f"--resume: {p} is not a folder")
    found = []
    own = read_state(p)
    if own is not None:
        found.append((own["step"], p, own))
    for child in p.iterdir():
        if CHECKPOINT_RE.match(child.name) and child.is_dir():
            st = read_state(child)
            if st is not None:
                found.append((st["step"], child, st))
    if not found:
        partial = sorted(c.name for c in p.iterdir() if c.name.startswith(".partial-"))
        hint = f" (only unfinished saves: {', '.join(partial)})" if partial else ""
        raise ResumeError(f"--resume: {p} holds no complete checkpoint: no {STATE_FILE} in it or in a "
                          f"checkpoint-<step> folder{hint}")
    step, folder, state = max(found, key=lambda t: (t[0], t[1] == p))
    missing = [name for name, size in state.get("files", {}).items()
               if not (folder / name).is_file() or (folder / name).stat().st_size != size]
    if missing or not state.get("files"):
        raise ResumeError(f"--resume: checkpoint {folder} is incomplete: "
                          + (f"missing or truncated {', '.join(missing[:4])}" if missing else "lists no files")
                          + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    return folder, state


def samples_per_step(identity: dict) -> int:
    """Samples (packed: rows) per optimizer step of the whole job: micro batch x accumulation x ranks."""
    return identity["micro_batch"] * identity["grad_accum"] * identity["world_size"]


def reshards(state: dict, world_size: int) -> bool:
    """Whether resuming ``state`` on ``world_size`` ranks goes through DeepSpeed's universal checkpoint."""
    return state.get("identity", {}).get("world_size") != world_size


def check_reshard(folder: Path, state: dict, world_size: int, micro_batch: int, grad_accum: int) -> None:
    """Refuse, before anything is built, a resume on another number of ranks that cannot continue the run: the
    plain loop (no universal checkpoint), or a step of another size (the step count, the LR schedule and the data
    position all count steps, so a step must take the same samples; names the accumulation that would)."""
    saved = state.get("identity", {})
    old_world = saved.get("world_size")
    if saved.get("engine") != "deepspeed":
        raise ResumeError(f"--resume: {folder} was written by the plain loop (--ds none) on {old_world} rank(s); "
                          f"it resumes only on {old_world} (this run has {world_size})")
    had, has = samples_per_step(saved), micro_batch * grad_accum * world_size
    if had != has:
        fit = had // (micro_batch * world_size) if had % (micro_batch * world_size) == 0 else None
        hint = (f"pass --grad-accum {fit}" if fit else
                f"no accumulation gives {had} with micro batch {micro_batch} on {world_size} ranks")
        raise ResumeError(f"--resume: {folder} took {had} samples per step ({old_world} ranks x micro batch "
                          f"{saved.get('micro_batch')} x accumulation {saved.get('grad_accum')}); this run takes "
                          f"{has} ({world_size} x {micro_batch} x {grad_accum}). A resume on another number of "
                          f"GPUs keeps the step's size: {hint}")


def check_resumable(folder: Path, state: dict, identity: dict, max_steps: int) -> None:
    """Refuse a resume whose data order or step count cannot continue the checkpoint (names key and values). A
    checkpoint of another number of ranks continues when each step takes as many samples (``check_reshard``)."""
    saved = state.get("identity", {})
    reshard = reshards(state, identity["world_size"])
    if reshard:  # the engine's own micro batch and accumulation, read back
        check_reshard(folder, state, identity["world_size"], identity["micro_batch"], identity["grad_accum"])
    for key in ORDER_KEYS:
        if reshard and key in ("world_size", "micro_batch", "grad_accum"):
            continue
        if saved.get(key) != identity.get(key):
            raise ResumeError(f"--resume: {folder} was written with {key} = {saved.get(key)!r}, this run has "
                              f"{identity.get(key)!r}; the data order (and the engine state) can only continue "
                              f"with the same value")
    if state["step"] >= max_steps:
        raise ResumeError(f"--resume: {folder} is at step {state['step']}, and this run stops at step {max_steps} "
                          f"(--max-steps and --epochs count from the start of the first run): nothing to train")


def saved_contents(folder: str | os.PathLike) -> list[str]:
    """What in ``folder`` a save would replace: its own model or state files and its ``checkpoint-<step>``
    folders (names, sorted); empty when the folder is missing or holds none of them."""
    p = Path(folder)
    if not p.is_dir():
        return []
    own = [name for name in (STATE_FILE, "model.safetensors", "config.json", ENGINE_DIR) if (p / name).exists()]
    ckpts = sorted(c.name for c in p.iterdir() if CHECKPOINT_RE.match(c.name) and c.is_dir())
    return own + ckpts


def check_save_target(save: str | None, resume: str | None, overwrite: bool) -> None:
    """Refuse ``--save DIR`` when DIR already holds a model or checkpoints and the run neither continues it
    (``--resume`` DIR or one of its ``checkpoint-<step>`` folders) nor was told ``--overwrite``: a re-run of the same
    command must not replace a trained model. Called before anything is built or trained (the Trainer and
    LLaMA-Factory refuse a non-empty output folder the same way)."""
    if not save or overwrite:
        return
    found = saved_contents(save)
    if not found:
        return
    target = Path(save).resolve()
    if resume:
        r = Path(resume).resolve()
        if r == target or r.parent == target:  # continuing this folder's own run
            return
    shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
    raise SaveTargetError(f"--save: {save} already holds a saved model or checkpoints ({shown}); this run would "
                          f"replace them. Continue that run with --resume {save}, save elsewhere, or pass "
                          "--overwrite to replace them")


# ------------------------------------------------------------------------------------------------ weights
def full_state_dict(module, zero_stage: int | None, rank: int) -> dict | None:
    """Every parameter once (a tied weight under its first name) as CPU tensors on rank 0; None on other ranks.
    Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must call this)."""
    out: dict = {}
    if zero_stage == 3:
        import deepspeed
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().to("cpu", copy=True).contiguous()
    elif rank == 0:
        out = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in module.named_parameters()}
    if rank != 0:
        return None
    for name, b in module.named_buffers():
        if name.rsplit(".", 1)[-1] not in getattr(module, "_non_persistent_buffers_set", set()):
            out[name] = b.detach().to("cpu", copy=True).contiguous()
    return out


def write_model_folder(folder: Path, state_dict: dict, config, tok) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files of ``tok``."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from sftbench.hf_tokenizer import PanguHFTokenizer

    cfg = copy.deepcopy(config)
    cfg.architectures = ["PanguForCausalLM"]
    # The special ids of the tokenizer the model was trained with, in config.json and generation_config.json alike:
    # an answer starts after <s> prompt <sep> and ends at <eot>.
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eot_id, tok.pad_id
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        cfg.dtype = next(iter(dtypes))  # what the weights are stored in; from_pretrained keeps it by default
    cfg.save_pretrained(folder)
    save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # Greedy answers that stop at <eot>. Ids past the tokenizer's vocabulary (the 40,000-row embedding with the
    # shipped small tokenizer) are not listed as suppress_tokens: tens of thousands of ids made a 394 KB file, and
    # training never targets those rows, so their logits only fall.
    gen = GenerationConfig.from_model_config(cfg)
    gen.max_new_tokens = 128
    gen.save_pretrained(folder)
    PanguHFTokenizer(tok.vocab_file, model_max_length=config.max_position_embeddings).save_pretrained(folder)


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    import torch
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import torch
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ------------------------------------------------------------------------------------------------ saving
def barrier() -> None:
    import torch
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Saver:
    """Writes save folders of one run (see the module doc). Every rank makes the same calls in the same order."""

    def __init__(self, root: str | os.PathLike, *, engine, is_deepspeed: bool, zero_stage: int | None,
                 precision: str, config, tok, rank: int, keep: int, say: Callable[[str], None],
                 write_folder: Callable | None = None, overwrite: bool = False):
        self.root = Path(root)
        # The model and tokenizer files: write_folder(folder, state_dict, module, tok) (the model seam's
        # ModelSpec.write_folder); None writes the Pangu-α folder (write_model_folder).
        self.write_folder = write_folder
        self.engine, self.is_deepspeed, self.zero_stage = engine, is_deepspeed, zero_stage
        self.precision, self.config, self.tok = precision, config, tok
        self.rank, self.keep, self.say = rank, keep, say
        self.last_saved_step: int | None = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".partial-*"):  # a save killed part-way: never complete, safe to drop
                _remove(stale)
            if overwrite:  # --overwrite: the old run's state and checkpoints go, so resume never takes one of them
                old = saved_contents(self.root)
                for name in old:
                    _remove(self.root / name)
                if old:
                    say(f"--overwrite: removed {', '.join(old)} from {self.root}")
        barrier()

    def save(self, step: int, state: dict, *, final: bool) -> Path:
        """Write the checkpoint of ``step`` (``final``: into the root folder itself, else checkpoint-<step>)."""
        name = "final" if final else f"checkpoint-{step}"
        partial = self.root / f".partial-{name}"
        if self.rank == 0:
            _remove(partial)
            (partial / ENGINE_DIR).mkdir(parents=True)
        barrier()
        import torch
        eng_dir = partial / ENGINE_DIR
        if self.is_deepspeed:
            self.engine.save_checkpoint(str(eng_dir), tag=DS_TAG)
        elif self.rank == 0:  # the plain engine's state is the same on every rank: one writer
            self.engine.save_checkpoint(str(eng_dir))
        torch.save(rng_state(), eng_dir / f"rng_state_rank{self.rank}.pt")
        sd = full_state_dict(self.engine.module, self.zero_stage, self.rank)
        if self.rank == 0 and self.write_folder is not None:
            self.write_folder(partial, sd, self.engine.module, self.tok)
        elif self.rank == 0:
            write_model_folder(partial, sd, self.config, self.tok)
        barrier()  # every rank's files are written before the state file marks the folder complete
        out = self.root if final else self.root / name
        if self.rank == 0:
            # Every file and its size: resume checks them all (each rank's partition included).
            files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
            full_state = {"format": STATE_FORMAT, "step": step, "zero_stage": self.zero_stage,
                          "precision": self.precision, **state, "files": files}
            _write_json_atomic(partial / STATE_FILE, full_state)
            if final:
                self._publish(partial)
            else:
                _remove(out)
                os.replace(partial, out)
                self._prune()
        barrier()
        self.last_saved_step = step
        return out

    def _publish(self, partial: Path) -> None:
        """Move a finished save into the root folder; the root is incomplete (no state file) while it moves."""
        _remove(self.root / STATE_FILE)
        for item in sorted(partial.iterdir(), key=lambda p: p.name == STATE_FILE):  # the state file last
            target = self.root / item.name
            _remove(target)
            os.replace(item, target)
        partial.rmdir()

    def _prune(self) -> None:
        ckpts = sorted((int(m.group(1)), p) for p in self.root.iterdir()
                       if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())
        for _, p in ckpts[:-self.keep] if self.keep > 0 else []:
            _remove(p)


def universal_dir(folder: Path) -> Path:
    """Where ``make_universal`` writes ``folder``'s engine state as a universal checkpoint."""
    return folder / ENGINE_DIR / UNIVERSAL_TAG


def make_universal(folder: Path, say: Callable[[str], None]) -> Path:
    """``folder``'s DeepSpeed state as a universal checkpoint (DeepSpeed's ``ds_to_universal``: every parameter's
    fp32 weights and optimizer moments whole, which any number of ranks can load), written once beside the state it
    comes from and reused by later resumes. Call on one process (global rank 0), then a barrier; the folder must be
    on a filesystem every rank reads. Nothing the checkpoint holds is changed."""
    out = universal_dir(folder)
    if (out / UNIVERSAL_DONE).is_file():
        say(f"resume: reusing the universal checkpoint {out}")
        return out
    partial = out.with_name(f".partial-{UNIVERSAL_TAG}")
    _remove(partial)
    say(f"resume: converting {folder / ENGINE_DIR / DS_TAG} to a universal checkpoint (another number of ranks)")
    t = time.time()
    # --inject_missing_state: the engine saves no universal_checkpoint_info for a model that sets none (ours)
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(folder / ENGINE_DIR / DS_TAG), "--output_folder", str(partial), "--inject_missing_state",
                        "--num_extract_workers", str(min(4, os.cpu_count() or 1))],
                       capture_output=True, text=True)
    if p.returncode != 0:
        _remove(partial)
        raise ResumeError(f"--resume: DeepSpeed's ds_to_universal could not convert {folder / ENGINE_DIR / DS_TAG} "
                          f"(rc {p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}")
    (partial / UNIVERSAL_DONE).write_text(json.dumps({"from": str(folder / ENGINE_DIR / DS_TAG),
                                                      "seconds": round(time.time() - t, 1)}))
    _remove(out)
    os.replace(partial, out)
    say(f"resume: universal checkpoint written in {time.time() - t:.1f}s: {out}")
    return out


def load_engine_state(engine, folder: Path, *, is_deepspeed: bool, rank: int, universal: bool = False,
                      seed: int = 0) -> None:
    """Restore the engine (weights, optimizer, LR schedule, loss scale) and this rank's RNG from ``folder``;
    ``universal``: from its universal checkpoint (``make_universal``; the engine built with
    ``checkpoint.load_universal``), where a rank the checkpoint did not have draws from a seeded RNG."""
    import torch
    eng_dir = folder / ENGINE_DIR
    if is_deepspeed:
        tag = UNIVERSAL_TAG if universal else DS_TAG
        path, _ = engine.load_checkpoint(str(eng_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:  # DeepSpeed only warns and trains from scratch
            raise ResumeError(f"--resume: DeepSpeed could not load {eng_dir / tag}")
    else:
        engine.load_checkpoint(str(eng_dir))
    rng = eng_dir / f"rng_state_rank{rank}.pt"
    if universal and not rng.is_file():  # dropout only: the data order does not come from this RNG
        torch.manual_seed(seed * 1_000_003 + rank)
        random.seed(seed * 1_000_003 + rank)
        return
    set_rng_state(torch.load(rng, weights_only=False))


# ------------------------------------------------------------------------------------------------ signals
class StopFlag:
    """SIGTERM / SIGINT handling for a run that saves (see the module doc)."""

    def __init__(self, saving: bool):
        self.saving = saving
        self.signum: int | None = None
        self.first_at = 0.0
        signal.signal(signal.SIGTERM, self._handler)
        if saving:
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if not self.saving:
            raise Interrupted(f"terminated by signal {signum}")
        now = time.monotonic()
        if self.signum is not None:
            if now - self.first_at > REPEAT_WINDOW_S:
                raise Interrupted(f"terminated by signal {signum} (a second one: stopped without a checkpoint)")
            return  # the same request arriving twice (Ctrl-C reaches the rank, and the launcher sends SIGTERM)
        self.signum, self.first_at = signum, now
        print(f"signal {signum}: saving a checkpoint after this step, then stopping (again to stop at once)",
              file=sys.stderr, flush=True)

    def agreed(self, device) -> bool:
        """True on every rank when any rank got a signal (a collective: every rank calls it after every step)."""
        if not self.saving:
            return False
        import torch
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
