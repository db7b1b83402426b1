"""Issue 2 core: capture, block discovery and route rewrite on DiT, against a hand-written TREAD."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routefx
from routefx import Route, RouteError
from helpers import dit_inputs, kept_ids, tiny_dit, tread_dit

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def routed_and_reference(model, routes, batch, seed=0):
    """Run the routed model and the hand-written reference from the same RNG state."""
    x, t, y = dit_inputs(batch)
    routed = routefx.apply(model, routes)
    torch.manual_seed(seed)
    out = routed(x, t, y)
    torch.manual_seed(seed)
    ref = tread_dit(model, x, t, y, routefx.route.resolve_routes(routes, len(model.blocks)))
    return routed, out, ref


@st.composite
def dit_routes(draw, depth=6):
    start = draw(st.integers(0, depth - 1))
    end = draw(st.integers(start, depth - 1))
    ratio = draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]))
    return [(start, end, ratio)]


@SETTINGS
@given(routes=dit_routes(), batch=st.integers(1, 8))
def test_matches_hand_written_tread(routes, batch):
    model = tiny_dit()
    routed, out, ref = routed_and_reference(model, routes, batch)
    assert out.shape == ref.shape == (batch, 8, 8, 8)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5), (out - ref).abs().max()
    (info,) = routefx.router(routed).routing
    n = 16
    assert info.ids.shape == (batch, n - int(n * routes[0][2]))
    assert (info.ids.diff(dim=1) > 0).all(), "indices sorted and unique per sample"


@SETTINGS
@given(routes=dit_routes(), batch=st.integers(1, 8))
def test_eval_and_ratio_zero_are_the_original(routes, batch):
    model = tiny_dit()
    x, t, y = dit_inputs(batch)
    routed = routefx.apply(model, routes)
    routed.eval()
    assert torch.equal(routed(x, t, y), model(x, t, y))
    zero = routefx.apply(model, [(s, e, 0.0) for s, e, _ in routes])
    zero.train()
    torch.manual_seed(3)
    a = zero(x, t, y)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    b = model(x, t, y)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state()), "ratio 0 must not draw random numbers"


def _block_io(model):
    """Record every block's input and output (full tensors seen at the block boundary)."""
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i, b in enumerate(model.blocks)]
    # hooks fire on leaf modules only: fx inlines the others (final_layer) into the graph
    hooks.append(model.final_layer.norm_final.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("final", a[0])))
    return seen, hooks


@SETTINGS
@given(routes=dit_routes(), batch=st.integers(1, 6))
def test_bypassed_tokens_unchanged_across_span(routes, batch):
    model = tiny_dit()
    (s, e, ratio), = routes
    routed = routefx.apply(model, routes, example_inputs=dit_inputs(2))
    seen, hooks = _block_io(model)
    routed(*dit_inputs(batch))
    for h in hooks:
        h.remove()
    (info,) = routefx.router(routed).routing
    before = seen[s - 1][1] if s > 0 else None
    after = seen[e + 1][0] if e + 1 < len(model.blocks) else seen["final"]
    kept = seen[e][1]
    assert seen[s][0].shape[1] == info.ids.shape[1] == kept.shape[1]
    if before is not None:
        m = info.mask
        assert torch.equal(after[m], before[m]), "bypassed tokens re-enter unchanged"
        assert torch.equal(seen[s][0], before.gather(1, info.ids[..., None].expand(-1, -1, before.shape[-1])))
    assert torch.equal(after.gather(1, info.ids[..., None].expand(-1, -1, kept.shape[-1])), kept)


def test_gradients_reach_every_parameter_and_token():
    model = tiny_dit()
    x, t, y = dit_inputs(4)
    x.requires_grad_(True)
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(x, t, y).square().mean().backward()
    for name, p in routed.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (x.grad.abs().sum(dim=1) > 0).all(), "every input pixel (every token) gets a gradient"


