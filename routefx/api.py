"""Public front door: `apply`, `remove`, `router`, `force_routing`, and `Router`.

`apply` routes a model in place: the model object, its class, its parameter names, its
`state_dict` and its hooks stay as they are. What changes is one instance attribute: `forward`
becomes the model's `Router`, a plain object (not a module: nothing is added to
`named_modules`, `state_dict` or `parameters`). `nn.Module.__call__` still runs every hook the
user or a wrapper (DDP, FSDP2, peft, accelerate) registered, then calls the router, which runs
the routed graph in training mode and the model's own forward in eval mode. `remove` deletes the
attribute again.
"""
import contextlib
import dataclasses
import inspect
import weakref

import torch
from torch import nn

from ._tree import flatten
from .check import check_routes
from .errors import INSPECT_HINT, RouteError
from .ops import RouteControl
from .passes.capture import input_skeleton
from .passes.find_blocks import explicit_blocks
from .pipeline import LIVE, build
from .route import Route, as_routes, resolve_routes

__all__ = ["apply", "remove", "router", "unrouted", "force_routing", "Router", "RouteInfo"]

# Bug C: a captured graph holds the module objects of capture time. Each module a graph depends
# on (see `_dependencies`) maps to the Routers that depend on it. torch's global registration
# hooks run on every setattr of a Module / Parameter / buffer, `ModuleList[i] = m`, `append`,
# `add_module`, `register_parameter` and `register_buffer`. When one of them puts a different
# object under a name a graph depends on, `_on_registration` drops that Router's graphs
# (the next call recaptures the model as it is then). A routed call pays nothing for this.
_WATCHED = weakref.WeakKeyDictionary()  # module -> WeakSet of Routers
_MISSING = object()
_hooks = []


def _on_registration(slot):
    def hook(owner, name, value):
        routed = _WATCHED.get(owner)
        if routed and getattr(owner, slot).get(name, _MISSING) is not value:
            for r in list(routed):
                mods, attrs = r._deps
                if (id(owner) in mods) if slot == "_modules" else ((id(owner), name) in attrs):
                    r._drop_graphs()
    return hook


def _install_hooks():
    if not _hooks:
        from torch.nn.modules import module as m
        _hooks.extend((m.register_module_module_registration_hook(_on_registration("_modules")),
                       m.register_module_parameter_registration_hook(_on_registration("_parameters")),
                       m.register_module_buffer_registration_hook(_on_registration("_buffers"))))


@dataclasses.dataclass
class RouteInfo:
    """One route's token selection in the last routed forward."""

    route: Route
    ids: torch.Tensor  # (batch, kept) sorted indices into all N tokens, or None at ratio 0
    num_tokens: int    # N, protected prefix included
    protect: int

    @property
    def mask(self) -> torch.Tensor:
        """(batch, N) bool, True where the token BYPASSED the route (prefix always False)."""
        if self.ids is None:
            raise RouteError("This route ran at ratio 0: no token was routed, there is no mask.")
        m = torch.ones(self.ids.shape[0], self.num_tokens, dtype=torch.bool, device=self.ids.device)
        return m.scatter(1, self.ids, False)

    @property
    def patch_mask(self) -> torch.Tensor:
        """Like `mask` but over the routable tokens only (the protected prefix dropped)."""
        return self.mask[:, self.protect:]


def _is_tensor(x):
    return isinstance(x, torch.Tensor)


