"""What a checkpoint holds of a training run, and putting it back: model and optimizer (DDP files
or DeepSpeed's engine folder), EMA (whole or per-rank ZeRO-3 partitions), every rank's RNG states
and data-stream position, and the loop's progress and LR controller.

The file names and the atomic publication belong to `depthdif_hpc.checkpoint.layout`; this module
decides what goes into them. Saving and loading are collective: every rank calls them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.checkpoint.weights import checkpoint_weights, load_model_weights
from depthdif_hpc.config import Config, ConfigError, to_dict
from depthdif_hpc.train.ema import ShardedEMA
from depthdif_hpc.train.optim import LRController
from depthdif_hpc.train.stream import DataStream

log = logging.getLogger("depthdif_hpc.train")


class CheckpointSpaceError(OSError):
    """The checkpoint folder's file system lacks the space for the next save."""


@dataclass
class Progress:
    """Where the loop is; saved in trainer_state.json."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0


def find_resume(cfg: Config, ckpt_root: Path, *, is_main: bool, world: int, group: Any) -> Path | None:
    """The checkpoint to resume from (`trainer.resume`), decided on rank 0 and broadcast; a
    refusal is raised on every rank, so that none is left waiting in a collective."""
    mode = cfg.trainer.resume
    path: Path | None = None
    refusal: str | None = None
    if is_main:
        layout.remove_stale_temporaries(ckpt_root)
        if mode == "auto":
            path = layout.latest_complete(ckpt_root, warn=log.warning)
        elif mode not in ("none", "", None):
            path = Path(mode)
            why = layout.check_complete(path)
            if why is not None:
                refusal = f"trainer.resume = {mode!r}: cannot use this checkpoint: {why}"
        elif steps := [s for s, _ in layout.list_checkpoints(ckpt_root)]:
            # A new run among an old run's checkpoints would see its own pruned (the newest by
            # step number are the old ones) and its first requeue (resume=auto) would continue
            # the old run under the new config.
            refusal = (f"trainer.resume = {mode!r} but the run folder {ckpt_root.parent} already holds "
                       f"checkpoints (steps {steps[0]}..{steps[-1]}): continue it with "
                       "trainer.resume=auto, or start the new run in another trainer.run_dir")
    obj = [str(path) if path else None, refusal]
    if world > 1:
        dist.broadcast_object_list(obj, src=0, group=group)
    if obj[1] is not None:
        raise ConfigError(obj[1])
    return Path(obj[0]) if obj[0] else None


class TrainState:
    """Saves and restores everything a bit-exact resume needs, for one rank."""

    def __init__(self, cfg: Config, ckpt_root: Path, *, accelerator: Any, rank: int, world: int,
                 zero_stage: int, module: torch.nn.Module, engine: Any, optimizer: Any,
                 ema: ShardedEMA | None, generator: torch.Generator, lr_ctl: LRController,
                 group: Any = None) -> None:
        self.cfg, self.ckpt_root, self.acc, self.group = cfg, ckpt_root, accelerator, group
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.zero_stage = zero_stage
        self.module, self.engine, self.optimizer = module, engine, optimizer
        self.ema, self.gen, self.lr_ctl = ema, generator, lr_ctl
        self.device = generator.device

    def _ema_file(self) -> str:
        assert self.ema is not None
        return layout.ema_shard_name(self.rank) if self.ema.sharded else layout.EMA

    # ------------------------------------------------------------------ load

    def load(self, path: Path, progress: Progress, stream: DataStream) -> dict:
        """Restore every rank's state from `path`; returns its manifest."""
        man = layout.read_manifest(path)
        mine = {"distributed": self.cfg.trainer.distributed, "zero_stage": self.zero_stage}
        for key, value in mine.items():
            if man.get(key) != value:
                raise ConfigError(
                    f"checkpoint {path} was written with {key} = {man.get(key)}, this run has {key} = "
                    f"{value}: the optimizer state is laid out differently. "
                    "Start a new run_dir with model.load_checkpoint=<that checkpoint> to warm start instead.")
        saved_world = int(man.get("world_size", self.world))
        state = json.loads((path / layout.TRAINER_STATE).read_text())
        from safetensors.torch import load_file

        if self.engine is not None:
            self._load_deepspeed(path, saved_world)
        else:
            load_model_weights(self.module, load_file(str(path / layout.MODEL)), str(path))
            self.optimizer.load_state_dict(torch.load(path / layout.OPTIMIZER, map_location="cpu",
                                                      weights_only=False))
        if self.ema is not None and saved_world != self.world and self.ema.sharded:
            self._load_ema_resharded(path)
        elif self.ema is not None:
            f = path / self._ema_file()
            if f.exists():
                self.ema.load_local_state(load_file(str(f)))
            else:
                log.warning(f"{path} has no EMA state ({f.name}); EMA restarts from the current weights")
                self.ema.update(0)
        progress.step = int(state["step"])
        progress.epoch = int(state["epoch"])
        progress.samples_seen = int(state.get("samples_seen", 0))
        self.lr_ctl.load_state_dict(state["lr_controller"])
        stream.set_epoch(progress.epoch)
        if saved_world != self.world:
            self._load_other_world(path, saved_world, progress, stream)
            return man
        rank_state = torch.load(path / layout.rank_state_name(self.rank), map_location="cpu",
                                weights_only=False)
        random.setstate(rank_state["python_rng"])
        np.random.set_state(rank_state["numpy_rng"])
        torch.set_rng_state(rank_state["torch_rng"])
        if torch.cuda.is_available() and rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)
        self.gen.set_state(rank_state["loss_generator"].to(self.gen.get_state().device))
        stream.load_state_dict(rank_state["data"])
        log.info(f"resumed from {path}: step {progress.step}, epoch {progress.epoch}")
        return man

    def _load_other_world(self, path: Path, saved_world: int, progress: Progress, stream: DataStream) -> None:
        """The per-rank part of a resume at another world size (the model, optimizer, EMA and LR
        controller were already loaded: without ZeRO they do not depend on the world size, under
        ZeRO they came through the universal checkpoint and the re-cut EMA).

        The data stream continues the saved epoch with the samples no saved rank consumed, dealt
        over the new ranks. The per-rank random streams cannot continue (there is no saved
        stream for a new rank, nor a new rank for every saved one): every rank reseeds from
        (training seed, step, rank), so the run is reproducible but not the one that would have
        run at either world size."""
        datas = []
        for r in range(saved_world):
            f = path / layout.rank_state_name(r)
            if not f.is_file():
                raise FileNotFoundError(f"checkpoint {path} lacks {f.name}: the stream positions of all "
                                        f"{saved_world} saved ranks are needed to resume at another world size")
            datas.append(torch.load(f, map_location="cpu", weights_only=False)["data"])
        if not hasattr(stream, "load_layout_states"):
            raise ConfigError(f"checkpoint {path} was written by {saved_world} ranks, this run has {self.world}, "
                              "and its data stream cannot continue an epoch in a new rank layout")
        stream.load_layout_states(datas)
        seed = int(np.random.SeedSequence([self.cfg.training.seed, progress.step, self.rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.gen.manual_seed(seed)
        per_rank = self.cfg.dataloader.batch_size * self.cfg.trainer.gradient_accumulation_steps
        old_batch = int(datas[0].get("batch_size", self.cfg.dataloader.batch_size))
        old_global = old_batch * self.cfg.trainer.gradient_accumulation_steps * saved_world
        log.warning(f"resumed from {path} (written by {saved_world} ranks) on {self.world} ranks: step "
                    f"{progress.step}, epoch {progress.epoch}. Weights, optimizer moments, EMA and the LR "
                    f"schedule continue; the global batch is now {per_rank * self.world} samples per "
                    f"step (was {old_global}: the per-rank batch is kept, so the step counter and LR "
                    "schedule now see a different number of samples per step); the rest of the epoch "
                    "is dealt over the new ranks; per-rank random streams are reseeded "
                    "(docs/cluster.md, 'What happens when')")

    def _load_deepspeed(self, path: Path, saved_world: int) -> None:
        """DeepSpeed's engine folder; written at another world size, its ZeRO partitions are first
        converted to DeepSpeed's universal checkpoint (one folder per parameter: fp32 weights and
        Adam moments, whatever the world size), which every rank then loads its new part of."""
        folder = path if saved_world == self.world else self._universal(path, saved_world)
        cfg = self.engine._config  # read by load_checkpoint; the engine has no setter for it
        cfg.load_universal_checkpoint = folder is not path
        try:
            load_path, _ = self.engine.load_checkpoint(str(folder), tag=layout.DEEPSPEED_TAG,
                                                       load_optimizer_states=True,
                                                       load_lr_scheduler_states=False, load_module_strict=True)
        finally:
            cfg.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}/{layout.DEEPSPEED_TAG}")
        if folder is not path:
            self.acc.wait_for_everyone()  # every rank has read its part
            if self.is_main:
                shutil.rmtree(folder, ignore_errors=True)

    def _universal(self, path: Path, saved_world: int) -> Path:
        """Rank 0 converts `path`'s engine folder into a sibling `.universal-<name>` folder (built
        under a temporary name, renamed when complete); a failure is raised on every rank."""
        final = path.parent / f".universal-{path.name}"
        refusal = None
        if self.is_main:
            tmp = path.parent / f".universal-{path.name}.part"
            src, out = path / layout.DEEPSPEED_TAG, tmp / layout.DEEPSPEED_TAG
            command = (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {src} "
                       f"--output_folder {out} --inject_missing_state")
            log.warning(f"checkpoint {path} was written by {saved_world} ranks, this run has {self.world}: "
                        f"converting its ZeRO-{self.zero_stage} state to a universal checkpoint in {final} "
                        f"(the equivalent of `{command}`)")
            try:
                from argparse import Namespace

                from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

                for d in (tmp, final):
                    shutil.rmtree(d, ignore_errors=True)
                # One worker: the conversion runs inside a trainer whose process group and
                # threads a process pool would fork.
                ds_to_universal(Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True,
                                          inject_missing_state=True))
                layout.fsync_files([f for f in tmp.rglob("*") if f.is_file()])
                tmp.rename(final)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                shutil.rmtree(tmp, ignore_errors=True)
                refusal = (f"checkpoint {path} was written by {saved_world} ranks under DeepSpeed "
                           f"ZeRO-{self.zero_stage}, this run has {self.world}, and DeepSpeed's universal "
                           f"conversion failed ({type(exc).__name__}: {exc}); the same conversion by hand: "
                           f"`{command}`. Resume on {saved_world} ranks, or warm start a new run_dir with "
                           f"model.load_checkpoint={path}")
        obj = [refusal]
        if self.world > 1:
            dist.broadcast_object_list(obj, src=0, group=self.group)
        if obj[0] is not None:
            raise ConfigError(obj[0])
        return final

    @torch.no_grad()
    def _load_ema_resharded(self, path: Path) -> None:
        """This rank's piece of the EMA from a checkpoint written at another world size: the
        full tensors (the saved pieces merged in rank order), cut the way this run holds them."""
        assert self.ema is not None
        try:
            full = checkpoint_weights(path, ema=True)
        except FileNotFoundError:
            log.warning(f"{path} has no EMA state; EMA restarts from the current weights")
            self.ema.update(0)
            return
        self.ema.load_full_state(full)

    # ------------------------------------------------------------------ save

    def _own_files(self, tmp: Path) -> list[Path]:
        """The files this rank wrote into `tmp` (DeepSpeed names its shards by data-parallel
        rank, which is the global rank here, and rank 0 writes the module states)."""
        mine = [tmp / layout.rank_state_name(self.rank)]
        if self.ema is not None and (self.ema.sharded or self.is_main):
            mine.append(tmp / self._ema_file())
        if self.engine is not None:
            ds = tmp / layout.DEEPSPEED_TAG
            mine += [f for f in ds.glob(f"*rank_{self.rank}_*") if f.is_file()]
            if self.is_main:
                mine += [f for f in ds.glob("mp_rank_*_model_states.pt") if f.is_file()]
        elif self.is_main:
            mine += [tmp / layout.MODEL, tmp / layout.OPTIMIZER]
        if self.is_main:
            mine.append(tmp / layout.TRAINER_STATE)
        return [f for f in mine if f.is_file()]

    def _bytes_needed(self) -> int:
        """The size of the newest complete checkpoint, or an estimate from the parameter count
        (fp32 weights + two Adam moments + EMA) before the first one."""
        newest = layout.latest_complete(self.ckpt_root, warn=lambda _msg: None)
        if newest is not None:
            return sum(layout.read_manifest(newest)["files"].values())
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.module.parameters())
        return numel * 4 * (3 + (1 if self.ema is not None else 0))

    def _check_space(self) -> None:
        """Refuse to start a save the file system cannot hold (decided on rank 0, raised on every
        rank): a full disk mid-save costs the save and nothing else, but it is better named."""
        refusal = None
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            need = int(self._bytes_needed() * 1.1) + (1 << 20)
            free = shutil.disk_usage(self.ckpt_root).free
            if free < need:
                refusal = (f"not enough space for a checkpoint in {self.ckpt_root}: {need:,} bytes "
                           f"needed (the last checkpoint's size + 10%), {free:,} free")
        obj = [refusal]
        if self.world > 1:
            dist.broadcast_object_list(obj, src=0, group=self.group)
        if obj[0] is not None:
            raise CheckpointSpaceError(obj[0])

    def save(self, progress: Progress, data_state: dict, val_loss: float | None = None) -> Path:
        """Write this rank's part into the temporary folder, then rank 0 publishes it.

        `val_loss`: the checkpoint-selection loss of the latest validation, recorded in the
        manifest so that pruning can keep the best checkpoint."""
        acc = self.acc
        tmp = layout.tmp_dir_for(self.ckpt_root, progress.step)
        final = self.ckpt_root / layout.step_dir_name(progress.step)
        self._check_space()
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        from safetensors.torch import save_file

        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp), tag=layout.DEEPSPEED_TAG, client_state={}, save_latest=False)
        elif self.is_main:
            sd = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
            save_file(sd, str(tmp / layout.MODEL))
            torch.save(self.optimizer.state_dict(), tmp / layout.OPTIMIZER)
        if self.ema is not None and (self.ema.sharded or self.is_main):
            save_file(self.ema.local_state(), str(tmp / self._ema_file()), metadata=self.ema.shard_metadata())
        rank_state = {
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if torch.cuda.is_available() else None,
            "loss_generator": self.gen.get_state(),
            "data": data_state,
            "rank": self.rank,
        }
        torch.save(rank_state, tmp / layout.rank_state_name(self.rank))
        if self.is_main:
            state = {"step": progress.step, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
                     "lr_controller": self.lr_ctl.state_dict(), "world_size": self.world,
                     "config": to_dict(self.cfg)}
            (tmp / layout.TRAINER_STATE).write_text(json.dumps(state, indent=1))
        # Every writer flushes its own files before the barrier: on Lustre/GPFS an fsync only
        # reaches the data this client wrote, so rank 0 alone cannot make the others' durable.
        layout.fsync_files(self._own_files(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            meta = {"step": progress.step, "epoch": progress.epoch, "world_size": self.world,
                    "distributed": self.cfg.trainer.distributed, "zero_stage": self.zero_stage,
                    "ema": self.ema is not None, "ema_sharded": bool(self.ema and self.ema.sharded),
                    "val_loss": val_loss}
            layout.write_manifest_and_publish(tmp, final, meta)
            for d in layout.prune(self.ckpt_root, self.cfg.trainer.keep_last_checkpoints,
                                  keep_best=self.cfg.trainer.keep_best_checkpoint):
                log.info(f"removed old checkpoint {d}")
            log.info(f"checkpoint {final}")
        acc.wait_for_everyone()
        return final
