"""Chain discovery over several block types and around stacks that are not the chain, and leaf
modules that return tuples (issue 12, items 4 and 5), each against a hand-written TREAD forward
at the same RNG state: outputs, kept ids and every gradient."""
import pytest
import torch

import routefx
from chain_models import Alternating, Refiners, RopeLeaf, patchify

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch, n, ratio, protect=0, shared=False):
    ids = torch.rand(1 if shared else batch, n - protect).argsort(1)[:, :n - protect - int((n - protect) * ratio)]
    ids = ids.sort(1).values.expand(batch, -1) + protect
    return torch.cat([torch.arange(protect).expand(batch, protect), ids], 1)


def _tread(blocks, h, route, protect=0, shared=False, extra=lambda i, ids: ()):
    """Blocks s..e on the kept tokens, scattered back into the route-start value after block e."""
    s, e, ratio = route
    for i, blk in enumerate(blocks):
        if i == s:
            ids = _ids(h.shape[0], h.shape[1], ratio, protect, shared)
            idx = ids[..., None].expand(-1, -1, h.shape[-1])
            saved, h = h, h.gather(1, idx)
        h = blk(h, *extra(i, ids if s <= i <= e else None))
        if i == e:
            h = saved.scatter(1, idx, h)
    return h, ids


def _same(model, routed, args, reference):
    torch.manual_seed(3)
    out = routed(*args)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    ref, ids = reference(*args)
    ref.square().mean().backward()
    assert torch.equal(routefx.router(routed).routing[0].ids, ids)
    assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("route", [(1, 5, 0.5), (2, 3, 0.25), (0, 7, 0.75)])
def test_alternating_layer_types_form_one_chain(route):
    torch.manual_seed(0)
    model = Alternating()
    routed = routefx.apply(model, [route])
    x = torch.randn(2, 4, 8, 8)

    def reference(x):
        h, ids = _tread(model.layers, model.embed(patchify(x)), route)
        return model.head(h), ids
    _same(model, routed, (x,), reference)
    assert routefx.router(routed)._graphs[0][1].chain.names == [f"layers.{i}" for i in range(8)]


@pytest.mark.parametrize("text_len", [3, 16])  # 16 = the image token count
def test_refiner_stacks_and_embedders_are_not_the_chain(text_len):
    torch.manual_seed(0)
    model = Refiners()
    routed = routefx.apply(model, [(1, 3, 0.5)])
    args = (torch.randn(2, 4, 8, 8), torch.randn(2, text_len, 5), torch.rand(2))

    def reference(x, text, t):
        h, ids = _tread(model.layers, model.prep(x, text, t), (1, 3, 0.5), protect=text_len)
        return model.head(h[:, text_len:]), ids
    _same(model, routed, args, reference)
    rg = routefx.router(routed)._graphs[0][1]
    assert rg.chain.names == [f"layers.{i}" for i in range(5)]
    assert rg.plans[0].protect == text_len  # the text in front of the image is never routed
    assert ["noise_refiner.0", "noise_refiner.1"] + [f"layers.{i}" for i in range(5)] in rg.chain.alternatives


def test_leaf_returning_a_tuple_is_gathered_element_by_element():
    """`leaf_modules=['rope']` (routefx's hint for code it cannot trace): the (cos, sin) tuple the
    blocks receive whole is split, each unbatched (N, d) table follows the kept tokens, with one
    index set for the batch (said by a warning)."""
    torch.manual_seed(0)
    model = RopeLeaf()
    with pytest.warns(UserWarning, match="ONE index set for the whole batch"):
        routed = routefx.apply(model, [(1, 3, 0.5)], leaf_modules=["rope"], example_inputs=(torch.randn(2, 4, 8, 8),))
    x = torch.randn(3, 4, 8, 8)

    def reference(x):
        h = model.embed(patchify(x))
        cos, sin = model.rope(h.shape[1], h.device)

        def rope(i, ids):
            return ((cos, sin),) if ids is None else ((cos[ids[0]], sin[ids[0]]),)
        h, ids = _tread(model.blocks, h, (1, 3, 0.5), shared=True, extra=rope)
        return model.head(h), ids
    _same(model, routed, (x,), reference)
    kinds = [g["kind"] for g in routefx.router(routed).plans[0].gathered]
    assert kinds.count("table0") == 2 and routefx.router(routed).plans[0].shared_indices