class Router:
    """The routing of one model, routed in place by `routefx.apply` (its `forward` attribute).

    Called like the model's forward: in training mode (or under `force_routing`) it runs the
    routed graph of this call's signature, captured on first use; in eval mode it is the model's
    own forward. `routefx.router(model)` returns it (`routing`, `plans`, `set_ratio`, and
    `state_dict` / `load_state_dict` for the routing generator).
    """

    def __init__(self, model: nn.Module, routes, *, blocks=None, protect=None,
                 leaf_modules=(), generator=None, static_batch=False, compile=None, fp32_after_route=False,
                 shared_indices=None, verify=True, ordered=None, per_token=(), not_per_token=()):
        self.model = model
        self.previous = model.__dict__.get("forward")  # an instance forward set before apply, or None
        self.__signature__ = inspect.signature(model.forward)  # what capture names the inputs by
        self.verify, self.ordered = verify, ordered
        self.routes = as_routes(routes)
        _check_names(model, self.routes, blocks, leaf_modules)
        self.control = RouteControl(generator)
        self.options = dict(blocks=blocks, protect=protect, leaf_modules=tuple(leaf_modules),
                            keep_batch=static_batch, fp32_after_route=fp32_after_route,
                            shared_indices=shared_indices, per_token=_names(per_token),
                            not_per_token=_names(not_per_token))
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self._graphs = []
        self._fast = None  # (fast key, graph) of the last eager call, see `_lookup`
        self._last = None
        self._deps = ({}, {})  # what the graphs rely on in the model, see `_dependencies`
        self._traced = ()      # (module, hook count) of the modules the graphs traced through
        self._drops = 0        # times the graphs were dropped; in `graph_for`'s key for dynamo's guards
        self._plain = 0  # > 0: the model's own forward in training mode too (`unrouted`, capture)

    def capture_now(self, example_inputs):
        args, kwargs = _split_example(example_inputs)
        was = self.model.training
        self.model.train()
        try:
            self.graph_for(args, kwargs)
        finally:
            self.model.train(was)

    def plain_forward(self, *args, **kwargs):
        """The model's own forward (what eval mode runs)."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    # -- running -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if args and args[0] is self.model:  # bound as a method (accelerate's unwrap_model does that)
            args = args[1:]
        if not (self.model.training or self.control.forced) or self._plain:
            return self.plain_forward(*args, **kwargs)  # (capture's own forwards of the model too)
        if not torch.compiler.is_compiling():  # (eager: under dynamo its guards would change per capture)
            for m, hooks in self._traced:
                if _hook_count(m) != hooks:  # a hook (an FSDP2 unit...) added to a module traced through
                    self._drop_graphs()
                    break
        rg, tensors = self._lookup(args, kwargs)
        if rg.compiled is not None:
            _mark_batch_dynamic(tensors)
        out = (rg.gm if rg.compiled is None else rg.compiled)(*tensors)
        k = len(rg.plans)
        self._last = (rg, out[len(out) - k:])
        return rg.rebuild_output(list(out[: len(out) - k]))

    def _lookup(self, args, kwargs):
        """(graph, tensor inputs); an eager call keyed like the last one skips `graph_for`'s full key."""
        key = None
        if not torch.compiler.is_compiling():  # dynamo must not store traced shapes in `_fast`
            key, tensors = _fast_key(self.model.training, args, kwargs, self._keep_batch())
        if key is None:
            return self.graph_for(args, kwargs), flatten((args, kwargs), is_leaf=_is_tensor)[0]
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, self.graph_for(args, kwargs))
        return self._fast[1], tensors

    def graph_for(self, args, kwargs):
        """The routed graph for this call's signature and mode, captured on first use."""
        # `_drops` makes dynamo guard on it: under torch.compile(routed), dropped graphs recompile
        key = (self.model.training, self._drops, input_skeleton(args, kwargs, self.options["keep_batch"]))
        full = None  # with the batch size: the key of graphs valid for one batch size only
        for k, rg in self._graphs:
            if rg.batch_baked and not self.options["keep_batch"]:
                full = full or (key[0], key[1], input_skeleton(args, kwargs, True))
                if _same(k, full):
                    return rg
            elif _same(k, key):
                return rg
        return self._capture(key, args, kwargs)

    def _keep_batch(self) -> bool:
        return self.options["keep_batch"] or any(rg.batch_baked for _, rg in self._graphs)

    @torch.compiler.disable
    def _capture(self, key, args, kwargs):
        """Build a routed graph (eager even inside torch.compile: dynamo must not trace a tracer)."""
        with unrouted(self.model):
            rg = build(self.model, args, kwargs, self.routes, self.control, real_verify=self.verify, **self.options)
            if self.verify:
                rg.check = check_routes(self.model, rg, args, kwargs, self.control, self.ordered)
        if rg.batch_baked:  # the model's Python baked the batch size in: one graph per batch size
            key = (key[0], key[1], input_skeleton(args, kwargs, True))
            self._fast = None
        if self.compile_options is not None:
            rg.compiled = torch.compile(rg.gm, **self.compile_options)
        _install_hooks()
        mods, attrs, traced = _dependencies(self, rg.gm)
        self._deps[0].update(mods)
        self._deps[1].update(attrs)
        self._traced = tuple({id(m): (m, _hook_count(m)) for m, _ in (*self._traced, *traced)}.values())
        for m in (*mods.values(), *attrs.values()):
            _WATCHED.setdefault(m, weakref.WeakSet()).add(self)
        self._graphs.append((key, rg))
        return rg

    def _drop_graphs(self):
        """Forget every captured graph (they hold the modules, parameters and buffers of capture time)."""
        self._graphs, self._fast, self._deps, self._traced = [], None, ({}, {}), ()
        self._drops += 1

    @property
    def routing(self) -> list:
        """`RouteInfo` for each route of the last routed forward (for masked losses)."""
        rg, ids = self._last_call()
        return [RouteInfo(r, i, p.num_tokens, p.protect) for r, i, p in zip(rg.routes, ids, rg.plans)]

    @property
    def plans(self) -> list:
        """The crossing report of each route (`RoutePlan`: blocks, tensors gathered / scattered /
        passed untouched, token counts) for the graph of the last routed forward."""
        return list(self._last_call()[0].plans)

    def _last_call(self) -> tuple:
        """(graph, selected ids) of the last routed forward."""
        if self._last is None:
            raise RouteError("No routed forward has run yet: call the model in training mode first.")
        return self._last

    def set_ratio(self, ratio):
        """Override every route's ratio (a float, or a list per route); None restores the routes'."""
        for r in ratio if isinstance(ratio, (list, tuple)) else [ratio]:
            if r is not None:
                Route(0, 0, r)  # validates the number
        self.control.ratio_override = ratio

    # -- the routing generator's state (for accelerate's save_state / load_state) ------------
    def state_dict(self) -> dict:
        """The routing generator's state (empty without `generator=`: the selection then draws
        from torch's global RNG, which checkpointing tools save already)."""
        gen = self.control.generator
        return {} if gen is None else {"generator": gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        gen = self.control.generator
        if bool(state) != (gen is not None):
            raise RouteError("routefx: this routing state was saved " + ("with" if state else "without")
                             + " a routing generator, and the model is routed " + ("without" if state else "with")
                             + " one: pass the same `generator=` to routefx.apply as in the run that saved it.")
        if gen is not None:
            gen.set_state(state["generator"])

    # -- plumbing ------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_graphs"], state["_fast"], state["_last"], state["_deps"], state["_traced"] = [], None, None, ({}, {}), ()
        state["_plain"] = 0
        return state

    def __setstate__(self, state):
        state.setdefault("_traced", ())
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Router(routes={[tuple(dataclasses.astuple(r)) for r in self.routes]})"


def _hook_count(m: nn.Module) -> int:
    return (len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_pre_hooks)
            + len(m._backward_hooks))


