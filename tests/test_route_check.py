"""Issue 13: residuals outside the blocks, the stream among several token-shaped block
arguments, positions counted inside a block, per-token side inputs declared or found, memories
told from position tables by behaviour, and routefx.check (the apply-time check on real values).
Every routed result is compared with a hand-written TREAD forward at the same token ids (float64,
outputs and gradients); every refusal's message is checked, and the fix it names is followed."""
import re

import pytest
import torch

import routefx
import route_check_models as M
from helpers import gather, kept_ids, scatter

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 7


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, M.C_IN, M.SIDE, M.SIDE, generator=g, dtype=torch.float64)


def _model(cls, *a):
    torch.manual_seed(0)
    return cls(*a).double()


def reference(model, x, extra, route, gather_extra=lambda e, ids: e):
    """TREAD over the model's own loop steps (`model.call`)."""
    s, e, r = route
    h, ex = model.prep(x), model.extras(x, *extra) if hasattr(model, "extras") else extra
    saved = ids = exg = None
    for i, blk in enumerate(model.blocks):
        if i == s:
            saved, ids = h, kept_ids(h.shape[0], h.shape[1], r)
            h, exg = gather(h, ids), gather_extra(ex, ids)
        h = model.call(i, blk, h, exg if s <= i <= e else ex)
        if i == e:
            h = scatter(saved, ids, h)
    return model.head(h), ids


def check_exact(model, args, route, ref, **kw):
    """Routed training forward == `ref` (output, every gradient, ids); eval is the model itself."""
    routed = routefx.apply(model, [route], **kw)
    w = torch.randn(1, dtype=torch.float64)
    torch.manual_seed(SEED)
    out = routed(*args)
    (out * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    want, ids = ref()
    (want * w).sum().backward()
    assert torch.equal(routefx.router(routed).routing[0].ids, ids)
    assert torch.allclose(out, want, atol=1e-10, rtol=1e-8), (out - want).abs().max()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in got), n
        assert p.grad is None or torch.allclose(got[n], p.grad, atol=1e-10, rtol=1e-8), n
    model.zero_grad(set_to_none=True)
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(*args), model(*args))
    return routefx.router(routed)


ROUTES = [(1, 3, 0.5), (0, 4, 0.25), (2, 4, 0.75), (4, 4, 0.5)]  # (.., 4): ends at the last block


@pytest.mark.parametrize("how", ["plus", "plus_after", "half", "gated"])
@pytest.mark.parametrize("route", ROUTES)
def test_residual_written_outside_the_blocks(how, route):
    """Bypassed tokens re-enter once: before, `h = h + blk(h)` gave them 2x (1.5x) their value."""
    model, x = _model(M.Residual, how), _inputs()
    check_exact(model, (x,), route, lambda: reference(model, x, (), route))


@pytest.mark.parametrize("route", [(1, 4, 0.5), (0, 5, 0.5), (3, 3, 0.25)])
def test_alternating_attention_and_mlp_blocks_with_the_mlp_residual_outside(route):
    model, x = _model(M.AttnThenMlp), _inputs()
    check_exact(model, (x,), route, lambda: reference(model, x, (), route))


@pytest.mark.parametrize("order", ["hx0", "x0h"])
@pytest.mark.parametrize("route", [(0, 2, 0.5), (1, 3, 0.5), (2, 4, 0.25)])
def test_stream_beside_a_fixed_initial_embedding_in_either_argument_order(order, route):
    """`blk(x0, h)`: the block output continues h (the argument block k-1 feeds), not x0, the
    first image-derived argument; at block 0, h = x0 + pos is the stream."""
    model, x = _model(M.WithX0, order), _inputs()
    s, e, r = route

    def ref():
        x0 = model.prep(x)
        h, ids = x0 + model.pos, None
        for i, blk in enumerate(model.blocks):
            if i == s:
                saved, ids = h, kept_ids(h.shape[0], h.shape[1], r)
                h, x0g = gather(h, ids), gather(x0, ids)
            xx = x0g if s <= i <= e else x0
            h = blk(h, xx) if order == "hx0" else blk(xx, h)
            if i == e:
                h = scatter(saved, ids, h)
        return model.head(h), ids

    check_exact(model, (x,), route, ref)


@pytest.mark.parametrize("how", ["arange", "slice"])
def test_positions_counted_inside_a_block_are_refused_then_routed_by_order_when_asked(how):
    """With fewer tokens a block numbering them itself gives the kept tokens positions 0..k-1:
    the apply-time check (every token kept, shuffled) sees it and names the block; with
    ordered=True that meaning is accepted and routed exactly as written."""
    model, x = _model(M.CountedPositions, how), _inputs()
    route = (1, 3, 0.5)
    with pytest.raises(routefx.RouteError, match=r"Route 0 \(1, 3, 0.5\) fails routefx's check on real values.*"
                       r"first block whose output differs for the same tokens is 'blocks.1'.*ordered=True"):
        routefx.apply(model, [route])(x)
    check_exact(model, (x,), route, lambda: reference(model, x, (), route), ordered=True)


def _bias(batch=2):
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 1, M.N, M.N, generator=g, dtype=torch.float64)


def _gather_bias(extra, ids):
    (b,) = extra
    b = b.expand(ids.shape[0], *b.shape[1:])
    b = b.gather(2, ids[:, None, :, None].expand(-1, b.shape[1], -1, b.shape[3]))
    return (b.gather(3, ids[:, None, None, :].expand(-1, b.shape[1], b.shape[2], -1)),)


