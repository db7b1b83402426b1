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
import logging
import dataclasses

import networkx as nx
import torch
import torch.fx as fx

from routefx.errors import INSPECT_HINT, GuardError, RouteError
from routefx.ops import gather_table, gather_tokens, select_tokens, setitem
from .find_blocks import dataflow_graph

__all__ = ["Streams", "analyze_streams", "flat_inputs", "token_kind", "projections", "PER_SAMPLE_TABLES"]

_CATS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)}


@dataclasses.dataclass
class Streams:
    """What the probe learned about the routed token stream."""

    source: fx.Node          # the model input the tokens come from
    primary: fx.Node         # block 0's argument carrying the stream
    batch: int
    num_tokens: int          # N at block 0, prefix included
    protect: int             # prefix tokens never routed
    input_derived: set       # nodes that depend on any model input
    failed_at: tuple = None  # (block index, exception) if a block cannot run on fewer tokens
    per_sample_tables: tuple = None  # (batch tried, exception) if (1, N, ...) tables fail per sample
    shared: bool = False     # one index set per batch for every route (see `analyze_streams`)
    shared_because: fx.Node = None  # the unbatched per-token table that made `shared` automatic


def flat_inputs(node: fx.Node) -> list:
    """Input nodes of `node` in call order (positional, then keyword), flattened."""
    out = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def projections(node: fx.Node) -> list:
    """`getitem` / `getattr` users that pick an element out of a tuple / container value."""
    import operator
    if not isinstance(node.meta.get("routefx", {}).get("spec"), (tuple, list)):
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
    if meta.get("token") is True:
        return "token"
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


def _assigned_span(node, values):
    """(start, stop) along dim 1 of `setitem(x, (:, start:stop), v)`, or None."""
    key = node.args[1]
    if not (isinstance(key, tuple) and len(key) >= 2 and key[0] == slice(None) and isinstance(key[1], slice)):
        return None
    n = values[node].shape[1]
    start, stop, _ = slice(_value(key[1].start, values), _value(key[1].stop, values)).indices(n)
    return start, stop


def _detect_prefix(primary, from_src, values) -> int:
    prefix, node = 0, primary
    while node.op != "placeholder":
        if node.op == "call_function" and node.target is setitem and node.args[2] in from_src:
            span = _assigned_span(node, values)  # seq[:, a:b] = image tokens into a preallocated sequence
            if span is not None:
                if span[1] < values[node].shape[1]:
                    raise RouteError(f"Tokens are placed AFTER the image tokens at {node.format_node()}; "
                                     f"routefx protects prefix tokens only. Pass protect=<prefix count> "
                                     f"and put extra tokens in front. {INSPECT_HINT}")
                prefix += span[0]
                node = node.args[2]
                continue
        if node.op == "call_function" and node.target in _CATS:
            parts = list(node.args[0])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim % values[node].dim() == 1:
                ours = [i for i, p in enumerate(parts) if p in from_src]
                i = max(ours, key=lambda j: values[parts[j]].shape[1])
                prefix += sum(values[p].shape[1] for p in parts[:i])
                if any(values[p].shape[1] for p in parts[i + 1:]):
                    raise RouteError(f"Tokens are appended AFTER the image tokens at {node.format_node()}; "
                                     f"routefx protects prefix tokens only. Pass protect=<prefix count> "
                                     f"and put extra tokens in front. {INSPECT_HINT}")
                node = parts[i]
                continue
        nxt = [u for u in node.all_input_nodes if u in from_src]
        if not nxt:
            break
        node = nxt[0]
    return prefix


def _dims(values: dict) -> set:
    """Every dimension size of every traced tensor value."""
    return {d for v in values.values() if isinstance(v, torch.Tensor) for d in v.shape}


def _probe_count(n_total: int, protect: int, values: dict) -> int:
    dims = _dims(values)
    for keep in range(n_total - protect - 1, 0, -1):
        if protect + keep not in dims:
            return protect + keep
    raise RouteError(f"Too few tokens ({n_total}) to tell the token stream apart from other tensors; "
                     f"trace with a larger example input. {INSPECT_HINT}")


