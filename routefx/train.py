"""Train a diffusion backbone with TREAD token routing: `python -m routefx.train`.

The defaults train a small class-conditional DiT ("DiT-mini": 28x28 MNIST, patch 4 -> 49
tokens, width 128, 6 blocks, 1.9M parameters) with TREAD route (2, 3, 0.5), rectified flow,
AdamW (lr 2e-3, 100 warm-up steps), EMA, batch 64 for 1,600 steps: about 9-10 minutes on 2 CPU
cores, and samples a digit classifier labels as asked ~98% of the time (cfg 2). Everything
lands in `--out` (default `runs/<name>`):

    checkpoint.pt   model (plain backbone keys), EMA, optimizer, step, RNG, data position, routes
    metrics.jsonl   one line per step: step, loss, lr, it_s, wall
    samples.png     final class-conditional EMA samples (rows = classes); samples/ holds earlier ones
    loss.png        the loss curve

Under `torchrun --nproc_per_node=N` the same command trains with DDP (gloo on CPU, nccl on GPU).
`--resume` continues bit-exactly; Ctrl-C or SIGTERM saves a checkpoint, then exits.

Example:
    python -m routefx.train                                   # the ~10 minute MNIST demo
    python -m routefx.train --data digits --steps 200 --no-routes --out runs/dense
    torchrun --standalone --nproc_per_node=2 -m routefx.train --data digits --steps 100
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError
from .trainer import StopFlag, Trainer, lr_at
from .viz import plot_loss, read_metrics

__all__ = ["main", "parse_args", "parse_route", "run_loop", "passive_omp", "run_cli"]

_MODEL_FLAGS = {"hidden": "hidden_size", "depth": "depth", "heads": "num_heads", "patch": "patch_size"}


def parse_route(text: str) -> tuple:
    """`"2,8,0.5"` -> `(2, 8, 0.5)` (start, end inclusive, ratio)."""
    try:
        start, end, ratio = text.split(",")
        return int(start), int(end), float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(f"route {text!r}: write start,end,ratio e.g. 2,8,0.5") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routefx.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model and routing")
    m.add_argument("--backbone", default="DiT-mini", help="DiT-mini or any routefx.backbones name")
    for flag, key in _MODEL_FLAGS.items():
        m.add_argument(f"--{flag}", type=int, default=None, help=f"override the backbone's {key}")
    m.add_argument("--routes", type=parse_route, nargs="+", default=None, metavar="S,E,R",
                   help="routes start,end,ratio (default: TREAD's rule for the depth)")
    m.add_argument("--no-routes", action="store_true", help="train dense (no token routing)")
    m.add_argument("--loss", choices=["plain", "masked"], default="plain",
                   help="plain MSE over all patches (current TREAD) or the multi-route masked loss")
    m.add_argument("--mae-lambda", type=float, default=0.0, help="masked loss: weight of the bypassed term")
    m.add_argument("--objective", choices=["rf", "edm"], default="rf")
    d = p.add_argument_group("data and optimisation")
    d.add_argument("--data", default="mnist", help="mnist | digits | a folder of images")
    d.add_argument("--image-size", type=int, default=None, help="resize images (default: native)")
    d.add_argument("--steps", type=int, default=2000)
    d.add_argument("--batch", type=int, default=64, help="per process")
    d.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="micro-batches of --batch per optimizer step (gradient accumulation)")
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--warmup", type=int, default=100, help="linear lr warm-up steps")
    d.add_argument("--weight-decay", type=float, default=0.0)
    d.add_argument("--grad-clip", type=float, default=1.0)
    d.add_argument("--ema", type=float, default=0.999, help="EMA decay (with warm-up)")
    d.add_argument("--label-dropout", type=float, default=0.1, help="labels dropped to the null class (CFG)")
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget; stops and saves when spent")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    r.add_argument("--name", default=None, help="run name (default from backbone, data, routes)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on CUDA devices that support it, else fp32; "
                        "bf16 = bf16 autocast (also on the CPU)")
    r.add_argument("--compile-blocks", action="store_true",
                   help="torch.compile every block in place (regional compilation, for GPU speed): "
                        "one compile reused by all blocks; the routing graph stays eager")
    r.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 (fully_shard per block and the root) instead of DDP; "
                        "under torchrun; sharded DCP checkpoints")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores / processes)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH (or OUT/checkpoint.pt when given alone)")
    r.add_argument("--overwrite", action="store_true", help="start fresh over an existing run in --out")
    r.add_argument("--ckpt-every", type=int, default=250)
    r.add_argument("--sample-every", type=int, default=500, help="0: only at the end")
    r.add_argument("--sample-steps", type=int, default=20)
    r.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    r.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance for sample grids")
    r.add_argument("--grid-cols", type=int, default=8)
    r.add_argument("--debug-json", action="store_true",
                   help="write OUT/debug/rank<r>.json (params digest, routing ids); also env ROUTEFX_DEBUG=1")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse `routefx.train` arguments; fills `model_kwargs`, `name` and `out`."""
    args = _parser().parse_args(argv)
    args.model_kwargs = {key: getattr(args, flag) for flag, key in _MODEL_FLAGS.items()
                         if getattr(args, flag) is not None}
    if args.routes and args.no_routes:
        raise SystemExit("routefx.train: --routes and --no-routes exclude each other")
    if args.grad_accum < 1:
        raise SystemExit(f"routefx.train: --grad-accum {args.grad_accum}: give the number of micro-batches "
                         f"per step (1 = no accumulation)")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SystemExit("routefx.train: --fsdp shards the model over processes: run it under torchrun with "
                         "2 or more processes (torchrun --nproc_per_node=2 -m routefx.train --fsdp ...); "
                         "one process trains without it")
    if args.name is None:
        data = os.path.basename(os.path.normpath(args.data))
        kind = "dense" if args.no_routes else "tread"
        args.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{args.backbone}-{data}-{kind}")
    args.out = args.out or os.path.join("runs", args.name)
    args.debug_json = args.debug_json or os.environ.get("ROUTEFX_DEBUG", "") not in ("", "0")
    return args


