"""streams: which tensors carry the routed token stream.

Needs `capture` (concrete values) and `find_chain` (`meta['routefx']['block']`). Ensures
`node.meta['routefx']['token']` on every node: True for a tensor of the routed stream, a tuple of
flags for tuple values, False otherwise.

The routed stream is decided by dataflow, never by shape alone. It starts as the first argument
of block 0 that is derived from the model's first tensor input (the image / latents) and shaped
`(batch, N, ...)`; prefix tokens concatenated in front of it (U-ViT time/class tokens, ViT
cls/register tokens, text tokens of a single-stream model) are protected. Through the blocks the
stream is followed by a *probe*: the graph runs once with every block seeing a token count that
occurs nowhere else in the model, and a value is part of the stream iff it shows that count. So
a text stream whose length equals the image token count is still told apart.
"""
import contextlib
import dataclasses
import itertools
import logging
import math
import operator

import networkx as nx
import torch
import torch.fx as fx

from routefx.errors import INSPECT_HINT, GuardError, RouteError
from routefx.ops import gather_side, gather_table, gather_tokens, select_tokens, setitem
from .fake_run import fake_run
from .find_blocks import dataflow_graph, image_input

__all__ = ["Streams", "analyze_streams", "declarable", "flat_inputs", "follow", "token_kind", "projections", "stream_offsets", "stream_end",
           "PER_SAMPLE_TABLES"]

_CATS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat), torch.hstack}


@dataclasses.dataclass
class Streams:
    """What the probe learned about the routed token stream."""

    source: fx.Node          # the model input the tokens come from
    primary: fx.Node         # block 0's argument carrying the stream
    batch: int
    num_tokens: int          # N at block 0, prefix included
    protect: int             # prefix tokens never routed
    input_derived: set       # nodes that depend on any model input
    failed_at: tuple = None  # (block index, exception, node) if the chain cannot run on fewer tokens
    per_sample_tables: tuple = None  # (batch tried, exception) if (1, N, ...) tables fail per sample
    ambiguous: list = None   # sets of (batch, N, ...) inputs that each make the blocks run as per-token
    shared: bool = False     # one index set per batch for every route (see `analyze_streams`)
    shared_because: fx.Node = None  # the unbatched per-token table that made `shared` automatic


def flat_inputs(node: fx.Node) -> list:
    """Input nodes of `node` in call order (positional, then keyword), flattened."""
    out = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def projections(node: fx.Node) -> list:
    """`getitem` / `getattr` users that pick an element out of a container value (a tuple, a
    dict, a dataclass such as diffusers' outputs)."""
    import operator
    spec = node.meta.get("routefx", {}).get("spec")
    mapping = isinstance(spec, type) and (issubclass(spec, dict) or dataclasses.is_dataclass(spec))
    if not (isinstance(spec, (tuple, list)) or mapping):
        return []  # x[:, k:] on a tensor is an op, not a pick out of a container
    return [u for u in node.users if u.op == "call_function" and u.target in (operator.getitem, getattr)
            and u.args[0] is node]


def _label(value, batch, count):
    if isinstance(value, torch.Tensor):
        return value.dim() >= 2 and value.shape[0] == batch and value.shape[1] == count
    if isinstance(value, (tuple, list)):
        return tuple(_label(v, batch, count) for v in value)
    return False


# `token_kind`s of (1, N, ...) tables that a route gathers per sample (unless shared_indices)
PER_SAMPLE_TABLES = ("broadcast", "table1")


def token_kind(node: fx.Node, streams: Streams) -> str:
    """How a value entering a routed span is treated.

    'token': the routed stream (per-sample gather); 'broadcast': a `(1, N, ...)` table (gathered
    per sample); 'table0' / 'table1': a per-token table along dim 0 (unbatched, e.g. rotary
    `(T_text + N, d)`) or dim 1 (`(1, T_text + N, ...)`) whose last rows line up with the
    stream's last tokens: extra rows in front are kept, and a table may lack rows only for
    protected prefix tokens (rotary tables of the patch tokens only, `(N - prefix, d)`);
    'pass': untouched.
    """
    meta = node.meta.get("routefx", {})
    if meta.get("not_per_token"):
        return "pass"  # shaped like a table, but the blocks fail when it follows the tokens
    if meta.get("per_token"):
        return "side"  # (batch, N, ...), not the stream, and the blocks fail unless it follows it
    if meta.get("token") is True:
        return "token"
    if _offsets(meta.get("token"))[0] is not None:
        return "joined"
    shape = getattr(meta.get("spec"), "shape", None)
    if shape is None:
        return "pass"
    n, b = streams.num_tokens, streams.batch
    rows = n - streams.protect if streams.protect else n  # fewest rows a per-token table can have
    per_token_ok = node not in streams.input_derived or b >= 2  # with batch 1, (1, N, D) may be data
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == n and per_token_ok:
        return "broadcast"
    if len(shape) >= 3 and shape[0] == 1 and shape[1] >= rows and per_token_ok:
        return "table1"
    if len(shape) >= 2 and shape[0] >= rows and shape[0] != b:
        return "table0"
    return "pass"


