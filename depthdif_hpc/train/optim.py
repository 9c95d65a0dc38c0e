"""AdamW and the learning-rate controller (docs/model.md#training: warm-up, ReduceLROnPlateau;
cosine option).

The LR is set by hand on the optimizer's param groups before every optimizer step instead of
through a torch LRScheduler: the same code then works on a plain optimizer, an Accelerate
wrapper and a DeepSpeed ZeRO optimizer (all expose `param_groups`), and its whole state is a
small dict saved with each checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from depthdif_hpc.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over all parameters, PyTorch defaults except weight decay (docs/model.md#training)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach keeps the update to a few kernel launches; trainer.fused_adamw makes it one kernel
    # per parameter group and dtype (CUDA and CPU). Under DeepSpeed this optimizer is the client
    # optimizer that ZeRO steps on its fp32 master partitions, so the option applies there too.
    fused = cfg.trainer.fused_adamw
    return torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay,
                             foreach=None if fused else True, fused=fused or None)


class LRController:
    """lr(step) = warm-up factor x (plateau-reduced base lr) or cosine decay after warm-up."""

    def __init__(self, cfg: Config) -> None:
        s = cfg.scheduler
        self.base_lr = cfg.training.lr
        self.max_steps = cfg.trainer.max_steps
        self.warmup_steps = s.warmup.steps if s.warmup.enabled else 0
        self.start_ratio = s.warmup.start_ratio
        self.cosine = s.cosine.enabled
        self.cosine_min_lr = s.cosine.min_lr
        self.plateau_cfg = s.reduce_on_plateau if s.reduce_on_plateau.enabled else None
        # Plateau state: torch.optim.lr_scheduler.ReduceLROnPlateau's rules with patience and
        # cooldown in optimizer steps instead of calls, so that they mean the same training
        # whatever the validation interval or the number of steps in an epoch (which shrinks as
        # ranks are added).
        self.plateau_lr = self.base_lr
        self.best: float | None = None
        self.best_step: int | None = None  # last improvement or reduction: the patience counts from it
        self.cooldown_until = 0  # no reduction and no bad steps counted before this step

    def lr_at(self, step: int) -> float:
        """LR for the optimizer step that turns `step` completed steps into step + 1."""
        if step < self.warmup_steps:
            r = self.start_ratio
            factor = r + (1.0 - r) * (step + 1) / self.warmup_steps
            return self.plateau_lr * factor
        if self.cosine:
            span = max(1, self.max_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.cosine_min_lr + (self.base_lr - self.cosine_min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.plateau_lr

    def apply(self, optimizer: Any, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _improved(self, value: float) -> bool:
        c = self.plateau_cfg
        assert c is not None and self.best is not None
        if c.mode == "min":
            bound = self.best * (1 - c.threshold) if c.threshold_mode == "rel" else self.best - c.threshold
            return value < bound
        bound = self.best * (1 + c.threshold) if c.threshold_mode == "rel" else self.best + c.threshold
        return value > bound

    def plateau_step(self, value: float, step: int) -> bool:
        """Feed the monitored value of the validation at optimizer step `step`; True when the LR
        was reduced: the value has not improved for more than patience_steps steps."""
        c = self.plateau_cfg
        if c is None or math.isnan(value):
            return False
        if self.best is None or self._improved(value):
            self.best, self.best_step = value, step
        if self.best_step is None or step <= self.cooldown_until:
            self.best_step = step  # a resumed pre-step-count state, or cooling down: count from here
        if step - self.best_step > c.patience_steps:
            new = max(self.plateau_lr * c.factor, c.min_lr)
            self.best_step = step
            self.cooldown_until = step + c.cooldown_steps
            if self.plateau_lr - new > c.eps:
                self.plateau_lr = new
                return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_lr": self.plateau_lr, "best": self.best, "best_step": self.best_step,
                "cooldown_until": self.cooldown_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_lr = float(state["plateau_lr"])
        self.best = None if state["best"] is None else float(state["best"])
        # Checkpoints from before the step count hold validation counts: the patience then
        # counts from the first validation after the resume.
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.cooldown_until = int(state.get("cooldown_until", 0))