# -- distributed / device -------------------------------------------------------------------
def _setup(args):
    """(rank, world, device) for this process; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    device = ("cuda" if args.device == "auto" else args.device) if cuda else args.device.replace("auto", "cpu")
    if cuda and world > 1:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


# -- the loop -------------------------------------------------------------------------------
def _agree(trainer, flag: bool) -> bool:
    """True on every rank when any rank says True."""
    if trainer.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=trainer.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _pictures(trainer, final: bool):
    out = trainer.args.out
    path = os.path.join(out, "samples.png") if final else os.path.join(out, "samples", f"step_{trainer.step:06d}.png")
    trainer.sample_grid(path)
    plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"), title=trainer.args.name)
    return path


def _progress(trainer):
    if not trainer.main:
        return None
    from tqdm import tqdm
    return tqdm(total=trainer.args.steps, initial=trainer.step, desc="train", unit="step",
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)


def run_loop(trainer: Trainer, t_start: float = None) -> int:
    """Train until `--steps`, the `--minutes` budget or a signal; save; draw. Returns an exit code."""
    a, t_start = trainer.args, t_start or time.time()
    ckpt, log_path = os.path.join(a.out, "checkpoint.pt"), os.path.join(a.out, "metrics.jsonl")
    log = open(log_path, "a") if trainer.main else None
    bar, t_loop, done, reason = _progress(trainer), time.perf_counter(), 0, "steps"
    try:
        with StopFlag() as stop:
            while trainer.step < a.steps:
                t0 = time.perf_counter()
                loss = trainer.train_step()
                done, now = done + 1, time.perf_counter()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {trainer.step}: lower --lr "
                                             f"(now {a.lr}) or raise --warmup / --grad-clip")
                if trainer.main:
                    rec = {"step": trainer.step, "loss": loss, "lr": lr_at(trainer.step - 1, a.lr, a.warmup),
                           "it_s": done / (now - t_loop), "step_s": now - t0, "wall": time.time() - t_start}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                over = a.minutes is not None and time.time() - t_start > a.minutes * 60
                if _agree(trainer, stop.requested or over):
                    reason = "signal" if stop.requested else "minutes"
                    break
                if a.ckpt_every and trainer.step % a.ckpt_every == 0 and trainer.step < a.steps:
                    trainer.save(ckpt)
                if a.sample_every and trainer.step % a.sample_every == 0 and trainer.step < a.steps \
                        and trainer.main:
                    _pictures(trainer, final=False)
            trainer.save(ckpt)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return _finish(trainer, reason, t_start)


def _finish(trainer, reason: str, t_start: float) -> int:
    a = trainer.args
    if a.debug_json:
        trainer.debug_dump(os.path.join(a.out, "debug"))
    if not trainer.main:
        return 130 if reason == "signal" else 0
    ckpt = os.path.join(a.out, "checkpoint.pt")
    if reason == "signal":
        print(f"[routefx.train] interrupted at step {trainer.step}: saved {ckpt} "
              f"(continue with --resume)", flush=True)
        return 130
    grid = _pictures(trainer, final=True)
    rows = read_metrics(os.path.join(a.out, "metrics.jsonl"))
    tail = [r["loss"] for r in rows[-50:]]
    print(f"[routefx.train] done ({reason}): step {trainer.step}, {(time.time() - t_start) / 60:.1f} min, "
          f"loss (mean of last {len(tail)}) {sum(tail) / max(len(tail), 1):.4f}\n"
          f"  checkpoint {ckpt}\n  samples    {grid}\n  loss curve {os.path.join(a.out, 'loss.png')}",
          flush=True)
    return 0


# -- start / resume -------------------------------------------------------------------------
def _prepare_out(trainer) -> None:
    """Resume if asked; refuse to overwrite a previous run silently."""
    a = trainer.args
    ckpt, log_path = os.path.join(a.out, "checkpoint.pt"), os.path.join(a.out, "metrics.jsonl")
    path = ckpt if a.resume == "auto" else a.resume
    if a.resume and (a.resume != "auto" or os.path.exists(ckpt)):
        trainer.load(path)
        if trainer.main and os.path.exists(log_path):  # drop log lines past the checkpoint
            keep = [r for r in read_metrics(log_path) if r.get("step", 0) <= trainer.step]
            with open(log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        return
    if os.path.exists(ckpt) and not a.overwrite and not a.resume:
        raise CheckpointError(f"{ckpt} exists: pass --resume to continue that run, --overwrite to "
                              f"start over, or another --out.")
    if trainer.main:
        os.makedirs(a.out, exist_ok=True)
        open(log_path, "w").close()
        with open(os.path.join(a.out, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(a).items()}, f, indent=1, default=str)


def _summary(trainer) -> str:
    m, a = trainer.model, trainer.args
    params = sum(p.numel() for p in m.parameters() if p.requires_grad)
    tokens = (trainer.shape[1] // trainer.info.patch_size) ** 2
    routes = ", ".join(f"({r.start}, {r.end}, {r.ratio})" for r in trainer.routes) or "none (dense)"
    return (f"[routefx.train] {a.backbone} {params / 1e6:.2f}M params, {trainer.info.depth} blocks, "
            f"{tokens} tokens/image | routes {routes} | {a.objective}, loss {a.loss} | data {a.data} "
            f"{len(trainer.data)} x {tuple(trainer.shape)} | batch {a.batch} x {trainer.world} | "
            f"{trainer.device}, {torch.get_num_threads()} threads | out {a.out}")


def main(argv=None) -> int:
    """Entry point of `python -m routefx.train` (see the module docstring)."""
    t_start = time.time()
    args = parse_args(argv)
    rank, world, device = _setup(args)
    try:
        trainer = Trainer(args, rank=rank, world=world, device=device)
        _prepare_out(trainer)
        if trainer.main:
            print(_summary(trainer) + (f" | resumed at step {trainer.step}" if trainer.step else ""),
                  flush=True)
        return run_loop(trainer, t_start)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def passive_omp(module: str) -> None:
    """Re-run `python -m module` with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    OpenMP threads spin while they wait by default; on a CPU shared with other processes a
    2-thread step then ran ~10-100x slower here (threads spinning for a descheduled peer).
    The policy is read when torch loads, so it has to be set before the interpreter starts.
    """
    if "OMP_WAIT_POLICY" not in os.environ and not torch.cuda.is_available():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def run_cli(module: str, entry, errors=(CheckpointError,)) -> None:
    """`python -m module`: passive OpenMP waiting, then `entry()`; `errors` end it with one line."""
    passive_omp(module)
    try:
        sys.exit(entry())
    except errors as e:
        sys.exit(f"{module}: {e}")


if __name__ == "__main__":
    run_cli("routefx.train", main)
