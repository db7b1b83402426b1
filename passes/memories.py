"""memories: inputs that are not per-token, told apart by the blocks' behaviour on real values.

Needs `analyze_streams`. A tensor without a batch dim that enters a block with the token count
on a dim (`(1, N, D)`, `(N, d)`) is gathered with the tokens by default: it looks like a
position table; so is a `(B, N, D)` value computed from the image that a block takes beside
its stream (the initial embedding, `blk(h, x0)`). Either may instead be a memory that the block
attends to: a learned context, a register bank, a cross-attention memory as long as the image,
computed from the image or not. Gathering a memory would be silently wrong (the kept tokens
would attend to a random subset of it), and shapes cannot tell.

So each such input is tried on the block it enters, on the real values of one call: the block
runs once as is and once with the stream's tokens (and every other per-token input) shuffled
and the candidate left alone. If the output is just the shuffled first output, the block treats
the candidate as a whole, not token by token: it is a memory (`meta['routefx']['not_per_token']`)
and stays untouched. Otherwise it follows the tokens as before. A position table added to the
tokens, or a rotary table, changes the output when left in place; a memory does not.

Skipped (default kept) on meta tensors and on non-plain parameters (sharded models).
"""
import torch
import torch.fx as fx

from routefx._tree import flatten
from routefx.ops import gather_tokens
from .fake_run import not_real, own_forward, state_kept
from .streams import PER_SAMPLE_TABLES, flat_inputs, follow, token_kind

__all__ = ["find_memories"]

_TABLES = (*PER_SAMPLE_TABLES, "table0")
_FOLLOWED = (*_TABLES, "side", "token")  # what a route gathers (joined streams are not tried)


def find_memories(model: torch.nn.Module, gm: fx.GraphModule, chain, streams, args, kwargs) -> list:
    """Mark the memories among the tables entering the chain's blocks; return their nodes."""
    blocks = {n: n for n in chain.nodes}
    trials = {}  # block node -> candidate table inputs
    for blk in chain.nodes:
        flat, spine = flat_inputs(blk), blk.meta.get("routefx", {}).get("spine", [])
        cands = [u for i, u in enumerate(flat) if u not in blocks and i not in spine and u not in flat[:i]
                 and token_kind(u, streams) in (*_TABLES, "token") and not _spine_too(u, flat, spine)]
        if cands:
            trials[blk] = cands
    tensors = [t for t in flatten((args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))[0]
               if isinstance(t, torch.Tensor)]
    if not trials or not_real(model, tensors):
        return []
    calls = _block_calls(model, [n.target for n in trials], args, kwargs, tensors)
    found = []
    for blk, cands in trials.items():
        if blk.target not in calls:
            continue
        values = _align(blk, *calls[blk.target])
        for u in cands:
            if u in values and _is_memory(model.get_submodule(blk.target), blk, u, values, streams):
                found.append(u)
    for u in found:
        u.meta["routefx"]["not_per_token"] = True
    return found


def _spine_too(u, flat, spine) -> bool:
    return any(flat[i] is u for i in spine)


class _Done(Exception):
    pass


def _block_calls(model, names, args, kwargs, tensors) -> dict:
    """The real (args, kwargs) each block in `names` is called with, from one forward of `model`
    (stopped after the last of them; no gradients, RNG and buffers as they were)."""
    calls, hooks = {}, []

    def hook(name):
        def pre(module, a, kw):
            calls.setdefault(name, (a, kw))
            if len(calls) == len(names):
                raise _Done
        return pre

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with state_kept(model, tensors), torch.no_grad():
            own_forward(model)(*args, **kwargs)
    except _Done:
        pass
    except Exception:  # noqa: BLE001 - no real call: the default reading stands
        return {}
    finally:
        for h in hooks:
            h.remove()
    return calls


def _align(node, args, kwargs) -> dict:
    """node -> real value, walking the call node's args / kwargs beside the real call's."""
    out = {}

    def walk(g, r):
        if isinstance(g, fx.Node):
            out.setdefault(g, r)
        elif isinstance(g, (tuple, list)) and isinstance(r, (tuple, list)) and len(g) == len(r):
            for a, b in zip(g, r):
                walk(a, b)
        elif isinstance(g, dict) and isinstance(r, dict):
            for k in g:
                if k in r:
                    walk(g[k], r[k])

    walk(tuple(node.args), tuple(args))
    walk(dict(node.kwargs), dict(kwargs))
    return out


def _is_memory(block, node, cand, values, streams) -> bool:
    """The block's output only shuffles with the tokens while `cand` stays as it is."""
    n, batch = streams.num_tokens, streams.batch
    stream = [u for u in values if token_kind(u, streams) == "token" and u is not cand]
    if not stream or any(not isinstance(values[u], torch.Tensor) or values[u].shape[:2] != (batch, n) for u in stream):
        return False
    gen = torch.Generator().manual_seed(0)
    k = streams.protect
    perm = torch.cat([torch.arange(k), torch.randperm(n - k, generator=gen) + k])
    ids = perm.to(values[stream[0]].device).expand(batch, -1)
    moved, fewer = _moved(values, cand, streams, ids), _moved(values, cand, streams, ids[:, :-1])
    was = block.training
    block.eval()
    try:
        with torch.no_grad():
            ref = _first(_call(block, node, values, {}))
            got = _first(_call(block, node, values, moved))
            _call(block, node, values, fewer)  # a memory left whole still runs on fewer tokens
    except Exception:  # noqa: BLE001 - cannot run that way: not a memory
        return False
    finally:
        block.train(was)
    if not (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor)) or ref.shape != got.shape \
            or ref.dim() < 2 or ref.shape[:2] != (batch, n):
        return False
    want = gather_tokens(ref, ids)
    tol = 5e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(((got - want).abs().max() <= tol * want.abs().max().clamp_min(1e-12)).item())


def _moved(values, cand, streams, ids) -> dict:
    """The block's inputs for the kept tokens `ids`, as a route would gather them, `cand` whole."""
    return {u: follow(u, v, ids, streams) for u, v in values.items()
            if u is not cand and isinstance(v, torch.Tensor) and token_kind(u, streams) in _FOLLOWED}


def _call(block, node, values, moved):
    pick = lambda a: moved.get(a, values.get(a)) if isinstance(a, fx.Node) else a  # noqa: E731
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lambda a: pick(a))
    return block(*args, **kwargs)


def _first(out):
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return getattr(out, "sample", out) if not isinstance(out, torch.Tensor) else out
