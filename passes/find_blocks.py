"""find_blocks: which modules are blocks, and their ordered chain in the dataflow graph.

Two steps around `capture`:

* `block_candidates(model)` (before tracing) names the modules to keep as leaves: the outermost
  modules whose Python type occurs at least twice in the model and that hold parameters
  (structure, not class-name lists: a DiT's `DiTBlock`s, timm's `Block`s, mamba-ssm's `Block`s).
* `find_chain(gm)` (needs `capture`) builds a networkx DiGraph over the fx dataflow and picks
  the longest sequence of block calls on the image tokens' dataflow, each reachable from the
  previous one, whatever their types (see `find_chain`). It marks
  `node.meta['routefx']['block'] = i`.
"""
import dataclasses
from collections import Counter

import networkx as nx
import torch.fx as fx
from torch import nn

from routefx.errors import INSPECT_HINT, RouteError
from .capture import reads_only_metadata

__all__ = ["Chain", "block_candidates", "explicit_blocks", "find_chain", "dataflow_graph", "image_input"]


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
    # a type repeated only inside blocks (an output norm whose twin sits in the last block) is no block
    outer = Counter(type(model.get_submodule(n)) for n in picked)
    return {n for n in picked if outer[type(model.get_submodule(n))] >= 2}


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


def dataflow_graph(graph: fx.Graph, data_only: bool = False) -> nx.DiGraph:
    """Directed graph with an edge u -> v for every input u of node v; `data_only` leaves out the
    edges of shape reads (metadata is not dataflow: `torch.ones(x.shape[0])` does not carry `x`)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for u in node.all_input_nodes:
            if not (data_only and reads_only_metadata(node, u)):
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


def _stack(node: fx.Node) -> str:
    """The container a block call belongs to ('layers' for 'layers.3')."""
    return node.target.rpartition(".")[0]


def _longest(calls: list, below: dict) -> list:
    """Longest sequence of calls, each fed (through dataflow) by the one before; earliest on ties."""
    best = {}
    for i, c in enumerate(calls):
        prev = [p for p in calls[:i] if c in below[p]]
        p = max(prev, key=lambda q: len(best[q]), default=None)
        best[c] = (best[p] if p is not None else []) + [c]
    return max(best.values(), key=len, default=[])


def _without_refiners(chain: list, calls: list, below: dict) -> list:
    """Drop leading stacks that run beside another stack before merging into the chain (a text
    refiner beside an image refiner, then joint blocks): the chain starts where they merge."""
    by_stack: dict = {}
    for c in calls:
        by_stack.setdefault(_stack(c), []).append(c)
    # a refiner is a sequential stack (each call fed by the previous), not parallel projections
    sequential = {k for k, cs in by_stack.items() if len(cs) >= 2 and all(b in below[a] for a, b in zip(cs, cs[1:]))}
    for j in range(1, len(chain)):
        if _stack(chain[j]) == _stack(chain[j - 1]):
            continue
        beside = [d for d in calls if d not in chain and _stack(d) in sequential and chain[j] in below[d]
                  and chain[j - 1] not in below[d] and d not in below[chain[0]]]
        if beside:
            return chain[j:]
    return chain


def find_chain(gm: fx.GraphModule, candidates: set, explicit: list = None) -> Chain:
    """Find the block chain among the calls of `candidates` (or exactly the `explicit` modules).

    The chain is the longest sequence of block calls on the image tokens' dataflow (from the
    model's first input; shape reads are not dataflow), each fed by the previous one, whatever
    their types: dual-stream then single-stream blocks, alternating attention / MLP modules, or
    U-ViT's in / mid / out blocks form one chain. Stacks that do not touch the image (a text
    refiner, an embedder used twice) are not in it, nor is an image-side stack that runs beside
    such a stack before both merge. The other readings are kept as `alternatives`.
    """
    g = dataflow_graph(gm.graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in (explicit or candidates)]
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
    data = dataflow_graph(gm.graph, data_only=True)
    source = image_input(gm)
    from_image = nx.descendants(data, source) if source is not None else set()
    on_image = [c for c in calls if c in from_image] or calls
    below = {c: nx.descendants(g, c) for c in calls}
    longest = _longest(on_image, below)
    best = _without_refiners(longest, calls, below)
    if len(best) < 2:
        raise RouteError("No block chain found: routefx looks for a sequence of at least two repeated "
                         "modules, each fed by the previous one, on the image tokens' dataflow. Fix: name "
                         "them with routefx.apply(..., blocks=['blocks.0', 'blocks.1', ...]) or "
                         "blocks='blocks'. " + INSPECT_HINT)
    groups: dict = {}
    for n in calls:
        groups.setdefault(type(gm.get_submodule(n.target)), []).append(n)
    others = [longest] if longest != best else []
    others += sorted((r for grp in groups.values() for r in _runs(grp, g) if r != best), key=len, reverse=True)
    return _mark(Chain(best, [n.target for n in best], [[n.target for n in r] for r in others]))


def _mark(chain: Chain) -> Chain:
    for i, n in enumerate(chain.nodes):
        n.meta.setdefault("routefx", {})["block"] = i
    return chain


def image_input(gm: fx.GraphModule):
    """The model's first tensor parameter in its forward's signature (the image / latents),
    whatever order the call passed its arguments in; None without inputs."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return min(inputs, key=lambda n: n.meta.get("routefx", {}).get("position", 0), default=None)
