"""capture: trace an `nn.Module` into an fx graph with its blocks kept as leaf modules.

Precondition: none (runs on any module). Ensures: a `GraphModule` whose `call_module` nodes
point at the ORIGINAL leaf modules (parameters shared, shape-agnostic), placeholders for the
tensor leaves of the example call only (non-tensor arguments are bound as constants), an output
that is the flat tuple of tensor leaves of the model's output, and `node.meta['routefx']['spec']`
holding the shape/dtype of every traced value.

The tracer is a "shadow" tracer: beside every proxy it carries the concrete value computed on the
example inputs. Python code that needs a concrete value (`int(x.shape[1] ** 0.5)`, `len`,
`if`/`assert` on shapes) gets it, and a guard node is inserted that re-checks the value at run
time. Data-dependent control flow (a Python branch on tensor values) is refused in traced code;
inside a leaf module it is fine (leaves just run), but fake tensors cannot run it, so a leaf that
needs real values raises `_LeafNeedsRealValues` and the caller captures again with `fake=False`.
"""
import contextlib
import dataclasses
import dis
import functools
import inspect
import linecache
import math
import operator
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensor, FakeTensorMode, UnsupportedOperatorException)
from torch.fx.proxy import Attribute

from routefx._tree import TensorSlot, flatten
from routefx.errors import INSPECT_HINT, CaptureError
from routefx.ops import check_assert, check_guard, setitem
from .fake_run import fake_run

__all__ = ["Captured", "capture", "TensorSpec", "user_frame", "reads_only_metadata"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),)
_INTERNAL = (_TORCH_DIR, os.path.dirname(contextlib.__file__))


# what fake tensors raise for code that needs real values: a branch or `.item()` on data,
# an output shape that depends on data, an op without a fake kernel
_NEEDS_REAL = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


class _LeafNeedsRealValues(Exception):
    """A leaf module cannot run on fake tensors; capture again with `fake=False`.

    Deliberately not a `RouteError`: `capture()` lets it through unwrapped so that
    `pipeline.build()` retries with real values.
    """


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a traced tensor value."""

    shape: tuple
    dtype: torch.dtype


@dataclasses.dataclass
class Captured:
    """Result of `capture`: the graph plus what is needed to call it and to analyse it."""

    gm: fx.GraphModule
    rebuild_output: Callable[[list], Any]
    input_skeleton: Any
    values: dict  # fx.Node -> concrete value on the example inputs (dropped after apply)
    guards: list  # (node, kind, value, where)
    leaves: set
    example: list  # the tensor inputs the values were computed from (fake tensors in fake mode)
    mode: Any = None  # the FakeTensorMode values live in, or None for real values
    batch_baked: bool = False  # a guard reads the batch size: the graph is valid for this batch only


def user_frame(tb=None) -> str:
    """`file:line in fn: code` of the innermost frame outside torch and routefx internals."""
    frames = traceback.extract_tb(tb) if tb is not None else traceback.extract_stack()
    for fr in reversed(frames):
        if not _internal(fr.filename):
            return f"{fr.filename}:{fr.lineno} in {fr.name}: `{(fr.line or '').strip()}`"
    return "<unknown location>"


def _caller() -> str:
    """`user_frame()` of the current call, cheaply (walks frames, reads one source line)."""
    frame = sys._getframe(1)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "<unknown location>"
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}: `{code}`"


@functools.lru_cache(maxsize=None)
def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL) or any(
        path.startswith(os.path.join(d, sub)) for d in _OUR_DIRS for sub in ("routefx", "passes"))


# tensor metadata that is fixed for a capture (the input signature holds dtype and device): read
# off the shadow value as a Python constant, so `x.device.type` is a str and `x.dtype` a dtype
_METADATA = ("device", "dtype", "layout", "is_cuda", "is_cpu", "is_meta", "ndim")


class ShadowProxy(fx.Proxy):
    """A proxy that can answer `len`, `int`, `float`, `bool`, `index`, `round` from its concrete
    shadow value (each answer becomes a run-time guard)."""

    def __getattr__(self, k: str):
        if k in _METADATA:
            value = self.tracer.value_of(self)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return ShadowAttribute(self, k)

    def __index__(self):  # slice bounds, range(), [0] * n, sizes of non-traced tensors
        return self.tracer.concretize(self, "int")

    def __round__(self, ndigits=None):
        value = self.tracer.concretize(self, "float")
        return round(value) if ndigits is None else round(value, ndigits)

    def __setitem__(self, key, value):
        """`x[key] = value` (in place) is recorded out of place, and this proxy then stands for the
        result: later reads of `x` see the assignment, and the dataflow shows where values came from."""
        out = self.tracer.create_proxy("call_function", setitem, (self, key, value), {})
        self.node = out.node

    def __len__(self):
        return self.tracer.concretize(self, "len")

    def __int__(self):
        return self.tracer.concretize(self, "int")

    def __float__(self):
        return self.tracer.concretize(self, "float")

    def __iter__(self):
        n = self.tracer.concretize(self, "len")
        return (self[i] for i in range(n))


class ShadowAttribute(Attribute, ShadowProxy):
    """`proxy.attr`, created lazily like fx's `Attribute`, with shadow powers."""


