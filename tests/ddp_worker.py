"""Run under torchrun: routed DDP training; writes a JSON per rank.

    ddp_worker.py OUT             eager DDP over each transformer backbone (and DiM)
    ddp_worker.py OUT compile     torch.compile + DDP on a tiny DiT, next to the same run in eager
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import routefx
from routefx.backbones import create, example_inputs

BACKBONES = [("DiT-T/2", {"input_size": 8, "num_classes": 10}, (1, 4, 0.5)),
             ("U-ViT-T/2", {}, (1, 5, 0.5)),
             ("SiT-T/2", {"input_size": 8, "num_classes": 10}, (0, 3, 0.5)),
             ("DiM-T/2", {"depth": 4}, (1, 2, 0.5))]


def _digest(model, routed):
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"param_sum": flat.double().sum().item(), "param_head": flat[:64].tolist(),
            "params": [p.detach().double().sum().item() for p in model.parameters()],
            "ids": routefx.router(routed).routing[0].ids.tolist()}


def eager(rank):
    report = {}
    for name, kw, route in BACKBONES:
        torch.manual_seed(0)  # same init on every rank
        model = create(name, **kw)
        gen = torch.Generator().manual_seed(1234 + rank)  # per-rank routing seed
        ddp = DDP(routefx.apply(model, [route], generator=gen))
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)  # different data per rank
        for _ in range(2):
            args = example_inputs(model, batch=3)
            loss = ddp(*args).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        report[name] = _digest(model, ddp.module)
    return report


def _train(how, rank, steps=3):
    """3 SGD steps of a routed tiny DiT under DDP. `how`: eager; outer = torch.compile(DDP(routed));
    inner = DDP(routefx.apply(..., compile=...)). aot_eager: dynamo + AOT autograd, no inductor
    codegen (minutes of C++ compilation on one core)."""
    from torch._dynamo.utils import counters

    from helpers import dit_inputs, tiny_dit
    model = tiny_dit(depth=4, seed=0)  # same init on every rank
    gen = torch.Generator().manual_seed(1234 + rank)
    opts = {"backend": "aot_eager"}
    routed = routefx.apply(model, [(1, 2, 0.5)], generator=gen, compile=opts if how == "inner" else None)
    net = DDP(routed)
    if how == "outer":
        net = torch.compile(net, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # params move in proportion to the grads
    losses, graphs = [], []
    for step in range(steps):
        torch.manual_seed(100 * step + rank)  # data and label dropout: per rank, same in every mode
        loss = net(*dit_inputs(3, seed=10 * step + rank)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    return {"losses": losses, "graphs_per_step": graphs, **_digest(model, routed)}


def compiled(rank):
    from torch._dynamo.utils import counters
    report = {}
    for how in ("eager", "outer", "inner"):
        torch._dynamo.reset()
        counters.clear()
        report[how] = _train(how, rank)
    return report


def main(out_dir, mode="eager"):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    report = compiled(rank) if mode == "compile" else eager(rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(*sys.argv[1:])
