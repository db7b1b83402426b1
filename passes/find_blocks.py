"""find_blocks: which modules are blocks, and their ordered chain in the dataflow graph.

Two steps around `capture`:

* `block_candidates(model)` (before tracing) names the modules to keep as leaves: the outermost
  modules whose Python type occurs at least twice in the model and that hold parameters
  (structure, not class-name lists: a DiT's `DiTBlock`s, timm's `Block`s, mamba-ssm's `Block`s).
* `find_chain(gm)` (needs `capture`) builds a networkx DiGraph over the fx dataflow, groups the
  leaf calls by module type, splits each group into runs where every call is reachable from the
  previous one, and picks the longest run. It marks `node.meta['routefx']['block'] = i`.
"""
import dataclasses
from collections import Counter

import networkx as nx
import torch.fx as fx
from torch import nn

from routefx.errors import INSPECT_HINT, RouteError

__all__ = ["Chain", "block_candidates", "explicit_blocks", "find_chain", "dataflow_graph"]


@dataclasses.dataclass
class Chain:
    """The ordered block calls a route indexes, and the other chains that were considered."""

    nodes: list
    names: list
    alternatives: list  # list of name lists, longest first
    explicit: bool = False

    def __len__(self):
        return len(self.nodes)


def _is_builtin(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))


def block_candidates(model: nn.Module) -> set:
    """Qualified names of the outermost repeated-type modules with parameters."""
    named = [(n, m) for n, m in model.named_modules() if n and not _is_builtin(m)
             and any(True for _ in m.parameters())]
    counts = Counter(type(m) for _, m in named)
    picked = []
    for name, m in named:  # named_modules is pre-order: parents come before children
        if counts[type(m)] >= 2 and not any(name.startswith(p + ".") for p in picked):
            picked.append(name)
    return set(picked)


def explicit_blocks(model: nn.Module, blocks) -> list:
    """Resolve `blocks=` (a container name or a list of module names) to module names."""
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules:
            close = [n for n in modules if n and (name in n or n in name)][:8]
            raise RouteError(f"blocks=: no module named '{name}' in {type(model).__name__}. "
                             f"Similar names: {close or sorted(block_candidates(model))[:8]}. {INSPECT_HINT}")
        m = modules[name]
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and isinstance(blocks, str):
            out += [f"{name}.{k}" for k, _ in m.named_children()]
        else:
            out.append(name)
    return out


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """Directed graph with an edge u -> v for every input u of node v."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for u in node.all_input_nodes:
            g.add_edge(u, node)
    return g


def _runs(calls: list, g: nx.DiGraph) -> list:
    runs = []
    for c in calls:
        if runs and nx.has_path(g, runs[-1][-1], c):
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def find_chain(gm: fx.GraphModule, leaves: set, explicit: list = None) -> Chain:
    """Find the block chain among the leaf calls (or exactly the `explicit` module names)."""
    g = dataflow_graph(gm.graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in (explicit or leaves)]
    if explicit:
        missing = [b for b in explicit if b not in {n.target for n in calls}]
        if missing:
            raise RouteError(f"blocks=: module(s) {missing} are never called in the traced forward. "
                             f"{INSPECT_HINT}")
        runs = _runs(calls, g)
        if len(runs) > 1:
            raise RouteError(f"blocks=: the blocks do not form one chain (no dataflow from "
                             f"'{runs[0][-1].target}' to '{runs[1][0].target}'). {INSPECT_HINT}")
        return _mark(Chain(calls, [n.target for n in calls], [], explicit=True))
    groups: dict = {}
    for n in calls:
        groups.setdefault(type(gm.get_submodule(n.target)), []).append(n)
    runs = sorted((r for grp in groups.values() for r in _runs(grp, g)), key=len, reverse=True)
    if not runs or len(runs[0]) < 2:
        raise RouteError("No block chain found: routefx looks for a sequence of at least two modules of "
                         "the same type, each fed by the previous one. Fix: name them with "
                         "routefx.apply(..., blocks=['blocks.0', 'blocks.1', ...]) or blocks='blocks'. "
                         + INSPECT_HINT)
    best = runs[0]
    return _mark(Chain(best, [n.target for n in best], [[n.target for n in r] for r in runs[1:]]))


def _mark(chain: Chain) -> Chain:
    for i, n in enumerate(chain.nodes):
        n.meta.setdefault("routefx", {})["block"] = i
    return chain
