"""fake_run: run a model's modules on fake tensors without leaving fakes behind (and, for the
real forwards of capture, `state_kept`: without moving its RNG or buffers).

The passes run leaf modules on fake tensors (shapes only). Two things make that leave the model
different from before:

* Parameters and buffers are real: ops mixing real and fake tensors bypass fake-tensor dispatch's
  cache and cost about twice as much. They are swapped for fake copies during the run.
* Modules cache what they compute (`functools.lru_cache` on a method, rotary tables kept in
  `self._cache`, a tensor assigned to `self.freqs`). A value computed during a fake run is a fake
  tensor: kept, it would reach the next real forward and fail there, far from the cause. Every
  attribute of the modules that comes out holding a fake tensor is put back as it was (a dict
  mutated in place loses its fake entries), and every `lru_cache` of the modules' classes and
  their source modules that grew during the run is cleared.

Hooks do not run on fake values: a module's forward hooks are set aside during the run (an FSDP2
unit would all-gather its shards on fake tensors and keep fake unsharded parameters; a user's
hook would log or count a step that did not happen). A sharded parameter (a DTensor) is seen as a
fake tensor of its full shape, as the module sees it unsharded.
"""
import contextlib
import functools
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["fake_run", "not_real", "own_forward", "rng_preserved", "state_kept"]

_MODULE_STATE = {"_parameters", "_buffers", "_modules"}
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@contextlib.contextmanager
def fake_run(module: torch.nn.Module, mode):
    """While fake values run through `module` (a no-op for real runs, `mode` None)."""
    if mode is None:
        yield
        return
    mods = list(module.modules())
    caches = {id(c): c for m in mods for c in _lru_caches(type(m))}
    sizes = {k: c.cache_info().currsize for k, c in caches.items()}
    before = [(m, dict(m.__dict__)) for m in mods]
    saved, hooks = [], [(m, h, m.__dict__[h]) for m in mods for h in _HOOKS if m.__dict__.get(h)]
    try:
        for m, h, _ in hooks:
            m.__dict__[h] = type(m.__dict__[h])()  # (the same dict goes back: handles stay valid)
        for m in mods:
            for store in (m._parameters, m._buffers):
                for k, v in store.items():
                    if v is None or isinstance(v, FakeTensor):
                        continue
                    saved.append((store, k, v))
                    store[k] = _fake_of(v, mode)
        yield
    finally:
        for store, k, v in reversed(saved):
            store[k] = v
        for m, h, d in hooks:
            m.__dict__[h] = d
        for m, state in before:
            _put_back(m, state)
        for k, c in caches.items():
            if c.cache_info().currsize != sizes[k]:
                c.cache_clear()


def _fake_of(v: torch.Tensor, mode):
    if type(v) in (torch.Tensor, torch.nn.Parameter):
        return mode.from_tensor(v, static_shapes=True)
    with mode:  # a DTensor (sharded) or another subclass: a fake plain tensor of its full shape
        return torch.empty(v.shape, dtype=v.dtype, device=v.device, requires_grad=v.requires_grad)


def _put_back(m: torch.nn.Module, state: dict) -> None:
    for k, v in list(m.__dict__.items()):
        if k in _MODULE_STATE or not _holds_fake(v):
            continue
        old = state.get(k, _MISSING)
        if old is v and isinstance(v, dict):  # a cache dict filled in place: drop the fake entries
            for key in [key for key, x in v.items() if _holds_fake(x)]:
                del v[key]
        elif old is _MISSING:
            del m.__dict__[k]
        else:
            m.__dict__[k] = old
    for store in (m._buffers, m._parameters):  # registered during the run
        for k in [k for k, v in store.items() if isinstance(v, FakeTensor)]:
            del store[k]


_MISSING = object()


def _holds_fake(v, depth=3) -> bool:
    if isinstance(v, FakeTensor):
        return True
    if depth == 0:
        return False
    if isinstance(v, dict):
        return any(_holds_fake(x, depth - 1) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_fake(x, depth - 1) for x in v)
    return False


@functools.lru_cache(maxsize=None)
def _lru_caches(cls) -> tuple:
    """`functools.lru_cache` wrappers reachable from `cls`: its methods (also behind wrappers that
    close over them) and the functions of the modules that define it and its bases."""
    found = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "builtins")):
            continue
        spaces = [vars(klass)]
        src = sys.modules.get(klass.__module__)
        if src is not None:
            spaces.append(vars(src))
        for space in spaces:
            for obj in list(space.values()):
                for c in _caches_of(obj):
                    found[id(c)] = c
    return tuple(found.values())


def _caches_of(obj, depth=3) -> list:
    obj = getattr(obj, "__func__", obj)  # staticmethod / classmethod
    if depth == 0 or not callable(obj):
        return []
    if hasattr(obj, "cache_info") and hasattr(obj, "cache_clear"):
        return [obj]
    out = []
    inner = getattr(obj, "__wrapped__", None)
    if inner is not None:
        out += _caches_of(inner, depth - 1)
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            out += _caches_of(cell.cell_contents, depth - 1)
        except ValueError:  # an empty cell
            pass
    return out


def own_forward(model: torch.nn.Module):
    """The forward capture traces: the class's, called directly. Capture's real runs of the model
    use it, not `model(...)`: the model's `forward` attribute is its Router, and wrappers set
    around it (accelerate's autocast decorator) must not be entered again from inside."""
    return functools.partial(type(model).forward, model)


def not_real(model: torch.nn.Module, tensors) -> str:
    """Why `model` cannot run on real values here ("" if it can): meta tensors, or parameters
    that are not plain tensors (sharded)."""
    if any(t.is_meta for t in tensors) or any(p.is_meta for p in model.parameters()):
        return "meta tensors"
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in model.parameters()):
        return "parameters are not plain tensors (sharded)"
    return ""


@contextlib.contextmanager
def rng_preserved(tensors):
    """Leave the global RNG state (CPU and the CUDA devices of `tensors`) as it was."""
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def state_kept(model: torch.nn.Module, tensors):
    """Global RNG and buffers (BatchNorm statistics) as they were after the block: for the real
    forwards of capture, which must leave no trace."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with rng_preserved(tensors):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