def _spec(value):
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_spec(v) for v in value) if not hasattr(value, "_fields") else tuple(
            _spec(v) for v in value)
    return value if isinstance(value, (int, float, bool, str, type(None), torch.Size)) else type(value)


class ShadowTracer(fx.Tracer):
    """fx tracer that keeps `leaves` as leaf modules and shadows every proxy with a value."""

    def __init__(self, leaves: set, autowrap_functions=(), mode=None):
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(autowrap_functions))
        self.leaves, self.mode = leaves, mode
        self.values: dict = {}
        self.guards: list = []
        self.folded: list = []  # (node, value): `.tolist()` / `.item()` of values fixed by shapes
        self._inputs: list = []

    # -- fx hooks ------------------------------------------------------------------------
    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def proxy(self, node):
        return ShadowProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind == "call_function" and target is torch._assert:  # a check on values: kept, fake-safe
            target, args = check_assert, (args[0], f"{user_frame()} ({args[1] if len(args) > 1 else ''})")
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output", "get_attr"):  # the model line, for error messages
            node.meta.setdefault("routefx", {})["at"] = _caller()
        if kind not in ("placeholder", "output"):  # every node, get_attr of buffers included
            self.values[node] = self._run(node, kind, target, args, kwargs)
        return node

    def to_bool(self, obj):
        if _in_assert() and _reads_data(obj.node):
            # `assert <tensor values>`: no Python constant can stand for it; check it at run time
            self.create_proxy("call_function", check_assert, (obj, user_frame()), {})
            return True
        return self.concretize(obj, "bool")

    def iter(self, obj):
        return iter(ShadowProxy.__iter__(obj))

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        proxies = []
        for name, pos, value in self._inputs:
            p = self.create_proxy("placeholder", name, (), {})
            p.node.meta["routefx"] = {"position": pos}  # in the forward's signature
            self.values[p.node] = value
            proxies.append(p)

        def fn(root, *ph):
            args, kwargs = self._rebuild_inputs(list(ph))
            leaves, self.out_skeleton, self.rebuild_output = flatten(
                root_fn(root, *args, **kwargs), is_leaf=lambda x: isinstance(x, (torch.Tensor, fx.Proxy)))
            return tuple(leaves)

        return fn, [self.root, *proxies]

    # -- shadow values -------------------------------------------------------------------
    def value_of(self, p):
        if isinstance(p, Attribute) and p._node is None:
            return getattr(self.value_of(p.root), p.attr)
        return self.values[p.node]

    def _run(self, node, kind, target, args, kwargs):
        if kind == "call_method" and target in ("item", "tolist"):
            if _reads_data(args[0]):  # real values would bake one step's data into the graph
                raise DataDependentOutputException(f"Tensor.{target}() of values computed from the inputs")
            if _reads_data(args[0], "get_attr"):  # a parameter or buffer: may change, read it live
                return getattr(self.values[args[0]], target)()
            # computed from shapes and constants only: a constant of this capture, guarded
            value = getattr(self.real_value(args[0]), target)()
            self.folded.append((node, value))
            self.guards.append((args[0], target, value, user_frame()))
            return value
        if kind == "call_function" and target is check_assert and _is_fake(self.values.get(args[0])):
            return None
        cargs, ckwargs = fx.node.map_arg((args, kwargs), lambda n: self.values[n])
        with _maybe_revert_all_patches(), _not_tracing(), torch.no_grad(), self.mode or contextlib.nullcontext():
            if kind == "call_function":
                return target(*cargs, **ckwargs)
            if kind == "call_method":
                return getattr(cargs[0], target)(*cargs[1:], **ckwargs)
            if kind == "call_module":  # a leaf: opaque, its code may branch on data
                try:
                    leaf = self.root.get_submodule(target)
                    with fake_run(leaf, self.mode):
                        return leaf(*cargs, **ckwargs)
                except _NEEDS_REAL as e:
                    if self.mode is None:
                        raise
                    raise _LeafNeedsRealValues(f"leaf '{target}' needs real values: "
                                               f"{type(e).__name__}: {e}") from e
            if kind == "get_attr":
                return _fetch_attr(self.root, target)
        return None

    def real_value(self, node):
        """The real value of a node computed from shapes, constants and parameters only (never
        from the inputs' values): fake tensors are recomputed with real ones."""
        value = self.values.get(node)
        if node.op == "placeholder" or not any(_is_fake(v) for v in _tensors_in(value)):
            return value  # already real: ints, shapes, parameters, a real-value capture
        cargs, ckwargs = fx.node.map_arg((node.args, node.kwargs), self.real_value)
        with _maybe_revert_all_patches(), _not_tracing(), torch.no_grad():
            if node.op == "call_function":
                return node.target(*cargs, **ckwargs)
            if node.op == "call_method":
                return getattr(cargs[0], node.target)(*cargs[1:], **ckwargs)
            return self.root.get_submodule(node.target)(*cargs, **ckwargs)

    def concretize(self, proxy, kind):
        value = self.value_of(proxy)
        where = user_frame()
        if isinstance(value, torch.Tensor) and kind != "len" and proxy.node is not None \
                and not _reads_data(proxy.node):
            value = self.real_value(proxy.node)  # e.g. `if torch.tensor(h) > 3`: shapes only
        if isinstance(value, torch.Tensor) and kind != "len":
            raise CaptureError(
                f"Data-dependent control flow at {where}: Python needs a concrete {kind} of a tensor's "
                f"VALUES, which differ every step, so no graph can stand for it. Fix: make the module "
                f"containing this line a leaf (routefx.apply(..., leaf_modules=['its.name'])). {INSPECT_HINT}")
        result = {"len": len, "int": int, "float": float, "bool": bool}[kind](value)
        if not any(g[0] is proxy.node and g[1] == kind for g in self.guards):
            self.guards.append((proxy.node, kind, result, where))
        return result


