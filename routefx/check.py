"""check: every route is verified on real values when it is captured.

The passes decide what a route gathers and scatters from dataflow, shapes on fake tensors and the
blocks' behaviour. This check does not reuse those decisions. It relies on one property of TREAD:
**keeping every token, in a shuffled order, must change nothing.** With the kept set = all tokens
in a random order per sample, a correctly routed forward equals the model's own forward (float
rounding aside). It differs when anything the blocks read per token was not reordered with the
tokens:

* a mask, bias or position table that was not gathered;
* positions the block computes from the token count it receives (`torch.arange(x.shape[1])`);
* a block that relies on the token order (frames x patches, a grid);
* a tensor routed along the wrong dim.

So on the first capture, routefx runs the routed graph once with such orders forced, under
`torch.no_grad()`, at the same RNG state as one forward of the model itself, and compares every
output. A difference is refused, never trained on. The error names the route, the first block
whose output differs for the same tokens, and the tensors the route passed untouched that carry
the token count. The check costs two forwards without gradients. It is skipped on meta tensors.
It is also skipped for models whose training forward is random beyond the routing (dropout):
their two forwards differ anyway. Blocks that read the tokens in order by design (scans:
mamba-ssm's mixers are recognised, `apply(..., ordered=True)` says it for others) cannot be
compared under a shuffle: the check is skipped for them, and the kept tokens keep their order.
`apply(..., verify=False)` turns the check off.

A second part checks the route ends themselves, at the model's real selection (`bypass_check`):
on the graph, the value every route end puts back for the bypassed tokens must be computed before
the route's selection (it cannot have passed a block of the route), and the value it writes for
the kept tokens after it; on one forward, the bypassed tokens' values after the route must equal,
bit for bit, the values their stream had when it was produced (nothing the model did in place in
between changed them), and the kept tokens' values must be the route's own. The model's inputs
must come out of the routed forward unchanged. This part runs wherever real values exist, also
for scans and random forwards.
"""
import logging

import networkx as nx
import torch
import torch.nn as nn

from ._tree import flatten
from .errors import INSPECT_HINT, RouteError
from .ops import _token_index, scatter_joined, scatter_tokens
from .passes.fake_run import not_real, own_forward, state_kept
from .passes.find_blocks import dataflow_graph
from .passes.streams import declarable

__all__ = ["check_routes"]

log = logging.getLogger("routefx")


# mixers that read the tokens in order by design (scans): a shuffle changes their output
_SCANS = ("mamba_ssm.",)


def scan_blocks(model: nn.Module, names) -> list:
    """Blocks of `names` that contain a known scan (mamba-ssm's Mamba / Mamba2 mixers)."""
    return [n for n in names if any(type(m).__module__.startswith(_SCANS) and type(m).__name__.startswith("Mamba")
                                    for m in model.get_submodule(n).modules())]


def check_routes(model: nn.Module, rg, args, kwargs, control, ordered=None) -> str:
    """Run the check (module docstring) for the routed graph `rg` of `model` on this call's
    inputs; return what was done ("passed" / "skipped: why"), raise `RouteError` on a mismatch.

    `ordered`: the blocks read the tokens in order by design (a scan, causal attention): a
    shuffle cannot be compared, so the check is skipped. None: True where a block holds a known
    scan (`scan_blocks`)."""
    tensors = flatten((args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))[0]
    if not rg.plans:
        return "skipped: no route"
    why = not_real(model, tensors)
    if why:
        return f"skipped: {why}"
    bypass_check(model, rg, tensors, control)
    if ordered or (ordered is None and scan_blocks(model, rg.chain.names)):
        return "skipped: the blocks read the tokens in order (ordered=True or a mamba-ssm scan); route ends checked"
    with state_kept(model, tensors), torch.no_grad():
        dense = _model_outputs(model, args, kwargs, seed=0)
        got, _ = _routed_outputs(rg, tensors, control, seed=0, only=None)
        bad = _first_mismatch(dense, got)
        if bad is None:
            return "passed"
        if _first_mismatch(dense, _model_outputs(model, args, kwargs, seed=1)) is not None:
            log.info("routefx: the route check is skipped: the model's training forward is random "
                     "beyond the routing (two forwards at different seeds differ)")
            return "skipped: random training forward"
        culprits = [i for i in range(len(rg.plans))
                    if _first_mismatch(dense, _routed_outputs(rg, tensors, control, 0, only=i)[0])]
        i = culprits[0] if culprits else 0
        _, seen = _routed_outputs(rg, tensors, control, seed=0, only=i, record=True)
        dense_seen = _block_outputs(model, rg, args, kwargs)
    raise RouteError(_message(rg, i, bad, seen, dense_seen))