def _value(a, values):
    return values[a] if isinstance(a, fx.Node) else a


def _dim1_slice(key, length, value=lambda a: a):
    """(start, stop, step) of a key `(:, a:b)` that slices dim 1 of a tensor with `length` tokens
    there (`value` resolves traced bounds), or None."""
    if not (isinstance(key, tuple) and len(key) >= 2 and key[0] == slice(None) and isinstance(key[1], slice)):
        return None
    return slice(value(key[1].start), value(key[1].stop), value(key[1].step)).indices(length)


def _assigned_span(node, values):
    """(start, stop) along dim 1 of `setitem(x, (:, start:stop), v)`, or None."""
    span = _dim1_slice(node.args[1], values[node].shape[1], lambda a: _value(a, values))
    return span and span[:2]


def _sliced_front(node, values):
    """a of `x[:, a:b]` (the tokens a slice along dim 1 drops in front), or None."""
    src = values.get(node.args[0])
    span = isinstance(src, torch.Tensor) and _dim1_slice(node.args[1], src.shape[1], lambda a: _value(a, values))
    return span[0] if span and span[2] == 1 else None


def _detect_prefix(primary, from_src, values, used: set = None, spine: dict = None) -> int:
    """Tokens in front of the image tokens in `primary` (text, time / class / register tokens).

    Walks back from `primary` to the image input keeping the window [lo, hi) of `primary`'s
    tokens in the current tensor's token axis: a slice `x[:, a:b]` shifts it by a, a
    concatenation or an item assignment that places the image tokens at offset `off` shifts it
    by -off. The prefix is what lies before the image tokens' position 0 (-lo); tokens after the
    image tokens that reach `primary` are refused.
    """
    lo, hi = 0, values[primary].shape[1]
    node = primary
    while node.op != "placeholder":
        if spine is not None:
            spine[node] = lo  # where `primary`'s tokens start in this node's token axis
        step = _token_axis_step(node, from_src, values)
        if step is not None and used is not None:
            used.add(node)
        if step is None:
            nxt = [u for u in node.all_input_nodes if u in from_src]
            if not nxt:
                break
            node = nxt[0]
            continue
        upstream, shift, size = step
        lo, hi = lo + shift, hi + shift
        if size is not None and hi > size:
            raise RouteError(f"Tokens are placed AFTER the image tokens at {node.format_node()}; "
                             f"routefx protects prefix tokens only. Pass protect=<prefix count> "
                             f"and put extra tokens in front. {INSPECT_HINT}")
        node = upstream
    return max(0, -lo)


_JOINS = _CATS | {torch.stack, setitem}


def _refuse_other_joins(gm, data, primary, from_src, source, understood):
    """Refuse a stream whose tokens were joined with another input's values in a way the prefix
    detection did not follow (per-sample `torch.cat` then `pad_sequence`, text after the image...):
    routing it would route those tokens too, silently. `data`: the value-only dataflow graph."""
    others = [n for n in gm.graph.nodes if n.op == "placeholder" and n is not source]
    from_others = set().union(*(nx.descendants(data, n) | {n} for n in others)) if others else set()
    for node in nx.ancestors(data, primary) | {primary}:
        joins = node.op == "call_function" and (node.target in _JOINS or "pad_sequence" in getattr(node.target, "__name__", ""))
        if not joins or node in understood:
            continue
        parts = node.all_input_nodes
        if any(p in from_src for p in parts) and any(p in from_others and p not in from_src for p in parts):
            raise RouteError(f"The token stream of block 0 ('{primary.name}') is built by joining the image tokens "
                             f"with another input's values at {node.format_node()}, in a way "
                             f"routefx does not follow (it follows a concatenation along the token dim, or an item "
                             f"assignment into a sequence, with the other tokens in front). Routing that stream "
                             f"would route the other tokens too. Pass protect=<number of leading tokens never "
                             f"routed> if they all come first, or route a model whose blocks get the image tokens "
                             f"as their own stream. {INSPECT_HINT}")