def test_attention_bias_on_two_token_dims_is_refused_naming_it_and_the_named_fix_routes_exactly():
    model, x, bias = _model(M.Biased), _inputs(), _bias()
    route = (1, 3, 0.5)
    with pytest.raises(routefx.RouteError, match=r"'bias' \(2, 1, 16, 16\) with the full count of 16 tokens.*"
                       r"per_token=\['bias'\]") as err:
        routefx.apply(model, [route])(x, bias)
    fix = eval(re.search(r"per_token=(\[[^\]]*\])", str(err.value)).group(1))  # the advice, followed
    r = check_exact(model, (x, bias), route, lambda: reference(model, x, (bias,), route, _gather_bias),
                    per_token=fix)
    assert [g["tensor"] for g in r.plans[0].gathered] == ["blocks_0", "bias"]


def test_declared_names_must_exist():
    with pytest.raises(routefx.RouteError, match=r"per_token=\[... 'mask' ...\] names no input.*Inputs: \['x', 'bias'\]"):
        routefx.apply(_model(M.Biased), [(1, 3, 0.5)], per_token=["mask"])(_inputs(), _bias())


def test_a_learned_memory_as_long_as_the_image_is_left_whole_and_the_position_table_gathered():
    """Both are (1, 16, D) parameters entering every block. The memory is attended to as a whole
    (leaving it in place while the tokens are shuffled only shuffles the output), the position
    table is added per token: only the table follows the selection."""
    model, x = _model(M.Memory), _inputs()
    route = (1, 3, 0.5)
    r = check_exact(model, (x,), route,
                    lambda: reference(model, x, (), route, lambda e, ids: (e[0], gather(e[1], ids))))
    assert {g["tensor"] for g in r.plans[0].gathered} == {"blocks_0", "pos"}


def test_not_per_token_overrides_the_default_reading():
    """Declared not per-token, the position table stays whole: the block then fails on fewer
    tokens, and the refusal says which input it received in full."""
    with pytest.raises(routefx.RouteError, match=r"'pos' \(1, 16, 16\) with the full count"):
        routefx.apply(_model(M.Memory), [(1, 3, 0.5)], not_per_token=["pos"])(_inputs())


def test_check_status_and_no_trace_left():
    """The check runs once per capture on real values and leaves RNG and BatchNorm statistics as
    they were; mamba-ssm scans and ordered=True skip it; verify=False does not run it."""
    model, x = _model(M.Normed), _inputs(3)
    bn = model.bn.running_mean.clone()
    rng = torch.get_rng_state()
    routed = routefx.apply(model, [(1, 3, 0.5)], example_inputs=(x,))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model.bn.running_mean, bn)
    assert routefx.router(routed)._graphs[0][1].check == "passed"
    assert routefx.router(routefx.apply(model, [(1, 3, 0.5)], example_inputs=(x,), verify=False))._graphs[0][1].check == "not run"
    assert routefx.router(routefx.apply(model, [(1, 3, 0.5)], example_inputs=(x,), ordered=True))._graphs[0][1].check.startswith("skipped")
    from routefx.backbones import create
    dim = create("DiM-T/2")
    xd, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
    assert routefx.router(routefx.apply(dim, [(2, 3, 0.5)], example_inputs=(xd, t, y)))._graphs[0][1].check.startswith("skipped: the blocks read")


def _broken_end(routed, how):
    """The routed graph of `routed` with its first route end broken as `how` says (a routefx bug
    simulated on the graph)."""
    rg = routefx.router(routed)._graphs[0][1]
    graph = rg.gm.graph
    end = next(n for n in graph.nodes if n.op == "call_function" and n.target is routefx.ops.scatter_tokens)
    base, sel, kept = end.args
    if how == "in place":  # the route-start value changed between the route's start and end
        with graph.inserting_before(end):
            graph.call_method("mul_", (base, 2.0))
    elif how == "late base":  # the bypassed tokens get a value that passed the route's first block
        end.args = (kept, sel, kept)
    else:  # the kept tokens' values never passed the route
        end.args = (base, sel, base)
    rg.gm.recompile()
    return rg


@pytest.mark.parametrize("how, message", [
    ("in place", r"the bypassed tokens' values after it differ from the values their stream had at the route start"),
    ("late base", r"the route-start value it puts back \('\w+'\) is computed after the route's selection"),
    ("kept", r"the value it writes for the kept tokens \('\w+'\) does not pass the route")])
def test_route_end_check_reports_a_broken_end(how, message):
    """The route-end part of the check (routefx.check.bypass_check) is independent of how the
    route was built: an end that puts back a value computed inside the route, writes kept values
    that never passed it, or finds its saved stream changed in place is reported as a routefx
    bug naming the route and the tensor; the intact graph passes."""
    model, x = _model(M.Normed), _inputs(3)
    routed = routefx.apply(model, [(1, 3, 0.5)], example_inputs=(x,))
    inner = routefx.router(routed)
    tensors = [x]
    routefx.check.bypass_check(model, inner._graphs[0][1], tensors, inner.control)  # intact: passes
    rg = _broken_end(routed, how)
    with pytest.raises(routefx.RouteError, match=r"routefx bug: route 0 \(1, 3, 0.5\) ends at '\w+' .*" + message):
        routefx.check.bypass_check(model, rg, tensors, inner.control)


def test_check_keeps_the_routing_generator():
    """The check draws selections from the routing generator and puts its state back: with a
    generator, training draws the same selections with the check on as with it off."""
    model, x = _model(M.Normed), _inputs(3)
    ids = []
    for verify in (True, False):
        routed = routefx.apply(model, [(1, 3, 0.5)], generator=torch.Generator().manual_seed(3), verify=verify)
        routed(x)
        ids.append(routefx.router(routed).routing[0].ids)
    assert torch.equal(*ids)
