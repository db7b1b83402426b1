"""insert_routes: rewrite the graph so each route runs its blocks on the kept tokens only.

Needs `find_chain` (`meta['routefx']['block']`) and `analyze_streams`
(`meta['routefx']['token']`). For route `i` over blocks `s..e` the span region is block `s`,
every node that depends on block `s` and feeds block `e`, and block `e` (plus tuple element
picks). The pass inserts, in the graph:

* `routefx_route_i(x)` right before block `s`: draws the per-sample kept indices (a
  `RouteSelector`), from the block's first routed-stream argument;
* `gather_tokens(u, ids)` for every routed-stream or `(1, N, ...)` tensor that ENTERS the region,
  and `gather_table(u, ids, stream, dim)` for per-token tables (rotary `(T_text + N, d)`: rows
  before the stream's N kept; the route then draws one index set for the whole batch);
* `scatter_tokens(base, ids, v)` for every routed-stream tensor that LEAVES the region, where
  `base` is the route-start value of the stream `v` continues (block outputs continue their
  inputs position by position; a block with one routed output continues its first routed input).

The route's indices are appended to the graph outputs. Anything ambiguous is a `RouteError`
naming the node. Lint and recompile are left to the caller (once, at the end).
"""
import dataclasses
import operator

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from routefx.errors import INSPECT_HINT, RouteError
from .capture import user_frame
from routefx.ops import (RouteSelector, gather_joined, gather_side, gather_table, gather_tokens, scatter_joined,
                         scatter_tokens)
from .find_blocks import dataflow_graph, image_input
from .streams import (PER_SAMPLE_TABLES, reduces, declarable, flat_inputs, span_region, spine_inputs, stream_end,
                      stream_offsets, token_kind)

__all__ = ["RoutePlan", "insert_routes", "fp32_after_routes", "Float32Block"]


@dataclasses.dataclass
class RoutePlan:
    """What one route does to the graph: the crossing report."""

    index: int
    route: object
    blocks: list
    num_tokens: int
    protect: int
    num_kept: int
    shared_indices: bool = False  # one index set for the whole batch instead of one per sample
    gathered: list = dataclasses.field(default_factory=list)   # dicts: tensor, shape, kind, into
    scattered: list = dataclasses.field(default_factory=list)  # dicts: tensor, shape, base
    passed: list = dataclasses.field(default_factory=list)     # dicts: tensor, shape


def _shape(node):
    return tuple(getattr(node.meta.get("routefx", {}).get("spec"), "shape", ()) or ())


def _label(node):
    return node.meta.get("routefx", {}).get("token", False)


def _is_container(label) -> bool:
    """A tuple of per-element labels (a block returning several values), not a joined stream."""
    return isinstance(label, tuple) and not (label and label[0] == "joined")


def _where(node):
    return f"'{node.name}' ({node.format_node()})"


def insert_routes(gm: fx.GraphModule, chain, streams, routes: list, control, shared_indices=False) -> list:
    """Insert every route (sorted, non-overlapping, resolved) into `gm.graph`; return the plans.

    `shared_indices`: one index set for the whole batch (required by unbatched per-token tables).
    """
    plans, selectors = [], []
    for i, route in enumerate(routes):
        after = routes[i - 1].end if i else None
        plan, sel = _insert_one(gm, chain, streams, i, route, control, shared_indices, after)
        plans.append(plan)
        selectors.append(sel)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + tuple(selectors),)
    return plans