@contextlib.contextmanager
def _not_tracing():
    """Run real module code inside the tracer without fx thinking it is being traced.

    torch >= 2.12 keeps the flag behind `_get/_set_is_fx_tracing`; older releases (2.4-2.11) keep
    it in the module global `_is_fx_tracing_flag`.
    """
    st = fx._symbolic_trace
    if hasattr(st, "_set_is_fx_tracing"):
        get, put = st._get_is_fx_tracing, st._set_is_fx_tracing
    else:
        get, put = (lambda: st._is_fx_tracing_flag), (lambda v: setattr(st, "_is_fx_tracing_flag", v))
    prev = get()
    put(False)
    try:
        yield
    finally:
        put(prev)


# read only the shape / dtype / device of their tensor argument, never its values
_METADATA_METHODS = ("size", "dim", "numel", "nelement", "stride", "new_zeros", "new_ones", "new_empty",
                     "new_full")
_METADATA_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                       torch.randn_like}


def reads_only_metadata(v: fx.Node, u: fx.Node) -> bool:
    """`v` reads only metadata of its input `u` (`u.shape`, `u.size()`, `u.new_zeros(...)`, ...),
    not its values: that edge is not dataflow."""
    if _is_shape(v):
        return True
    if v.op == "call_function" and v.target in _METADATA_FUNCTIONS:
        return bool(v.args) and v.args[0] is u
    return v.op == "call_method" and v.target in _METADATA_METHODS and v.args[0] is u