_SCATTERS = (scatter_tokens, scatter_joined)


def bypass_check(model, rg, tensors, control) -> None:
    """The route ends' check (module docstring, second part); raises `RouteError` naming the
    route end and the tensor on a violation."""
    graph = rg.gm.graph
    sels = {n.meta["routefx"]["selector"]: n for n in graph.nodes if "selector" in n.meta.get("routefx", {})}
    g = dataflow_graph(graph)
    after = {i: nx.descendants(g, sel) for i, sel in sels.items()}
    ends = [n for n in graph.nodes if n.op == "call_function" and n.target in _SCATTERS]
    for n in ends:
        i, base, kept = n.meta["routefx"]["route"], n.args[0], n.args[2]
        if base in after[i] or kept not in after[i]:
            raise RouteError(_bug(rg, i, n, f"the route-start value it puts back ('{base.name}') is computed after "
                                  f"the route's selection" if base in after[i] else
                                  f"the value it writes for the kept tokens ('{kept.name}') does not pass the route"))
    before = {k: t.clone() for k, t in enumerate(tensors) if isinstance(t, torch.Tensor)}
    gen = control.generator
    routing = gen.get_state() if gen is not None else None
    try:
        with state_kept(model, tensors), torch.no_grad():
            torch.manual_seed(0)
            _EndsChecked(rg, {n.args[0] for n in ends}).run(*tensors)
    finally:
        if gen is not None:
            gen.set_state(routing)  # the training run draws the same selections as without the check
    for k, b in before.items():
        if not torch.equal(tensors[k], b):
            raise RouteError(f"routefx bug: the routed forward changed the model's input {k} in place. "
                             f"{_REPORT}")


_REPORT = ("This is a bug in routefx, not in your model: please report it with the output of "
           "`python -m routefx.inspect`; apply(..., verify=False) skips this check.")


def _bug(rg, i, node, what):
    r = rg.plans[i].route
    return (f"routefx bug: route {i} ({r.start}, {r.end}, {r.ratio}) ends at '{node.name}' (the stream "
            f"'{node.meta['routefx']['scatter_of'].name}'), but {what}. Bypassed tokens would not come "
            f"back with their route-start values. {_REPORT}")


class _EndsChecked(torch.fx.Interpreter):
    """One forward of the routed graph at the real selection, checking every route end."""

    def __init__(self, rg, bases):
        super().__init__(rg.gm)
        self.rg, self.bases, self.copies = rg, bases, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.bases and isinstance(out, torch.Tensor):
            self.copies[n] = out.clone()  # the values the stream had when it was produced
        if n.op == "call_function" and n.target in _SCATTERS and n.args[1] is not None:
            ids = self.env[n.args[1]]
            if ids is not None:
                self._check(n, ids, out, self.env[n.args[2]])
        return out

    def _check(self, n, ids, out, kept):
        p, s, bp, bs = (n.args[3:7] + (0, 0))[:4] if n.target is scatter_joined else (0, 0, 0, 0)
        start = self.copies[n.args[0]]
        start = start[:, bp: start.shape[1] - bs].to(out.dtype).expand(out.shape[0], *start.shape[1:])
        mine = out[:, p: out.shape[1] - s]
        bypassed = torch.ones(mine.shape[:2], dtype=torch.bool, device=mine.device).scatter_(1, ids, False)
        i = n.meta["routefx"]["route"]
        if not torch.equal(mine[bypassed], start[bypassed]):
            raise RouteError(_bug(self.rg, i, n, "the bypassed tokens' values after it differ from the values their "
                                  "stream had at the route start (changed in place in between?)"))
        if not torch.equal(mine.gather(1, _token_index(ids, mine)), kept[:, p: kept.shape[1] - s]):
            raise RouteError(_bug(self.rg, i, n, "the kept tokens' values after it are not the route's own"))


def _model_outputs(model, args, kwargs, seed):
    torch.manual_seed(seed)
    out = own_forward(model)(*args, **kwargs)
    return [x for x in flatten(out, is_leaf=lambda x: isinstance(x, torch.Tensor))[0] if isinstance(x, torch.Tensor)]


