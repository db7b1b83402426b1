"""Flatten nested call arguments / outputs into tensor leaves and a rebuildable skeleton."""
import dataclasses
from typing import Any, Callable

import torch

__all__ = ["flatten", "TensorSlot"]


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Stands for a tensor leaf inside a skeleton; `shape` without the batch dim unless kept; the
    device, because a capture reads `x.device` as a constant."""

    ndim: int
    dtype: torch.dtype
    shape: tuple = ()
    device: torch.device = None


def _is_leaf(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or type(x).__name__ in ("Proxy", "ShadowProxy", "Attribute")


def flatten(obj: Any, is_leaf: Callable[[Any], bool] = _is_leaf, slot=None):
    """Return (leaves, skeleton, rebuild): `rebuild(leaves)` gives `obj` back with new leaves.

    Handles tuples, lists, named tuples, dicts and dataclasses (kept as their own type);
    anything else is a constant. `slot(leaf)` makes the skeleton entry of a leaf.
    """
    leaves: list = []
    slot = slot or (lambda leaf: None)

    def walk(x):
        if is_leaf(x):
            leaves.append(x)
            i = len(leaves) - 1
            return slot(x), lambda vals: vals[i]
        if isinstance(x, (tuple, list)):
            parts = [walk(v) for v in x]
            skel = (type(x), tuple(p[0] for p in parts))
            if hasattr(x, "_fields"):  # named tuple
                return skel, lambda vals: type(x)(*(p[1](vals) for p in parts))
            return skel, lambda vals: type(x)(p[1](vals) for p in parts)
        if isinstance(x, dict):
            keys = list(x)
            parts = [walk(x[k]) for k in keys]
            skel = (type(x), tuple(zip(keys, (p[0] for p in parts))))
            return skel, lambda vals: _rebuild_dict(x, keys, [p[1](vals) for p in parts])
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            names = [f.name for f in dataclasses.fields(x) if f.init]
            parts = [walk(getattr(x, n)) for n in names]
            skel = (type(x), tuple(zip(names, (p[0] for p in parts))))
            return skel, lambda vals: type(x)(**{n: p[1](vals) for n, p in zip(names, parts)})
        return ("const", x), lambda vals: x

    skeleton, rebuild = walk(obj)
    return leaves, skeleton, rebuild


def _rebuild_dict(orig: dict, keys: list, values: list) -> dict:
    """A dict of `orig`'s type; one that is also a dataclass (diffusers' `BaseOutput`, an
    `OrderedDict` dataclass holding its non-None fields) is built from its fields by keyword."""
    items = dict(zip(keys, values))
    if dataclasses.is_dataclass(orig):
        names = {f.name for f in dataclasses.fields(orig) if f.init}
        if set(keys) <= names:
            return type(orig)(**items)
    try:
        return type(orig)(items)
    except TypeError:
        return items
