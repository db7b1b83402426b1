"""Run the passes in order on one example call: capture -> find_blocks -> streams -> insert_routes.

Each pass failure that is not already a `RouteError` is re-raised naming the pass. The graph is
linted and recompiled once, at the end, then run once on the example inputs to verify it.
"""
import contextlib
import dataclasses
import logging
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from routefx.passes.capture import _internal, capture
from routefx.passes.fake_run import fake_run, not_real, rng_preserved, state_kept
from routefx.passes.find_blocks import block_candidates, explicit_blocks, find_chain
from routefx.passes.insert_routes import fp32_after_routes, insert_routes
from routefx.passes.memories import find_memories
from routefx.passes.streams import analyze_streams

from ._tree import flatten
from .errors import INSPECT_HINT, RouteError
from .route import resolve_routes

__all__ = ["RoutedGraph", "build", "rng_preserved", "LIVE"]

LIVE = "_routefx_model"  # the graph's handle on the model: its parameters and buffers are read live

log = logging.getLogger("routefx")


@dataclasses.dataclass
class RoutedGraph:
    """One captured and routed graph, for one input signature and mode."""

    gm: fx.GraphModule
    rebuild_output: Callable[[list], Any]
    chain: Any
    streams: Any
    plans: list
    routes: list
    guards: list
    seconds: float
    compiled: Any = None  # torch.compile(gm) when the routed module was asked to compile
    batch_baked: bool = False  # valid for the traced batch size only (see capture.Captured)
    check: str = "not run"  # what routefx.check did: "passed" / "skipped: why" / "not run"


@contextlib.contextmanager
def _stage(name: str):
    try:
        yield
    except RouteError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RouteError(f"routefx pass '{name}' failed: {type(e).__name__}: {e}. {INSPECT_HINT}") from e


def _tensors(args, kwargs):
    return flatten((args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))[0]


def build(model, args, kwargs, routes, control, **options) -> RoutedGraph:
    """Capture `model(*args, **kwargs)` and insert `routes`; see the module docstring.

    The passes first run on fake tensors (shapes only: no FLOPs, no memory). A model whose leaf
    modules cannot run on them (code that branches on data, an op without a fake-tensor kernel:
    capture then raises an exception that is not a `RouteError`) is captured again with real values.
    """
    # blocks the user already compiled (`block.compile()`, `torch.compile(block)`) run eagerly here:
    # inductor's code must never see the fake tensors (it reads their data pointers and crashes)
    with torch.compiler.set_stance("force_eager"):
        try:
            return _build(model, args, kwargs, routes, control, fake=True, **options)
        except RouteError:
            raise
        except Exception as e:  # noqa: BLE001 - needs real values (see the docstring)
            log.info("routefx: fake-tensor capture failed (%s: %s); capturing with real values",
                     type(e).__name__, e)
            return _build(model, args, kwargs, routes, control, fake=False, **options)
        finally:
            # inside an autocast region, autocast caches the low-precision copies of the weights it
            # cast while we traced: fake tensors must not leak into the real forward that follows
            torch.clear_autocast_cache()


def _build(model, args, kwargs, routes, control, *, blocks=None, protect=None, leaf_modules=(),
           keep_batch=False, fake=True, fp32_after_route=False, shared_indices=None, per_token=(),
           not_per_token=(), real_verify=False) -> RoutedGraph:
    t0 = time.perf_counter()
    with rng_preserved(_tensors(args, kwargs)):
        explicit = explicit_blocks(model, blocks) if blocks is not None else None
        candidates = set(explicit or block_candidates(model))
        leaves = candidates | set(leaf_modules) | hooked_modules(model, candidates)
        cap = capture(model, args, kwargs, leaves, keep_batch=keep_batch, fake=fake)
        example = cap.example
        with _stage("find_blocks"):
            chain = find_chain(cap.gm, candidates, explicit)
        resolved = resolve_routes(routes, len(chain))
        with _stage("streams"):
            streams = analyze_streams(cap.gm, chain, cap.values, example, protect, cap.mode, shared_indices,
                                      per_token, not_per_token)
        with _stage("memories"):
            find_memories(model, cap.gm, chain, streams, args, kwargs)
        with _stage("insert_routes"):
            plans = insert_routes(cap.gm, chain, streams, resolved, control, streams.shared)
            if fp32_after_route:
                fp32_after_routes(cap.gm, chain, resolved)
        if streams.shared_because is not None and plans:
            u = streams.shared_because
            warnings.warn(f"routefx: every route of {type(model).__name__} draws ONE index set for the whole "
                          f"batch (not one per sample): the per-token table '{u.name}' of shape "
                          f"{tuple(u.meta['routefx']['spec'].shape)} has no batch dim, so it can follow only one "
                          f"selection. Pass shared_indices=True to say this is intended (no warning), or "
                          f"shared_indices=False to refuse instead.", stacklevel=_user_stacklevel())
        cap.gm.graph.lint()
        cap.gm.recompile()
        user_generator, control.generator = control.generator, None  # verifying must not draw from it
        try:
            tensors = _tensors(args, kwargs)
            real = tensors if real_verify and not not_real(model, tensors) else None
            _verify(cap, example, len(plans), model, real)
        finally:
            control.generator = user_generator
        read_live(cap.gm, model)
    rg = RoutedGraph(cap.gm, cap.rebuild_output, chain, streams, plans, resolved, cap.guards,
                     time.perf_counter() - t0, batch_baked=cap.batch_baked)
    log.info("routefx: captured %s (%d blocks, %d routes) in %.2fs", type(model).__name__,
             len(chain), len(plans), rg.seconds)
    return rg


