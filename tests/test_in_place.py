"""Issue 14, item 1: `routefx.apply` routes the model in place. The object, its class, its names
and state dict stay; hooks on the model and on modules the graph traces through still run;
`remove` undoes it; wrappers are refused with the way that works."""
import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import routefx
from helpers import dit_inputs, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTE = (1, 4, 0.5)


def _step(model, seed=0):
    torch.manual_seed(seed)
    return model(*dit_inputs(3))


def test_apply_returns_the_model_with_its_class_names_and_state():
    model = tiny_dit()
    cls, params = type(model), [n for n, _ in model.named_parameters()]
    mods, keys = [n for n, _ in model.named_modules()], list(model.state_dict())
    assert routefx.apply(model, [ROUTE]) is model and type(model) is cls
    out = _step(model)
    assert routefx.router(model).routing[0].ids.shape == (3, 8), "the training call was routed"
    assert [n for n, _ in model.named_parameters()] == params and [n for n, _ in model.named_modules()] == mods
    assert list(model.state_dict()) == keys
    model.load_state_dict(tiny_dit(seed=3).state_dict())  # strict, the plain model's keys
    assert not torch.equal(_step(model), out)
    model.eval()
    with torch.no_grad():
        plain = routefx.router(model).plain_forward(*dit_inputs(3))
        assert torch.equal(model(*dit_inputs(3)), plain)
    assert routefx.remove(model) is model and "forward" not in model.__dict__
    with pytest.raises(routefx.RouteError, match="No routed model found"):
        routefx.router(model)


def test_hooks_on_the_model_and_on_traced_modules_run_on_every_routed_call():
    """A forward hook on the model itself, on a module routefx would trace through (t_embedder)
    and on a block run once per routed call (capture's fake runs do not call them); a hook
    that changes t_embedder's output changes the routed output as it changes the model's."""
    model = tiny_dit()
    calls = {"model": 0, "t_embedder": 0, "block": 0}

    def count(name):
        def hook(module, args, out):
            calls[name] += 1
        return hook
    model.register_forward_hook(count("model"))
    model.t_embedder.register_forward_hook(count("t_embedder"))
    model.blocks[2].register_forward_hook(count("block"))
    routefx.apply(model, [ROUTE], verify=False)  # (the check's own forwards would count too)
    for _ in range(3):
        _step(model)
    assert calls == {"model": 3, "t_embedder": 3, "block": 3}
    rg = routefx.router(model)._graphs[0][1]
    assert "t_embedder" in {n.target for n in rg.gm.graph.nodes if n.op == "call_module"}, "a leaf: its hooks run"
    twin = copy.deepcopy(model)
    model.t_embedder.register_forward_hook(lambda m, a, out: out * 2)
    routefx.apply(twin, [ROUTE])  # captured with the hook in place
    twin.t_embedder.register_forward_hook(lambda m, a, out: out * 2)
    assert torch.equal(_step(model), _step(twin))


def test_a_hook_added_after_capture_to_a_traced_module_is_honoured():
    """The graph traced through `final_layer`; a hook registered there afterwards (as
    fully_shard does for an FSDP2 unit) makes the next call capture again with the module as a
    leaf, so the hook runs."""
    model = tiny_dit()
    routefx.apply(model, [ROUTE])
    first = _step(model)
    model.final_layer.register_forward_hook(lambda m, a, out: out + 1)
    assert torch.allclose(_step(model), first + 1, atol=1e-6)
    assert len(routefx.router(model)._graphs) == 1, "the stale graph was dropped"


def test_a_hooked_module_holding_the_blocks_is_refused():
    model = tiny_dit()
    holder = torch.nn.Module()
    model.register_module("stage", holder)
    holder.blocks = model.blocks  # (the same modules under a container with a hook)
    del model._modules["blocks"]
    model.__dict__["blocks"] = holder.blocks
    holder.register_forward_pre_hook(lambda m, a: None)
    routefx.apply(model, [ROUTE], blocks=[f"stage.blocks.{i}" for i in range(6)])
    with pytest.raises(routefx.RouteError, match=r"Module 'stage' \(Module\) has hooks .* holds the blocks "
                                                 r"\['stage.blocks.0', 'stage.blocks.1', 'stage.blocks.2'\]"):
        _step(model)


def test_wrappers_and_nested_routing_are_refused_with_the_fix():
    model = tiny_dit()
    with pytest.raises(routefx.RouteError, match=r"got a OptimizedModule: .* routefx.apply\(model._orig_mod, routes\)"):
        routefx.apply(torch.compile(model), [ROUTE])
    fake_ddp = type("DistributedDataParallel", (torch.nn.Module,), {})()
    fake_ddp.module = model
    with pytest.raises(routefx.RouteError, match=r"routefx.apply\(model.module, routes\)"):
        routefx.apply(fake_ddp, [ROUTE])
    assert DistributedDataParallel.__name__ == "DistributedDataParallel"
    holder = torch.nn.Sequential(routefx.apply(tiny_dit(), [ROUTE]))
    with pytest.raises(routefx.RouteError, match=r"Module '0' of this model is routed already"):
        routefx.apply(holder, [ROUTE])


def test_apply_again_replaces_the_routes():
    model = tiny_dit()
    routefx.apply(model, [ROUTE])
    _step(model)
    routefx.apply(model, [(2, 3, 0.25)])
    _step(model)
    (info,) = routefx.router(model).routing
    assert info.route == routefx.Route(2, 3, 0.25) and info.ids.shape == (3, 12)


def test_apply_on_a_full_size_model_built_on_meta():
    """DiT-XL/2 (675M parameters) built under torch.device("meta"): apply captures it on fake
    tensors (the check says it was skipped for meta tensors), a training call routes it on meta,
    and nothing was materialised (benchmarks/meta_apply.py prints the seconds and memory)."""
    from routefx.backbones import create
    with torch.device("meta"):
        model = create("DiT-XL/2")
        x, t, y = torch.randn(4, 4, 32, 32), torch.rand(4) * 999, torch.randint(0, 1000, (4,))
    routefx.apply(model, [(2, 23, 0.5)], example_inputs=(x, t, y))
    assert routefx.router(model)._graphs[0][1].check == "skipped: meta tensors"
    out = model(x, t, y)
    assert out.is_meta and out.shape == (4, 8, 32, 32)
    assert routefx.router(model).routing[0].ids.shape == (4, 128)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
