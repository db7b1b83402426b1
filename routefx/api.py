"""Public front door: `apply`, `remove`, `force_routing`, and the `RoutedModule` wrapper."""
import contextlib
import dataclasses
import weakref

import torch
from torch import nn

from ._tree import flatten
from .check import check_routes
from .errors import INSPECT_HINT, RouteError
from .ops import RouteControl
from .passes.capture import input_skeleton
from .passes.find_blocks import explicit_blocks
from .pipeline import build
from .route import Route, as_routes, resolve_routes

__all__ = ["apply", "remove", "force_routing", "RoutedModule", "RouteInfo"]

_PREFIX = "module."

# Bug C: a captured graph holds the module objects of capture time. Each module a graph depends
# on (see `_dependencies`) maps to the RoutedModules that depend on it. torch's global registration
# hooks run on every setattr of a Module / Parameter / buffer, `ModuleList[i] = m`, `append`,
# `add_module`, `register_parameter` and `register_buffer`. When one of them puts a different
# object under a name a graph depends on, `_on_registration` drops that RoutedModule's graphs
# (the next call recaptures the model as it is then). A routed call pays nothing for this.
_WATCHED = weakref.WeakKeyDictionary()  # module -> WeakSet of RoutedModules
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


class RoutedModule(nn.Module):
    """A model whose training forward runs a routed graph; eval runs the original module.

    Parameters are the original model's (shared); `state_dict()` has exactly its keys. Made by
    `routefx.apply`; `routefx.remove` gives the original module back.
    """

    def __init__(self, model: nn.Module, routes, *, example_inputs=None, blocks=None, protect=None,
                 leaf_modules=(), generator=None, static_batch=False, compile=None, fp32_after_route=False,
                 shared_indices=None, verify=True, ordered=None, per_token=(), not_per_token=()):
        super().__init__()
        self.module = model
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
        self._drops = 0        # times the graphs were dropped; in `graph_for`'s key for dynamo's guards
        self._register_state_dict_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)
        if example_inputs is not None:
            args, kwargs = _split_example(example_inputs)
            was = model.training
            model.train()
            try:
                self.graph_for(args, kwargs)
            finally:
                model.train(was)

    # -- running -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not (self.training or self.control.forced):
            return self._modules["module"](*args, **kwargs)
        rg, tensors = self._lookup(args, kwargs)
        if rg.compiled is not None:
            _mark_batch_dynamic(tensors)
        out = (rg.gm if rg.compiled is None else rg.compiled)(*tensors)
        k = len(rg.plans)
        self.__dict__["_last"] = (rg, out[len(out) - k:])  # skips nn.Module.__setattr__ (~2 us)
        return rg.rebuild_output(list(out[: len(out) - k]))

    def _lookup(self, args, kwargs):
        """(graph, tensor inputs); an eager call keyed like the last one skips `graph_for`'s full key."""
        key = None
        if not torch.compiler.is_compiling():  # dynamo must not store traced shapes in `_fast`
            key, tensors = _fast_key(self._modules["module"].training, args, kwargs, self._keep_batch())
        if key is None:
            return self.graph_for(args, kwargs), flatten((args, kwargs), is_leaf=_is_tensor)[0]
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, self.graph_for(args, kwargs))
        return self._fast[1], tensors

    def graph_for(self, args, kwargs):
        """The routed graph for this call's signature and mode, captured on first use."""
        # `_drops` makes dynamo guard on it: under torch.compile(routed), dropped graphs recompile
        key = (self.module.training, self._drops, input_skeleton(args, kwargs, self.options["keep_batch"]))
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
        rg = build(self.module, args, kwargs, self.routes, self.control, real_verify=self.verify, **self.options)
        if self.verify:
            rg.check = check_routes(self.module, rg, args, kwargs, self.control, self.ordered)
        if rg.batch_baked:  # the model's Python baked the batch size in: one graph per batch size
            key = (key[0], key[1], input_skeleton(args, kwargs, True))
            self._fast = None
        if self.compile_options is not None:
            rg.compiled = torch.compile(rg.gm, **self.compile_options)
        _install_hooks()
        mods, attrs = _dependencies(self, rg.gm)
        self._deps[0].update(mods)
        self._deps[1].update(attrs)
        for m in (*mods.values(), *attrs.values()):
            _WATCHED.setdefault(m, weakref.WeakSet()).add(self)
        self._graphs.append((key, rg))
        return rg

    def _drop_graphs(self):
        """Forget every captured graph (they hold the modules, parameters and buffers of capture time)."""
        self._graphs, self._fast, self._deps = [], None, ({}, {})
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

    # -- plumbing ------------------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def _apply(self, fn, *args, **kwargs):
        self._drop_graphs()  # graphs hold references to buffers that .to() replaces
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_graphs"], state["_fast"], state["_last"], state["_deps"] = [], None, None, ({}, {})
        return state

    def __setstate__(self, state):
        state.setdefault("_deps", ({}, {}))  # pickled before these existed
        state.setdefault("_drops", 0)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"routes={[tuple(dataclasses.astuple(r)) for r in self.routes]}"


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

    Returns ({id: module}, {(id, name): owner}). The modules: `routed`, every module the trace
    went into, and their children that are not leaves (so that e.g. an append to a then-empty
    ModuleList counts); the graph depends on which object each holds under each name. The
    attributes: each parameter or buffer the graph reads with `get_attr`. Leaves (`call_module`
    targets) run live, so changes inside them are seen without a new capture and not recorded.
    """
    model = routed._modules["module"]
    called, paths, reads = set(), {""}, []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            called.add(n.target)
            paths.add(n.target)
        elif n.op == "get_attr":
            owner, _, name = n.target.rpartition(".")
            reads.append((owner, name))
            paths.add(owner)
        for k, v in (n.meta.get("nn_module_stack") or {}).items():
            paths.add(v[0] if isinstance(v, tuple) else k)
    for p in list(paths):
        while p:
            p = p.rpartition(".")[0]
            paths.add(p)
    mods = {id(routed): routed}
    for path in paths - called:
        try:
            m = model.get_submodule(path)
        except AttributeError:  # graph-own modules (route selectors) and constants
            continue
        mods[id(m)] = m
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
    return mods, attrs


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


def _strip_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(_PREFIX):]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


def apply(model: nn.Module, routes, *, example_inputs=None, blocks=None, protect=None, leaf_modules=(),
          generator=None, static_batch=False, compile=None, fp32_after_route=False,
          shared_indices=None, verify=True, ordered=None, per_token=(), not_per_token=()) -> RoutedModule:
    """Route tokens around blocks of `model` during training (TREAD), without editing its code.

    Args:
        model: any `nn.Module` whose forward runs a chain of blocks over tokens. Not modified.
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
        A `RoutedModule`: call it like the model; in eval mode it IS the original forward.

    Example:
        >>> from routefx.backbones import create
        >>> routed = apply(create("DiT-T/2", input_size=8), routes=[(1, 4, 0.5)])
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
        >>> routed(x, t, y).shape
        torch.Size([2, 8, 8, 8])
    """
    if isinstance(model, RoutedModule):
        model = remove(model)
    if not isinstance(model, nn.Module):
        raise RouteError(f"routefx.apply needs an nn.Module, got {type(model).__name__}. Apply it before "
                         f"wrapping in DDP or torch.compile.")
    if any(isinstance(m, RoutedModule) for m in model.modules()):
        raise RouteError("This model already contains a RoutedModule: call routefx.remove on it first.")
    return RoutedModule(model, routes, example_inputs=example_inputs, blocks=blocks, protect=protect,
                        leaf_modules=leaf_modules, generator=generator, static_batch=static_batch,
                        compile=compile, fp32_after_route=fp32_after_route, shared_indices=shared_indices,
                        verify=verify, ordered=ordered, per_token=per_token, not_per_token=not_per_token)


def _names(names) -> tuple:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise RouteError(f"per_token / not_per_token take names (str) of model inputs or parameters, got {names!r}.")
    return names


def remove(model: nn.Module) -> nn.Module:
    """Return the original module of a `RoutedModule` (anything else is returned unchanged)."""
    return model.module if isinstance(model, RoutedModule) else model


def _find_routed(model) -> RoutedModule:
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if isinstance(m, RoutedModule):
            return m
    found = [m for m in model.modules() if isinstance(m, RoutedModule)] if isinstance(model, nn.Module) else []
    if not found:
        raise RouteError("No RoutedModule found: call routefx.apply(model, routes) first.")
    return found[0]


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