def hooked_modules(model, blocks) -> set:
    """Modules with hooks (an FSDP2 unit, activation checkpointing, a user's hook), which must be
    called as modules (leaves) for their hooks to run: tracing through one would drop them. One
    that holds blocks cannot be a leaf: refused, naming it."""
    out = set()
    for name, m in model.named_modules():
        if name and (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks):
            inner = sorted(b for b in blocks if b.startswith(name + "."))
            if inner:
                raise RouteError(f"Module '{name}' ({type(m).__name__}) has hooks (e.g. it is an FSDP2 unit or "
                                 f"checkpointed) and holds the blocks {inner[:3]}: routefx traces through it to "
                                 f"reach them, and its hooks would not run. Put the hooks (fully_shard, "
                                 f"checkpointing) on the blocks themselves, or pass blocks=[...] naming "
                                 f"'{name}' and its peers. {INSPECT_HINT}")
            out.add(name)
    return out


def read_live(gm: fx.GraphModule, model) -> None:
    """Make the graph read the model's parameters and buffers where they are at run time (not
    the tensors of capture time): FSDP2 swaps sharded and unsharded parameters, `.to()` replaces
    buffers, and the graph must follow. Each `get_attr` of the model goes through `gm.<LIVE>`, a
    plain reference to the model (not a submodule: the graph does not own its parameters)."""
    object.__setattr__(gm, LIVE, model)
    changed = False
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.target.startswith(LIVE + "."):
            owner, _, name = n.target.rpartition(".")
            try:
                holder = model.get_submodule(owner)
            except AttributeError:
                continue  # the graph's own constants
            if name in holder._parameters or name in holder._buffers:
                n.target, changed = f"{LIVE}.{n.target}", True
    if changed:
        gm.recompile()


def _user_stacklevel() -> int:
    """`warnings.warn` stacklevel of the innermost frame outside routefx and torch (the user's call)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _verify(cap, example, n_routes, model=None, real=None):
    """The routed graph runs on the capture call's inputs and gives the model's output shapes:
    on the real values when `real` (one forward without gradients; RNG and buffers restored: on
    small models far cheaper than fake tensors), else on the fake ones."""
    outputs = [n for n in cap.gm.graph.nodes if n.op == "output"][0].args[0][: -n_routes or None]
    want = [cap.values[n].shape if isinstance(n, fx.Node) and isinstance(cap.values.get(n), torch.Tensor)
            else None for n in outputs]
    # the nodes in front of the first one the passes added compute what the trace did: not rerun
    env = {}
    for n in cap.gm.graph.nodes:
        if n not in cap.values:
            if "guard" in n.meta.get("routefx", {}):
                continue  # a run-time check of a traced value: runs again, on that value
            break
        if n.op != "placeholder":
            env[n] = cap.values[n]
    try:
        if real is not None:
            with state_kept(model, real), torch.no_grad():
                got = cap.gm(*real)
        else:
            with torch.no_grad(), cap.mode or contextlib.nullcontext(), fake_run(cap.gm, cap.mode):
                got = fx.Interpreter(cap.gm).run(*example, initial_env=env)
    except Exception as e:  # noqa: BLE001
        raise RouteError(f"The routed graph fails on the example inputs: {type(e).__name__}: {e}. A block "
                         f"inside a route may depend on the token count. {INSPECT_HINT}") from e
    for i, (w, v) in enumerate(zip(want, got)):
        if w is not None and tuple(v.shape) != tuple(w):
            raise RouteError(f"Output {i} of the routed graph has shape {tuple(v.shape)}, the model's has "
                             f"{tuple(w)}. {INSPECT_HINT}")
