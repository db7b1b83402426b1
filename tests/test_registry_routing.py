"""Every backbone family routefx ships or names (DiT, SiT, U-ViT, DiM/Mamba, timm ViT), one
property suite: Hypothesis over routes and batch sizes, checked at the block boundaries with
forward hooks (what block `start` receives, what block `end + 1` receives, for every crossing
stream), plus eval / ratio-0 equality, gradients, the crossing report, and a hand-written
routed DiM forward.
"""
import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routefx
from routefx import RouteError
from routefx.backbones import create, example_inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model, std=0.05):
    """Move every weight off its init so zero-initialised layers (adaLN-Zero) carry signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.train()


def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=6)


def _uvit_blocks(m):
    return [*m.in_blocks, m.mid_block, *m.out_blocks]


# name: (build, inputs(model, batch), blocks(model), prefix tokens, streams per block)
FAMILIES = {
    "DiT-T/2": (lambda: create("DiT-T/2", input_size=8), example_inputs, lambda m: list(m.blocks), 0, 1),
    "SiT-T/2": (lambda: create("SiT-T/2", input_size=8), example_inputs, lambda m: list(m.blocks), 0, 1),
    "U-ViT-T/2": (lambda: create("U-ViT-T/2"), example_inputs, _uvit_blocks, 2, 1),
    "DiM-T/2": (lambda: create("DiM-T/2", img_size=16), example_inputs, lambda m: list(m.layers), 2, 2),
    "timm-vit": (_timm_vit, lambda m, batch: (torch.randn(batch, 3, 64, 64),), lambda m: list(m.blocks), 1, 1),
}
_MODELS = {}


def family(name):
    if name not in _MODELS:
        build, inputs, blocks, prefix, streams = FAMILIES[name]
        torch.manual_seed(0)
        _MODELS[name] = _perturb(build())
    build, inputs, blocks, prefix, streams = FAMILIES[name]
    return _MODELS[name], inputs, blocks(_MODELS[name]), prefix, streams


def _first(out, k):
    return tuple(out[:k]) if isinstance(out, tuple) else (out,)


def record(blocks, k):
    """Hooks that keep each block's first `k` stream inputs and outputs."""
    seen = {}

    def hook(i):
        def fn(module, args, kwargs, out):
            ins = list(args) + list(kwargs.values())
            seen[i] = (tuple(ins[:k]), _first(out, k))
        return fn
    return seen, [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]


def take(x, ids):
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


@st.composite
def routes(draw, depth):
    start = draw(st.integers(1, depth - 2))
    end = draw(st.integers(start, depth - 2))
    return start, end, draw(st.sampled_from([0.25, 0.5, 0.75]))


@pytest.mark.parametrize("name", list(FAMILIES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_route_semantics_at_block_boundaries(name, data):
    model, inputs, blocks, prefix, k = family(name)
    s, e, ratio = route = data.draw(routes(len(blocks)), label="route")
    batch = data.draw(st.integers(1, 3), label="batch")
    args = inputs(model, batch=batch)
    routed = routefx.apply(model, [route])
    seen, hooks = record(blocks, k)
    try:
        routed(*args)
    finally:
        for h in hooks:
            h.remove()
    (info,) = routefx.router(routed).routing
    n = info.num_tokens
    assert info.protect == prefix and info.ids.shape == (batch, prefix + (n - prefix) - int((n - prefix) * ratio))
    assert torch.equal(info.ids[:, :prefix], torch.arange(prefix).expand(batch, -1)), "prefix never routed"
    assert (info.ids.diff(dim=1) > 0).all(), "kept tokens stay in ascending (scan) order"
    bypass = info.mask
    for j in range(k):  # every crossing stream (DiM: hidden and residual)
        before = seen[s - 1][1][j]  # the stream leaving block start-1, all N tokens
        assert torch.equal(seen[s][0][j], take(before, info.ids)), "block start gets the kept tokens, in order"
        after = seen[e + 1][0][j]  # what block end+1 receives
        assert after.shape == before.shape
        assert torch.equal(after[bypass], before[bypass]), "bypassed tokens re-enter unchanged"
        assert torch.equal(take(after, info.ids), seen[e][1][j]), "kept tokens come from block end"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deep_route_trains_equals_original_in_eval_and_reports_crossings(name):
    model, inputs, blocks, prefix, k = family(name)
    depth = len(blocks)
    route = (1, depth - 2, 0.5)  # most of the depth
    routed = routefx.apply(model, [route])
    args = inputs(model, batch=2)
    opt = torch.optim.SGD(routed.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    out = routed(*args)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    (plan,) = routefx.router(routed).plans
    assert plan.route == routefx.Route(*route) and len(plan.blocks) == depth - 2
    assert plan.gathered and plan.scattered, "the crossing report lists what is gathered and scattered"
    assert all({"tensor", "shape", "kind"} <= set(g) for g in plan.gathered)
    assert all({"tensor", "shape", "base"} <= set(sc) for sc in plan.scattered)
    assert len([sc for sc in plan.scattered]) >= k
    routed.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(routed(*args), model(*args)), "eval runs the original forward"
    model.train()
    zero = routefx.apply(model, [(1, depth - 2, 0.0)])
    torch.manual_seed(3)
    a = zero(*args)
    torch.manual_seed(3)
    assert torch.equal(a, model(*args)), "ratio 0 is the original forward"


def tread_dim(model, x, t, y, route):
    """TREAD over DiM's (hidden, residual) layers, written by hand: both streams gathered with
    one index set (prefix tokens kept) and scattered back into their own route-start values."""
    s, e, ratio = route
    hidden, residual = model.embed(x, t, y), None
    for i, layer in enumerate(model.layers):
        if i == s:
            n = hidden.shape[1] - model.extras
            keep = torch.rand(hidden.shape[0], n).argsort(dim=1)[:, : n - int(n * ratio)].sort(dim=1).values
            ids = torch.cat([torch.arange(model.extras).expand(hidden.shape[0], -1), keep + model.extras], 1)
            saved = hidden, residual
            hidden, residual = take(hidden, ids), take(residual, ids)
        hidden, residual = layer(hidden, residual)
        if i == e:
            idx = ids[..., None].expand(-1, -1, hidden.shape[-1])
            hidden, residual = saved[0].scatter(1, idx, hidden), saved[1].scatter(1, idx, residual)
    residual = hidden + residual
    out = model.head(model.norm_f(residual.to(model.norm_f.weight.dtype))[:, model.extras:])
    return model.unpatchify(out)


@pytest.mark.parametrize("route", [(1, 4, 0.5), (2, 2, 0.75), (1, 3, 0.25)])
def test_dim_matches_hand_written_reference(route):
    model, inputs, *_ = family("DiM-T/2")
    args = inputs(model, batch=3)
    routed = routefx.apply(model, [route])
    torch.manual_seed(7)
    out = routed(*args)
    torch.manual_seed(7)
    ref = tread_dim(model, *args, route)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()


def test_dim_route_from_block_0_is_refused():
    """Layer 0 gets residual=None: its residual output has no route-start value to keep."""
    model, inputs, *_ = family("DiM-T/2")
    routed = routefx.apply(model, [(0, 3, 0.5)])
    with pytest.raises(RouteError, match="Start the route one block later"):
        routed(*inputs(model, batch=2))