def _check_route(gm, chain, streams, i, route):
    s, e = route.start, route.end
    if streams.failed_at is not None and streams.failed_at[0] <= e:
        b, err, node = streams.failed_at
        where = "fails" if s <= b else "sits before this route and fails"
        name = chain.names[min(b, len(chain) - 1)]
        if node is not None and "block" not in node.meta.get("routefx", {}):  # the model's own code
            what, line = f"the model's own code before block {b} ('{name}')", node.meta["routefx"].get("at", "?")
        else:
            what, line = f"block {b} ('{name}')", user_frame(err.__traceback__)
        raise RouteError(f"Route {i} {tuple(route.__dict__.values())}: {what} "
                         f"{where} when it gets fewer tokens than it was traced with, at {line}: "
                         f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}. {_probe_cause(err, line, what)}"
                         f"{_undeclared(gm, node, streams)}{_channels_first(gm, streams)} routefx "
                         f"follows the token stream with fewer tokens through the chain, so it cannot see past "
                         f"that block: use routes that end before block {b}. {INSPECT_HINT}") from err
    if streams.ambiguous:
        sets = "; ".join(", ".join(f"'{u.name}' {_shape(u)}" for u in c) for c in streams.ambiguous)
        raise RouteError(f"Route {i}: the blocks need some (batch, {streams.num_tokens}, ...) inputs that are not "
                         f"the token stream to follow the token selection, and routefx cannot tell which: each "
                         f"of these makes them run ({sets}). Gathering the wrong one (e.g. a text context as "
                         f"long as the image) would be silently wrong, so the model is refused. {INSPECT_HINT}")
    n = streams.num_tokens - streams.protect
    if route.num_kept(n) <= 0:
        raise RouteError(f"Route {i}: ratio {route.ratio} keeps {route.num_kept(n)} of {n} tokens; lower the ratio.")


def _channels_first(gm, streams) -> str:
    """A hint where the stream may be laid out (batch, channels, tokens): its dim 2, not its dim 1,
    divides the image's pixel count."""
    src, shape = image_input(gm), _shape(streams.primary)
    pix = getattr(src.meta.get("routefx", {}).get("spec"), "shape", ())
    if len(shape) != 3 or len(pix) != 4:
        return ""
    pixels = pix[2] * pix[3]
    if pixels % shape[1] and not pixels % shape[2]:
        return (f" The stream '{streams.primary.name}' {shape} may be laid out channels-first (batch, channels, "
                f"tokens): {shape[2]} divides the {pixels} pixels of '{src.target}', {shape[1]} does not; routefx "
                f"routes (batch, tokens, channels) streams, so transpose before the blocks.")
    return ""


def _undeclared(gm, node, streams) -> str:
    """The inputs of the failing node that carry the full token count and were not gathered, as
    names `apply(per_token=...)` takes (the fix when one of them is a mask, bias or position)."""
    if node is None:
        return ""
    n = streams.num_tokens
    full = [u for u in dict.fromkeys(node.all_input_nodes)
            if token_kind(u, streams) == "pass" and n in tuple(getattr(u.meta.get("routefx", {}).get("spec"), "shape", ()))]
    names = list(dict.fromkeys(name for u in full for name in declarable(gm, u)))
    if not names:
        return ""
    shapes = ", ".join(f"'{u.name}' {_shape(u)}" for u in full[:4])
    return (f" It receives {shapes} with the full count of {n} tokens, not gathered. If that is a "
            f"per-token input (a mask, a bias, positions), declare it: routefx.apply(..., per_token="
            f"{names[:3]!r}); if it is not (a text context as long as the image), not_per_token=[...].")


def _probe_cause(err, line: str, what: str) -> str:
    """The likely reason a block fails on fewer tokens, from the error and the model line."""
    text = f"{err} {line}"
    if any(w in text for w in ("unflatten", "view(", "reshape", "is invalid for input of size", "shape '[")):
        who = "That line" if what.startswith("the model") else "The block"
        return (f"{who} reshapes the tokens to a fixed layout (an (H, W) grid for a convolution, or "
                f"frames x patches): it cannot run on a subset of them.")
    if any(w in text for w in ("must match the size", "broadcast")):
        return ("A tensor the block receives still has the full token count: a per-token input (an "
                "attention mask or bias, a position table) that routefx did not recognise, so it was not "
                "gathered, or a length the model computes from the whole sequence.")
    return ""


