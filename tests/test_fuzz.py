"""Bad input, fuzzed: every invalid route list is refused with a RouteError before training."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import routefx
from routefx import Route, RouteError
from routefx.route import resolve_routes
from helpers import dit_inputs, tiny_dit

DEPTH = 6
junk = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.integers(-20, 20))
ratio = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), junk)


def _valid(r) -> bool:
    ok_idx = lambda v: isinstance(v, int) and not isinstance(v, bool) and -DEPTH <= v < DEPTH  # noqa: E731
    if not (isinstance(r, tuple) and len(r) == 3 and ok_idx(r[0]) and ok_idx(r[1])):
        return False
    q = r[2]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0 <= q < 1:
        return False
    return r[0] % DEPTH <= r[1] % DEPTH


def _valid_list(routes) -> bool:
    if not isinstance(routes, list) or not all(_valid(r) for r in routes):
        return False
    spans = sorted((r[0] % DEPTH, r[1] % DEPTH) for r in routes)
    return all(b[0] > a[1] for a, b in zip(spans, spans[1:]))


route_lists = st.lists(st.tuples(junk, junk, ratio) | st.tuples(st.integers(-8, 8), st.integers(-8, 8), ratio)
                       | junk, max_size=3) | junk


@settings(max_examples=300, deadline=None)
@given(routes=route_lists)
def test_invalid_route_lists_are_refused_valid_ones_resolve(routes):
    if _valid_list(routes):
        resolved = resolve_routes(routes, DEPTH)
        assert all(0 <= r.start <= r.end < DEPTH for r in resolved)
        return
    with pytest.raises(RouteError):
        resolve_routes(routes, DEPTH)


@settings(max_examples=15, deadline=None)
@given(routes=route_lists.filter(lambda r: not _valid_list(r)))
def test_invalid_routes_fail_at_first_call_before_any_step(routes):
    model = tiny_dit()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RouteError):
        routefx.apply(model, routes)(*dit_inputs(2))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_duplicate_and_empty_route_lists():
    with pytest.raises(RouteError, match="overlap"):
        resolve_routes([(1, 2, 0.5), (1, 2, 0.5)], DEPTH)
    assert resolve_routes([], DEPTH) == []
    routed = routefx.apply(tiny_dit(), [])  # no route: the captured graph is the model itself
    x = dit_inputs(2)
    torch.manual_seed(0)
    a = routed(*x)
    torch.manual_seed(0)
    assert torch.equal(a, routed(*x))


def test_wrong_example_inputs():
    with pytest.raises(RouteError):
        routefx.apply(tiny_dit(), [(1, 2, 0.5)], example_inputs=(torch.randn(2, 4, 8, 8),))  # t, y missing
    with pytest.raises(RouteError, match="without any tensor"):
        routefx.apply(tiny_dit(), [(1, 2, 0.5)], example_inputs=(1, 2, 3))


class Downsample(torch.nn.Module):
    """A block that halves the token count (merging pairs): it cannot sit inside a route."""

    def __init__(self, d, merge=False):
        super().__init__()
        self.fc, self.merge = torch.nn.Linear(d, d), merge

    def forward(self, x):
        x = x + self.fc(x)
        return x.reshape(x.shape[0], x.shape[1] // 2, 2, -1).mean(2) if self.merge else x


class Pyramid(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Downsample(8, merge=(i == 2)) for i in range(5))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_block_that_changes_token_count_is_refused_inside_a_route():
    x = torch.randn(2, 16, 8)
    with pytest.raises(RouteError):
        routefx.apply(Pyramid(), [(1, 3, 0.5)], example_inputs=(x,))
    routed = routefx.apply(Pyramid(), [(0, 1, 0.5)], example_inputs=(x,))  # before it: fine
    assert routed(x).shape == (2, 8, 8)


def test_route_type_errors_name_the_fix():
    with pytest.raises(RouteError, match=r"routes=\[\(2, 8, 0.5\)\]"):
        routefx.apply(tiny_dit(), "2,8,0.5")
    with pytest.raises(RouteError, match="ratio"):
        Route(0, 1, float("inf"))
