"""The `--ds none` baseline: a plain PyTorch training step behind the same three calls as a DeepSpeed engine.

``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``: so train.py has one loop for both. This is what
the reference's "no DeepSpeed" rows ran: torch AdamW (fused on GPU), autocast for fp16/bf16 with fp32 weights, a
GradScaler for fp16, DDP when there are several ranks, gradient accumulation, clipping and a linear LR warm-up.
"""
from __future__ import annotations

import contextlib

import torch

from sftbench.schedule import lr_factor


def param_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Decay matrices, not biases or LayerNorm weights (what the Trainer the reference used does).
    weight_decay None leaves the decay group's value to the optimizer's config."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "ln" in name.split(".")[-2] else decay).append(p)
    g = {"params": decay}
    if weight_decay is not None:
        g["weight_decay"] = weight_decay
    return [g, {"params": no_decay, "weight_decay": 0.0}]


class PlainEngine:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, precision: str, grad_accum: int,
                 micro_batch: int, lr: float, lr_warmup_steps: int, world_size: int, clip: float = 1.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.01, lr_schedule: str = "config",
                 total_steps: int | None = None):
        self.device, self.precision, self.clip = device, precision, clip
        self._ga, self._mb = grad_accum, micro_batch
        self.module = model
        if world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.module, weight_decay), lr=lr, betas=betas, eps=eps,
                                           fused=fused)
        # --lr-schedule in DeepSpeed's shapes (sftbench.schedule; 'config' = the reference's warm-up, then constant);
        # 'auto' is cosine here: the plain loop has no config schedule that decays
        kind = "cosine" if lr_schedule == "auto" else lr_schedule
        total = total_steps or 1
        self.lr_schedule = kind
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(kind, s, lr_warmup_steps, total))
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0

    def gradient_accumulation_steps(self) -> int:
        return self._ga

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._mb

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self._ga == 0

    def train(self) -> None:
        self.model.train()

    def __call__(self, **batch):
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        # DDP all-reduces on every backward unless told otherwise: only the boundary micro-batch syncs.
        sync = (contextlib.nullcontext() if self.is_gradient_accumulation_boundary()
                or not hasattr(self.model, "no_sync") else self.model.no_sync())
        self._sync_ctx = sync
        sync.__enter__()
        with ctx:
            return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self._ga
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self._sync_ctx.__exit__(None, None, None)

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # GradScaler skips the optimizer step on overflow and lowers the scale.
            if self.scaler.get_scale() < scale:
                self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    def save_checkpoint(self, path: str) -> None:
        import os
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "global_steps": self.global_steps,
                    "scaler": self.scaler.state_dict() if self.scaler else None}, os.path.join(path, "plain.pt"))

    def load_checkpoint(self, path: str) -> None:
        import os
        f = os.path.join(path, "plain.pt")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--resume: {f} not found (was the checkpoint written by a --ds none run?)")
        st = torch.load(f, map_location=self.device)
        self.module.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.global_steps = st["global_steps"]
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