def analyze_streams(gm: fx.GraphModule, chain, values: dict, example: list, protect=None, mode=None,
                    shared=None) -> Streams:
    """Label every node of `gm` with `meta['routefx']['token']` (see module docstring).

    `shared`: one index set for the whole batch in every route (True), one per sample (False), or
    None: per sample unless an unbatched per-token table (a rotary `(T_text + N, d)` table) enters
    the blocks, which can only follow one index set for the batch (`streams.shared_because`).
    """
    g = dataflow_graph(gm.graph)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    source = inputs[0]
    from_src = nx.descendants(g, source) | {source}
    block0 = chain.nodes[0]
    cands = [u for u in flat_inputs(block0) if u in from_src and isinstance(values.get(u), torch.Tensor)
             and values[u].dim() >= 3]
    if not cands:
        raise RouteError(f"Block 0 ('{block0.target}') takes no (batch, tokens, ...) tensor derived from the "
                         f"model's first input '{source.target}': nothing to route. Pass the image/latent "
                         f"tensor first. {INSPECT_HINT}")
    primary = cands[0]
    batch, n_total = values[primary].shape[:2]
    k = _detect_prefix(primary, from_src, values) if protect is None else int(protect)
    if not 0 <= k < n_total:
        raise RouteError(f"protect={k} must be in [0, {n_total}) (the stream has {n_total} tokens).")
    derived = set().union(*(nx.descendants(g, p) | {p} for p in inputs))
    streams = Streams(source, primary, batch, n_total, k, derived)
    after0 = nx.descendants(g, block0)
    for n in gm.graph.nodes:
        if n not in after0:
            ok = n in from_src and _label(values.get(n), batch, n_total) is True
            n.meta.setdefault("routefx", {})["token"] = ok
    region = span_region(g, chain.nodes[0], chain.nodes[-1])
    tables = [u for v in region for u in v.all_input_nodes if u not in region and token_kind(u, streams) == "table0"]
    streams.shared = bool(tables) if shared is None else bool(shared)
    streams.shared_because = tables[0] if tables and shared is None else None
    _probe(gm, chain, g, streams, values, example, mode, streams.shared)
    return streams


def span_region(g: nx.DiGraph, first: fx.Node, last: fx.Node) -> set:
    """Nodes a route over blocks first..last runs on its kept tokens, plus their projections."""
    region = {first, last} | (nx.descendants(g, first) & nx.ancestors(g, last))
    return region | {p for n in region for p in projections(n)}


class _Stop(Exception):
    pass


class _Probe(fx.Interpreter):
    def __init__(self, gm, region, after0, streams, keep, shared, batch=None):
        super().__init__(gm)
        self.region, self.after0, self.streams, self.keep, self.shared = region, after0, streams, keep, shared
        self.batch = batch or streams.batch
        self.check_only = batch is not None  # a second run at another batch size: learn nothing
        self.todo = set(region)  # stop once every node of the span has run
        self.ids = None
        self.gathered = {}

    def run_node(self, n):
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
            if u not in self.region and token_kind(u, self.streams) != "pass":
                saved[u], self.env[u] = self.env[u], self._gather(u)
        try:
            out = super().run_node(n)
        finally:
            self.env.update(saved)
        if not self.check_only:
            n.meta.setdefault("routefx", {})["token"] = _label(out, self.streams.batch, self.keep)
        self.todo.discard(n)
        if not self.todo:
            raise _Stop
        return out

    def _gather(self, u):
        if u not in self.gathered:
            x, s = self.env[u], self.streams
            if self.ids is None:  # one index set for the whole batch: valid for tables too
                gen = torch.Generator(device=x.device).manual_seed(0)
                ratio = 1 - (self.keep - s.protect) / (s.num_tokens - s.protect)
                ids = select_tokens(1, s.num_tokens, ratio, s.protect, x.device, gen)
                self.ids = ids[:, : self.keep].expand(self.batch, -1)
            kind = token_kind(u, s)
            if kind in ("table0", "table1"):
                self.gathered[u] = gather_table(x, self.ids, s.num_tokens, int(kind[-1]), self.shared)
            else:
                self.gathered[u] = gather_tokens(x, self.ids, self.shared and kind == "broadcast")
        return self.gathered[u]


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


def _probe(gm, chain, g, streams, values, example, mode, shared):
    keep = _probe_count(streams.num_tokens, streams.protect, values)
    first, last = chain.nodes[0], chain.nodes[-1]
    region = span_region(g, first, last)
    probe = _Probe(gm, region, nx.descendants(g, first) | {first}, streams, keep, shared)
    try:
        with torch.no_grad(), mode or contextlib.nullcontext(), _quiet_fake_tensor():
            probe.run(*example)
    except _Stop:
        if mode is not None and not shared:
            _check_per_sample_tables(gm, region, probe, streams, keep, values, example, mode)
        return
    except Exception as e:  # noqa: BLE001 - remembered, reported by routes that need this block
        failed = probe.env and max((n for n in probe.env if "block" in n.meta.get("routefx", {})),
                                   key=lambda n: n.meta["routefx"]["block"], default=None)
        streams.failed_at = ((failed.meta["routefx"]["block"] + 1) if failed else 0, e)


def _check_per_sample_tables(gm, region, probe, streams, keep, values, example, mode):
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
    check = _Probe(gm, region, probe.after0, streams, keep, False, batch=batch)
    try:
        with torch.no_grad(), mode, _quiet_fake_tensor():
            check.run(*bigger)
    except _Stop:
        return
    except Exception as e:  # noqa: BLE001 - reported by the routes that gather such tables
        streams.per_sample_tables = (batch, e)
