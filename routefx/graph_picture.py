"""A picture of the block-level graph with routes drawn: DOT text, or SVG/PNG via Graphviz or
matplotlib (used when Graphviz's `dot` is not installed)."""
import shutil
import subprocess

import networkx as nx

from .api import apply, remove, router

__all__ = ["block_graph", "to_dot", "draw_routes"]

_COLORS = {"input": "#9ecae1", "block": "#d9d9d9", "routed": "#fdae6b", "gather": "#74c476",
           "scatter": "#fb6a4a", "select": "#bcbddc", "output": "#9ecae1"}


def _kind(node, routed_blocks):
    meta = node.meta.get("routefx", {})
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if "block" in meta:
        return "routed" if meta["block"] in routed_blocks else "block"
    if "selector" in meta:
        return "select"
    if "gather_of" in meta:
        return "gather"
    if "scatter_of" in meta:
        return "scatter"
    return None


def block_graph(gm, routes) -> nx.DiGraph:
    """Condense an fx graph to its inputs, blocks, route nodes and output (paths kept as edges)."""
    routed = {i for r in routes for i in range(r.start, r.end + 1)}
    kinds = {n: _kind(n, routed) for n in gm.graph.nodes}
    g = nx.DiGraph()
    for n, k in kinds.items():
        if k:
            label = n.target if k in ("block", "routed") else n.name
            g.add_node(n.name, kind=k, label=str(label))
    for n, k in kinds.items():
        if not k:
            continue
        stack, seen = list(n.users), set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if kinds.get(u):
                g.add_edge(n.name, u.name)
            else:
                stack.extend(u.users)
    return g


def to_dot(g: nx.DiGraph) -> str:
    lines = ["digraph routefx {", "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica];"]
    for n, d in g.nodes(data=True):
        lines.append(f'  "{n}" [label="{d["label"]}", fillcolor="{_COLORS[d["kind"]]}"];')
    lines += [f'  "{u}" -> "{v}";' for u, v in g.edges]
    return "\n".join(lines + ["}"])


def _layout(g: nx.DiGraph) -> dict:
    pos, layers = {}, list(nx.topological_generations(g))
    for depth, nodes in enumerate(layers):
        nodes = sorted(nodes, key=lambda n: g.nodes[n]["kind"] != "input")
        for k, n in enumerate(nodes):
            pos[n] = ((k - (len(nodes) - 1) / 2) * 1.6, -depth)
    return pos


def _matplotlib(g: nx.DiGraph, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pos = _layout(g)
    depth = -min(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(7, max(4, 0.6 * depth)))
    nx.draw_networkx_nodes(g, pos, ax=ax, node_shape="s", node_size=500,
                           node_color=[_COLORS[d["kind"]] for _, d in g.nodes(data=True)])
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: d["label"] for n, d in g.nodes(data=True)},
                            font_size=7, horizontalalignment="left")
    nx.draw_networkx_edges(g, pos, ax=ax, arrowsize=7, width=0.6, edge_color="#555555",
                           connectionstyle="arc3,rad=0.35", node_size=500, node_shape="s")
    ax.set_title("routefx: orange = routed blocks, green = gather, red = scatter", fontsize=9)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)


def draw_routes(model, args, kwargs, routes, path: str, **apply_kw) -> str:
    """Write the routed block-level graph to `path` (.dot, .svg or .png); returns the tool used."""
    routed = apply(model, routes, example_inputs=(args, kwargs), **apply_kw)
    rg = router(routed)._graphs[0][1]
    remove(model)
    g = block_graph(rg.gm, rg.routes)
    dot = to_dot(g)
    if path.endswith(".dot"):
        with open(path, "w") as f:
            f.write(dot + "\n")
        return "dot-text"
    if shutil.which("dot"):
        fmt = path.rsplit(".", 1)[-1]
        subprocess.run(["dot", f"-T{fmt}", "-o", path], input=dot.encode(), check=True)
        return "graphviz"
    _matplotlib(g, path)
    return "matplotlib"