def _insert_one(gm, chain, streams, i, route, control, shared_indices, after=None):
    _check_route(gm, chain, streams, i, route)
    graph = gm.graph
    g = dataflow_graph(graph)
    order = {n: k for k, n in enumerate(graph.nodes)}
    static = set(graph.nodes) - streams.input_derived  # parameters, constants and what they compute
    first, last = chain.nodes[route.start], stream_end(g, chain, route.end, streams.primary, order, streams, static)
    starts = _route_start(g, chain, streams, route, order, static, after)
    region = span_region(g, first, last, starts)
    _refuse_guards(region, i, route)
    n = streams.num_tokens - streams.protect
    plan = RoutePlan(i, route, chain.names[route.start: route.end + 1], streams.num_tokens,
                     streams.protect, streams.protect + route.num_kept(n), shared_indices)

    entering = _entering(region, order, streams, plan)
    primary = next((u for u in [*starts, *flat_inputs(first)] if u in entering and entering[u][0] in ("token", "joined")),
                   None)
    if primary is None:
        raise RouteError(f"Route {i}: no routed-stream tensor enters block {route.start} ('{first.target}'): "
                         f"routefx lost the token stream before it.{_lost_at(chain, streams)} {INSPECT_HINT}")
    name = f"routefx_route_{i}"
    tables = [u for u, (kind, _) in entering.items() if kind == "table0"]
    if tables and not shared_indices:
        u = tables[0]
        raise RouteError(f"Route {i}: the unbatched per-token table {_where(u)} of shape {_shape(u)} enters "
                         f"blocks {route.start}..{route.end}. Without a batch dim it can only follow ONE "
                         f"index set for the whole batch, while TREAD draws one per sample, and "
                         f"shared_indices=False was passed. Leave shared_indices at its default (None: "
                         f"one index set per batch where a table needs it) or pass shared_indices=True "
                         f"(--shared-indices in routefx.inspect), or give the table a batch dim.")
    per_sample = [u for u, (kind, _) in entering.items() if kind in PER_SAMPLE_TABLES]
    if per_sample and not shared_indices and streams.per_sample_tables is not None:
        batch, err = streams.per_sample_tables
        u = per_sample[0]
        raise RouteError(f"Route {i}: the per-token table {_where(u)} of shape {_shape(u)} enters blocks "
                         f"{route.start}..{route.end}. routefx gathers it per sample into (batch, kept, ...), "
                         f"but the model fails that way at batch size {batch} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): it probably broadcasts the table "
                         f"against another dim (e.g. attention heads), where per-sample rows would mix "
                         f"samples. Pass shared_indices=True to routefx.apply (one index set per batch; the "
                         f"table stays (1, kept, ...) and broadcasts as before).")
    gm.add_submodule(name, RouteSelector(i, route.ratio, streams.protect, control, shared=shared_indices))
    p, q = stream_offsets(primary)
    with graph.inserting_before(min(region, key=order.get)):  # as late as the first op of the route
        sel = graph.call_module(name, (primary, p + q) if p or q else (primary,))
    sel.meta["routefx"] = {"selector": i, "token": False}

    gathered = {}
    for u, (kind, users) in entering.items():
        with graph.inserting_before(users[0]):
            if kind == "joined":
                node = graph.call_function(gather_joined, (u, sel, *stream_offsets(u)))
            elif kind == "side":
                node = graph.call_function(gather_side, (u, sel, u.meta["routefx"].get("token_dims", (1,))))
            elif kind == "table0":
                node = graph.call_function(gather_table, (u, sel, primary, 0))
            elif kind == "table1":
                node = graph.call_function(gather_table, (u, sel, primary, 1, shared_indices))
            else:
                node = graph.call_function(gather_tokens, (u, sel, shared_indices and kind == "broadcast"))
        node.meta["routefx"] = {"token": u.meta["routefx"]["token"] if kind in ("token", "joined") else False,
                                "gather_of": u, "route": i, "spec": None}
        if kind in ("token", "joined"):
            gathered[node] = u  # the stream's route-start values: what leaving tensors continue
        for v in users:
            v.replace_input_with(u, node)
    _scatter_leaving(graph, region, order, gathered, sel, plan, primary, nx.ancestors(g, last) | {last})
    return plan, sel