def _check_names(model, routes, blocks, leaf_modules):
    """What can be checked before any forward: module names, and routes against explicit blocks."""
    if blocks is not None:
        resolve_routes(routes, len(explicit_blocks(model, blocks)))
    names = dict(model.named_modules())
    for name in leaf_modules:
        if name not in names:
            raise RouteError(f"leaf_modules: no module named '{name}' in {type(model).__name__}. "
                             f"{INSPECT_HINT}")


def _dependencies(routed, gm):
    """What a captured graph relies on in the model, to notice replacements after capture (bug C).

    Returns ({id: module}, {(id, name): owner}, traced). The modules: every module the trace
    went into, and their children that are not leaves (so that e.g. an append to a then-empty
    ModuleList counts); the graph depends on which object each holds under each name. The
    attributes: each parameter or buffer the graph reads with `get_attr`. Leaves (`call_module`
    targets) run live, so changes inside them are seen without a new capture and not recorded.
    `traced`: the modules the trace went into (the root aside), whose hooks the graph does not run.
    """
    model = routed.model
    called, paths, reads = set(), {""}, []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            called.add(n.target)
            paths.add(n.target)
        elif n.op == "get_attr":
            owner, _, name = n.target.removeprefix(LIVE + ".").rpartition(".")
            reads.append((owner, name))
            paths.add(owner)
        for k, v in (n.meta.get("nn_module_stack") or {}).items():
            paths.add(v[0] if isinstance(v, tuple) else k)
    for p in list(paths):
        while p:
            p = p.rpartition(".")[0]
            paths.add(p)
    mods, traced = {}, []
    for path in paths - called:
        try:
            m = model.get_submodule(path)
        except AttributeError:  # graph-own modules (route selectors) and constants
            continue
        mods[id(m)] = m
        if path:
            traced.append((m, 0))
        for name, child in m._modules.items():
            if child is not None and (f"{path}.{name}" if path else name) not in called:
                mods[id(child)] = child
    attrs = {}
    for path, name in reads:
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            continue
        if name in owner._parameters or name in owner._buffers:
            attrs[(id(owner), name)] = owner
    return mods, attrs, traced


