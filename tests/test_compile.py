"""torch.compile / dynamo on a routed DiT: one graph, no breaks, same numbers as eager."""
import copy

import pytest
import torch

import routefx
from helpers import dit_inputs, tiny_dit


def test_dynamo_sees_one_graph_without_breaks():
    routed = routefx.apply(tiny_dit(), [(1, 4, 0.5)], example_inputs=dit_inputs(2))
    torch._dynamo.reset()
    for fn in (routed, routefx.router(routed)._graphs[0][1].gm):
        report = torch._dynamo.explain(fn)(*dit_inputs(2))
        assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
        torch._dynamo.reset()


@torch._inductor.config.patch(fallback_random=True)
def test_compiled_routed_step_matches_eager():
    # inductor draws random numbers its own way; fallback_random makes it use eager's RNG so
    # the token selection (and DiT's label dropout) match the eager run exactly
    torch._dynamo.reset()
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    x, t, y = dit_inputs(3)
    compiled = torch.compile(routed)
    torch.manual_seed(0)
    out = compiled(x, t, y)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)
    ref = routed(x, t, y)
    ref.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n
    torch._dynamo.reset()


@torch._inductor.config.patch(fallback_random=True)
def test_apply_compile_one_graph_for_every_batch_size():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 3, 0.5)], compile=True)
    eager = routefx.apply(copy.deepcopy(model), [(1, 3, 0.5)])  # (apply routes in place)
    for batch in (3, 5, 2):
        torch.manual_seed(batch)
        out = routed(*dit_inputs(batch))
        out.sum().backward()
        torch.manual_seed(batch)
        assert torch.allclose(out, eager(*dit_inputs(batch)), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"]["ok"] == 1, "no recompilation for new batch sizes"
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_blocks_compiled_by_the_user_route_like_eager(how):
    # regional compilation: `block.compile()` in place, or `blocks[i] = torch.compile(block)`, before
    # or after `apply`. Capture runs the blocks on fake tensors, which inductor's code must never see
    # (it crashed the process before capture forced eager), and the routed step must equal eager's
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, routes = tiny_dit(), [(1, 4, 0.5)]
    x, t, y = dit_inputs(3)

    def step(routed):
        torch.manual_seed(0)
        out = routed(x, t, y)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return out.detach(), grads

    def routed_model():
        return routefx.apply(model, routes, generator=torch.Generator().manual_seed(0))

    ref_out, ref_grads = step(routed_model())
    before = routed_model()  # applied before the blocks are compiled
    for i, block in enumerate(model.blocks):
        if how == "in_place":
            block.compile()
        else:
            model.blocks[i] = torch.compile(block)
    for routed in (before, None):  # routed before the blocks were compiled, then routed again
        out, grads = step(routed or routed_model())
        assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] >= 1, "the routed steps ran the compiled blocks"
    torch._dynamo.reset()