def _lost_at(chain, streams) -> str:
    """The first block whose output routefx does not follow, with its traced shapes."""
    for k, blk in enumerate(chain.nodes):
        if stream_offsets(blk)[0] is None and not _is_container(_label(blk)):
            out, ins = _shape(blk), [_shape(u) for u in flat_inputs(blk) if stream_offsets(u)[0] is not None]
            if ins and out and len(out) > 1 and out[1] != ins[0][1]:
                return (f" Block {k} ('{chain.names[k]}') returns {out} from a stream of {ins[0]}: a block "
                        f"that adds or drops tokens (registers appended inside it) leaves routefx unable to tell "
                        f"where the stream's tokens are in its output; routes must end before it.")
            return f" The first block whose output it does not follow is block {k} ('{chain.names[k]}'), shape {out}."
    return ""


def _route_start(g, chain, streams, route, order, static, after) -> list:
    """Where the route takes its stream: where block start-1's step ends (`stream_end`), so the
    ops between the two blocks that prepare block start (a position table or a side input added,
    a long skip fused) run on the kept tokens only, as every later such op of the route does; the
    bypassed tokens skip one of each per block. Block start's own stream input for a route at
    block 0, right after another route (`after`: its end), or where the stream is not a plain
    tensor there (tuple outputs, text joined)."""
    s, ins = route.start, spine_inputs(g, chain, route.start, streams.primary)
    if s == 0 or after == s - 1:
        return ins
    x = stream_end(g, chain, s - 1, streams.primary, order, streams, static)
    if stream_offsets(x) != (0, 0) or any(stream_offsets(u) != (0, 0) for u in ins):
        return ins
    return [x]


def _refuse_guards(region, i, route):
    for node in region:
        for user in node.users:
            meta = user.meta.get("routefx", {})
            if meta.get("token_dependent") and meta["guarded"] in region:
                where = meta["guard"]
                raise RouteError(f"Route {i} ({route.start}..{route.end}): code inside the span turns a value "
                                 f"that depends on the token count into a Python constant at {where}. A route "
                                 f"cannot span that point (the count changes under routing); end the route "
                                 f"before it or start it after it.")


def _entering(region, order, streams, plan) -> dict:
    entering = {}
    for v in sorted(region, key=order.get):
        for u in dict.fromkeys(v.all_input_nodes):
            if u in region:
                continue
            kind = token_kind(u, streams)
            if kind != "pass":
                if u not in entering:
                    plan.gathered.append({"tensor": u.name, "shape": _shape(u), "kind": kind, "into": v.name})
                entering.setdefault(u, (kind, []))[1].append(v)
            elif u.op != "get_attr" and _shape(u) and not any(p["tensor"] == u.name for p in plan.passed):
                plan.passed.append({"tensor": u.name, "shape": _shape(u)})
    return entering


def _routed_inputs(node, gathered):
    return [u for u in dict.fromkeys(flat_inputs(node)) if u in gathered or stream_offsets(u)[0] is not None]


def _origin(u, gathered, region, memo):
    if u in gathered:
        return gathered[u]
    if u in memo:
        return memo[u]
    src = u.args[0] if u.op == "call_function" and u.target in (operator.getitem, getattr) else None
    if src is not None and src in region and _is_container(_label(src)):
        ins = _routed_inputs(src, gathered)
        outs = [k for k, flag in enumerate(_label(src)) if flag is True]
        idx = u.args[1]
        if len(ins) == len(outs) and idx in outs:
            res = _origin(ins[outs.index(idx)], gathered, region, memo)
        elif len(ins) == 1 and [k for k in outs if _leaves(src, k, region)] == [idx]:
            res = _origin(ins[0], gathered, region, memo)  # the others end inside (router logits)
        elif len(outs) > 1 and len(ins) < len(outs):
            raise RouteError(f"{_where(src)} returns {len(outs)} token tensors from {len(ins)} token "
                             f"input(s), so element {idx} has no value at the route start for the "
                             f"bypassed tokens to keep (e.g. mamba-ssm's Block called with residual=None "
                             f"in the first layer). Start the route one block later. {INSPECT_HINT}")
        else:
            res = _unique_origin(src, ins, gathered, region, memo, block_first=len(outs) == 1)
    elif src is not None and src in region and src.meta.get("routefx", {}).get("spine"):
        res = _origin(src, gathered, region, memo)  # a field of a block's dict / dataclass output
    else:
        ins = _routed_inputs(u, gathered)
        spine = u.meta.get("routefx", {}).get("spine")
        if spine:  # a chain block: its stream continues the inputs it gets from the previous block
            flat = flat_inputs(u)
            ins = [r for r in ins if any(flat[i] is r for i in spine)] or ins
        res = _unique_origin(u, ins, gathered, region, memo, block_first=u.op == "call_module")
    memo[u] = res
    return res