def _fast_key(training, args, kwargs, keep_batch):
    """(key, tensors) of a call made of tensors and plain constants only; (None, None) otherwise.

    Stricter than `input_skeleton` (it adds devices), so equal keys always mean the same graph.
    """
    key, tensors = [training, tuple(kwargs)], []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            key.append((v.dim(), v.shape if keep_batch else v.shape[1:], v.dtype, v.device))
            tensors.append(v)
        elif v is None or type(v) in (bool, int, float, str):
            key.append((type(v), v))
        else:
            return None, None
    return key, tensors


def _mark_batch_dynamic(tensors):
    """One compiled graph for every batch size: dim 0 of the batched inputs is dynamic."""
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    for t in tensors:
        if t.dim() and t.shape[0] == batch and batch > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - unusual constants (arrays...) that cannot be compared
        return False


def _split_example(example):
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) \
            and isinstance(example[0], (tuple, list)):
        return tuple(example[0]), dict(example[1])
    return tuple(example), {}


def apply(model: nn.Module, routes, *, example_inputs=None, blocks=None, protect=None, leaf_modules=(),
          generator=None, static_batch=False, compile=None, fp32_after_route=False,
          shared_indices=None, verify=True, ordered=None, per_token=(), not_per_token=()) -> nn.Module:
    """Route tokens around blocks of `model` during training (TREAD), without editing its code.

    In place: `model` keeps its class, parameter names, `state_dict` and hooks, and is returned
    (for chaining). Its `forward` attribute becomes a `Router` (`routefx.router(model)`); eval
    mode runs the model's own forward; `routefx.remove(model)` undoes it. Apply before wrapping
    the model in DDP / `torch.compile` / accelerate's `prepare`; FSDP2's `fully_shard` may come
    before or after.

    Args:
        model: any `nn.Module` whose forward runs a chain of blocks over tokens.
        routes: `[(start, end, ratio), ...]` or `Route`s; indices into the block chain, negative
            ones counted from the end; routes must not overlap.
        example_inputs: optional args tuple (or `(args, kwargs)`, or a kwargs dict) to capture
            now; otherwise capture happens on the first training-mode call.
        blocks: module names (or one container name like `"blocks"`) to use as the chain
            instead of the automatic discovery.
        protect: number of prefix tokens never routed (default: detected from the graph).
        leaf_modules: extra module names not to trace into.
        generator: a `torch.Generator` for the token selection (default: the global RNG).
        static_batch: re-trace per batch size (for code that bakes the batch size in).
        compile: True (or a dict of `torch.compile` options) to compile each routed graph, with
            the batch dim marked dynamic: one compilation serves every batch size.
        fp32_after_route: run the block right after each route's end with autocast disabled and
            float inputs in float32 (the TREAD reference's stability measure under bf16).
        shared_indices: True: draw one index set for the whole batch (`torch.rand(1, N)`) in every
            route; False: one per sample (TREAD), refusing models that cannot take it; None (the
            default): per sample, unless an unbatched per-token table (e.g. a rotary
            `(T_text + N, d)` table) enters the blocks, which can follow one index set only: then
            shared, with a warning (`plans[i].shared_indices` says which).
        verify: check every captured graph on the capture call's real inputs (routefx.check:
            keeping every token in a shuffled order must give the model's own output; two
            forwards without gradients); False skips it.
        ordered: the blocks read the tokens in order by design (a scan, causal attention,
            positions counted from `x.shape[1]`): the kept tokens keep their order and are
            numbered 0..k-1 among themselves (TREAD's meaning for them), and the shuffle check
            is skipped. None: True for blocks holding mamba-ssm's scans; False: never.
        per_token: names of model inputs (forward arguments) or parameters / buffers that are
            per-token side inputs (a key-padding mask `(B, N)`, an attention bias
            `(B, h, N, N)`, per-token timesteps): every value computed from one that enters a
            route is gathered with the tokens, along each of its dims >= 1 of size N.
        not_per_token: names of inputs / parameters that never follow the tokens, whatever
            their shape (a text context or a learned memory as long as the image).
    Returns:
        `model` itself, routed.

    Example:
        >>> from routefx.backbones import create
        >>> model = create("DiT-T/2", input_size=8)
        >>> apply(model, routes=[(1, 4, 0.5)]) is model
        True
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
        >>> model(x, t, y).shape, [i.ids.shape for i in router(model).routing]
        (torch.Size([2, 8, 8, 8]), [torch.Size([2, 8])])
    """
    if not isinstance(model, nn.Module):
        raise RouteError(f"routefx.apply needs an nn.Module, got {type(model).__name__}.")
    for kind, inner in _WRAPPERS:
        if type(model).__name__ == kind and hasattr(model, inner):
            raise RouteError(f"routefx.apply got a {kind}: route the model inside it, before wrapping: "
                             f"routefx.apply(model.{inner}, routes) routes it in place, the wrapper included.")
    remove(model)  # applying again replaces the routes
    nested = [n for n, m in model.named_modules() if n and _as_router(m.__dict__.get("forward"))]
    if nested:
        raise RouteError(f"Module '{nested[0]}' of this model is routed already: routefx.remove(model.{nested[0]}) "
                         f"first (one route set per model).")
    r = Router(model, routes, blocks=blocks, protect=protect,
               leaf_modules=leaf_modules, generator=generator, static_batch=static_batch,
               compile=compile, fp32_after_route=fp32_after_route, shared_indices=shared_indices,
               verify=verify, ordered=ordered, per_token=per_token, not_per_token=not_per_token)
    model.forward = r  # an instance attribute: nn.Module.__call__ (and its hooks) calls it
    if example_inputs is not None:
        r.capture_now(example_inputs)
    return model