class _Shuffled:
    """Forced route selections: every token, in a random order per sample (the prefix in place)."""

    def __init__(self, only):
        self.only, self.ids = only, {}
        self.gen = torch.Generator().manual_seed(1234)

    def __call__(self, selector, x, others):
        if self.only is not None and selector.index != self.only:
            return None  # that route keeps every token in place: identity gathers and scatters
        b, n = x.shape[0], x.shape[1] - others
        k = selector.protect
        rows = 1 if selector.shared else b
        perm = torch.stack([torch.randperm(n - k, generator=self.gen) for _ in range(rows)]) + k
        ids = torch.cat([torch.arange(k).expand(rows, k), perm], dim=1).to(x.device).expand(b, -1)
        self.ids[selector.index] = ids
        return ids


def _routed_outputs(rg, tensors, control, seed, only, record=False):
    forced = _Shuffled(only)
    seen, hooks = {}, []
    if record:  # the blocks' outputs, put back in token order
        for name in rg.chain.names:
            mod = rg.gm.get_submodule(name)
            hooks.append(mod.register_forward_hook(_recorder(seen, name)))
    control.check_ids = forced
    try:
        torch.manual_seed(seed)
        out = rg.gm(*tensors)
    finally:
        control.check_ids = None
        for h in hooks:
            h.remove()
    outs = [x for x in out[: len(out) - len(rg.plans)] if isinstance(x, torch.Tensor)]
    if record:
        seen = {name: _unshuffle(v, forced.ids.get(only)) for name, v in seen.items()}
    return outs, seen


def _recorder(seen, name):
    def hook(module, args, out):  # (returns None: the output stays as it is)
        seen.setdefault(name, out)
    return hook


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) and value else value


def _unshuffle(value, ids):
    t = _first(value)
    if ids is None or not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[:2] != ids.shape:
        return t
    return torch.empty_like(t).scatter_(1, _token_index(ids, t), t)


def _block_outputs(model, rg, args, kwargs):
    seen, hooks = {}, []
    for name in rg.chain.names:
        hooks.append(model.get_submodule(name).register_forward_hook(_recorder(seen, name)))
    try:
        _model_outputs(model, args, kwargs, seed=0)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _tolerance(t: torch.Tensor) -> float:
    low = t.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(t.device.type)
    return 5e-2 if low else 1e-3


def _difference(a, b):
    """Relative max difference of two float tensors (None if not comparable)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return float("inf") if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else None
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if a.numel() else 0.0


def _first_mismatch(dense, got):
    if len(dense) != len(got):
        return (None, float("inf"))
    for k, (d, r) in enumerate(zip(dense, got)):
        diff = _difference(r, d)
        if diff is not None and diff > _tolerance(d):
            return (k, diff)
    return None


def _message(rg, i, bad, seen, dense_seen) -> str:
    plan = rg.plans[i]
    r = plan.route
    where = ""
    for name in rg.chain.names[r.start: r.end + 1]:
        diff = _difference(seen.get(name), _first(dense_seen.get(name)))
        if diff is not None and diff > 1e-3:
            where = (f" The first block whose output differs for the same tokens is '{name}' (relative "
                     f"difference {diff:.2g}): it computes something from the token count or order it "
                     f"receives (positions from `x.shape[1]`, a fixed frame or grid layout), reads a "
                     f"per-token input that was not gathered, or takes the tokens on another dim than 1 "
                     f"(a stream laid out sequence-first or channels-first, where sizes coincide).")
            break
    passed = [p for p in plan.passed if plan.num_tokens in p["shape"] or (plan.num_tokens - plan.protect) in p["shape"]]
    cands = "; ".join(f"'{p['tensor']}' {tuple(p['shape'])}" for p in passed[:6])
    nodes = {n.name: n for n in rg.gm.graph.nodes}
    names = list(dict.fromkeys(x for p in passed if p["tensor"] in nodes for x in declarable(rg.gm, nodes[p["tensor"]])))
    hint = (f" Tensors the route passes untouched that have a dim of {plan.num_tokens} (the token count): "
            f"{cands}; if one of them is per-token (a mask, a bias, positions), it must follow the tokens: "
            f"routefx.apply(..., per_token={names[:3]!r})." if cands else "")
    k, diff = bad
    return (f"Route {i} ({r.start}, {r.end}, {r.ratio}) fails routefx's check on real values: keeping every "
            f"token in a shuffled order must give the model's own output, but output {k} differs by "
            f"{diff:.2g} (relative). Routing this model as analysed would train on wrong values, so it "
            f"is refused.{where}{hint} End the route before that block, or make the block a part of the "
            f"model that routefx does not route. If the blocks read the tokens in order by design (a "
            f"scan, causal attention, positions counted from x.shape[1]) and you want TREAD's meaning "
            f"for them - the kept tokens keep their order and are numbered 0..k-1 among themselves - "
            f"pass apply(..., ordered=True). {INSPECT_HINT}")
