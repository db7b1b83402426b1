"""Run under torchrun (2 processes, gloo, CPU): FSDP2 over a routed tiny DiT, every order.

    fsdp_worker.py OUT CASE...

Each case builds the same DiT on every rank, shards and routes it in the order the case names,
runs one training step on this rank's data with this rank's routing generator, and compares
the full gradients with a single-process reference computed here: the same routed model,
unsharded, stepped on each rank's data and routing seed, gradients averaged over the ranks (what
FSDP2's reduce-scatter computes). Writes OUT/rank{r}.json: case -> {max_err, ids, ...}.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import routefx
from helpers import tiny_dit
from routefx.backbones.dit import DiTBlock

ROUTE = (1, 3, 0.5)


def build(seed=0, device=None):
    """A tiny DiT with every weight random (DiT zero-initialises its output layers and gates:
    its first step would have zero output and almost no gradient to compare); on `device`
    "meta": built there, weights to be loaded."""
    with torch.device(device or "cpu"):
        return tiny_dit(seed=seed, randomize=device is None)


def plain_name(n):
    return n.replace("._checkpoint_wrapped_module", "")  # torch's checkpoint wrapper, not routefx


def data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g) * 999,
            torch.randint(0, 10, (3,), generator=g))


def step(model, rank, dtype=None):
    x, t, y = data(rank)
    if dtype is not None:  # what FSDP2's MixedPrecisionPolicy does to the root's float inputs
        x, t = x.to(dtype), t.to(dtype)
    out = model(x, t, y)
    loss = out.float().square().mean()
    loss.backward()
    return loss.item()


def reference(world, dtype=None):
    """Gradients (name -> float32 tensor) averaged over the ranks' steps, the ids each rank
    draws; with `dtype`, the model's parameters and float inputs in that dtype."""
    grads, ids = {}, []
    for r in range(world):
        model = build()
        if dtype is not None:
            model.to(dtype)
        routefx.apply(model, [ROUTE], generator=torch.Generator().manual_seed(1234 + r))
        step(model, r, dtype)
        ids.append(routefx.router(model).routing[0].ids.tolist())
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad.float() / world
    return grads, ids


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model, mesh, extra=(), mp=None):
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for blk in model.blocks:
        fully_shard(blk, **kw)
    for name in extra:
        fully_shard(model.get_submodule(name), **kw)
    fully_shard(model, **kw)


def run_case(case, rank, world, mesh, ref, out_dir):
    gen = torch.Generator().manual_seed(1234 + rank)
    mp = None
    names = [n for n, _ in build().named_parameters()]
    if case == "shard_then_apply":
        model = build()
        shard(model, mesh)
        routefx.apply(model, [ROUTE], generator=gen)
    elif case == "apply_then_shard":
        model = build()
        routefx.apply(model, [ROUTE], generator=gen)
        shard(model, mesh)
    elif case == "extra_units":  # units on modules routefx traces through otherwise
        model = build()
        routefx.apply(model, [ROUTE], generator=gen)
        shard(model, mesh, extra=("t_embedder", "y_embedder", "final_layer"))
    elif case == "checkpointed":  # activation checkpointing on the blocks, then sharding
        model = build()
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, DiTBlock))
        shard(model, mesh)
        routefx.apply(model, [ROUTE], generator=gen)
    elif case == "bf16":
        model = build()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        routefx.apply(model, [ROUTE], generator=gen)
        shard(model, mesh, mp=mp)
    elif case == "meta":  # deferred init: built on meta, routed, sharded, materialised, loaded
        model = build(device="meta")
        routefx.apply(model, [ROUTE], generator=gen)
        shard(model, mesh)
        model.to_empty(device="cpu")
        set_model_state_dict(model, build().state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        raise SystemExit(f"unknown case {case}")
    got_names = [plain_name(n) for n, _ in model.named_parameters()]
    loss = step(model, rank)
    ids = routefx.router(model).routing[0].ids.tolist()
    grads = ref[0]
    err = 0.0
    for n, p in model.named_parameters():
        n = plain_name(n)
        if p.grad is None or n not in grads:
            err = err if (p.grad is None) == (n not in grads) else float("inf")
            continue
        g = full(p.grad).float()
        err = max(err, ((g - grads[n]).abs().max() / grads[n].abs().max().clamp_min(1e-12)).item())
    report = {"max_err": err, "loss": loss, "ids": ids, "ref_ids": ref[1][rank], "names_same": got_names == names,
              "check": routefx.router(model)._graphs[0][1].check}
    if case == "shard_then_apply":
        report.update(checkpoints(model, mesh, gen, out_dir))
    return report


def checkpoints(model, mesh, gen, out_dir):
    """DCP save / load into a freshly sharded routed model; a full state dict into a plain DiT."""
    path = os.path.join(out_dir, "dcp")
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    other = build(seed=5)
    shard(other, mesh)
    routefx.apply(other, [ROUTE], generator=gen)
    sd = {"model": other.state_dict()}
    dcp.load(sd, checkpoint_id=path)
    other.load_state_dict(sd["model"])
    same = all(torch.equal(full(a), full(b)) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    fsd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank():  # (cpu_offload: the full state dict is rank 0's)
        return {"dcp_round_trip": same}
    plain = build(seed=7)
    plain.load_state_dict(fsd, strict=True)
    loaded = all(torch.equal(plain.state_dict()[k], v) for k, v in fsd.items())
    return {"dcp_round_trip": same, "full_state_dict_into_plain": loaded,
            "state_dict_keys_plain": list(fsd) == list(build().state_dict())}


def main():
    out_dir, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    ref = {None: reference(world), "bf16": reference(world, torch.bfloat16)}
    report = {}
    for case in cases:
        try:
            report[case] = run_case(case, rank, world, mesh, ref["bf16" if case == "bf16" else None], out_dir)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback
            report[case] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