def _reads_data(node, op: str = "placeholder") -> bool:
    """Whether the value of `node` depends on the VALUES of a graph input (`op="get_attr"`: of a
    parameter or buffer); metadata reads are not dataflow."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, fx.Node) and n not in seen:
            if n.op == op:
                return True
            seen.add(n)
            todo += [u for u in n.all_input_nodes if not reads_only_metadata(n, u)]
    return False


def _reads_batch(node, kind, values) -> bool:
    """Whether a guarded value is computed from dim 0 (the batch size) of an input-derived tensor
    (`[0] * x.shape[0]`, `len(x)`, a whole `x.shape`): then the graph holds for that batch only."""
    if kind == "len":  # len(x) of a tensor is its batch size; len(x.shape) is its fixed ndim
        return isinstance(values.get(node), torch.Tensor) and _reads_data(node)
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is operator.getitem and _is_shape(n.args[0]):
            i = n.args[1]
            if (i == 0 or isinstance(i, slice) and i.start in (None, 0)) and _reads_data(n.args[0].args[0]):
                return True
            continue
        if _is_shape(n) or n.op == "call_method" and n.target == "size":
            if (n.op != "call_method" or len(n.args) == 1 or n.args[1] == 0) and _reads_data(n.args[0]):
                return True
            continue
        todo += n.all_input_nodes
    return False


def _is_shape(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr \
        and node.args[1] == "shape"


def _is_fake(value) -> bool:
    return isinstance(value, FakeTensor)


def _tensors_in(value) -> list:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]


def _in_assert() -> bool:
    """Whether the innermost user frame is evaluating the condition of an `assert` statement
    (bytecode: a jump-if-true whose fall-through raises AssertionError)."""
    frame = inspect.currentframe()
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return False
    insts = list(dis.get_instructions(frame.f_code))
    cur = next((i for i, ins in enumerate(insts) if ins.offset == frame.f_lasti), None)
    if cur is None:
        return False
    for ins in insts[cur: cur + 3]:  # TO_BOOL (3.13+), the jump, then the raise
        if "JUMP" in ins.opname and "TRUE" in ins.opname:
            nxt = insts[insts.index(ins) + 1]
            return nxt.opname == "LOAD_ASSERTION_ERROR" or (nxt.opname == "LOAD_GLOBAL" and nxt.argval == "AssertionError")
    return False


def _fetch_attr(root, target: str):
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# factories whose sizes or data may be traced values (`torch.ones(b, n)`, `torch.tensor([h, w])`):
# torch's argument parser rejects proxies there instead of dispatching them to fx
_FACTORIES = ("tensor", "as_tensor", "asarray", "scalar_tensor", "ones", "zeros", "empty", "full", "arange",
              "linspace", "logspace", "rand", "randn", "randint", "randperm", "eye", "tril_indices", "triu_indices")


def _wrapped_functions():
    """Library functions recorded as graph nodes when a proxy is anywhere in their arguments:
    torch's factories and einops' functions (they call methods fx cannot trace)."""
    return [(torch, n) for n in _FACTORIES] + _einops_functions()


def _einops_functions():
    try:
        import einops
    except ImportError:
        return []
    names = ("rearrange", "repeat", "reduce", "einsum", "pack", "unpack")
    return [(mod, n) for mod in (einops, getattr(einops, "einops", einops)) for n in names if hasattr(mod, n)]


@contextlib.contextmanager
def _wrap_module_functions(tracer: ShadowTracer, targets):
    """Record calls like `einops.rearrange(proxy, ...)` as graph nodes during tracing."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]

    def wrapper_for(fn):
        def wrapped(*args, **kwargs):
            found = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else a)
            if found:
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return wrapped

    try:
        for mod, name, fn in saved:
            setattr(mod, name, wrapper_for(fn))
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _input_names(model, args, kwargs, n_leaves: int) -> list:
    """(name, signature position) of every tensor leaf of the call, in the order capture makes
    the placeholders (positional arguments, then keyword arguments as passed): a model called
    with keywords in another order than its signature still gets each placeholder's real name,
    and the stream analysis finds the model's FIRST parameter (the image) by its position."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "arg")
    order = {p.name: i for i, p in enumerate(params)}
    items = [(positional[i].name, i) if i < len(positional) else (f"{var}_{i}", len(params) + i)
             for i in range(len(args))]
    items += [(k, order.get(k, len(params) + len(args) + j)) for j, k in enumerate(kwargs)]
    out = []
    for (name, pos), value in zip(items, [*args, *kwargs.values()]):
        leaves = flatten(value)[0]
        out += [(name if len(leaves) == 1 else f"{name}_{i}", pos) for i in range(len(leaves))]
    if len(out) != n_leaves:  # structures we could not name: fall back
        out = [(f"input_{i}", i) for i in range(n_leaves)]
    return [(n if n.isidentifier() else f"input_{i}", pos) for i, (n, pos) in enumerate(out)]


def input_skeleton(args, kwargs, keep_batch: bool = False):
    """Hashable-ish description of a call: structure, constants, tensor ndim/dtype/shape."""
    def slot(t):
        shape = tuple(t.shape) if keep_batch else tuple(t.shape[1:])
        return TensorSlot(t.dim(), t.dtype, shape, t.device)
    return flatten((args, kwargs), slot=slot)[1]


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: set,
            keep_batch: bool = False, fake: bool = True) -> Captured:
    """Trace `model(*args, **kwargs)` keeping the modules named in `leaves` as leaves.

    Args:
        model: the module to trace; it is not modified.
        args, kwargs: one real call; tensors become graph inputs, everything else a constant.
        leaves: qualified names of modules to keep as `call_module` nodes.
        keep_batch: put the batch size into the input skeleton (re-trace per batch size).
        fake: compute the shadow values with fake tensors (shapes only, no FLOPs); pass False
            for modules whose ops have no fake-tensor implementation.
    Returns:
        A `Captured` with the GraphModule and its call conventions.
    """
    tensors, _, rebuild_inputs = flatten((args, kwargs), is_leaf=lambda x: isinstance(x, torch.Tensor))
    if not tensors:
        raise CaptureError("The model was called without any tensor argument; routefx needs the "
                           "token-producing input (e.g. the image latents) as a tensor.")
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    # tracing must never mutate the user's batch
    tensors = [mode.from_tensor(t) if fake else t.detach().clone() for t in tensors]
    tracer = ShadowTracer(leaves, [getattr(m, n) for m, n in _einops_functions()], mode)
    tracer._inputs = [(name, pos, t) for (name, pos), t in zip(_input_names(model, args, kwargs, len(tensors)), tensors)]

    def rebuild(ph):
        a, kw = rebuild_inputs(ph)
        return a, kw
    tracer._rebuild_inputs = rebuild
    try:
        with _wrap_module_functions(tracer, _wrapped_functions()), torch.enable_grad():
            graph = tracer.trace(model)
    except (CaptureError, _LeafNeedsRealValues):
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure gets a located explanation
        where = user_frame(e.__traceback__)
        scope = next(reversed(tracer.module_stack.values()), ("",))[0] if tracer.module_stack else ""
        raise CaptureError(
            f"Could not trace {type(model).__name__} at {where} (inside module '{scope or '<root>'}'): "
            f"{type(e).__name__}: {e}. {_capture_fix(scope)} {INSPECT_HINT}") from e
    gm = fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Captured")
    _split_containers(gm.graph, tracer.values)
    for node in gm.graph.nodes:
        node.meta.setdefault("routefx", {})["spec"] = _spec(tracer.values.get(node))
    _fold(gm.graph, tracer.folded)
    folded = {n for n, _ in tracer.folded}  # their own guards (`a, b = t.tolist()`) are constants now
    tracer.guards = [g for g in tracer.guards if g[0] not in folded]
    _insert_guards(gm.graph, tracer.guards)
    baked = any(_reads_batch(node, kind, tracer.values) for node, kind, _, _ in tracer.guards)
    return Captured(gm, tracer.rebuild_output, input_skeleton(args, kwargs, keep_batch or baked),
                    tracer.values, tracer.guards, leaves, tensors, mode, baked)


def _capture_fix(scope: str) -> str:
    hint = ("routefx traces Python over shapes (int(), len(), range(), slices, if/assert), but not "
            "Python that needs tensor VALUES, nor calls into libraries that need real tensors.")
    if scope:
        return (f"Fix: keep that module out of the trace with routefx.apply(..., leaf_modules=['{scope}']), "
                f"or name the block modules explicitly with blocks=[...]. ({hint})")
    return (f"Fix: this line is in the model's own forward; move it into a submodule and list that in "
            f"leaf_modules=[...], or make the value a Python constant (e.g. from the config). ({hint})")


def _split_containers(graph: fx.Graph, values: dict) -> None:
    """A tuple / list of tensors used whole (a rotary module returning `(cos, sin)`, passed as is
    to every block) is passed as a tuple of its element picks instead: every element is then a
    value of its own that the stream analysis sees (and a route can gather)."""
    for node in list(graph.nodes):
        v = values.get(node)
        if not (type(v) in (tuple, list) and v and all(isinstance(e, torch.Tensor) for e in v)):
            continue  # (named tuples and torch.return_types keep their attributes: left whole)
        whole = [u for u in node.users if not (u.op == "call_function" and u.target in (operator.getitem, getattr))]
        if not whole or node.op == "placeholder":
            continue
        picks, at = [], node
        for i, e in enumerate(v):
            with graph.inserting_after(at):
                at = graph.call_function(operator.getitem, (node, i))
            values[at] = e
            picks.append(at)
        packed = type(v)(picks)
        for u in whole:
            u.args, u.kwargs = fx.node.map_arg((u.args, u.kwargs), lambda n: packed if n is node else n)


def _fold(graph: fx.Graph, folded: list) -> None:
    """Uses of a folded `.tolist()` / `.item()` read its traced value (a guard re-checks it)."""
    for node, value in folded:
        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: value if n is node else n)
        graph.erase_node(node)


def _insert_guards(graph: fx.Graph, guards: list) -> None:
    for node, kind, value, where in guards:
        with graph.inserting_after(node):
            g = graph.call_function(check_guard, (node, kind, value, where))
        g.meta["routefx"] = {"guard": where, "guarded": node}