_WRAPPERS = (("DistributedDataParallel", "module"), ("OptimizedModule", "_orig_mod"),
             ("DataParallel", "module"))


def _names(names) -> tuple:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise RouteError(f"per_token / not_per_token take names (str) of model inputs or parameters, got {names!r}.")
    return names


def _as_router(f):
    """The Router behind an instance `forward` (itself, or bound to the model as a method)."""
    f = getattr(f, "__func__", f)
    return f if isinstance(f, Router) else None


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` on `model` (in place; anything not routed is left as it is); returns it."""
    r = _as_router(model.__dict__.get("forward")) if isinstance(model, nn.Module) else None
    if r is None and isinstance(model, nn.Module) and _as_router(model.__dict__.get("_original_forward")):
        raise RouteError("routefx.remove: model.forward was wrapped after routefx.apply (accelerate's mixed "
                         "precision does this in prepare); unwrap it first: "
                         "model = accelerator.unwrap_model(model, keep_fp32_wrapper=False), then remove.")
    if r is not None:
        del model.__dict__["forward"]
        if r.previous is not None:
            model.__dict__["forward"] = r.previous
        r._drop_graphs()
    return model


def router(model) -> Router:
    """The `Router` of a routed model, also through DDP, `torch.compile`, accelerate and peft
    wrappers (the first routed module found)."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if isinstance(m, nn.Module):
            for f in (m.__dict__.get("forward"), m.__dict__.get("_original_forward")):
                if _as_router(f):
                    return _as_router(f)
    if isinstance(model, nn.Module):
        for m in model.modules():
            if _as_router(m.__dict__.get("forward")):
                return _as_router(m.__dict__["forward"])
    raise RouteError("No routed model found: call routefx.apply(model, routes) first.")


_find_routed = router


@contextlib.contextmanager
def unrouted(model):
    """Run the routed `model`'s own forward in training mode too (a dense step beside routed
    ones, e.g. in a benchmark)."""
    r = router(model)
    r._plain += 1
    try:
        yield model
    finally:
        r._plain -= 1


@contextlib.contextmanager
def force_routing(model, ratio=None):
    """Route even in eval mode (e.g. routing guidance), optionally with another ratio.

    Example:
        >>> with force_routing(routed, ratio=0.7):   # a "weak" prediction
        ...     v_weak = routed(x, t, y)
    """
    routed = _find_routed(model)
    prev = (routed.control.forced, routed.control.ratio_override)
    routed.set_ratio(ratio)
    routed.control.forced = True
    try:
        yield routed
    finally:
        routed.control.forced, routed.control.ratio_override = prev