def _leaves(src, k, region) -> bool:
    """Element k of `src` (or a value computed from it inside the region) is used after the route."""
    seen, todo = set(), [p for p in src.users if p.op == "call_function" and len(p.args) > 1 and p.args[1] == k]
    while todo:
        n = todo.pop()
        if n in seen or reduces(n):  # (a reduction's value leaves as it is)
            continue
        seen.add(n)
        if any(v not in region for v in n.users):
            return True
        todo += [v for v in n.users if v in region]
    return False


def _unique_origin(node, ins, gathered, region, memo, block_first):
    if not ins:
        raise RouteError(f"Cannot tell which stream {_where(node)} continues: it has no routed input. "
                         f"{INSPECT_HINT}")
    origins = list(dict.fromkeys(_origin(r, gathered, region, memo) for r in ins))
    if len(origins) == 1 or block_first:
        return origins[0]
    primary, path = memo[_SPINE]
    if primary in origins and node in path:  # on the way to the route's end: the chain's stream
        return primary  # continues (`blk(h) + a * x0`: x0 is a side input added to it)
    raise RouteError(f"{_where(node)} combines token streams that started the route as different tensors "
                     f"({', '.join(o.name for o in origins)}); routefx cannot tell which one its bypassed "
                     f"tokens should come from. Move the route boundary so the streams do not mix inside it.")


_SPINE = object()  # memo key of (the route's stream at its start, the nodes on its way to the end)


def _scatter_leaving(graph, region, order, gathered, sel, plan, primary, path):
    memo = {_SPINE: (primary, path)}
    for u in sorted(region, key=order.get):
        outside = [v for v in u.users if v not in region]
        label = _label(u)
        if not outside:
            continue
        if _is_container(label) and any(label):
            outside = [v for v in outside if not v.meta.get("routefx", {}).get("guard")]  # len(tuple)
        if _is_container(label) and any(label) and outside:
            raise RouteError(f"{_where(u)} returns several token tensors and is used whole after the route "
                             f"(by '{outside[0].name}'); routefx scatters tensors, not containers. End the "
                             f"route one block earlier. {INSPECT_HINT}")
        p, q = stream_offsets(u)
        if p is None:
            continue
        base = _origin(u, gathered, region, memo)
        bp, bq = stream_offsets(base)
        with graph.inserting_after(u if order[u] > order[base] else base):
            if p or q or bp or bq:  # joined with text on the way in or out
                node = graph.call_function(scatter_joined, (base, sel, u, p, q, bp, bq))
            else:
                node = graph.call_function(scatter_tokens, (base, sel, u))
        node.meta["routefx"] = {"token": True, "scatter_of": u, "route": plan.index, "spec": u.meta["routefx"].get("spec")}
        plan.scattered.append({"tensor": u.name, "shape": _shape(base), "base": base.name})
        for v in outside:
            v.replace_input_with(u, node)


class Float32Block(nn.Module):
    """Runs a block with autocast off and half-precision float inputs in float32 (after a route's
    end); float32 and float64 inputs are left as they are."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.element_size() < 4 else a  # noqa: E731
        args, kwargs = fx.node.map_aggregate((args, kwargs), up)
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return self.block(*args, **kwargs)


def fp32_after_routes(gm: fx.GraphModule, chain, routes: list) -> None:
    """Point the call of the block after each route's end at a `Float32Block` wrapper."""
    for i, route in enumerate(routes):
        if route.end + 1 < len(chain):
            node = chain.nodes[route.end + 1]
            name = f"routefx_fp32_{i}"
            gm.add_submodule(name, Float32Block(gm.get_submodule(node.target)))
            node.target = name
