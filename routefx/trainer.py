"""The training loop behind `python -m routefx.train`: one `Trainer` per process (or DDP rank).

Order of construction: the plain backbone is built, routefx is applied (in place, with a
per-rank routing generator seeded `seed + rank`), the EMA copy is taken, and only then is the
model wrapped in `DistributedDataParallel` or, with `--fsdp`, sharded with FSDP2's
`fully_shard` (each block, then the root). Under `--fsdp` a checkpoint is a DCP folder with the
sharded model and optimizer (`checkpoint.dcp-<step>`), written by every rank, plus the usual
`checkpoint.pt` (rank 0: full model and EMA weights for `sample` / `evaluate`, step, RNG and data
state, and the folder's name), written last: a run killed in between resumes from the previous
pair. `--grad-accum K` runs K micro-batches of `--batch` per optimizer step; their noise and
labels are drawn for the K batches at once, so a step equals one step over the K-fold batch.

Example:
    >>> from routefx.train import parse_args
    >>> trainer = Trainer(parse_args(["--data", "digits", "--steps", "2"]))   # doctest: +SKIP
    >>> trainer.run()                                                         # doctest: +SKIP
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import signal

import torch
import torch.distributed as dist

from . import apply as route_apply, remove, router
from .checkpoint import (CheckpointError, load_checkpoint, load_weights, remove_stale_temps, rng_state,
                         save_checkpoint, set_rng_state)
from .data import Batches, load_images
from .diffusion import Guidance, make_objective, sample
from .losses import masked_route_loss, plain_loss, standardize_patches
from .models import backbone_config, build, describe, paper_route
from .passes.find_blocks import block_candidates
from .route import Route
from .viz import save_grid

__all__ = ["Trainer", "EMA", "StopFlag", "lr_at", "NOISE_SEED_OFFSET"]

NOISE_SEED_OFFSET = 100_003  # global (noise) RNG seed = seed + rank + this; routing uses seed + rank


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up
    `decay_k = min(decay, (1 + k) / (10 + k))` so short runs are not dominated by the init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = remove(copy.deepcopy(model)).eval().requires_grad_(False)  # (plain: not routed)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        """(Under FSDP2 the EMA stays a full copy: each sharded parameter is gathered.)"""
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(_full(p.detach()), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(_full(b))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant (resume-safe: no total-step schedule)."""
    return base * min(1.0, (step + 1) / max(warmup, 1))


