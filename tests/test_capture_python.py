"""Capture of ordinary Python over shape values, asserts on tensor values, and output objects
(issue 12, items 1-3). Each model has the line in its ROOT forward (where `leaf_modules=` cannot
help) and is compared with a hand-written TREAD forward at the same RNG state: same kept tokens,
same output, same gradients. Values fixed at trace time are re-checked at run time.
"""
import pytest
import torch

import routefx
from capture_models import (D, Asserts, Base, DeviceAndDtype, Factories, ListTimesBatch, MappingDataclassOutput,
                            Output, PerSampleJoin, PerSampleLoop, Range, Round, SetItemAfter, SetItemPrefix, Slice, Tolist)
from routefx.errors import CaptureError

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTE = (1, 2, 0.5)


def _inputs(name, batch=2, size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    if name in ("Asserts",):
        return (x, torch.randint(0, 10, (batch,), generator=g))
    if name.startswith("SetItem"):
        return (x, torch.randn(batch, 3, D, generator=g))
    return (x,)


def _reference(model, args, route, protect=0):
    """TREAD by hand: the model's own prep, blocks with gather / scatter at the same RNG state."""
    s, e, ratio = route
    h = model.prep(*args)
    n = h.shape[1] - protect
    for i, blk in enumerate(model.blocks):
        if i == s:
            ids = torch.rand(h.shape[0], n).argsort(1)[:, :n - int(n * ratio)].sort(1).values + protect
            ids = torch.cat([torch.arange(protect).expand(h.shape[0], protect), ids], 1)
            saved, idx = h, ids[..., None].expand(-1, -1, h.shape[-1])
            h = h.gather(1, idx)
        h = blk(h)
        if i == e:
            h = saved.scatter(1, idx, h)
    return model.head(h), ids


CASES = [Slice, Range, Round, ListTimesBatch, PerSampleLoop, Factories, DeviceAndDtype, Tolist, Asserts, SetItemPrefix,
         MappingDataclassOutput]


@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
def test_root_forward_python_routes_like_the_reference(cls):
    torch.manual_seed(0)
    model = cls()
    routed = routefx.apply(model, [ROUTE])
    for batch in (2, 3):  # the batch size stays free (or is guarded and re-traced)
        args = _inputs(cls.__name__, batch)
        protect = args[1].shape[1] if cls is SetItemPrefix else 0
        torch.manual_seed(7)
        out = routed(*args)
        out = out.sample if isinstance(out, Output) else out
        assert isinstance(out, torch.Tensor)
        out.square().mean().backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        ref, ids = _reference(model, args, ROUTE, protect)
        ref.square().mean().backward()
        assert torch.equal(routefx.router(routed).routing[0].ids, ids)
        assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
        for n, p in model.named_parameters():
            assert (got[n] is None) == (p.grad is None), n
            assert got[n] is None or torch.allclose(got[n], p.grad, atol=1e-6), n
        model.zero_grad(set_to_none=True)
    assert routefx.router(routed).plans[0].protect == protect


def test_output_object_keeps_its_type_and_fields():
    torch.manual_seed(0)
    model = MappingDataclassOutput()
    out = routefx.apply(model, [ROUTE])(*_inputs("x"))
    assert type(out) is Output and list(out.keys()) == ["sample"] and isinstance(out.sample, torch.Tensor)
    assert out["sample"] is out.sample and out.extra is None


def test_tokens_assigned_after_the_image_are_refused():
    with pytest.raises(routefx.RouteError, match="AFTER the image tokens.*protect="):
        routefx.apply(SetItemAfter(), [ROUTE])(*_inputs("SetItemAfter"))


def test_image_joined_with_another_input_in_an_unfollowed_way_is_refused():
    """Text joined to the image tokens per sample (`cat` along dim 0 then `stack`, as Z-Image does
    with `pad_sequence`) would be routed with them: refused, naming the join."""
    with pytest.raises(routefx.RouteError, match="joining the image tokens with another input's values at .*cat"):
        routefx.apply(PerSampleJoin(), [ROUTE])(*_inputs("SetItemX"))


def test_asserts_on_values_still_check_at_run_time():
    torch.manual_seed(0)
    routed = routefx.apply(Asserts(), [ROUTE])
    x, y = _inputs("Asserts")
    routed(x, y)  # captured, passes
    with pytest.raises(AssertionError, match="model's assertion failed at .*capture_models.py.*assert y.max"):
        routed(x, torch.tensor([3, 12]))
    with pytest.raises(AssertionError, match="negative label"):
        routed(x, torch.tensor([3, -1]))


def test_a_constant_from_shapes_is_guarded():
    """`.tolist()` of shape-derived values is fixed for the capture; another image size re-traces."""
    torch.manual_seed(0)
    model = Tolist()
    routed = routefx.apply(model, [ROUTE])
    small, big = _inputs("Tolist", size=8)[0], _inputs("Tolist", size=12)[0]
    torch.manual_seed(3)
    a = routed(big)
    torch.manual_seed(3)
    assert torch.allclose(a, _reference(model, (big,), ROUTE)[0], atol=1e-6)
    routed(small)
    assert len(routefx.router(routed)._graphs) == 2


def test_data_dependent_tolist_is_still_refused():
    class DataTolist(Base):
        def prep(self, x):
            k = int(x.abs().sum().tolist()) % 3  # from the input's VALUES
            return self.tokens(x) * k

    with pytest.raises(CaptureError, match="leaf_modules"):
        routefx.apply(DataTolist(), [ROUTE])(*_inputs("x"))


def test_python_that_bakes_the_batch_size_in_retraces_per_batch_size():
    """A loop over the batch unrolls it into the graph: such a graph is kept per batch size (a new
    size is a new capture, not a GuardError). `[n] * batch` stays symbolic (fx records the
    multiplication), and a model without either keeps one graph."""
    torch.manual_seed(0)
    routed = [routefx.apply(cls(), [ROUTE]) for cls in (PerSampleLoop, ListTimesBatch, Round)]
    for batch in (2, 3, 2):
        for r in routed:
            r(*_inputs("x", batch))
    assert [[rg.batch_baked for _, rg in routefx.router(r)._graphs] for r in routed] == [[True, True], [False], [False]]


@pytest.mark.parametrize("how", ["lru", "module_lru", "dict", "attr", "buffer"])
def test_a_leaf_that_caches_what_it_computes_keeps_no_fake_tensor(how):
    """Capture runs leaf modules on fake tensors: a table the leaf caches then would be a fake
    one and break the next real forward (or silently stand for the real table). Every cache the
    fake run filled is emptied; the routed model matches the reference, twice, and in eval."""
    from torch._subclasses.fake_tensor import FakeTensor

    from capture_models import CachingLeaf, _sincos

    _sincos.cache_clear()
    torch.manual_seed(0)
    model = CachingLeaf(how)
    routed = routefx.apply(model, [ROUTE], leaf_modules=["pos"])
    args = _inputs("x")
    for _ in range(2):
        torch.manual_seed(7)
        out = routed(*args)
        torch.manual_seed(7)
        ref, _ = _reference(model, args, ROUTE)
        assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    pos = model.pos
    held = [pos.cached, *pos._cache.values(), *pos._buffers.values(), pos._table(16), _sincos(16, D)]
    assert not any(isinstance(t, FakeTensor) for t in held if t is not None)
    routed.eval()
    assert torch.allclose(routed(*args), model(*args), atol=1e-6)
