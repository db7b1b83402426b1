"""Run under torchrun: routed DDP training for each transformer backbone; writes a JSON per rank."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import routefx
from routefx.backbones import create, example_inputs


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    report = {}
    for name, kw, route in [("DiT-T/2", {"input_size": 8, "num_classes": 10}, (1, 4, 0.5)),
                            ("U-ViT-T/2", {}, (1, 5, 0.5)), ("SiT-T/2", {"input_size": 8, "num_classes": 10}, (0, 3, 0.5))]:
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
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        report[name] = {"param_sum": flat.double().sum().item(), "param_head": flat[:64].tolist(),
                        "ids": ddp.module.routing[0].ids.tolist()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