class StopFlag:
    """First Ctrl-C / SIGTERM asks to stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.requested, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[routefx.train] {signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(press Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Builds data, model, routing, optimizer and EMA from parsed `routefx.train` arguments."""

    def __init__(self, args, rank: int = 0, world: int = 1, device: str = "cpu"):
        self.args, self.rank, self.world, self.device = args, rank, world, torch.device(device)
        self.main = rank == 0
        self.data = load_images(args.data, args.image_size, "train")
        c, h = self.data.images.shape[1], self.data.images.shape[-1]
        self.shape = (c, h, h)
        self.config = backbone_config(args.backbone, h, c, self.data.num_classes, args.label_dropout,
                                      **args.model_kwargs)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.model = build(self.config).to(self.device)
        self.info = describe(self.model)
        self.routes = self._routes()
        self.gen = torch.Generator(self.device).manual_seed(args.seed + rank)
        self.net = route_apply(self.model, self.routes, generator=self.gen) if self.routes else self.model
        if args.compile_blocks:
            for name in sorted(block_candidates(self.model)):  # the repeated blocks routefx treats as leaves
                self.model.get_submodule(name).compile()      # in place: same module, same state_dict keys
        self.ema = EMA(self.model, args.ema)
        self.train_net = self._distribute(self.net)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                     betas=(0.9, 0.99), weight_decay=args.weight_decay,
                                     fused=self.device.type == "cuda" or None)  # one kernel per update on GPUs
        self.objective = make_objective(args.objective)
        self.batches = Batches(self.data, args.batch, seed=args.seed, rank=rank, world=world)
        self.step = 0
        self._temps_checked = False  # stale `.tmp-*.pt` of killed saves: removed once per run
        torch.manual_seed(args.seed + rank + NOISE_SEED_OFFSET)
        self.autocast = self._autocast()

    # -- construction helpers -----------------------------------------------------------
    def _routes(self) -> list:
        if self.args.no_routes:
            return []
        if self.args.routes:
            return [Route(*r).resolve(self.info.depth) for r in self.args.routes]
        return [paper_route(self.info.depth)]

    def _distribute(self, net):
        if self.args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for name in sorted(block_candidates(self.model)):  # the blocks routefx routes around
                fully_shard(self.model.get_submodule(name), mesh=mesh)
            fully_shard(self.model, mesh=mesh)  # (routed in place: the root is the model itself)
            return net
        if self.world == 1:
            return net
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(net, device_ids=ids)

    def _autocast(self):
        """bf16 autocast: `--precision bf16` (CUDA with bf16 support, or the CPU), or `auto` on
        CUDA devices that support it; fp32 otherwise."""
        want, kind = self.args.precision, self.device.type
        cuda_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
        if want == "bf16" and kind == "cuda" and not cuda_bf16:
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bf16 support; "
                             f"use --precision fp32.")
        if want == "bf16" or (want == "auto" and cuda_bf16):
            return lambda: torch.autocast(kind, dtype=torch.bfloat16)
        return contextlib.nullcontext

    # -- one step ------------------------------------------------------------------------
    def _labels(self, y):
        p = self.args.label_dropout
        if self.info.drops_labels or p <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < p
        return torch.where(drop, torch.full_like(y, self.info.null_class), y)

    def loss_of(self, x0, y):
        """The training loss of one batch (the forward runs routed when routes are set)."""
        return self._loss(self.objective.noisy(x0), self._labels(y))

    def _loss(self, batch, y):
        with self.autocast():
            out = self.train_net(batch.x_in, batch.t_in, y)[:, :self.shape[0]]
        out = out.float()
        if self.args.loss == "plain":
            return plain_loss(out, batch.target, batch.weight)
        infos = router(self.net).routing if self.routes else []
        mae = standardize_patches(batch.x_noisy, self.info.patch_size) if self.args.mae_lambda else None
        return masked_route_loss(out, batch.target, infos, self.info.patch_size, weight=batch.weight,
                                 mae_target=mae, mae_lambda=self.args.mae_lambda)

    def train_step(self) -> float:
        self.model.train()
        k = self.args.grad_accum
        data = [next(self.batches) for _ in range(k)]
        x0 = torch.cat([x for x, _ in data]).to(self.device)
        batch, y = self.objective.noisy(x0), self._labels(torch.cat([y for _, y in data]).to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, part in enumerate(_split(batch, k)):
            sync = i == k - 1 or self.world == 1 or self.args.fsdp
            with contextlib.nullcontext() if sync else self.train_net.no_sync():  # DDP: one all-reduce
                micro = self._loss(part, y.chunk(k)[i]) / k
                micro.backward()
            loss = loss + micro.detach()
        if self.args.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.args.lr, self.args.warmup)
        self.opt.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        loss = loss.detach()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item()

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        rngs = [None] * self.world
        mine = rng_state(self.gen)
        if self.world > 1:
            dist.all_gather_object(rngs, mine)
        else:
            rngs = [mine]
        if self.args.fsdp:  # full weights on rank 0 (for sample / evaluate); the optimizer is in the DCP folder
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            model = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            optimizer = {}
        else:
            model, optimizer = self.model.state_dict(), self.opt.state_dict()
        return {"model": model, "ema": self.ema.model.state_dict(),
                "optimizer": optimizer, "step": self.step, "rng": rngs,
                "data": self.batches.state_dict(), "world_size": self.world,
                "routes": [list(vars(r).values()) for r in self.routes],
                "config": self.config, "objective": self.args.objective,
                "args": {k: v for k, v in vars(self.args).items() if _jsonable(v)}}

    def save(self, path: str):
        """Every rank calls this (RNG states are gathered); rank 0 writes the file atomically."""
        state = self.state()
        if self.args.fsdp:  # every rank writes its shards, then rank 0 the file that points to them
            import torch.distributed.checkpoint as dcp
            folder = f"{os.path.splitext(path)[0]}.dcp-{self.step:07d}"
            dcp.save(self._sharded(), checkpoint_id=folder)
            state["dcp"] = os.path.basename(folder)
        if self.main:
            if not self._temps_checked:
                self._remove_stale_temps(os.path.dirname(os.path.abspath(path)), "")
            save_checkpoint(path, state)
            if self.args.fsdp:
                _remove_old_dcp(path, state["dcp"])
        if self.world > 1:
            dist.barrier()

    def _sharded(self) -> dict:
        """The sharded model and optimizer state (DCP's format), for `--fsdp` checkpoints."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, self.opt)
        return {"model": model, "optim": optim}

    def load(self, path: str):
        """Restore a checkpoint written by `save`; the file is never modified.

        Once it is restored, rank 0 deletes the temp files that interrupted saves (kill -9 in the
        middle of `save_checkpoint`) left in `--out`: this run owns that folder from now on. A run
        that does not resume does the same before its first save.
        """
        ck = load_checkpoint(path)
        if ck.get("config") != self.config:
            raise CheckpointError(f"checkpoint {path} was made for another model or data:\n  "
                                  f"checkpoint: {ck.get('config')}\n  this run:   {self.config}\n"
                                  f"Use the same --backbone / --data / --image-size, or another --out. "
                                  f"The file was left untouched.")
        if ck.get("objective") != self.args.objective:
            raise CheckpointError(f"checkpoint {path} was trained with --objective {ck.get('objective')}, "
                                  f"this run uses {self.args.objective}: pass the same objective. "
                                  f"The file was left untouched.")
        if bool(ck.get("dcp")) != bool(self.args.fsdp):
            raise CheckpointError(f"checkpoint {path} was written {'with' if ck.get('dcp') else 'without'} --fsdp "
                                  f"and this run is {'with' if self.args.fsdp else 'without'} it: resume with the "
                                  f"same setting (its optimizer state is stored differently). The file was left "
                                  f"untouched.")
        load_weights(self.ema.model, ck["ema"], path, "EMA")
        if ck.get("dcp"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict
            sharded = self._sharded()
            dcp.load(sharded, checkpoint_id=os.path.join(os.path.dirname(os.path.abspath(path)), ck["dcp"]))
            set_state_dict(self.model, self.opt, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
        else:
            load_weights(self.model, ck["model"], path)
            try:
                self.opt.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from e
        self.step, saved = int(ck["step"]), [Route(*r) for r in ck.get("routes", [])]
        if saved != self.routes and self.main:
            print(f"[routefx.train] note: checkpoint routes {saved} differ from this run's {self.routes}; "
                  f"using this run's.", flush=True)
        self.batches.load_state_dict(ck["data"])
        if ck.get("world_size") == self.world:
            set_rng_state(ck["rng"][self.rank], self.gen)
        else:
            if self.main:
                print(f"[routefx.train] note: {path} was written by {ck.get('world_size')} process(es), "
                      f"this run has {self.world}: random streams are re-seeded.", flush=True)
            torch.manual_seed(self.args.seed + self.rank + NOISE_SEED_OFFSET + self.step)
            self.gen.manual_seed(self.args.seed + self.rank + self.step)
        if self.main:
            self._remove_stale_temps(self.args.out, f"; resuming from {path}")
        return ck

    def _remove_stale_temps(self, folder: str, note: str):
        """Delete the temp files that saves killed mid-write left in `folder` (rank 0, which owns
        it, before its first write there)."""
        self._temps_checked = True
        for tmp in remove_stale_temps(folder):
            print(f"[routefx.train] removed {tmp}: the temp file of a checkpoint write that never "
                  f"finished (the process was killed){note}.", flush=True)

    # -- pictures ------------------------------------------------------------------------
    def sample_grid(self, path: str, cols: int = None) -> torch.Tensor:
        """Class-conditional samples of the EMA model, one row per class, to a PNG."""
        a = self.args
        cols = cols or a.grid_cols
        rows = min(self.data.num_classes, 10)
        labels = torch.arange(rows, device=self.device).repeat_interleave(cols)
        g = torch.Generator().manual_seed(a.seed)  # the same noise for every grid of a run
        guidance = Guidance(cfg=a.cfg, null_class=self.info.null_class)
        imgs = sample(self.ema.model, self.objective, labels, self.shape, steps=a.sample_steps,
                      sampler=a.sampler, guidance=guidance, generator=g)
        save_grid(imgs, path, rows=rows)
        return imgs

    def debug_dump(self, folder: str):
        """Per-rank JSON: parameter digest and last routing indices (for the DDP smoke test)."""
        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(_full(p.detach()).cpu().contiguous().numpy().tobytes())
        ids = [i.ids.tolist() if i.ids is not None else None for i in router(self.net).routing] if self.routes else []
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{self.rank}.json"), "w") as f:
            json.dump({"rank": self.rank, "world": self.world, "step": self.step, "params_sha256": h.hexdigest(),
                       "routing_ids": ids, "routing_seed": self.args.seed + self.rank}, f)


def _remove_old_dcp(path: str, keep: str) -> None:
    """Delete the DCP folders of earlier `--fsdp` checkpoints (the file now points to `keep`)."""
    import shutil
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.splitext(path)[0]) + ".dcp-"
    for name in os.listdir(folder):
        if name.startswith(stem) and name != keep:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _split(batch, k: int) -> list:
    """The K micro-batches of a noisy batch (a dataclass of batch-first tensors)."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    parts = {n: [None] * k if v is None else v.chunk(k) for n, v in fields.items()}
    return [type(batch)(**{n: v[i] for n, v in parts.items()}) for i in range(k)]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False

