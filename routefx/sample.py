"""Draw class-conditional samples from a `routefx.train` checkpoint into a PNG grid.

Rows are classes, columns independent samples. `--cfg` sets classifier-free guidance;
`--routing-guidance` uses TREAD's routing guidance instead (TREAD.md section 3): the plain
backbone is routed again with the checkpoint's routes, and every ODE step combines two forced-
routing predictions, `weak + scale * (strong - weak)`, at ratios `--rg-strong` / `--rg-weak`.

Example:
    python -m routefx.sample --ckpt runs/DiT-mini-mnist-tread/checkpoint.pt --out grid.png --cfg 1.5
    python -m routefx.sample --ckpt runs/DiT-mini-mnist-tread/checkpoint.pt --out rg.png --routing-guidance
"""
import argparse

import torch

from . import apply as route_apply
from .checkpoint import load_checkpoint, load_weights
from .diffusion import Guidance, make_objective, sample
from .models import build, describe, paper_route
from .route import Route
from .viz import save_grid

__all__ = ["main", "load_for_sampling", "draw"]


def load_for_sampling(path: str, ema: bool = True, device="cpu", routed: bool = False, generator=None):
    """(net, checkpoint, info): the checkpoint's EMA (or raw) weights in the plain backbone,
    eval mode; with `routed=True` routed in place by `routefx.apply` with its routes (for routing guidance)."""
    ck = load_checkpoint(path)
    model = build(ck["config"])
    load_weights(model, ck["ema" if ema else "model"], path, "EMA" if ema else "model")
    model = model.to(device).eval()
    info = describe(model)
    if not routed:
        return model, ck, info
    routes = [Route(*r) for r in ck.get("routes") or []] or [paper_route(info.depth)]
    return route_apply(model, routes, generator=generator).eval(), ck, info


def draw(net, ck: dict, info, per_class: int = 8, classes=None, steps: int = 50, sampler: str = "euler",
         guidance: Guidance = None, seed: int = 0, device="cpu") -> tuple:
    """(images, labels): `per_class` samples of each class in `classes` (default: up to 10)."""
    cfg = ck["config"]
    classes = list(classes if classes is not None else range(min(cfg["num_classes"], 10)))
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    g = torch.Generator().manual_seed(seed)
    imgs = sample(net, make_objective(ck.get("objective", "rf")), labels, shape, steps=steps,
                  sampler=sampler, guidance=guidance, generator=g)
    return imgs, labels


def _parser():
    p = argparse.ArgumentParser(prog="python -m routefx.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.pt written by routefx.train")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--steps", type=int, default=50, help="ODE steps")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--routing-guidance", action="store_true", help="routing guidance instead of CFG")
    p.add_argument("--rg-scale", type=float, default=1.5)
    p.add_argument("--rg-strong", type=float, default=0.3, help="ratio of the strong (less routed) branch")
    p.add_argument("--rg-weak", type=float, default=0.7, help="ratio of the weak (more routed) branch")
    p.add_argument("--per-class", type=int, default=8, help="columns")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval", action="store_true", help="also print the label agreement (MNIST classifier)")
    return p


def main(argv=None) -> int:
    """Entry point of `python -m routefx.sample`."""
    a = _parser().parse_args(argv)
    gen = torch.Generator(a.device).manual_seed(a.seed + 1)
    net, ck, info = load_for_sampling(a.ckpt, ema=not a.raw, device=a.device, routed=a.routing_guidance,
                                      generator=gen)
    if a.routing_guidance:
        guidance = Guidance(routing=True, scale=a.rg_scale, strong=a.rg_strong, weak=a.rg_weak)
    else:
        guidance = Guidance(cfg=a.cfg, null_class=info.null_class)
    imgs, labels = draw(net, ck, info, a.per_class, steps=a.steps, sampler=a.sampler, guidance=guidance,
                        seed=a.seed, device=a.device)
    save_grid(imgs, a.out, rows=len(labels) // a.per_class)
    msg = f"[routefx.sample] wrote {a.out} ({len(labels)} samples, step {ck['step']}, {a.sampler} x {a.steps})"
    if a.eval:
        from .evaluate import label_agreement
        msg += f", label agreement {label_agreement(imgs, labels):.3f}"
    print(msg, flush=True)
    return 0


if __name__ == "__main__":
    from .train import run_cli
    run_cli("routefx.sample", main)