def test_selection_differs_across_batch_and_matches_reference_rng():
    torch.manual_seed(0)
    routed = routefx.apply(tiny_dit(), [(1, 4, 0.5)])
    x, t, y = dit_inputs(8)
    g = torch.Generator().manual_seed(5)
    routefx.router(routed).control.generator = g
    routed(x, t, y)
    ids = routefx.router(routed).routing[0].ids
    assert len({tuple(r.tolist()) for r in ids}) > 1
    assert torch.equal(ids, kept_ids(8, 16, 0.5, torch.Generator().manual_seed(5)))


def test_multiple_routes_and_negative_indices():
    model = tiny_dit(depth=8)
    routes = [(0, 2, 0.5), (4, -2, 0.25)]
    routed, out, ref = routed_and_reference(model, routes, 3)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert [i.route for i in routefx.router(routed).routing] == [Route(0, 2, 0.5), Route(4, 6, 0.25)]
    assert [i.ids.shape[1] for i in routefx.router(routed).routing] == [8, 12]


def test_adjacent_routes_match_reference():
    model = tiny_dit()
    routed, out, ref = routed_and_reference(model, [(1, 2, 0.5), (3, 5, 0.75)], 2)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_batch_size_stays_free_and_shape_retraces():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)], example_inputs=dit_inputs(2))
    assert routed(*dit_inputs(7)).shape == (7, 8, 8, 8)
    assert len(routefx.router(routed)._graphs) == 1, "batch 7 reuses the batch-2 graph"
    big = tiny_dit(input_size=16)
    routed = routefx.apply(big, [(1, 4, 0.5)])
    routed(*dit_inputs(2, input_size=16))
    big.pos_embed.data = big.pos_embed.data  # same model, other resolution would need other pos_embed
    assert routefx.router(routed).routing[0].num_tokens == 64


def test_graph_cache_fast_path_never_serves_a_stale_graph():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)], generator=torch.Generator())

    def call(batch, ratio=0.5, t_dtype=torch.float32, y_as_kwarg=False):
        """Routed vs a fresh apply at the same seeds; returns how many graphs `routed` holds."""
        x, t, y = dit_inputs(batch)
        args, kwargs = ((x, t.to(t_dtype)), {"y": y}) if y_as_kwarg else ((x, t.to(t_dtype), y), {})
        fresh = routefx.apply(copy.deepcopy(model), [(1, 4, ratio)], generator=torch.Generator())
        fresh.train(routed.training)
        routefx.router(fresh).control.forced = routefx.router(routed).control.forced
        outs = []
        for m in (routed, fresh):
            routefx.router(m).control.generator.manual_seed(0)
            torch.manual_seed(1)
            outs.append(m(*args, **kwargs))
        assert torch.equal(*outs)
        assert routefx.router(routed)._last[0] is routefx.router(routed).graph_for(args, kwargs), "the graph the full lookup picks"
        return len(routefx.router(routed)._graphs)

    assert [call(2), call(3)] == [1, 1], "batch 3 reuses the batch-2 graph"
    assert call(3, t_dtype=torch.float64) == 2
    assert call(3, y_as_kwarg=True) == 3
    assert [call(2), call(2)] == [3, 3], "back to the first graph"
    routefx.router(routed).set_ratio(0.25)
    assert call(2, ratio=0.25) == 3 and routefx.router(routed).routing[0].ids.shape == (2, 12)
    routefx.router(routed).set_ratio(None)
    routed.float()  # new buffer objects: the graphs read the model's tensors live, and stay
    assert call(2) == 3
    routed.eval()
    with routefx.force_routing(routed):
        assert call(2) == 4, "eval mode has its own graph"
    static = routefx.apply(model.train(), [(1, 4, 0.5)], static_batch=True)
    static(*dit_inputs(2))
    static(*dit_inputs(3))
    assert len(routefx.router(static)._graphs) == 2


def test_state_dict_is_the_original_and_remove_restores():
    model = tiny_dit()
    before = copy.deepcopy(model.state_dict())
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(*dit_inputs(2))
    sd = routed.state_dict()
    assert list(sd) == list(before)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    plain = tiny_dit(seed=9)
    plain.load_state_dict(sd)
    routed.load_state_dict(before)
    assert routefx.remove(routed) is model
    again = routefx.apply(routed, [(2, 3, 0.25)])
    assert again is model and routefx.router(again).routes == [Route(2, 3, 0.25)]


