"""Exponential moving average of the weights that works on sharded (ZeRO) parameters.

Each rank averages only the part of every parameter that it owns, so the update needs no
communication. What a rank averages:

* DDP, or DeepSpeed in fp32: the whole working tensor (replicated; ZeRO-1/2 copy the fp32
  master into it after every step, so it is the master).
* ZeRO-3 in fp32: its flat partition `param.ds_tensor`.
* DeepSpeed in bf16: the fp32 master, never the bf16 working copy (its rounding: bf16 keeps 8
  mantissa bits, so an Adam update of 1e-4 relative to a weight is lost in the working copy but
  kept in the master). ZeRO-3: the fp32 partition of the parameter in the optimizer's flat group
  (the same size as `ds_tensor`). ZeRO-1/2 and BF16_Optimizer: the fragment of the parameter that
  lies in this rank's fp32 flat partition (DeepSpeed's `_hp_mapping`; empty where the parameter
  lies wholly in other ranks' partitions); the fragments of a parameter, in rank order, are the
  parameter.

Why per-rank pieces and not the full fp32 master each step: for N parameters, gathering the
master every step would move 4N bytes to each rank per step (twice ZeRO-1/2's own bf16 weight
all-gather of 2N) and keep a full 4N-byte EMA on every rank; the pieces cost nothing per step
and 4N/world bytes per rank. Full EMA weights are assembled only when needed (validation,
checkpoints, export): one all-gather (ZeRO-3) or all-reduce (fragments) of 4N bytes.

Rule (checked against a hand-computed average in the trainer tests): after optimizer step `s`
(1-based), if s <= start_step the EMA is a copy of the weights; otherwise, when
(s - start_step) % update_every == 0, ema <- d * ema + (1 - d) * w with d = decay, or with
`warmup` d = min(decay, (1 + n) / (10 + n)), n = s - start_step. The warm-up (the rule of
TensorFlow's ExponentialMovingAverage with num_updates) matters at decay 0.9999: without it the
average still holds ~37% of the random initialisation after 10k steps, and a plateau scheduler
watching the EMA's validation loss sees no progress. The average is kept in fp32 whatever the
training dtype; only steps the optimizer applied are averaged in.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

WHOLE, PARTITION, FRAGMENT = "whole", "partition", "fragment"


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def has_fp32_master(p: torch.Tensor) -> bool:
    """True when DeepSpeed keeps an fp32 master of p apart from a reduced-precision working copy."""
    working = p.ds_tensor if is_zero3_param(p) else p
    return working.dtype != torch.float32 and (hasattr(p, "_z3_optimizer") or hasattr(p, "_hp_mapping"))


def local_view(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank averages for parameter p (see the module docstring)."""
    if has_fp32_master(p):
        if is_zero3_param(p):
            opt = p._z3_optimizer
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)
        if p._hp_mapping is None:  # p lies wholly in other ranks' partitions
            return torch.empty(0, dtype=torch.float32, device=p.device)
        return p._hp_mapping.hp_fragment
    return p.ds_tensor if is_zero3_param(p) else p.data


def layout_of(p: torch.Tensor) -> str:
    if is_zero3_param(p):
        return PARTITION
    return FRAGMENT if has_fp32_master(p) else WHOLE


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape)


class ShardedEMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float,
                 start_step: int = 0, update_every: int = 1, warmup: bool = False) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.start_step = start_step
        self.update_every = update_every
        self.warmup = warmup
        self.layouts = [layout_of(p) for p in self.params]
        # Per-rank files in checkpoints (merged in rank order by checkpoint.weights)
        self.sharded = any(k != WHOLE for k in self.layouts)
        self.shadow = [local_view(p).detach().float().to(p.device).clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        n = step - self.start_step
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based count of completed steps)."""
        # Resolved at every update: a checkpoint load may re-link DeepSpeed's fragment views.
        views = [local_view(p).float().to(s.device) for p, s in zip(self.params, self.shadow, strict=True)]
        if step <= self.start_step:
            torch._foreach_copy_(self.shadow, views)
        elif (step - self.start_step) % self.update_every == 0:
            # lerp: ema + (1 - decay) * (w - ema), one fused launch per tensor group
            torch._foreach_lerp_(self.shadow, views, 1.0 - self.decay_at(step))

    # ------------------------------------------------------------------ full weights

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors on every rank (a collective when sharded)."""
        if not self.sharded:
            return {n: s for n, s in zip(self.names, self.shadow, strict=True)}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        out: dict[str, torch.Tensor] = {}
        for name, p, s, kind in zip(self.names, self.params, self.shadow, self.layouts, strict=True):
            if kind == PARTITION:
                parts = [s.contiguous()]
                if world > 1:
                    parts = [torch.empty_like(s) for _ in range(world)]
                    dist.all_gather(parts, s.contiguous())
                out[name] = torch.cat(parts)[: p.ds_numel].view(full_shape(p)).clone()
            elif kind == WHOLE:
                out[name] = s
        frags = [(n, p, s) for n, p, s, k in zip(self.names, self.params, self.shadow, self.layouts, strict=True)
                 if k == FRAGMENT]
        if frags:
            # Fragments differ in size per rank: each rank writes its own into a zero buffer of
            # all fragment-held parameters and one sum assembles them (x + 0 is exact).
            sizes = [p.numel() for _, p, _ in frags]
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=frags[0][2].device)
            offset = 0
            for (_, p, s), size in zip(frags, sizes, strict=True):
                if s.numel():
                    start = p._hp_mapping.lp_fragment_address.start
                    flat.narrow(0, offset + start, s.numel()).copy_(s)
                offset += size
            if world > 1:
                dist.all_reduce(flat, group=getattr(frags[0][1], "_dp_group", None))
            for (name, p, _), piece in zip(frags, flat.split(sizes), strict=True):
                out[name] = piece.view(full_shape(p)).clone()
        return {n: out[n] for n in self.names}

    @torch.no_grad()
    def load_full_state(self, full: dict[str, torch.Tensor]) -> None:
        """Set the average from full tensors (e.g. merged from the per-rank files of a checkpoint
        written at another world size): each rank keeps the piece it averages."""
        for name, p, s, kind in zip(self.names, self.params, self.shadow, self.layouts, strict=True):
            if name not in full:
                raise KeyError(f"full EMA state lacks {name}")
            src = full[name].reshape(-1).to(s.device, torch.float32)
            if src.numel() != math.prod(full_shape(p)):
                raise ValueError(f"EMA tensor {name}: {src.numel()} values, the parameter has "
                                 f"shape {full_shape(p)}")
            if kind == WHOLE:
                s.copy_(src.view_as(s))
            elif kind == FRAGMENT:
                if s.numel():
                    s.copy_(src.narrow(0, p._hp_mapping.lp_fragment_address.start, s.numel()))
            else:  # ZeRO-3: rank r holds [r * n, (r + 1) * n) of the padded flat parameter
                rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
                piece = src[rank * s.numel():(rank + 1) * s.numel()]
                s.zero_()
                s[:piece.numel()].copy_(piece)

    # ------------------------------------------------------------------ checkpoint

    def local_state(self) -> dict[str, torch.Tensor]:
        """What this rank saves: full tensors (replicated case), its ZeRO-3 partitions or its
        fp32 fragments (empty where it holds none): in rank order they make each parameter."""
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow, strict=True)}

    def shard_metadata(self) -> dict[str, str]:
        return {n: ",".join(map(str, full_shape(p))) for n, p in zip(self.names, self.params, strict=True)}

    @torch.no_grad()
    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, s in zip(self.names, self.shadow, strict=True):
            src = state[n]
            if src.shape != s.shape:
                raise ValueError(f"EMA tensor {n}: checkpoint shape {tuple(src.shape)} != this run's "
                                 f"{tuple(s.shape)} (different world size under ZeRO?)")
            s.copy_(src.to(s.device, s.dtype))