def _slices_off_the_image(n, spine, values) -> bool:
    """`n = x[:, a:b]` of a tensor `x` on the way from the image to block 0 that takes other tokens
    than the image's (CogVideoX's text, sliced off the joint patch embedding): not the stream,
    even when it happens to be as long."""
    if n in spine or not (n.op == "call_function" and n.target is operator.getitem and n.args[0] in spine):
        return False
    cut = _sliced_front(n, values)
    return cut is not None and cut != spine[n.args[0]]  # the stream starts at spine[x]: another window is not it


def _token_axis_step(node, from_src, values):
    """(upstream node, window shift, upstream token count or None) for a node that moves tokens
    along dim 1 (slice, concatenation, item assignment of the image tokens), else None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(values.get(node), torch.Tensor):
        cut = _sliced_front(node, values)
        return None if cut is None else (node.args[0], cut, None)
    if node.target is setitem and node.args[2] in from_src:
        span = _assigned_span(node, values)
        return None if span is None else (node.args[2], -span[0], span[1] - span[0])
    if node.target in _CATS and _cat_dim(node, values[node]) == 1:
        parts = list(node.args[0])
        ours = [i for i, p in enumerate(parts) if p in from_src]
        if not ours:
            return None
        i = max(ours, key=lambda j: values[parts[j]].shape[1])
        return parts[i], -sum(values[p].shape[1] for p in parts[:i]), values[parts[i]].shape[1]
    return None


def _dims(values: dict) -> set:
    """Every dimension size of every traced tensor value."""
    return {d for v in values.values() if isinstance(v, torch.Tensor) for d in v.shape}


def _probe_count(n_total: int, protect: int, values: dict) -> int:
    """A token count (prefix included) that no traced tensor has on any dim, preferably coprime
    with the model's own counts: a block that regroups its tokens into a fixed layout (frames x
    patches, an H x W grid) then fails on it rather than running on a mislaid subset."""
    dims = _dims(values)
    free = [protect + keep for keep in range(n_total - protect - 1, 0, -1) if protect + keep not in dims]
    if not free:
        raise RouteError(f"Too few tokens ({n_total}) to tell the token stream apart from other tensors; "
                         f"trace with a larger example input. {INSPECT_HINT}")
    coprime = [k for k in free if math.gcd(k, n_total) == 1 and math.gcd(k - protect, n_total - protect) == 1]
    return (coprime or free)[0]


def analyze_streams(gm: fx.GraphModule, chain, values: dict, example: list, protect=None, mode=None,
                    shared=None, per_token=(), not_per_token=()) -> Streams:
    """Label every node of `gm` with `meta['routefx']['token']` (see module docstring).

    `shared`: one index set for the whole batch in every route (True), one per sample (False), or
    None: per sample unless an unbatched per-token table (a rotary `(T_text + N, d)` table) enters
    the blocks, which can only follow one index set for the batch (`streams.shared_because`).
    """
    g = dataflow_graph(gm.graph)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    source = image_input(gm)
    # values computed from the image's VALUES: reading its shape (`text.view(b, -1, x.shape[-1])`) is not
    data = dataflow_graph(gm.graph, data_only=True)
    from_src = nx.descendants(data, source) | {source}
    block0 = chain.nodes[0]
    cands = [u for u in flat_inputs(block0) if u in from_src and isinstance(values.get(u), torch.Tensor)
             and values[u].dim() >= 3]
    if not cands:
        raise RouteError(f"Block 0 ('{block0.target}') takes no (batch, tokens, ...) tensor derived from the "
                         f"model's first input '{source.target}': nothing to route. Pass the image/latent "
                         f"tensor first. {INSPECT_HINT}")
    primary = _spine_first(g, chain, cands)
    _mark_spine(g, chain, primary)
    batch, n_total = values[primary].shape[:2]
    src = values.get(source)
    if values[primary].dim() == 4 and isinstance(src, torch.Tensor) and src.dim() == 4:
        raise RouteError(f"Block 0 ('{block0.target}') receives the token stream '{primary.name}' of shape "
                         f"{tuple(values[primary].shape)}: a grid (batch, H, W, channels) - or another "
                         f"4-d layout - rather than (batch, tokens, channels). routefx selects tokens along "
                         f"one dim, and along dim 1 it would keep whole rows of the grid. Flatten the grid "
                         f"before the blocks (x.flatten(1, 2)) and reshape after them. {INSPECT_HINT}")
    if isinstance(src, torch.Tensor) and src.dim() and batch != src.shape[0] == n_total:
        raise RouteError(f"Block 0 ('{block0.target}') receives the token stream '{primary.name}' of shape "
                         f"{tuple(values[primary].shape)}, laid out (tokens, batch, ...) - sequence-first: its "
                         f"dim 0 is not the batch of the model's "
                         f"first input '{source.target}' ({src.shape[0]}). routefx routes streams laid out "
                         f"(batch, tokens, ...) between the blocks; transpose in the blocks (e.g. "
                         f"nn.MultiheadAttention(batch_first=True)) or route a model that keeps that layout. "
                         f"{INSPECT_HINT}")
    understood, spine = set(), {}
    if protect is None:
        k = _detect_prefix(primary, from_src, values, understood, spine)
        _refuse_other_joins(gm, data, primary, from_src, source, understood)
    else:  # the user's count stands; the walk only records the stream's windows (`spine`)
        k = int(protect)
        try:
            _detect_prefix(primary, from_src, values, spine=spine)
        except RouteError:
            pass
    if not 0 <= k < n_total:
        raise RouteError(f"protect={k} must be in [0, {n_total}) (the stream has {n_total} tokens).")
    _mark_declared(gm, data, from_src, per_token, not_per_token, n_total)
    derived = set().union(*(nx.descendants(g, p) | {p} for p in inputs))
    streams = Streams(source, primary, batch, n_total, k, derived)
    after0 = nx.descendants(g, block0)
    for n in gm.graph.nodes:
        if n not in after0:
            ok = n in from_src and _label(values.get(n), batch, n_total) is True and \
                not _slices_off_the_image(n, spine, values)
            n.meta.setdefault("routefx", {})["token"] = ok
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region = span_region(g, chain.nodes[0], stream_end(g, chain, len(chain.nodes) - 1, primary, order))
    tables = [u for v in region for u in v.all_input_nodes if u not in region and token_kind(u, streams) == "table0"]
    streams.shared = bool(tables) if shared is None else bool(shared)
    streams.shared_because = tables[0] if tables and shared is None else None
    _probe(gm, chain, g, region, streams, values, example, mode, streams.shared)
    return streams


def span_region(g: nx.DiGraph, first: fx.Node, last: fx.Node, starts=()) -> set:
    """Nodes a route over blocks first..last runs on its kept tokens, plus their projections:
    everything computed from the first block or from its stream inputs `starts` (a gate computed
    from the stream beside the block) that the route's end depends on, and the side computations
    on the kept tokens that end in values without a token dim (an auxiliary loss on router
    logits, a pooled vector): those see the kept tokens only, as in a hand-written loop."""
    below = nx.descendants(g, first)
    for x in starts:
        below |= nx.descendants(g, x)
    region = {first, last} | (below & nx.ancestors(g, last))
    region |= {p for n in region for p in projections(n)}
    return region | _reductions(region, last)


_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "prod", "logsumexp", "nansum",
           "nanmean", "mse_loss", "l1_loss", "cross_entropy", "smooth_l1_loss", "kl_div"}


def reduces(w) -> bool:
    """`w` reduces its token input (`logits.mean()`, `h.sum(1)`, a loss)."""
    name = w.target if isinstance(w.target, str) else getattr(w.target, "__name__", "")
    return w.op in ("call_function", "call_method") and name in _REDUCE


def _reductions(region: set, last) -> set:
    """Side computations branching off strictly inside the route (not off its end: what the model
    computes from the route's output sees every token, scattered back)."""
    memo = {}

    def ends_reduced(v):  # a token value whose every use ends in a reduction
        if v not in memo:
            memo[v] = False  # (cycle guard)
            memo[v] = v.op != "output" and bool(v.users) and all(
                w in region or reduces(w) or ends_reduced(w) for w in v.users)
        return memo[v]

    side = set()
    todo = [w for n in region if n is not last for w in n.users if w not in region]
    while todo:
        w = todo.pop()
        if w in side or w in region:
            continue
        if ends_reduced(w):
            side.add(w)
            todo += list(w.users)
        elif reduces(w) and any(u in side for u in w.all_input_nodes):
            side.add(w)  # the reduction itself: its value leaves the route as it is
    return side


def spine_inputs(g: nx.DiGraph, chain, k: int, primary: fx.Node) -> list:
    """The inputs of block k that carry the chain's stream: those computed from block k-1 (the
    primary stream for block 0)."""
    if k == 0:
        return [primary]
    prev = chain.nodes[k - 1]
    before = nx.ancestors(g, chain.nodes[k])
    return [u for u in dict.fromkeys(flat_inputs(chain.nodes[k])) if u is prev or (u in before and prev in nx.ancestors(g, u))]


def _mark_declared(gm, data, from_src, per_token, not_per_token, n_total):
    """The user's word on side inputs (`apply(per_token=..., not_per_token=...)`): names of the
    model's inputs or of parameters / buffers it reads. Every value computed from one (and not
    from the image) is per-token - gathered along each dim >= 1 of size N - or left alone."""
    for names, flag in ((per_token, "per_token"), (not_per_token, "not_per_token")):
        for name in names:
            roots = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr") and n.target == name]
            if not roots:
                ins = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
                attrs = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
                raise RouteError(f"{flag}=[... '{name}' ...] names no input of the model's forward and no "
                                 f"parameter or buffer its traced code reads. Inputs: {ins}; attributes: "
                                 f"{attrs[:12]}{' ...' if len(attrs) > 12 else ''}.")
            for root in roots:
                for n in {root} | nx.descendants(data, root):
                    shape = getattr(n.meta.get("routefx", {}).get("spec"), "shape", None)
                    dims = tuple(d for d in range(1, len(shape or ())) if shape[d] == n_total)
                    if n in from_src or (flag == "per_token" and not dims):
                        continue
                    n.meta.setdefault("routefx", {})[flag] = True
                    if flag == "per_token":
                        n.meta["routefx"]["token_dims"] = dims


def declarable(gm: fx.GraphModule, node: fx.Node) -> list:
    """Names `apply(per_token=...)` accepts that `node` is computed from: model inputs and
    parameters / buffers among its ancestors (the first input, the image, excluded)."""
    image = image_input(gm)
    seen, todo, out = set(), [node], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            if n is not image:
                out.append(n.target)
            continue
        todo += n.all_input_nodes
    return sorted(set(out))


def _own_ops_end(g, chain, k, primary, order, static, streams):
    """The next block's stream input if every op between block k and it is block k's own (see
    `stream_end`), else None."""
    blk, ins = chain.nodes[k], spine_inputs(g, chain, k, primary)
    nxt = spine_inputs(g, chain, k + 1, primary)
    if len(nxt) != 1 or nxt[0] is blk or any(stream_offsets(u) != (0, 0) for u in (*nxt, *ins)):
        return None
    end = nxt[0]
    mine = {blk} | set(ins)
    for x in ins:
        mine |= nx.descendants(g, x)
    path = sorted((nx.descendants(g, blk) & nx.ancestors(g, end)) | {end}, key=order.get)
    for n in path:
        if "block" in n.meta.get("routefx", {}):
            return None
        # a parameter read is block k's own (a scale, a norm) unless it is a per-token table: a
        # position table added there is the next block's input (`h = blk(h + pos[i])`)
        if any(u not in mine and (u not in static or token_kind(u, streams) != "pass") for u in n.all_input_nodes):
            return None
    return end


def _spine_first(g, chain, cands):
    """Block 0's stream among its image-derived inputs `cands`: the one in the argument position
    through which block 0 feeds block 1 (`blk(x0, h)` with a fixed embedding x0 passed too)."""
    if len(cands) > 1 and len(chain.nodes) > 1:
        b0, b1 = chain.nodes[0], chain.nodes[1]
        feeds = nx.descendants(g, b0) | {b0}
        pos = [i for i, u in enumerate(flat_inputs(b1)) if u in feeds]
        ins = flat_inputs(b0)
        if len(pos) == 1 and len(ins) == len(flat_inputs(b1)) and ins[pos[0]] in cands:
            return ins[pos[0]]
    return cands[0]


def _mark_spine(g, chain, primary):
    """`meta['routefx']['spine']` of every block: the positions (in `flat_inputs`) of the inputs
    that carry the chain's stream (the bypassed tokens of a route ending there come from them)."""
    for k, blk in enumerate(chain.nodes):
        spine = set(spine_inputs(g, chain, k, primary))
        blk.meta.setdefault("routefx", {})["spine"] = [i for i, u in enumerate(flat_inputs(blk)) if u in spine]


def stream_end(g: nx.DiGraph, chain, k: int, primary: fx.Node, order: dict, streams=None,
               static=None) -> fx.Node:
    """Where block k's step is complete, the point a route ending at block k ends at.

    Block k's step is the block and the ops the model writes around it on the stream that use
    nothing but the block's output, its stream input and parameters / constants (`static`): a
    residual written outside the block (`x = x + blk(x)`, `h = h + 0.5 * blk(h)`), a gate
    computed from the stream, a per-block scale or norm. Where all ops between block k and the
    next block are such (and the stream is plain there: `streams` holds the probe's labels), the route ends
    at the next block's stream input. An op that also reads another value (a long skip, text
    joined to the tokens) prepares the next block instead: the route ends before it, at block
    k - or at the first node joining block k's output with its stream input (a residual), the
    rule also used after the last block. The bypassed tokens skip each step once and re-enter
    at their route-start values."""
    blk = chain.nodes[k]
    if k + 1 < len(chain.nodes) and streams is not None:
        end = _own_ops_end(g, chain, k, primary, order, static, streams)
        if end is not None:
            return end
    below = nx.descendants(g, blk)
    skip = set()
    for x in spine_inputs(g, chain, k, primary):
        skip |= ({x} | nx.descendants(g, x)) - below - {blk}
    if not skip:
        return blk
    stop = order[chain.nodes[k + 1]] if k + 1 < len(chain.nodes) else None
    for j in sorted(below, key=order.get):
        if (stop is not None and order[j] >= stop) or "block" in j.meta.get("routefx", {}):
            break
        if any(u in skip for u in j.all_input_nodes) and any(u is blk or u in below for u in j.all_input_nodes):
            return j
    return blk


class _Stop(Exception):
    pass


class _Probe(fx.Interpreter):
    def __init__(self, gm, region, after0, streams, keep, shared, batch=None, traced=None):
        super().__init__(gm)
        self.traced = traced  # the trace's values: reused for every node the probe cannot change
        self.region, self.after0, self.streams, self.keep, self.shared = region, after0, streams, keep, shared
        self.batch = batch or streams.batch
        self.check_only = batch is not None  # a second run at another batch size: learn nothing
        self.todo = set(region)  # stop once every node of the span has run
        self.ids = self.current = None
        self.gathered = {}
        self.labels = {}  # node -> True / tuple / ("joined", p, s) / False, for this token count
        self.skip = set()  # table-shaped inputs not to gather (see `_probe`)

    def run(self, *args):
        env = None
        if self.traced is not None:  # nodes outside the span and not after block 0: as traced
            env = {n: v for n, v in self.traced.items()
                   if n.op != "placeholder" and n not in self.after0 and n not in self.region}
        return super().run(*args, initial_env=env)

    def run_node(self, n):
        self.current = n  # the node that raised, if the probe fails
        meta = n.meta.get("routefx", {})
        if meta.get("guard") and meta["guarded"] in self.region:
            try:  # does a value the trace fixed change when blocks see fewer tokens?
                return super().run_node(n)
            except GuardError:
                if not self.check_only:
                    meta["token_dependent"] = True
                return None
        if n in self.after0 and n not in self.region:
            return None  # consumes the stream after it left the probe's span: not needed
        if n not in self.region:
            return super().run_node(n)
        saved = {}
        for u in n.all_input_nodes:
            if u not in self.region and u not in self.skip and token_kind(u, self.streams) != "pass":
                saved[u], self.env[u] = self.env[u], self._gather(u)
        try:
            out = super().run_node(n)
        finally:
            self.env.update(saved)
        if not self.check_only:
            label = _label(out, self.streams.batch, self.keep)
            if label is False:
                label = self._joined(n, out)
            self.labels[n] = label
        self.todo.discard(n)
        if not self.todo:
            raise _Stop
        return out

    def _joined(self, n, out):
        """("joined", p, s) if `out` is `(batch, p + kept + s, ...)` with the stream's kept tokens
        after p other tokens (text joined in front) and before s others; False otherwise."""
        if not (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[0] == self.batch):
            return False
        size, keep = out.shape[1], self.keep
        if n.op == "call_function" and n.target in _CATS and _cat_dim(n, out) == 1:
            offset, found = 0, []
            for part in n.args[0]:
                p, s = _offsets(self.labels.get(part, False))
                if p is not None:
                    found.append(offset + p)
                offset += self.env[part].shape[1] if isinstance(self.env.get(part), torch.Tensor) else 0
            if len(found) == 1 and size - keep - found[0] >= 0:
                return _as_label(found[0], size - keep - found[0])
            return False
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in self.labels:
            p, s = _offsets(self.labels[n.args[0]])
            span = p is not None and _dim1_slice(n.args[1], self.env[n.args[0]].shape[1],
                                                 lambda a: self.env[a] if isinstance(a, fx.Node) else a)
            if span and span[2] == 1 and span[0] <= p and span[1] >= p + keep:
                return _as_label(p - span[0], span[1] - p - keep)
            return False
        for u in n.all_input_nodes:
            p, s = _offsets(self.labels.get(u, False))
            if p is not None and (p or s) and size == keep + p + s:
                return _as_label(p, s)
        return False

    def _gather(self, u):
        if u not in self.gathered:
            x, s = self.env[u], self.streams
            if self.ids is None:  # one index set for the whole batch: valid for tables too
                gen = torch.Generator().manual_seed(0)  # (on the CPU: meta tensors have no generator)
                ratio = 1 - (self.keep - s.protect) / (s.num_tokens - s.protect)
                ids = select_tokens(1, s.num_tokens, ratio, s.protect, "cpu", gen).to(x.device)
                self.ids = ids[:, : self.keep].expand(self.batch, -1)
            self.gathered[u] = follow(u, x, self.ids, s, self.shared)
        return self.gathered[u]


def follow(u: fx.Node, x: torch.Tensor, ids, streams: Streams, shared: bool = False) -> torch.Tensor:
    """`x`, the value of `u` entering a span, for the kept tokens `ids`, by its `token_kind`
    (real values: the probe and the behaviour trials; the routed graph has the same ops)."""
    kind = token_kind(u, streams)
    if kind == "side":
        return gather_side(x, ids, u.meta["routefx"].get("token_dims", (1,)))
    if kind in ("table0", "table1"):
        return gather_table(x, ids, streams.num_tokens, int(kind[-1]), shared)
    return gather_tokens(x, ids, shared and kind == "broadcast")


@contextlib.contextmanager
def _quiet_fake_tensor():
    """A block failing on fewer tokens is an expected answer of the probe: keep fake-tensor
    dispatch from logging it as an error (the route that needs that block reports it)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _offsets(label):
    """(p, s) of a value carrying the stream (p other tokens before it, s after), or (None, None)."""
    if label is True:
        return 0, 0
    if isinstance(label, tuple) and label and label[0] == "joined":
        return label[1], label[2]
    return None, None


def stream_offsets(node: fx.Node) -> tuple:
    """(p, s) of a node carrying the stream with p other tokens in front and s behind (text
    joined to the image tokens inside the chain), (0, 0) for the stream itself, else (None, None)."""
    return _offsets(node.meta.get("routefx", {}).get("token"))


def _as_label(p, s):
    return True if p == s == 0 else ("joined", p, s)


def _cat_dim(node, value):
    if node.target is torch.hstack:  # dim 1 of 2-D and higher tensors
        return 1 if value.dim() > 1 else 0
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % value.dim()


def _probe(gm, chain, g, region, streams, values, example, mode, shared):
    """Run the chain at a token count no tensor has; a value is part of the stream iff it shows
    that count, and the trace shows the model's own count at the same offsets: two counts, so a
    size that equals one of them by chance (a text stream of length N) is never taken."""
    after0 = nx.descendants(g, chain.nodes[0]) | {chain.nodes[0]}
    keep = _probe_count(streams.num_tokens, streams.protect, values)
    probe = _Probe(gm, region, after0, streams, keep, shared, traced=values)
    err = _run_probe(probe, example, mode)
    if err is not None:  # the default reading fails: decide by behaviour
        skip = _not_per_token(gm, region, after0, streams, keep, shared, example, mode, values)
        if skip or any(u.meta.get("routefx", {}).get("per_token") for u in gm.graph.nodes):
            probe = _Probe(gm, region, after0, streams, keep, shared, traced=values)
            probe.skip = skip
            err = _run_probe(probe, example, mode)
    if err is not None:  # what ran before the failing block still counts
        failed = probe.env and max((n for n in probe.env if "block" in n.meta.get("routefx", {})),
                                   key=lambda n: n.meta["routefx"]["block"], default=None)
        streams.failed_at = ((failed.meta["routefx"]["block"] + 1) if failed else 0, err, probe.current)
    for n in region:
        label = probe.labels.get(n, False)
        n.meta.setdefault("routefx", {})["token"] = _confirmed(label, values.get(n), streams)
    if streams.failed_at is None and mode is not None and not shared:
        _check_per_sample_tables(gm, region, after0, streams, keep, values, example, mode)


def _confirmed(label, traced, streams):
    """`label` (read at the probe's count) where the traced value shows the model's own count at
    the same offsets (a tuple: element by element), else False."""
    if isinstance(label, tuple) and label and label[0] != "joined":
        if not isinstance(traced, (tuple, list)) or len(traced) != len(label):
            return False
        return tuple(_confirmed(a, b, streams) for a, b in zip(label, traced))
    p, s = _offsets(label)
    ok = (p is not None and isinstance(traced, torch.Tensor) and traced.dim() >= 2
          and traced.shape[0] == streams.batch and traced.shape[1] == p + streams.num_tokens + s)
    return label if ok else False


def _run_probe(probe, example, mode):
    """None if the probe ran to the end of the span, else the exception it raised."""
    try:
        with torch.no_grad(), mode or contextlib.nullcontext(), _quiet_fake_tensor(), fake_run(probe.module, mode):
            probe.run(*example)
    except _Stop:
        return None
    except Exception as e:  # noqa: BLE001 - the caller decides what a failure means
        return e
    return None


def _not_per_token(gm, region, after0, streams, keep, shared, example, mode, values) -> set:
    """Which side inputs follow the token selection, decided by behaviour where shapes cannot tell.

    By default table-shaped inputs (`(S, d)`, `(1, S, ...)`) are gathered with the tokens and
    `(batch, N, ...)` tensors that are not the stream (a text context as long as the image) are
    not. If the chain fails that way on fewer tokens: a table whose exclusion makes it run is not
    per-token (a text rotary table as long as the image; `meta['routefx']['not_per_token']`,
    returned); else the smallest set of `(batch, N, ...)` inputs whose gathering makes it run is
    per-token (rotary tables with a batch dim; `meta['routefx']['per_token']`). Two such sets of
    the same size are ambiguous: `streams.ambiguous`, and the routes are refused.
    """
    def runs(skip=(), extra=()):  # (the caller saw the default reading fail)
        for u in extra:
            u.meta["routefx"]["per_token"] = True
        trial = _Probe(gm, region, after0, streams, keep, shared, traced=values)
        trial.skip = set(skip)
        try:
            return _run_probe(trial, example, mode) is None
        finally:
            for u in extra:
                u.meta["routefx"].pop("per_token", None)

    groups: dict = {}  # one table read in several places (a constant per block) is tried as one
    entering = dict.fromkeys(u for v in sorted(region, key=lambda n: n.name) for u in v.all_input_nodes
                             if u not in region)
    for u in entering:
        if token_kind(u, streams) in ("table0", "table1", "broadcast"):
            groups.setdefault(_fetch_value(gm, u) if u.op == "get_attr" else u, []).append(u)
    for group in groups.values():
        if runs(skip=set(group)):
            for u in group:
                u.meta.setdefault("routefx", {})["not_per_token"] = True
            return set(group)
    cands = [u for u in entering if _per_token_shaped(u, streams)]
    for size in range(1, min(len(cands), 3) + 1):
        working = [c for c in itertools.combinations(cands, size) if runs(extra=c)]
        if len(working) == 1:
            for u in working[0]:
                u.meta["routefx"]["per_token"] = True
            return set()
        if working:
            streams.ambiguous = working
            return set()
    return set()


def _fetch_value(gm, node):
    """Identity of the tensor a `get_attr` node reads (fx makes one attribute per constant use)."""
    obj = operator.attrgetter(node.target)(gm)
    if not isinstance(obj, torch.Tensor):
        return id(obj)
    return (obj.data_ptr() if obj.device.type != "meta" else id(obj)), tuple(obj.shape)


def _per_token_shaped(u, streams) -> bool:
    """A `(batch, N, ...)` tensor that is not the stream: per-token, or something as long by chance."""
    shape = getattr(u.meta.get("routefx", {}).get("spec"), "shape", None)
    return (token_kind(u, streams) == "pass" and shape is not None and len(shape) >= 2
            and shape[0] == streams.batch and shape[1] == streams.num_tokens)


def _check_per_sample_tables(gm, region, after0, streams, keep, values, example, mode):
    """A `(1, N, ...)` table entering the span is gathered per sample into `(B, n_kept, ...)`,
    which is right only if the blocks broadcast its dim 0 against the batch. A block that
    broadcasts it against another dim (attention heads) runs at a batch equal to that dim and
    silently mixes samples. So run the span again, on fake tensors, at a batch size no tensor of
    the model has: such a block then fails, and routes gathering those tables are refused."""
    if not any(token_kind(u, streams) in PER_SAMPLE_TABLES for v in region for u in v.all_input_nodes if u not in region):
        return
    dims = _dims(values)
    batch = next(b for b in range(3, 10_000) if b not in dims)
    with mode:
        bigger = [torch.zeros((batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
                  if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == streams.batch else x
                  for x in example]
    check = _Probe(gm, region, after0, streams, keep, False, batch=batch)
    try:
        with torch.no_grad(), mode, _quiet_fake_tensor(), fake_run(gm, mode):
            check.run(*bigger)
    except _Stop:
        return
    except Exception as e:  # noqa: BLE001 - reported by the routes that gather such tables
        streams.per_sample_tables = (batch, e)