def test_force_routing_in_eval_uses_eval_graph_and_override():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed.eval()
    x, t, y = dit_inputs(3)
    torch.manual_seed(0)
    with routefx.force_routing(routed, ratio=0.25):
        out = routed(x, t, y)
    torch.manual_seed(0)
    ref = tread_dit(model, x, t, y, [Route(1, 4, 0.25)])  # eval: no label dropout
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert routefx.router(routed).routing[0].ids.shape[1] == 12
    assert torch.equal(routed(x, t, y), model(x, t, y)), "forcing ends with the context"


def test_graph_lints_and_has_route_markers():
    routed = routefx.apply(tiny_dit(), [(1, 4, 0.5)], example_inputs=dit_inputs(2))
    rg = routefx.router(routed)._graphs[0][1]
    rg.gm.graph.lint()
    blocks = [n for n in rg.gm.graph.nodes if "block" in n.meta.get("routefx", {})]
    assert [n.meta["routefx"]["block"] for n in blocks] == list(range(6))
    code = rg.gm.code
    assert code.count("gather_tokens(") == 1 and code.count("scatter_tokens(") == 1
    assert code.index("routefx_route_0(blocks_0)") < code.index("blocks_1 = ")
    assert rg.plans[0].gathered[0]["tensor"] == "blocks_0" and rg.plans[0].scattered[0]["base"] == "blocks_0"


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("routes, match", [
    ([(0, 9, 0.5)], "out of range"),
    ([(-9, 2, 0.5)], "out of range"),
    ([(4, 2, 0.5)], "comes after its end"),
    ([(1, 2, 1.0)], r"outside \[0, 1\)"),
    ([(1, 2, -0.1)], r"outside \[0, 1\)"),
    ([(1, 2, float("nan"))], "finite number"),
    ([(1, 3, 0.5), (3, 4, 0.5)], "overlap"),
    ([(1.5, 3, 0.5)], "must be an int"),
    ([(1, 3)], r"\(start, end, ratio\)"),
    ([(1, 2, 0.99)], None),  # keeps 1 of 16 tokens: allowed
])
def test_route_errors_name_the_fix(routes, match):
    model = tiny_dit()
    if match is None:
        routefx.apply(model, routes)(*dit_inputs(2))
        return
    with pytest.raises(RouteError, match=match):
        routefx.apply(model, routes)(*dit_inputs(2))


def test_too_few_tokens_to_route():
    # With int() truncation any ratio < 1 keeps >= 1 of N >= 1 tokens; ratio 1 is refused above.
    # A single-token model has nothing to route and is refused before training starts.
    with pytest.raises(RouteError, match="Too few tokens"):
        routefx.apply(tiny_dit(input_size=2), [(1, 2, 0.5)], example_inputs=dit_inputs(2, input_size=2))


def test_unknown_block_names():
    with pytest.raises(RouteError, match="no module named 'blokcs'.*routefx.inspect"):
        routefx.apply(tiny_dit(), [(0, 1, 0.5)], blocks="blokcs")


def test_explicit_blocks_override():
    model = tiny_dit()
    routed = routefx.apply(model, [(0, 1, 0.5)], blocks=[f"blocks.{i}" for i in range(2, 6)])
    torch.manual_seed(0)
    out = routed(*dit_inputs(2))
    torch.manual_seed(0)
    assert torch.allclose(out, tread_dit(model, *dit_inputs(2), [Route(2, 3, 0.5)]), atol=1e-6)


class NoChain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: no graph can stand for it
            x = -x
        for b in self.blocks:
            x = b(x)
        return x


def test_model_without_chain_and_untraceable_model():
    with pytest.raises(RouteError, match="No block chain found.*blocks="):
        routefx.apply(NoChain(), [(0, 1, 0.5)], example_inputs=(torch.randn(2, 3, 4),))
    with pytest.raises(routefx.CaptureError, match="Data-dependent control flow at .*test_core.py.*leaf_modules"):
        routefx.apply(Untraceable(), [(0, 1, 0.5)], example_inputs=(torch.randn(2, 3, 4),))
